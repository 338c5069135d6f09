"""The embeddings of one volume's slices: kept in memory (float16 on the CPU), on disk (one
safetensors file per slice under a key of the volume's content, the backbone's weights and the
preprocessing), and computed by the encoder in batches when neither has them. A CUDA out-of-memory
error halves the batch, and at batch 1 asks the owner for a CPU backbone (slower, but the run
finishes; the shared backbone, and every other session on it, stays on the GPU).

Slices are ``k`` indices of the volume's ``(K, J, I)`` array; the backbone sees each one as its
``(S, S, 3)`` model input (see :class:`~automedsam.preprocess.SliceTransform`), framed as the
:class:`~automedsam.framing.Framing` given to :meth:`EmbeddingStore.set_volume` says.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import InvalidInputError
from .framing import Framing, frame_slices
from .preprocess import IntensityConfig, normalize_intensity
from .volume import Volume

if TYPE_CHECKING:
    from .backbones import Backbone, ImageFeatures

log = logging.getLogger(__name__)


class EmbeddingStore:
    """Encoded slices of the volume given to :meth:`set_volume`.

    Args:
        backbone: the frozen backbone that encodes.
        batch_size: slices per encoder batch; None: 4 on CUDA, 1 on the CPU.
        cache_dir: folder of the on-disk cache (None: memory only).
        note: called with a message for the user when the store changes course (smaller batches,
            CPU fallback); logged as a warning too.
        on_out_of_memory: called when CUDA runs out of memory at batch 1; returns the backbone to
            go on with (the owner's CPU one; the owner moves what else it holds on the GPU). None:
            the error is raised.
    """

    def __init__(self, backbone: Backbone, batch_size: int | None = None, cache_dir: str | None = None,
                 note: Callable[[str], None] | None = None,
                 on_out_of_memory: Callable[[], Backbone] | None = None):
        self.backbone = backbone
        self._batch_size = batch_size
        self.cache_dir = cache_dir
        self._note = note
        self._on_out_of_memory = on_out_of_memory
        self.volume: Volume | None = None
        self._features: dict[int, ImageFeatures] = {}

    def set_volume(self, volume: Volume, intensity: IntensityConfig, framing: Framing | None = None) -> None:
        """Take ``volume`` (its slices are encoded lazily) with the intensity preprocessing and the
        framing (default: SAM's resize) to use."""
        self.volume = volume
        self.intensity = intensity
        self.framing = framing or Framing()
        self.value_range = intensity.value_range(volume.array)
        self.transform = frame_slices(self.backbone, volume, self.framing, intensity)
        self._features = {}
        # The encoder's runtime is part of the key: bf16 embeddings are not PyTorch's fp32 ones.
        key = "|".join([volume.content_hash(), self.backbone.id, self.backbone.weights_fingerprint,
                        json.dumps(intensity.to_dict(), sort_keys=True), str(self.backbone.input_size),
                        self.backbone.runtime_id("encoder"), json.dumps(self.transform.describe(), sort_keys=True)])
        self.cache_key = hashlib.sha256(key.encode()).hexdigest()[:32]

    def sharing(self, backbone: Backbone) -> EmbeddingStore:
        """A store on this store's volume that decodes with ``backbone`` (a view of the same image
        encoder: a training view, another decoder) and shares this store's embeddings: what either
        encodes, both have. Until either takes another volume.

        Raises:
            ValueError: ``backbone`` encodes with another image encoder, or no volume is set.
        """
        if not backbone.same_encoder(self.backbone):
            raise ValueError(f"backbone {backbone.id} has another image encoder; its embeddings would not be these")
        self.require_volume()
        other = EmbeddingStore(backbone, self._batch_size, self.cache_dir, self._note)
        other.volume, other.intensity, other.value_range = self.volume, self.intensity, self.value_range
        other.framing = self.framing
        other.transform, other.cache_key, other._features = self.transform, self.cache_key, self._features
        return other

    def clear(self) -> None:
        """Forget the volume and its embeddings held in memory (the disk cache stays)."""
        self.volume, self._features = None, {}

    def require_volume(self) -> Volume:
        if self.volume is None:
            raise InvalidInputError("no volume set: call set_volume(volume) first")
        return self.volume

    def check_slice(self, k) -> int:
        """``k`` as an int, or InvalidInputError naming the volume's slice range."""
        return self.require_volume().check_slice(k)

    @property
    def batch_size(self) -> int:
        """Encoder batch: the configured one, else 4 on CUDA and 1 on the CPU."""
        return self._batch_size or (4 if self.backbone.device.type == "cuda" else 1)

    def model_input(self, k: int) -> np.ndarray:
        """Slice k as the backbone's ``(S, S, 3)`` float input in [0, 1]."""
        volume = self.require_volume()
        return self.transform.image_to_model(normalize_intensity(volume.array[k], self.value_range))

    def encode(self, slices: Sequence[int]) -> int:
        """Make sure ``slices`` are encoded (memory, then disk cache, then the encoder in batches).
        Returns how many slices ran through the encoder."""
        import torch

        todo = []
        for k in slices:
            k = self.check_slice(k)
            if k in self._features:
                continue
            cached = self._load_cached(k)
            if cached is not None:
                self._features[k] = cached
            else:
                todo.append(k)
        batch = self.batch_size
        n = 0
        while n < len(todo):
            ks = todo[n:n + batch]
            try:
                feats = self.backbone.encode(np.stack([self.model_input(k) for k in ks]))
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                if batch > 1:
                    batch = max(1, batch // 2)
                    self._tell(f"CUDA out of memory: retrying with encoder batch {batch}")
                    continue
                if self._on_out_of_memory is None:
                    raise
                self._tell("CUDA out of memory with batch 1: this session goes on on the CPU (slower)")
                self.backbone = self._on_out_of_memory()
                continue
            for idx, k in enumerate(ks):
                one = feats.select(idx).to("cpu", torch.float16)
                self._features[k] = one
                self._store_cached(k, one)
            n += len(ks)
        return len(todo)

    def features(self, k: int) -> ImageFeatures:
        """Float32 features of slice k on the backbone's device (batch of 1)."""
        import torch

        self.encode([k])
        return self._features[k].to(self.backbone.device, torch.float32)

    def _tell(self, message: str) -> None:
        log.warning(message)
        if self._note is not None:
            self._note(message)

    # --------------------------------------------------------------------------- disk cache
    def _disk_path(self, k: int) -> Path | None:
        if not self.cache_dir:
            return None
        return Path(self.cache_dir) / self.cache_key / f"slice_{k:05d}.safetensors"

    def _load_cached(self, k: int) -> ImageFeatures | None:
        path = self._disk_path(k)
        if path is None or not path.is_file():
            return None
        from safetensors.torch import load_file

        from .backbones import ImageFeatures

        try:
            t = load_file(str(path))
        except Exception:  # a damaged cache file is re-encoded, never trusted
            log.warning("ignoring unreadable embedding cache file %s", path)
            return None
        n_high = len([key for key in t if key.startswith("high_res_")])
        return ImageFeatures(t["embeddings"], tuple(t[f"high_res_{n}"] for n in range(n_high)))

    def _store_cached(self, k: int, feats: ImageFeatures) -> None:
        path = self._disk_path(k)
        if path is None:
            return
        import os

        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"embeddings": feats.embeddings.contiguous()}
        tensors.update({f"high_res_{n}": h.contiguous() for n, h in enumerate(feats.high_res)})
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, path)
