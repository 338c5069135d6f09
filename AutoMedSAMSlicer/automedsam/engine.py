"""The inference engine: one expensive encoder pass per slice, cheap segment / refine / propagate.

Coordinates in every public call are voxel indices of the volume set with :meth:`Engine.set_volume`:
``slice_index`` is ``k`` (``volume.array[k]``), points are ``(i, j)`` (column, row) on that slice,
boxes are ``(i0, j0, i1, j1)`` indices of their extreme voxels (inclusive). Masks are boolean
arrays ``(J, I)`` per slice or ``(K, J, I)`` per volume, on the volume's own grid, so they carry the
volume's geometry (any direction, flipped or oblique) unchanged. The engine maps to and from model
pixels with :class:`~automedsam.preprocess.SliceTransform`.

Long work (``segment``, ``propagate``, ``teach``) is a generator of events; the last event of a
completed run carries the result. Results are stored only when a run completes, so a cancelled run
(consumer stops iterating, or ``cancel`` is set) changes nothing. Changes to a class's masks can be
undone with :meth:`Engine.undo` (the last ``EngineConfig.undo_steps`` of them).

The engine is a facade (:class:`automedsam.contract.SegmentationEngine`) over parts with one job
each: :class:`~automedsam.embeddings.EmbeddingStore` (slice embeddings: memory, disk, batches,
out-of-memory fall-back), :class:`~automedsam.automatic.LearnedPrompts` (the prompt network's
prompts and memoised automatic results), :class:`~automedsam.refinement.Refiner` (interactive
correction), :class:`~automedsam.history.UndoStack` (undo) and :mod:`automedsam.propagation`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .automatic import LearnedPrompts
from .classes import ClassCatalog, ClassInfo, resolve_class
from .contract import ProgressEvent, SegmentationResult, TrainEvent, result_of
from .embeddings import EmbeddingStore
from .errors import InvalidInputError
from .history import PackedMask, UndoStack
from .preprocess import IntensityConfig, SliceTransform
from .refinement import Refiner
from .volume import Volume

if TYPE_CHECKING:
    import threading

    from .backbones import Backbone, ImageFeatures
    from .bundle import ModelBundle
    from .propagation import SliceSource

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    """Engine settings.

    Attributes:
        batch_size: slices per encoder batch (halved automatically on CUDA out-of-memory); None: 4 on
            CUDA, 1 on the CPU (measured: ViT-B at 1024 px runs ~1.6x slower per slice in batches of
            4 on a 2-core CPU, and needs 11 GB).
        cache_dir: folder for the on-disk embedding cache (None: memory only).
        objectness_threshold: a class is predicted on a slice only if its objectness logit is above.
        mask_threshold: logit threshold of the final masks.
        cleanup: ``"largest_component"`` keeps each class's largest 3-D connected component
            after ``segment``; ``"none"`` keeps everything.
        intensity: override the bundle's intensity preprocessing.
        prompt_cache_size: (class, slice) learned prompts kept for fast repeated refines.
        result_cache_mb: memory for memoised automatic low-resolution logits (0 disables).
        stop_fraction: propagation stops where a slice's mask shrinks below this fraction of the
            previous slice's (the object ends).
        propagation: ``"memory"`` (SAM 2 only), ``"seeded"`` (previous mask as box + mask
            prompt), ``"learned"`` (one-shot class map from the seed slice) or ``"auto"`` (see
            :func:`automedsam.propagation.propagation_method`).
        undo_steps: changes kept for :meth:`Engine.undo`, over all classes (oldest dropped first).
    """

    batch_size: int | None = None
    cache_dir: str | None = None
    objectness_threshold: float = 0.0
    mask_threshold: float = 0.0
    cleanup: str = "largest_component"
    intensity: IntensityConfig | None = None
    prompt_cache_size: int = 64
    result_cache_mb: int = 256
    stop_fraction: float = 0.15
    propagation: str = "auto"
    undo_steps: int = 30

    def __post_init__(self) -> None:
        if self.propagation not in ("auto", "memory", "seeded", "learned"):
            raise InvalidInputError(f"propagation must be auto, memory, seeded or learned, got {self.propagation!r}")
        if self.batch_size is not None and self.batch_size < 1:
            raise InvalidInputError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.cleanup not in ("largest_component", "none"):
            raise InvalidInputError(f"cleanup must be 'largest_component' or 'none', got {self.cleanup!r}")
        if self.undo_steps < 1:
            raise InvalidInputError(f"undo_steps must be >= 1, got {self.undo_steps}")


#: One undo step of one class: (slice k, its mask before) pairs; k None: the whole ``(K, J, I)``
#: masks before (None: the class had none).
UndoGroup = list[tuple[int | None, PackedMask | None]]


class Engine:
    """Segment a volume with a backbone and (optionally) a model bundle's prompt network.

    ``bundle`` None allows manual prompting only (plain SAM behaviour). The backbone must be the
    one the bundle was trained with (see :func:`automedsam.bundle.backbone_for_bundle`); make one
    with :meth:`from_bundle` or :meth:`manual`.
    """

    def __init__(self, backbone: Backbone, bundle: ModelBundle | None = None, config: EngineConfig | None = None):
        self.config = config or EngineConfig()
        self.messages: list[str] = []
        self.history: UndoStack[UndoGroup] = UndoStack(self.config.undo_steps)
        self.masks: dict[str, np.ndarray] = {}
        self._load(backbone, bundle)

    def _load(self, backbone: Backbone, bundle: ModelBundle | None) -> None:
        """The parts on ``backbone``, with ``bundle``'s prompt network when there is one."""
        self.backbone, self.bundle = backbone, bundle
        self.store = EmbeddingStore(backbone, self.config.batch_size, self.config.cache_dir,
                                    note=self.messages.append, on_cpu_fallback=self._after_cpu_fallback)
        self.learned = LearnedPrompts(self.store, self.config.prompt_cache_size, self.config.result_cache_mb << 20)
        self.refiner = Refiner(self.store, self.learned, self.config.mask_threshold)
        self._extra_classes: dict[str, ClassInfo] = {}
        if bundle is not None:
            bundle.check_backbone(backbone)
            self.use_prompt_network(bundle.build_prompt_network(backbone.device), bundle.classes)

    @classmethod
    def from_bundle(cls, bundle: str | os.PathLike | ModelBundle, device: str = "auto",
                    config: EngineConfig | None = None) -> Engine:
        """An engine for a model bundle (a path, or a loaded :class:`~automedsam.bundle.ModelBundle`)
        on the backbone it was trained with (see :func:`automedsam.bundle.backbone_for_bundle`)."""
        from .bundle import backbone_for_bundle, load_bundle

        if isinstance(bundle, (str, os.PathLike)):
            bundle = load_bundle(bundle)
        return cls(backbone_for_bundle(bundle, device), bundle, config)

    @classmethod
    def manual(cls, backbone_id: str | None = None, device: str = "auto", weights: str | None = None,
               config: EngineConfig | None = None) -> Engine:
        """A manual-mode engine (points and boxes only, like plain SAM) on a catalog backbone
        (default: :data:`automedsam.models.DEFAULT_BACKBONE`); ``weights`` as for
        :func:`automedsam.backbones.build_backbone`."""
        from .backbones import build_backbone
        from .models import DEFAULT_BACKBONE

        return cls(build_backbone(backbone_id or DEFAULT_BACKBONE, weights=weights, device=device), None, config)

    def sibling(self) -> Engine:
        """A new engine on the same loaded model (backbone and bundle shared; no volume, masks or
        history): one per worker session, while the model stays loaded once."""
        return type(self)(self.backbone, self.bundle, self.config)

    # ------------------------------------------------------------------- prompt network
    @property
    def prompt_network(self):
        """The bundle's prompt network (a torch module), or None in manual mode."""
        return self.learned.network

    @property
    def class_catalog(self) -> ClassCatalog:
        return self.learned.class_catalog

    def use_prompt_network(self, network, classes: Sequence[ClassInfo]) -> None:
        """Use a prompt network whose class indices follow ``classes`` (a bundle's, or one being
        trained); forgets its learned prompts and memoised results."""
        self.learned.use(network, classes)

    def clear_result_cache(self) -> None:
        """Forget memoised automatic results (call after changing prompt network or decoder weights)."""
        self.learned.clear()

    def _after_cpu_fallback(self) -> None:
        if self.learned.network is not None:
            self.learned.network.to("cpu")
        self.learned.clear()

    # ------------------------------------------------------------------------------ volume
    @property
    def volume(self) -> Volume | None:
        return self.store.volume

    @property
    def transform(self) -> SliceTransform:
        """Voxels of a slice <-> the backbone's model input (see :mod:`automedsam.preprocess`)."""
        return self.store.transform

    def set_volume(self, volume: Volume) -> None:
        """Take a new volume (KJI array, any geometry). Cheap: slices are encoded lazily, on first
        use, and reused by every class; previous masks and undo history are dropped."""
        if not isinstance(volume, Volume):
            raise InvalidInputError(f"set_volume needs a Volume, got {type(volume).__name__}")
        intensity = self.config.intensity or (self.bundle.intensity if self.bundle else IntensityConfig.ct())
        if volume.is_rgb and intensity.mode != "rgb":
            intensity = IntensityConfig.rgb()
        self.store.set_volume(volume, intensity)
        self.masks = {}
        self.history.clear()
        self.learned.clear()
        self.refiner.clear()

    def require_volume(self) -> Volume:
        """The volume; raises InvalidInputError when none was set."""
        return self.store.require_volume()

    def model_input(self, k: int) -> np.ndarray:
        """Slice k as the backbone's ``(S, S, 3)`` float input in [0, 1]."""
        return self.store.model_input(k)

    def encode(self, slices: Sequence[int]) -> int:
        """Encode ``slices`` now (see :meth:`EmbeddingStore.encode`); how many ran through the encoder."""
        return self.store.encode(slices)

    def features(self, k: int) -> ImageFeatures:
        """Float32 features of slice k on the backbone's device (batch of 1)."""
        return self.store.features(k)

    # ---------------------------------------------------------------------------- classes
    def class_info(self, name: str) -> ClassInfo:
        """The bundle's class for a name or alias. Manual mode also accepts other names: the shipped
        class catalog's (so "liver" is SNOMED-coded Liver there too), else a new custom class."""
        if name in self.class_catalog:
            return self.class_catalog.get(name)
        if self.prompt_network is not None and name not in self._extra_classes:
            raise InvalidInputError(
                f"class {name!r} is not one the model knows; it has: {', '.join(self.class_catalog.names())}"
            )
        if name not in self._extra_classes:
            self._extra_classes[name] = resolve_class(name)
        return self._extra_classes[name]

    # ---------------------------------------------------------------------------- segment
    def segment(self, classes: Sequence[str], slices: Sequence[int] | None = None, *, cleanup: str | None = None,
                cancel: threading.Event | None = None) -> Iterator[ProgressEvent]:
        """Automatic masks for ``classes`` on ``slices`` (default: all), as a generator of events.

        One encoder pass per slice serves every class; per-slice objectness gating; optional 3-D
        cleanup. The final ``"done"`` event carries the :class:`SegmentationResult`; the masks are
        then stored (undoable). Slices outside ``slices`` keep the masks they have. Stopping early
        (or ``cancel.set()``) stores nothing. Bad input is refused when called, before any work.
        """
        volume = self.require_volume()
        if self.prompt_network is None:
            raise InvalidInputError("automatic segmentation needs a model bundle; without one use refine() with "
                                    "points or a box (manual mode)")
        if not classes:
            raise InvalidInputError(f"no classes given; the bundle has: {', '.join(self.class_catalog.names())}")
        infos = [self.class_info(c) for c in classes]
        ks = list(range(volume.num_slices)) if slices is None else [self.store.check_slice(k) for k in slices]
        if not ks:
            raise InvalidInputError("no slices to segment (empty slice range)")
        if cleanup not in (None, "largest_component", "none"):
            raise InvalidInputError(f"cleanup must be 'largest_component' or 'none', got {cleanup!r}")
        return self._segment_events(volume, infos, ks, cleanup or self.config.cleanup, cancel)

    def _segment_events(self, volume: Volume, infos: list[ClassInfo], ks: list[int], cleanup: str,
                        cancel: threading.Event | None) -> Iterator[ProgressEvent]:
        names = [c.name for c in infos]
        shape = volume.array.shape[:3]
        # Slices outside ``slices`` keep what the class has now (the user's work); the selected ones
        # are recomputed from scratch.
        masks = {n: self.masks[n].copy() if n in self.masks else np.zeros(shape, bool) for n in names}
        for n in names:
            masks[n][ks] = False
        present: dict[str, list[int]] = {n: [] for n in names}
        # Voxel counts for the progress events, kept per slice: summing whole volumes after every
        # slice would cost more than the decoder on a large CT.
        counts = {n: int(masks[n].sum()) for n in names}
        t0 = time.perf_counter()
        yield ProgressEvent("start", 0, len(ks), f"segmenting {len(names)} class(es) on {len(ks)} slice(s)")
        batch = self.store.batch_size
        for start in range(0, len(ks), batch):
            if cancel is not None and cancel.is_set():
                yield ProgressEvent("cancelled", start, len(ks), "cancelled; nothing was changed")
                return
            chunk = ks[start:start + batch]
            self.store.encode(chunk)
            for k in chunk:
                for name, mask in self.learned.slice_masks(k, names, self.config.objectness_threshold,
                                                           self.config.mask_threshold).items():
                    masks[name][k] = mask
                    present[name].append(k)
                    counts[name] += int(np.count_nonzero(mask))
            done = min(start + batch, len(ks))
            yield ProgressEvent("segment", done, len(ks), partial=dict(counts))
        if cleanup == "largest_component":
            yield ProgressEvent("cleanup", len(ks), len(ks), "keeping the largest 3-D component per class")
            for n in names:  # judged in 3-D with the kept slices, applied to the segmented ones only
                masks[n][ks] = largest_component(masks[n])[ks]
                present[n] = [k for k in present[n] if masks[n][k].any()]
        for n in names:
            before = self.masks.get(n)
            self.history.push(n, [(None, None if before is None else PackedMask.of(before))])
            self.masks[n] = masks[n].copy()  # later refines must not change the result handed out
        result = SegmentationResult(volume, masks, infos, ks, present, time.perf_counter() - t0)
        yield ProgressEvent("done", len(ks), len(ks), "done", result=result)

    def segment_volume(self, classes: Sequence[str], slices: Sequence[int] | None = None, *,
                       cleanup: str | None = None, cancel: threading.Event | None = None) -> SegmentationResult:
        """Run :meth:`segment` to the end and return its result."""
        return result_of(self.segment(classes, slices, cleanup=cleanup, cancel=cancel))

    # ----------------------------------------------------------------------------- refine
    def refine(self, class_name: str, slice_index: int, points=None, point_labels=None, box=None,
               mode: str | None = None, reset: bool = False) -> np.ndarray:
        """Correct one slice's mask with manual prompts; returns the new ``(J, I)`` bool mask.

        Args:
            class_name: a bundle class (any name in manual mode).
            slice_index: k.
            points: ``(N, 2)`` voxel coordinates (i, j) on slice k; ``point_labels`` ``(N,)``:
                1 = include (+), 0 = exclude (-).
            box: ``(i0, j0, i1, j1)`` extreme voxel indices of the object on slice k.
            mode: ``"semi"`` (learned prompts of the bundle + the manual ones; Sam2Rad's
                semi-autonomous mode) or ``"manual"`` (manual prompts only, like plain SAM);
                default: semi with a bundle, manual without.
            reset: forget the earlier prompts of this (class, slice) and start over.

        Interactive, as SAM's own loop (see :mod:`automedsam.refinement`): a refine builds on
        what was placed before on the slice as long as the slice still holds the mask that refine
        wrote; an edit made elsewhere (segment, undo, propagate, ``set_masks``) starts a new
        interaction. Points placed before are not added twice when a caller re-sends them all, as
        Slicer's markups do. Decoder-only on the cached embedding. One undo step.
        """
        k = self.store.check_slice(slice_index)
        mode = mode or ("semi" if self.prompt_network is not None else "manual")
        if mode not in ("semi", "manual"):
            raise InvalidInputError(f"mode must be 'semi' or 'manual', got {mode!r}")
        if mode == "semi" and self.prompt_network is None:
            raise InvalidInputError("semi-automatic refine needs a model bundle; use mode='manual'")
        name = self.class_info(class_name).name
        current = self.masks[name][k] if name in self.masks else None
        mask = self.refiner.refine(name, k, current, points, point_labels, box, mode, reset)
        self._set_slices(name, {k: mask})
        return mask

    # ------------------------------------------------------------------------------- undo
    def _set_slices(self, name: str, new: dict[int, np.ndarray]) -> None:
        """Write slice masks for a class as one undoable step."""
        volume = self.require_volume()
        current = self.masks.get(name)
        if current is None:
            current = self.masks[name] = np.zeros(volume.array.shape[:3], bool)
        self.history.push(name, [(k, PackedMask.of(current[k])) for k in new])
        for k, m in new.items():
            current[k] = m

    def undo(self, class_name: str) -> list[int] | None:
        """Undo the last change to a class (a refine, a propagation or a whole segmentation).

        Returns the slice indices that changed (all slices for a segmentation), or None when there
        is nothing to undo.
        """
        name = self.class_info(class_name).name
        group = self.history.pop(name)
        if group is None:
            return None
        changed: list[int] = []
        for k, old in reversed(group):
            if k is None:  # a whole-volume result replaced `old`
                if old is None:
                    self.masks.pop(name, None)
                else:
                    self.masks[name] = old.unpack()
                changed = list(range(self.require_volume().num_slices))
            else:
                self.masks[name][k] = old.unpack()
                changed.append(k)
        return sorted(set(changed))

    def can_undo(self, class_name: str) -> bool:
        return self.history.can_undo(self.class_info(class_name).name)

    def masks_of(self, class_name: str) -> np.ndarray:
        """A copy of the class's ``(K, J, I)`` bool masks (all False where it has none)."""
        volume = self.require_volume()
        masks = self.masks.get(self.class_info(class_name).name)
        return masks.copy() if masks is not None else np.zeros(volume.array.shape[:3], bool)

    def set_masks(self, class_name: str, masks: np.ndarray) -> None:
        """Replace a class's ``(K, J, I)`` bool masks with edits made elsewhere (e.g. in Slicer's
        Segment Editor), so propagation starts from what the user sees. Not an undo step: the
        caller owns the history of its copy."""
        volume = self.require_volume()
        masks = np.asarray(masks)
        if masks.shape != volume.array.shape[:3]:
            raise InvalidInputError(f"masks {masks.shape} are not on the volume grid {volume.array.shape[:3]}")
        self.masks[self.class_info(class_name).name] = masks.astype(bool, copy=True)

    # -------------------------------------------------------------------------- propagate
    def propagate(self, class_name: str, from_slice: int, direction: str = "both",
                  max_slices: int | None = None, cancel: threading.Event | None = None) -> Iterator[ProgressEvent]:
        """Carry the mask of ``from_slice`` to its neighbours until the object ends.

        SAM 2 backbones use their memory (the video predictor over slices); SAM backbones seed
        each next slice with the previous mask (box + mask prompt, plus the learned tokens when a
        bundle is loaded); box-only backbones (LiteMedSAM) teach a one-class class map from the
        seed slice in seconds and prompt the next slices with it. ``direction``: ``"forward"``
        (increasing k), ``"backward"`` or ``"both"``. All slices written form one undo step.
        Events carry the slice just written. Bad input is refused when called, before any work.
        """
        k0 = self.store.check_slice(from_slice)
        if direction not in ("forward", "backward", "both"):
            raise InvalidInputError(f"direction must be forward, backward or both, got {direction!r}")
        if max_slices is not None and max_slices < 1:
            raise InvalidInputError(f"max_slices must be at least 1, got {max_slices}")
        name = self.class_info(class_name).name
        seed = self.masks.get(name)
        if seed is None or not seed[k0].any():
            raise InvalidInputError(f"slice {k0} has no mask for {name!r} to propagate; segment or refine it first")
        return self._propagate_events(name, k0, direction, max_slices, cancel)

    def slice_source(self, class_name: str, from_slice: int) -> SliceSource:
        """What propagation of a class from slice ``from_slice`` reads (see :mod:`automedsam.propagation`)."""
        from .propagation import SliceSource

        info = self.class_info(class_name)
        learned = None
        if self.prompt_network is not None:
            def learned(k, feats, name=info.name):
                return self.learned.prompts(name, k, feats)
        c = self.config
        return SliceSource(self.backbone, self.transform, self.require_volume().num_slices, self.store.model_input,
                           self.store.features, learned, self.masks_of(info.name)[from_slice],
                           info.type_modifier is not None, c.propagation, c.mask_threshold, c.objectness_threshold,
                           c.stop_fraction)

    def _propagate_events(self, name: str, k0: int, direction: str, max_slices: int | None,
                          cancel: threading.Event | None) -> Iterator[ProgressEvent]:
        from .propagation import propagate_slices

        n = self.require_volume().num_slices
        limit = max_slices if max_slices is not None else n
        steps = [+1, -1] if direction == "both" else ([+1] if direction == "forward" else [-1])
        total = sum(min(limit, (n - 1 - k0) if s > 0 else k0) for s in steps)
        written: dict[int, np.ndarray] = {}
        yield ProgressEvent("start", 0, total, f"propagating {name} from slice {k0}")
        for k, mask in propagate_slices(self.slice_source(name, k0), k0, steps, limit):
            if cancel is not None and cancel.is_set():
                yield ProgressEvent("cancelled", len(written), total, "cancelled; nothing was changed")
                return
            written[k] = mask
            yield ProgressEvent("propagate", len(written), total, partial={"slice": k, "voxels": int(mask.sum())})
        if written:
            self._set_slices(name, written)
        yield ProgressEvent("done", len(written), max(total, len(written)),
                            f"propagated to {len(written)} slice(s)", partial={"slices": sorted(written)})

    # ------------------------------------------------------------------------------ teach
    def teach(self, labels: np.ndarray, classes: dict[str, int], save_to: str | Path, *,
              prompt_network: str = "classmap", epochs: int = 40, train_slices: str | None = None,
              val_slices: str | None = "0::3", lr: float | None = None, decoder_lr: float = 1e-5,
              use_now: bool = True, name: str = "taught-in-session",
              cancel: threading.Event | None = None) -> Iterator[TrainEvent]:
        """Teach ``classes`` (name -> label value) from ``labels`` (``(K, J, I)`` label values on the
        volume's grid): train a prompt network of kind ``prompt_network`` on this engine's backbone
        (see :func:`automedsam.training.teach.teach_config`). The bundle is saved to ``save_to`` (a
        rescue folder if that fails); the "done" event's ``bundle_path`` says where. With
        ``use_now`` this engine segments with the new bundle from then on (volume and masks kept).
        Bad input is refused when called, before any work."""
        from .bundle import check_bundle_destination
        from .classes import check_classes_present
        from .training.teach import teach_config

        volume = self.require_volume()
        labels = np.asarray(labels)
        if labels.shape != volume.array.shape[:3]:
            raise InvalidInputError(f"labels {labels.shape} are not on the volume grid {volume.array.shape[:3]}")
        config = teach_config(self, classes, prompt_network=prompt_network, epochs=epochs, train_slices=train_slices,
                              val_slices=val_slices, lr=lr, decoder_lr=decoder_lr, name=name)
        check_classes_present(config.classes, [labels], "the label map")
        check_bundle_destination(save_to, overwrite=True)
        return self._teach_events(labels, config, Path(save_to), use_now, cancel)

    def _teach_events(self, labels, config, save_to: Path, use_now: bool, cancel) -> Iterator[TrainEvent]:
        import dataclasses

        from .rescue import save_or_rescue
        from .training.teach import teach

        for event in teach(self, labels, config, cancel=cancel):
            if event.bundle is not None:
                path = save_or_rescue(event.bundle, save_to)
                if use_now:
                    self.use_bundle(event.bundle)
                event = dataclasses.replace(event, bundle_path=str(path))
            yield event

    def use_bundle(self, bundle: ModelBundle) -> None:
        """Segment with ``bundle`` from now on (one taught on this engine's backbone), keeping the
        volume and the masks; the undo history and cached embeddings start over."""
        from .bundle import backbone_for_bundle

        volume, masks = self.volume, self.masks
        self._load(backbone_for_bundle(bundle, str(self.backbone.device)), bundle)
        if volume is not None:
            self.set_volume(volume)
            self.masks = masks

    # ---------------------------------------------------------------------- results, device
    def device_info(self) -> dict:
        """``{"device": "cpu" | "cuda:N", "gpu": {"name", "free_mb", "total_mb"} or None}``."""
        from .backbones import gpu_info

        return {"device": str(self.backbone.device), "gpu": gpu_info(self.backbone.device)}

    def close(self) -> None:
        """Drop the volume, masks and cached embeddings (the model stays loaded)."""
        self.store.clear()
        self.masks = {}
        self.history.clear()
        self.learned.clear()
        self.refiner.clear()

    def current_result(self, classes: Sequence[str] | None = None) -> SegmentationResult:
        """The engine's current masks (after segment, refine, propagate and undo) as a result."""
        volume = self.require_volume()
        names = list(classes) if classes is not None else list(self.masks)
        infos = [self.class_info(n) for n in names]
        empty = np.zeros(volume.array.shape[:3], bool)
        masks = {i.name: self.masks.get(i.name, empty) for i in infos}
        present = {n: [int(k) for k in np.nonzero(m.any(axis=(1, 2)))[0]] for n, m in masks.items()}
        return SegmentationResult(volume, masks, infos, list(range(volume.num_slices)), present, 0.0)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep the largest 6-connected 3-D component of a ``(K, J, I)`` bool mask."""
    if not mask.any():
        return mask
    from scipy import ndimage

    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(labels.reshape(-1))
    sizes[0] = 0
    return labels == int(sizes.argmax())
