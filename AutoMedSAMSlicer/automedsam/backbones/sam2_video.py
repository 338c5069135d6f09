"""sam2's video predictor over frames handed to it: propagation treats a volume's slices as video
frames, and sam2 1.1.0 can only read frames from image files (``init_state(video_path)``). This
subclass starts its inference state from frames instead; sam2 is imported with this module, which
is only imported when a SAM 2 propagation needs it."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from sam2.sam2_video_predictor import SAM2VideoPredictor


class FramesVideoPredictor(SAM2VideoPredictor):
    """A ``SAM2VideoPredictor`` whose state comes from :meth:`init_state_from_frames`."""

    @torch.inference_mode()
    def init_state_from_frames(self, frames: Sequence[torch.Tensor], size: int,
                               offload_state_to_cpu: bool = False) -> dict:
        """The inference state ``init_state`` would build, for ``frames`` (``frames[k]``: a
        ``(3, S, S)`` normalised float tensor, made when asked for) whose "video" resolution is
        ``size`` x ``size``: masks then come back in model space. The keys are those of sam2
        1.1.0's ``init_state`` (pinned in pyproject.toml; a test compares them)."""
        return {
            "images": frames,
            "num_frames": len(frames),
            "offload_video_to_cpu": True,
            "offload_state_to_cpu": offload_state_to_cpu,
            "video_height": size,
            "video_width": size,
            "device": self.device,
            "storage_device": torch.device("cpu") if offload_state_to_cpu else self.device,
            "point_inputs_per_obj": {},
            "mask_inputs_per_obj": {},
            "cached_features": {},
            "constants": {},
            "obj_id_to_idx": OrderedDict(),
            "obj_idx_to_id": OrderedDict(),
            "obj_ids": [],
            "output_dict_per_obj": {},
            "temp_output_dict_per_obj": {},
            "frames_tracked_per_obj": {},
        }
