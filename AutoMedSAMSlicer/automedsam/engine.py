"""The inference engine: one expensive encoder pass per slice, cheap segment / refine / propagate.

Coordinates in every public call are voxel indices of the volume set with :meth:`Engine.set_volume`:
``slice_index`` is ``k`` (``volume.array[k]``), points are ``(i, j)`` (column, row) on that slice,
boxes are ``(i0, j0, i1, j1)`` indices of their extreme voxels (inclusive). Masks are boolean
arrays ``(J, I)`` per slice or ``(K, J, I)`` per volume, on the volume's own grid, so they carry the
volume's geometry (any direction, flipped or oblique) unchanged. The engine maps to and from model
pixels with :class:`~automedsam.preprocess.SliceTransform`.

Long work (``segment``, ``propagate``) is a generator of :class:`ProgressEvent`; the last event of a
completed run carries the result. Results are stored only when a run completes, so a cancelled run
(consumer stops iterating, or ``cancel`` is set) changes nothing. Every change to a class's masks
can be undone with :meth:`Engine.undo`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .classes import ClassCatalog, ClassInfo, resolve_class
from .contract import ProgressEvent, SegmentationResult, TrainEvent, result_of
from .errors import InvalidInputError
from .preprocess import IntensityConfig, normalize_intensity
from .volume import Volume

if TYPE_CHECKING:
    import threading

    import torch

    from .backbones import Backbone, ImageFeatures
    from .bundle import ModelBundle
    from .generators import GeneratedPrompts

log = logging.getLogger(__name__)

MASK_PROMPT_LOGIT = 8.0  # magnitude of the logits a binary mask becomes when used as a mask prompt


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

    def __post_init__(self) -> None:
        if self.propagation not in ("auto", "memory", "seeded", "learned"):
            raise InvalidInputError(f"propagation must be auto, memory, seeded or learned, got {self.propagation!r}")
        if self.batch_size is not None and self.batch_size < 1:
            raise InvalidInputError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.cleanup not in ("largest_component", "none"):
            raise InvalidInputError(f"cleanup must be 'largest_component' or 'none', got {self.cleanup!r}")


@dataclass(frozen=True)
class _Interaction:
    """Prompts placed so far on one (class, slice), in model coordinates, and their result."""

    mode: str
    points: np.ndarray | None  # (1, N, 2) model (x, y)
    labels: np.ndarray | None  # (1, N)
    box: np.ndarray | None  # (1, 4) model (x0, y0, x1, y1)
    logits: torch.Tensor | None  # (1, 1, L, L) low-resolution logits, the next mask prompt
    mask: np.ndarray  # (J, I) bool: what the refine wrote


def _without_placed(points, labels, state: _Interaction):
    """``(1, N, 2)`` model points and ``(1, N)`` labels minus those already placed in ``state``."""
    if points is None or state.points is None:
        return points, labels
    placed = state.points[0]
    fresh = [n for n, p in enumerate(points[0])
             if not any(np.allclose(p, q, atol=1e-6) and labels[0, n] == state.labels[0, m]
                        for m, q in enumerate(placed))]
    if not fresh:
        return None, None
    return points[:, fresh], labels[:, fresh]


def _placed(state: _Interaction | None, points, labels):
    """All points of the interaction: the earlier ones, then the new ones."""
    if state is None or state.points is None:
        return points, labels
    if points is None:
        return state.points, state.labels
    return np.concatenate([state.points, points], axis=1), np.concatenate([state.labels, labels], axis=1)


class Engine:
    """Segment a volume with a backbone and (optionally) a model bundle's prompt generator.

    ``bundle`` None allows manual prompting only (plain SAM behaviour). The backbone must be the
    one the bundle was trained with (see :func:`automedsam.bundle.backbone_for_bundle`).
    """

    def __init__(self, backbone: Backbone, bundle: ModelBundle | None = None, config: EngineConfig | None = None):
        self.backbone = backbone
        self.bundle = bundle
        self.config = config or EngineConfig()
        self.generator = None
        self.class_catalog = ClassCatalog([])
        self._prompts: OrderedDict[tuple[str, int], GeneratedPrompts] = OrderedDict()
        self.clear_result_cache()
        if bundle is not None:
            bundle.check_backbone(backbone)
            self.use_generator(bundle.build_generator(backbone.device), bundle.classes)
        self.volume: Volume | None = None
        self.masks: dict[str, np.ndarray] = {}
        self._undo: dict[str, list[list[tuple[int | None, np.ndarray | None]]]] = {}
        self._features: dict[int, ImageFeatures] = {}
        self._extra_classes: dict[str, ClassInfo] = {}
        self._interactions: dict[tuple[str, int], _Interaction] = {}
        self.messages: list[str] = []

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

    def use_generator(self, generator, classes: Sequence[ClassInfo]) -> None:
        """Use a prompt generator whose class indices follow ``classes`` (a bundle's, or one being
        trained); clears cached learned prompts."""
        self.generator = generator
        self.class_catalog = ClassCatalog(list(classes))
        self._prompts.clear()
        self.clear_result_cache()

    # ------------------------------------------------------------------------------ volume
    def set_volume(self, volume: Volume) -> None:
        """Take a new volume (KJI array, any geometry). Cheap: slices are encoded lazily, on first
        use, and reused by every class; previous masks and undo history are dropped."""
        if not isinstance(volume, Volume):
            raise InvalidInputError(f"set_volume needs a Volume, got {type(volume).__name__}")
        intensity = self.config.intensity or (self.bundle.intensity if self.bundle else IntensityConfig.ct())
        if volume.is_rgb and intensity.mode != "rgb":
            intensity = IntensityConfig.rgb()
        self.volume = volume
        self.intensity = intensity
        self.value_range = intensity.value_range(volume.array)
        _, j, i = volume.array.shape[:3]
        self.transform = self.backbone.slice_transform(j, i)
        self.masks, self._undo, self._features, self._prompts = {}, {}, {}, OrderedDict()
        self._interactions = {}
        self.clear_result_cache()
        key = "|".join([volume.content_hash(), self.backbone.id, self.backbone.weights_fingerprint,
                        json.dumps(intensity.to_dict(), sort_keys=True), str(self.backbone.input_size)])
        self.cache_key = hashlib.sha256(key.encode()).hexdigest()[:32]

    def require_volume(self) -> Volume:
        """The volume; raises InvalidInputError when none was set."""
        if self.volume is None:
            raise InvalidInputError("no volume set: call set_volume(volume) first")
        return self.volume

    def _check_slice(self, k: int) -> int:
        n = self.require_volume().num_slices
        if not isinstance(k, (int, np.integer)) or not 0 <= int(k) < n:
            raise InvalidInputError(f"slice index {k} is out of range: the volume has slices 0..{n - 1} (k)")
        return int(k)

    def model_input(self, k: int) -> np.ndarray:
        """Slice k as the backbone's ``(S, S, 3)`` float input in [0, 1]."""
        volume = self.require_volume()
        return self.transform.image_to_model(normalize_intensity(volume.array[k], self.value_range))

    # ---------------------------------------------------------------------------- encoding
    def _disk_path(self, k: int) -> Path | None:
        if not self.config.cache_dir:
            return None
        return Path(self.config.cache_dir) / self.cache_key / f"slice_{k:05d}.safetensors"

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

    def encode(self, slices: Sequence[int]) -> int:
        """Make sure ``slices`` are encoded (memory, then disk cache, then the encoder in batches).
        Embeddings are kept as float16 on the CPU. Returns how many slices ran through the encoder."""
        import torch

        todo = []
        for k in slices:
            k = self._check_slice(k)
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
                    self._note(f"CUDA out of memory: retrying with encoder batch {batch}")
                    continue
                self._note("CUDA out of memory with batch 1: falling back to the CPU (slower)")
                self._to_device("cpu")
                continue
            for idx, k in enumerate(ks):
                one = feats.select(idx).to("cpu", torch.float16)
                self._features[k] = one
                self._store_cached(k, one)
            n += len(ks)
        return len(todo)

    @property
    def batch_size(self) -> int:
        """Encoder batch: the configured one, else 4 on CUDA and 1 on the CPU."""
        return self.config.batch_size or (4 if self.backbone.device.type == "cuda" else 1)

    def _note(self, message: str) -> None:
        log.warning(message)
        self.messages.append(message)

    def _to_device(self, device: str) -> None:
        self.backbone.to(device)
        if self.generator is not None:
            self.generator.to(device)
        self._prompts.clear()
        if getattr(self, "_video_predictor", None) is not None:
            self._video_predictor = None

    def features(self, k: int) -> ImageFeatures:
        """Float32 features of slice k on the backbone's device (batch of 1)."""
        self.encode([k])
        import torch

        return self._features[k].to(self.backbone.device, torch.float32)

    # ---------------------------------------------------------------------------- classes
    def class_info(self, name: str) -> ClassInfo:
        """The bundle's class for a name or alias. Manual mode also accepts other names: the shipped
        class catalog's (so "liver" is SNOMED-coded Liver there too), else a new custom class."""
        if name in self.class_catalog:
            return self.class_catalog.get(name)
        if self.generator is not None and name not in self._extra_classes:
            raise InvalidInputError(
                f"class {name!r} is not one the model knows; it has: {', '.join(self.class_catalog.names())}"
            )
        if name not in self._extra_classes:
            self._extra_classes[name] = resolve_class(name)
        return self._extra_classes[name]

    def _generated(self, names: Sequence[str], feats: ImageFeatures) -> GeneratedPrompts:
        import torch

        known = self.class_catalog.names()
        idx = torch.tensor([known.index(n) for n in names], device=self.backbone.device)
        emb = feats.embeddings.expand(len(names), -1, -1, -1)
        return self.generator(emb, self.backbone.dense_pe(), idx)

    def _generated_cached(self, name: str, k: int, feats: ImageFeatures) -> GeneratedPrompts:
        """Learned prompts of (class, slice); they do not depend on clicks, so repeated refines
        on a slice cost only the prompt encoder and the decoder."""
        key = (name, k)
        if key in self._prompts:
            self._prompts.move_to_end(key)
            return self._prompts[key]
        gen = self._generated([name], feats)
        self._prompts[key] = gen
        if len(self._prompts) > self.config.prompt_cache_size:
            self._prompts.popitem(last=False)
        return gen

    def _automatic_logits(self, k: int, names: Sequence[str]):
        """Objectness ``(C,)`` and low-resolution mask logits ``(C, L, L)`` (CPU) of the learned
        prompts on slice k. Results are memoised per (class, slice) within ``result_cache_mb``:
        they depend only on the slice and the weights, so re-segmenting (other classes, another
        cleanup) skips the generator and the decoder as well as the encoder."""
        import torch

        from .generators import decoder_prompts

        todo = [n for n in names if (n, k) not in self._results]
        if todo:
            feats = self.features(k)
            gen = self._generated(todo, feats)
            sparse, dense = decoder_prompts(self.backbone, gen)
            out = self.backbone.decode(feats, sparse, dense)
            for row, n in enumerate(todo):
                item = (float(gen.object_logit[row]), out.mask_logits[row, 0].to("cpu", torch.float16))
                self._results[(n, k)] = item
                self._results_bytes += item[1].numel() * 2
            while self._results_bytes > self.config.result_cache_mb * 2**20 and len(self._results) > len(names):
                _, (_, dropped) = self._results.popitem(last=False)
                self._results_bytes -= dropped.numel() * 2
        for n in names:
            self._results.move_to_end((n, k))
        objectness = torch.tensor([self._results[(n, k)][0] for n in names])
        return objectness, torch.stack([self._results[(n, k)][1] for n in names])

    def clear_result_cache(self) -> None:
        """Forget memoised automatic results (call after changing generator or decoder weights)."""
        self._results: OrderedDict[tuple[str, int], tuple[float, torch.Tensor]] = OrderedDict()
        self._results_bytes = 0

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
        if self.generator is None:
            raise InvalidInputError("automatic segmentation needs a model bundle; without one use refine() with "
                                    "points or a box (manual mode)")
        if not classes:
            raise InvalidInputError(f"no classes given; the bundle has: {', '.join(self.class_catalog.names())}")
        infos = [self.class_info(c) for c in classes]
        ks = list(range(volume.num_slices)) if slices is None else [self._check_slice(k) for k in slices]
        if not ks:
            raise InvalidInputError("no slices to segment (empty slice range)")
        if cleanup not in (None, "largest_component", "none"):
            raise InvalidInputError(f"cleanup must be 'largest_component' or 'none', got {cleanup!r}")
        return self._segment_events(volume, infos, ks, cleanup or self.config.cleanup, cancel)

    def _segment_events(self, volume: Volume, infos: list[ClassInfo], ks: list[int], cleanup: str,
                        cancel: threading.Event | None) -> Iterator[ProgressEvent]:
        import torch

        names = [c.name for c in infos]
        shape = volume.array.shape[:3]
        # Slices outside ``slices`` keep what the class has now (the user's work); the selected ones
        # are recomputed from scratch.
        masks = {n: self.masks[n].copy() if n in self.masks else np.zeros(shape, bool) for n in names}
        for n in names:
            masks[n][ks] = False
        present: dict[str, list[int]] = {n: [] for n in names}
        t0 = time.perf_counter()
        yield ProgressEvent("start", 0, len(ks), f"segmenting {len(names)} class(es) on {len(ks)} slice(s)")
        batch = self.batch_size
        for start in range(0, len(ks), batch):
            if cancel is not None and cancel.is_set():
                yield ProgressEvent("cancelled", start, len(ks), "cancelled; nothing was changed")
                return
            chunk = ks[start:start + batch]
            self.encode(chunk)
            with torch.inference_mode():
                for k in chunk:
                    objectness, logits = self._automatic_logits(k, names)
                    keep = (objectness > self.config.objectness_threshold).nonzero().flatten().tolist()
                    if not keep:
                        continue
                    slice_logits = self.transform.logits_to_slice(logits[keep].float())
                    for row, c in enumerate(keep):
                        m = (slice_logits[row] > self.config.mask_threshold).numpy()
                        if m.any():
                            masks[names[c]][k] = m
                            present[names[c]].append(k)
            done = min(start + batch, len(ks))
            yield ProgressEvent("segment", done, len(ks), partial={n: int(masks[n].sum()) for n in names})
        if cleanup == "largest_component":
            yield ProgressEvent("cleanup", len(ks), len(ks), "keeping the largest 3-D component per class")
            for n in names:  # judged in 3-D with the kept slices, applied to the segmented ones only
                masks[n][ks] = largest_component(masks[n])[ks]
                present[n] = [k for k in present[n] if masks[n][k].any()]
        for n in names:
            self._push_undo(n, [(None, self.masks.get(n))])
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

        Interactive, as SAM's own loop: a refine builds on what was placed before on the slice
        (its earlier points, its box unless a new one is given, and the previous low-resolution
        logits as the mask prompt), as long as the slice still holds the mask that refine wrote;
        an edit made elsewhere (segment, undo, propagate, ``set_masks``) starts a new interaction.
        Points (and a box) placed before are not added twice when a caller re-sends them all, as
        Slicer's markups do. On a box-only backbone (LiteMedSAM) points edit the current mask
        locally instead (see :meth:`_click_edits`) and a new box starts over.
        Decoder-only on the cached embedding. The previous slice mask goes on the undo stack.
        """
        import torch

        from .generators import decoder_prompts

        k = self._check_slice(slice_index)
        mode = mode or ("semi" if self.generator is not None else "manual")
        if mode not in ("semi", "manual"):
            raise InvalidInputError(f"mode must be 'semi' or 'manual', got {mode!r}")
        if mode == "semi" and self.generator is None:
            raise InvalidInputError("semi-automatic refine needs a model bundle; use mode='manual'")
        name = self.class_info(class_name).name
        new_points, new_labels, new_box = self._manual_prompts(points, point_labels, box)
        state = None if reset else self._interaction(name, k, mode)
        if state is not None:  # a caller that re-sends every point (Slicer's markups) adds none twice
            new_points, new_labels = _without_placed(new_points, new_labels, state)
            if new_box is not None and state.box is not None and np.allclose(new_box, state.box):
                new_box = None
        if self.backbone.spec.box_only and (new_points is not None or (state is not None and new_box is None)):
            mask = self._click_edits(name, k, mode, new_points, new_labels, new_box)
            self._set_slices(name, {k: mask})
            pts, lbl = _placed(state, new_points, new_labels)
            box_now = new_box if new_box is not None else (state.box if state is not None else None)
            self._interactions[(name, k)] = _Interaction(mode, pts, lbl, box_now, None, mask.copy())
            return mask
        pts, lbl = _placed(state, new_points, new_labels)
        bx = new_box if new_box is not None else (state.box if state is not None else None)
        if self.backbone.spec.box_only:  # a new box starts over: no points, no logits as mask prompt
            pts = lbl = state = None
        if mode == "manual" and pts is None and bx is None:
            raise InvalidInputError("manual refine needs at least one point or a box")
        with torch.inference_mode():
            feats = self.features(k)
            gen = self._generated_cached(name, k, feats) if mode == "semi" else None
            previous = state.logits if state is not None else (
                None if self.backbone.spec.box_only else self._automatic_low_res(name, k, mode))
            sparse, dense = decoder_prompts(self.backbone, gen, pts, lbl, bx, masks=previous)
            # A single click alone is ambiguous (SAM's advice): decode 3 candidates and keep the best.
            multimask = gen is None and bx is None and previous is None and pts is not None and pts.shape[1] == 1
            out = self.backbone.decode(feats, sparse, dense, multimask=multimask)
            pick = int(out.iou[0].argmax()) if multimask else 0
            logits = out.mask_logits[0, pick].float()
        mask = (self.transform.logits_to_slice(logits.cpu()) > self.config.mask_threshold).numpy()
        self._set_slices(name, {k: mask})
        self._interactions[(name, k)] = _Interaction(mode, pts, lbl, bx, logits[None, None], mask.copy())
        return mask

    def _click_edits(self, name: str, k: int, mode: str, points, labels, box) -> np.ndarray:
        """Clicks on a backbone trained with boxes only (LiteMedSAM), whose masks get worse with
        point prompts or its own logits as a mask prompt: each click edits the slice's current
        mask locally. The model proposes the region at the click (its best of three candidates for
        that single point); a + click adds the part of it outside the mask that touches the click, a -
        click removes the part inside the mask that touches the click, both within twice the
        click's distance to the mask's edge plus 2 voxels (and at least the click's voxel). Far
        parts of the mask never change. The start is the slice's current mask, or what the box
        (or, in semi mode, the learned prompts) decodes to when a box is given or the slice is
        empty.
        """
        import torch
        from scipy import ndimage

        from .generators import decoder_prompts

        current = self.masks.get(name)
        mask = current[k].copy() if box is None and current is not None and current[k].any() else None
        with torch.inference_mode():
            feats = self.features(k)
            if mask is None and (box is not None or mode == "semi"):
                gen = self._generated_cached(name, k, feats) if mode == "semi" else None
                sparse, dense = decoder_prompts(self.backbone, gen, None, None, box)
                logits = self.backbone.decode(feats, sparse, dense).mask_logits[0, 0].float().cpu()
                mask = (self.transform.logits_to_slice(logits) > self.config.mask_threshold).numpy()
            if mask is None:
                mask = np.zeros(self.require_volume().array.shape[1:3], bool)
            if points is None:
                return mask
            voxels = self.transform.points_from_model(points[0])
            jj, ii = np.mgrid[0:mask.shape[0], 0:mask.shape[1]]
            for (x, y), (fi, fj), label in zip(points[0], voxels, labels[0], strict=True):
                i, j = int(np.clip(round(fi), 0, mask.shape[1] - 1)), int(np.clip(round(fj), 0, mask.shape[0] - 1))
                sparse, dense = self.backbone.embed_prompts(np.array([[[x, y]]]), np.array([[1]]))
                out = self.backbone.decode(feats, sparse, dense, multimask=True)
                best = int(out.iou[0].argmax())
                proposal = (self.transform.logits_to_slice(out.mask_logits[0, best].float().cpu())
                            > self.config.mask_threshold).numpy()
                side = ~mask if label == 1 else mask  # where this click can change voxels
                region = proposal & side
                parts, _ = ndimage.label(region)
                touched = parts == parts[j, i] if parts[j, i] else np.zeros_like(mask)
                # Reach: a click far from the mask's edge fixes a large error, one next to it a
                # sliver; the edit stays within twice that distance (plus 2 voxels) of the click.
                depth = float(ndimage.distance_transform_edt(np.pad(side, 1))[1:-1, 1:-1][j, i])
                near = (jj - j) ** 2 + (ii - i) ** 2 <= (2 * depth + 2) ** 2
                touched = (touched & near) | ((jj - j) ** 2 + (ii - i) ** 2 <= 2)
                mask = (mask | touched) if label == 1 else (mask & ~touched)
        return mask

    def _interaction(self, name: str, k: int, mode: str) -> _Interaction | None:
        """The prompts placed so far on (class, slice), if the slice still shows their result."""
        state = self._interactions.get((name, k))
        current = self.masks.get(name)
        if state is None or state.mode != mode or current is None or not np.array_equal(current[k], state.mask):
            self._interactions.pop((name, k), None)
            return None
        return state

    def _automatic_low_res(self, name: str, k: int, mode: str):
        """The memoised automatic logits of (class, slice) when the slice still shows the automatic
        result: the first semi refine then starts from it, as SAM's loop starts from its last mask."""
        import torch

        if mode != "semi" or (name, k) not in self._results or name not in self.masks:
            return None
        logits = self._results[(name, k)][1].float()
        shown = (self.transform.logits_to_slice(logits) > self.config.mask_threshold).numpy()
        if not np.array_equal(shown, self.masks[name][k]):
            return None
        return logits.to(self.backbone.device, torch.float32)[None, None]

    def _manual_prompts(self, points, point_labels, box):
        t = self.transform
        pts = lbl = bx = None
        if points is not None and len(points):
            p = np.asarray(points, dtype=float)
            if p.ndim == 1 and p.size == 2:
                p = p[None]
            if p.ndim != 2 or p.shape[1] != 2:
                raise InvalidInputError(f"points must be (i, j) pairs, got an array of shape {p.shape}")
            labels = np.ones(len(p), int) if point_labels is None else np.asarray(point_labels).reshape(-1)
            if labels.shape != (len(p),) or not np.isin(labels, (0, 1)).all():
                raise InvalidInputError(f"point_labels must be {len(p)} values of 1 (include) or 0 (exclude)")
            t.check_points(p, "point")
            pts, lbl = t.points_to_model(p)[None], labels[None]
        if box is not None:
            b = np.asarray(box, dtype=float).reshape(-1)
            if b.shape != (4,) or b[0] > b[2] or b[1] > b[3]:
                raise InvalidInputError(f"box must be (i0, j0, i1, j1) with i0 <= i1 and j0 <= j1, got {box}")
            t.check_points(b.reshape(2, 2), "box corner")
            bx = t.box_to_model(b)[None]
        return pts, lbl, bx

    # ------------------------------------------------------------------------------- undo
    def _push_undo(self, name: str, group: list[tuple[int | None, np.ndarray | None]]) -> None:
        self._undo.setdefault(name, []).append(group)

    def _set_slices(self, name: str, new: dict[int, np.ndarray]) -> None:
        """Write slice masks for a class as one undoable step."""
        volume = self.require_volume()
        current = self.masks.get(name)
        if current is None:
            current = self.masks[name] = np.zeros(volume.array.shape[:3], bool)
        self._push_undo(name, [(k, current[k].copy()) for k in new])
        for k, m in new.items():
            current[k] = m

    def undo(self, class_name: str) -> list[int] | None:
        """Undo the last change to a class (a refine, a propagation or a whole segmentation).

        Returns the slice indices that changed (all slices for a segmentation), or None when there
        is nothing to undo.
        """
        name = self.class_info(class_name).name
        stack = self._undo.get(name)
        if not stack:
            return None
        group = stack.pop()
        changed: list[int] = []
        for k, old in reversed(group):
            if k is None:  # a whole-volume result replaced `old`
                if old is None:
                    self.masks.pop(name, None)
                else:
                    self.masks[name] = old
                changed = list(range(self.require_volume().num_slices))
            else:
                self.masks[name][k] = old
                changed.append(k)
        return sorted(set(changed))

    def set_masks(self, class_name: str, masks: np.ndarray) -> None:
        """Replace a class's ``(K, J, I)`` bool masks with edits made elsewhere (e.g. in Slicer's
        Segment Editor), so propagation starts from what the user sees. Not an undo step: the
        caller owns the history of its copy."""
        volume = self.require_volume()
        masks = np.asarray(masks)
        if masks.shape != volume.array.shape[:3]:
            raise InvalidInputError(f"masks {masks.shape} are not on the volume grid {volume.array.shape[:3]}")
        self.masks[self.class_info(class_name).name] = masks.astype(bool, copy=True)

    def can_undo(self, class_name: str) -> bool:
        return bool(self._undo.get(self.class_info(class_name).name))

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
        k0 = self._check_slice(from_slice)
        if direction not in ("forward", "backward", "both"):
            raise InvalidInputError(f"direction must be forward, backward or both, got {direction!r}")
        if max_slices is not None and max_slices < 1:
            raise InvalidInputError(f"max_slices must be at least 1, got {max_slices}")
        name = self.class_info(class_name).name
        seed = self.masks.get(name)
        if seed is None or not seed[k0].any():
            raise InvalidInputError(f"slice {k0} has no mask for {name!r} to propagate; segment or refine it first")
        return self._propagate_events(name, k0, direction, max_slices, cancel)

    def _propagate_events(self, name: str, k0: int, direction: str, max_slices: int | None,
                          cancel: threading.Event | None) -> Iterator[ProgressEvent]:
        from .propagation import propagate_slices

        n = self.require_volume().num_slices
        limit = max_slices if max_slices is not None else n
        steps = [+1, -1] if direction == "both" else ([+1] if direction == "forward" else [-1])
        total = sum(min(limit, (n - 1 - k0) if s > 0 else k0) for s in steps)
        written: dict[int, np.ndarray] = {}
        yield ProgressEvent("start", 0, total, f"propagating {name} from slice {k0}")
        for k, mask in propagate_slices(self, name, k0, steps, limit):
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
        config = teach_config(self, classes, generator=prompt_network, epochs=epochs, train_slices=train_slices,
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
        self.__init__(backbone_for_bundle(bundle, str(self.backbone.device)), bundle, self.config)
        if volume is not None:
            self.set_volume(volume)
            self.masks = masks

    def masks_of(self, class_name: str) -> np.ndarray:
        """A copy of the class's ``(K, J, I)`` bool masks (all False where it has none)."""
        volume = self.require_volume()
        masks = self.masks.get(self.class_info(class_name).name)
        return masks.copy() if masks is not None else np.zeros(volume.array.shape[:3], bool)

    def device_info(self) -> dict:
        """``{"device": "cpu" | "cuda:N", "gpu": {"name", "free_mb", "total_mb"} or None}``."""
        from .backbones import gpu_info

        return {"device": str(self.backbone.device), "gpu": gpu_info(self.backbone.device)}

    def close(self) -> None:
        """Drop the volume, masks and cached embeddings (the model stays loaded)."""
        self.volume, self.masks, self._features, self._undo = None, {}, {}, {}
        self._interactions, self._prompts = {}, OrderedDict()
        self.clear_result_cache()

    # ---------------------------------------------------------------------------- results
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
