"""One registry of inference backbones: every engine, worker session, batch worker and teach gets its
backbone here, so a model is loaded once per process and configuration.

A backbone is keyed by its catalog id, where its weights come from (the verified cache, a file, or a
random seed), the device and the CPU runtime (:class:`Runtime`). What the registry hands out is
shared and never changed by a session:

- a bundle's fine-tuned mask decoder is its own module on a view of the shared backbone
  (:meth:`~automedsam.backbones.base.Backbone.with_decoder`), shared by the sessions of that bundle;
- a session that runs out of CUDA memory asks for the same backbone on the CPU (:meth:`ModelRegistry.on_device`)
  and moves alone; the other sessions keep the GPU;
- training works on :meth:`~automedsam.backbones.base.Backbone.trainable`, a view with PyTorch's
  decoder (and its own copy of the decoder when it is fine-tuned).

Backbones live as long as someone uses them (weak references) plus the ``keep`` most recently asked
for, so a CLI run, a worker that opens session after session and the Slicer module all reuse one
loaded model without holding every model ever opened.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..bundle import ModelBundle
    from .base import Backbone

__all__ = ["ModelRegistry", "Runtime", "default_registry", "set_default_registry"]


@dataclass(frozen=True)
class Runtime:
    """Where inference runs: ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``) and ``cpu``, the CPU
    runtime of the exportable parts (``auto``, ``openvino``, ``openvino-bf16``, ``openvino-f32``,
    ``onnxruntime``, ``torch``; see :mod:`automedsam.backbones.runtime`)."""

    device: str = "auto"
    cpu: str = "auto"

    @classmethod
    def from_environment(cls, device: str = "auto") -> Runtime:
        """The user's process-wide choice: ``$AUTOMEDSAM_CPU_RUNTIME`` (else ``auto``). Read here only,
        at the edges (the CLI, the worker, batch processes), never inside the library."""
        from ..errors import InvalidInputError
        from .runtime import RUNTIME_ENV, RUNTIMES

        name = os.environ.get(RUNTIME_ENV, "").strip().lower() or "auto"
        if name not in RUNTIMES:
            raise InvalidInputError(f"{RUNTIME_ENV}={name!r} is not a CPU runtime; use one of: {', '.join(RUNTIMES)}")
        return cls(device, name)

    def on(self, device: str | None) -> Runtime:
        """The same runtime on ``device`` (None or ``""`` keeps this one's)."""
        return dataclasses.replace(self, device=device) if device else self

    def resolved(self) -> Runtime:
        """Concrete names: the device as torch names it (``cpu``, ``cuda:0``) and the installed CPU runtime.

        Raises:
            InvalidInputError: an unknown device or runtime, or CUDA asked for without a GPU.
            RuntimeUnavailableError: a runtime named explicitly that is not installed.
        """
        from . import resolve_device
        from .runtime import resolve_runtime

        dev = resolve_device(self.device)
        if dev.type == "cuda" and dev.index is None:
            import torch

            dev = torch.device("cuda", torch.cuda.current_device())
        return Runtime(str(dev), resolve_runtime(self.cpu))


@dataclass(frozen=True)
class _Key:
    backbone_id: str
    source: tuple  # ("cache",), ("random", seed) or ("file", path, mtime_ns, size)
    runtime: Runtime
    decoder: str | None = None  # a bundle's fine-tuned decoder: the sha256 of the bundle's weights


class ModelRegistry:
    """Builds backbones once and hands out shared, unchanging ones (thread-safe).

    Args:
        runtime: the default :class:`Runtime` (calls may name another device or CPU runtime).
        keep: backbones held even while no engine uses them (the most recently asked for).
    """

    def __init__(self, runtime: Runtime | None = None, keep: int = 2):
        self.runtime = runtime or Runtime()
        self._keep = keep
        self._lock = threading.RLock()
        self._live: weakref.WeakValueDictionary[_Key, Backbone] = weakref.WeakValueDictionary()
        self._recent: OrderedDict[_Key, Backbone] = OrderedDict()
        self._keys: weakref.WeakKeyDictionary[Backbone, _Key] = weakref.WeakKeyDictionary()
        #: How many backbones (and fine-tuned decoders) this registry has built: what tests count.
        self.builds = 0

    def backbone(self, backbone_id: str, *, weights: str | os.PathLike | None = None, seed: int = 0,
                 runtime: Runtime | None = None) -> Backbone:
        """The shared backbone ``backbone_id`` (``weights`` and ``seed`` as for
        :func:`automedsam.backbones.build_backbone`) on ``runtime`` (default: the registry's)."""
        key = _Key(backbone_id, _source(weights, seed), (runtime or self.runtime).resolved())
        return self._get(key, lambda: self._build(key))

    def for_bundle(self, bundle: ModelBundle, runtime: Runtime | None = None) -> Backbone:
        """The backbone ``bundle`` was trained with (the same weights or random seed), with the bundle's
        fine-tuned decoder when it has one (a view sharing the encoders, one per bundle); checked
        against the bundle's weights fingerprint."""
        fingerprint = bundle.backbone_weights
        if fingerprint.startswith("random:seed="):
            base = self.backbone(bundle.backbone_id, weights="random", seed=int(fingerprint.split("=", 1)[1]),
                                 runtime=runtime)
        else:
            base = self.backbone(bundle.backbone_id, runtime=runtime)
        bundle.check_backbone(base)
        state = bundle.decoder_state()
        if state is None:
            return base
        key = dataclasses.replace(self._keys[base], decoder=bundle.weights_sha256)
        return self._get(key, lambda: base.with_decoder(state))

    def on_device(self, backbone: Backbone, device: str) -> Backbone:
        """The backbone this registry handed out as ``backbone``, on ``device`` instead (a session's
        own fall-back: the others keep theirs), with the same fine-tuned decoder."""
        with self._lock:
            key = self._keys.get(backbone)
        if key is None:
            raise ValueError(f"backbone {backbone.id} did not come from this registry")
        base_key = dataclasses.replace(key, runtime=key.runtime.on(device).resolved(), decoder=None)
        base = self._get(base_key, lambda: self._build(base_key))
        if key.decoder is None:
            return base
        state = {k: v.detach().cpu() for k, v in backbone.mask_decoder.state_dict().items()}
        return self._get(dataclasses.replace(base_key, decoder=key.decoder), lambda: base.with_decoder(state))

    def _get(self, key: _Key, build) -> Backbone:
        with self._lock:
            backbone = self._live.get(key)
            if backbone is None:
                backbone = build()
                self.builds += 1
                self._live[key] = backbone
                self._keys[backbone] = key
            self._recent[key] = backbone
            self._recent.move_to_end(key)
            while len(self._recent) > self._keep:
                self._recent.popitem(last=False)
            return backbone

    @staticmethod
    def _build(key: _Key) -> Backbone:
        from . import build_backbone

        kind = key.source[0]
        weights = None if kind == "cache" else ("random" if kind == "random" else key.source[1])
        seed = key.source[1] if kind == "random" else 0
        return build_backbone(key.backbone_id, weights=weights, seed=seed, device=key.runtime.device,
                              runtime=key.runtime.cpu)


def _source(weights, seed: int) -> tuple:
    if weights is None:
        return ("cache",)
    if weights == "random":
        return ("random", int(seed))
    path = Path(weights).resolve()
    try:
        stat = path.stat()
    except OSError:
        return ("file", str(path), None, None)  # build_backbone says the file is missing
    return ("file", str(path), stat.st_mtime_ns, stat.st_size)


_default: ModelRegistry | None = None
_default_lock = threading.Lock()


def default_registry() -> ModelRegistry:
    """The process's registry, made on first use with :meth:`Runtime.from_environment`."""
    global _default
    with _default_lock:
        if _default is None:
            _default = ModelRegistry(Runtime.from_environment())
        return _default


def set_default_registry(registry: ModelRegistry) -> ModelRegistry:
    """Make ``registry`` the process's (the CLI's ``--cpu-runtime``; tests); returns it."""
    global _default
    with _default_lock:
        _default = registry
    return registry
