"""The inference engine: one expensive encoder pass per slice, cheap segment / refine / propagate.

Coordinates in every public call are voxel indices of the volume set with :meth:`Engine.set_volume`:
``slice_index`` is ``k`` (``volume.array[k]``), points are ``(i, j)`` (column, row) on that slice,
boxes are ``(i0, j0, i1, j1)`` indices of their extreme voxels (inclusive). Masks are boolean
arrays ``(J, I)`` per slice or ``(K, J, I)`` per volume, on the volume's own grid, so they carry the
volume's geometry (any direction, flipped or oblique) unchanged.

The caller owns the masks: ``segment`` and ``propagate`` return them, ``refine`` takes the slice's
current mask and returns the new one. The engine keeps only what is a function of the volume and
the model (embeddings, learned prompts) and, between clicks on one slice, the interaction that
produced the mask it last returned there, dropped as soon as the caller's mask differs from it.
Undo is the caller's too (Slicer's history; :class:`automedsam.annotation.Annotation` in Python).

Inside, the model sees every volume in one slice orientation (:mod:`automedsam.orientation`: the
nearest axial LPS order), whatever order the file stored the voxels in; masks are mapped back onto
the caller's grid exactly (axis permutations and flips only). A volume whose k-slices are not
axial (stored sagittally or coronally) is segmented in axial slices where it resolves them (see
:mod:`automedsam.orientation`); refine and propagate on its own k-slices then run on those slices
as stored.

Long work (``segment``, ``propagate``, ``teach``) is a generator of events; the last event of a
completed run carries the result. A consumer that stops iterating, or a ``cancel`` that is set,
gets no result.

The engine is a facade (:class:`automedsam.contract.SegmentationEngine`) over parts with one job
each: :class:`~automedsam.embeddings.EmbeddingStore` (slice embeddings: memory, disk, batches,
out-of-memory fall-back), :class:`~automedsam.automatic.LearnedPrompts` (the prompt network's
prompts and memoised automatic results), :class:`~automedsam.refinement.Refiner` (interactive
correction) and :mod:`automedsam.propagation`, one set of them per :class:`SliceView`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .automatic import LearnedPrompts
from .backbones.registry import ModelRegistry, Runtime, default_registry
from .classes import ClassCatalog, ClassInfo, resolve_class
from .contract import (
    DEFAULT_PROMPT_NETWORK,
    TEACH_DECODER_LR,
    TEACH_EPOCHS,
    TEACH_NAME,
    TEACH_VAL_SLICES,
    ProgressEvent,
    SegmentationResult,
    TrainEvent,
    result_of,
)
from .embeddings import EmbeddingStore
from .errors import InvalidInputError
from .framing import Framing, frame_slices
from .orientation import CANONICAL, Reorientation
from .preprocess import IntensityConfig, SliceTransform, check_slice_points
from .refinement import Refiner
from .volume import Volume

if TYPE_CHECKING:
    import threading

    from .backbones import Backbone, ImageFeatures
    from .bundle import ModelBundle

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
class SliceView:
    """The volume as the model sees it in one slice orientation, with the parts that work on it.

    ``orientation`` maps the caller's ``(K, J, I)`` grid onto the view's (``store.volume``); the
    store, learned prompts and refiner work in the view's indices only.
    """

    orientation: Reorientation
    store: EmbeddingStore
    learned: LearnedPrompts
    refiner: Refiner


class Engine:
    """Segment a volume with a backbone and (optionally) a model bundle's prompt network.

    ``bundle`` None allows manual prompting only (plain SAM behaviour). The backbone must be the
    one the bundle was trained with; make one with :meth:`from_bundle` or :meth:`manual`, which take
    it from ``registry`` (default: the process's :func:`~automedsam.backbones.registry.default_registry`),
    shared with every other engine on the same model and never changed by this one.
    """

    def __init__(self, backbone: Backbone, bundle: ModelBundle | None = None, config: EngineConfig | None = None,
                 registry: ModelRegistry | None = None):
        self.config = config or EngineConfig()
        self.registry = registry or default_registry()
        self.messages: list[str] = []
        self._load(backbone, bundle)

    def _load(self, backbone: Backbone, bundle: ModelBundle | None) -> None:
        """The parts on ``backbone``, with ``bundle``'s prompt network when there is one."""
        self.backbone, self.bundle = backbone, bundle
        #: How the model's slices are oriented: canonical, except for bundles taught before
        #: orientation was recorded (they were taught on slices in their files' stored order).
        self.slice_orientation = bundle.slice_orientation if bundle is not None else CANONICAL
        self._source: Volume | None = None
        self._intensity: IntensityConfig | None = None
        self._stored: SliceView | None = None  # the slices as stored, when they are not the model's
        self._network, self._network_classes = None, []
        self.view = self._new_view(Reorientation.identity((1, 1, 1)))
        self._extra_classes: dict[str, ClassInfo] = {}
        if bundle is not None:
            bundle.check_backbone(backbone)
            self.use_prompt_network(bundle.build_prompt_network(backbone.device), bundle.classes)

    def _new_view(self, orientation: Reorientation) -> SliceView:
        c = self.config
        store = EmbeddingStore(self.backbone, c.batch_size, c.cache_dir, note=self.messages.append,
                               on_out_of_memory=self._fall_back_to_cpu)
        learned = LearnedPrompts(store, c.prompt_cache_size, c.result_cache_mb << 20)
        if self._network is not None:
            learned.use(self._network, self._network_classes)
        return SliceView(orientation, store, learned, Refiner(store, learned, c.mask_threshold))

    @property
    def store(self) -> EmbeddingStore:
        """The main view's embeddings (slices in the model's orientation)."""
        return self.view.store

    @property
    def learned(self) -> LearnedPrompts:
        return self.view.learned

    @classmethod
    def from_bundle(cls, bundle: str | os.PathLike | ModelBundle, device: str = "auto",
                    config: EngineConfig | None = None, registry: ModelRegistry | None = None) -> Engine:
        """An engine for a model bundle (a path, or a loaded :class:`~automedsam.bundle.ModelBundle`)
        on the backbone it was trained with, from ``registry`` (see
        :meth:`~automedsam.backbones.registry.ModelRegistry.for_bundle`) on ``device``."""
        from .bundle import load_bundle

        if isinstance(bundle, (str, os.PathLike)):
            bundle = load_bundle(bundle)
        registry = registry or default_registry()
        return cls(registry.for_bundle(bundle, registry.runtime.on(device)), bundle, config, registry)

    @classmethod
    def manual(cls, backbone_id: str | None = None, device: str = "auto", weights: str | None = None,
               config: EngineConfig | None = None, registry: ModelRegistry | None = None) -> Engine:
        """A manual-mode engine (points and boxes only, like plain SAM) on a catalog backbone
        (default: :data:`automedsam.models.DEFAULT_BACKBONE`); ``weights`` as for
        :func:`automedsam.backbones.build_backbone`."""
        from .models import DEFAULT_BACKBONE

        registry = registry or default_registry()
        backbone = registry.backbone(backbone_id or DEFAULT_BACKBONE, weights=weights,
                                     runtime=registry.runtime.on(device))
        return cls(backbone, None, config, registry)

    def sibling(self) -> Engine:
        """A new engine on the same loaded model (backbone and bundle shared; no volume): one per
        worker session, while the model stays loaded once."""
        return type(self)(self.backbone, self.bundle, self.config, self.registry)

    # ------------------------------------------------------------------- prompt network
    @property
    def prompt_network(self):
        """The bundle's prompt network (a torch module), or None in manual mode."""
        return self._network

    @property
    def class_catalog(self) -> ClassCatalog:
        return self.learned.class_catalog

    def use_prompt_network(self, network, classes: Sequence[ClassInfo]) -> None:
        """Use a prompt network whose class indices follow ``classes`` (a bundle's, or one being
        trained); forgets its learned prompts and memoised results."""
        self._network, self._network_classes = network, list(classes)
        for view in self._all_views():
            view.learned.use(network, classes)

    def clear_result_cache(self) -> None:
        """Forget memoised automatic results (call after changing prompt network or decoder weights)."""
        for view in self._all_views():
            view.learned.clear()

    def _all_views(self) -> list[SliceView]:
        return [self.view] if self._stored is None else [self.view, self._stored]

    def _fall_back_to_cpu(self) -> Backbone:
        """This engine's way on after CUDA ran out of memory: the registry's CPU copy of its backbone
        (the shared GPU one, and every other session on it, stay), with its prompt network moved too."""
        cpu = self.registry.on_device(self.backbone, "cpu")
        self.backbone = cpu
        for view in self._all_views():
            view.store.backbone = cpu
        if self._network is not None:
            self._network.to("cpu")
        self.clear_result_cache()
        return cpu

    # ------------------------------------------------------------------------------ volume
    @property
    def volume(self) -> Volume | None:
        """The volume given to :meth:`set_volume`, as given (None before, or after :meth:`close`)."""
        return self._source

    @property
    def orientation(self) -> Reorientation:
        """How the volume's grid maps onto the slices the model sees (see :mod:`automedsam.orientation`)."""
        return self.view.orientation

    def set_volume(self, volume: Volume) -> None:
        """Take a new volume (KJI array, any geometry). Cheap: slices are encoded lazily, on first
        use, and reused by every class."""
        if not isinstance(volume, Volume):
            raise InvalidInputError(f"set_volume needs a Volume, got {type(volume).__name__}")
        intensity = self._intensity_for(volume, self.bundle)
        shape = volume.array.shape[:3]
        canonical = self.slice_orientation == CANONICAL and not volume.is_rgb
        orientation = Reorientation.nearest_axial_lps(volume) if canonical else Reorientation.identity(shape)
        self.view = dataclasses.replace(self.view, orientation=orientation)
        self.view.store.set_volume(orientation.volume(volume), intensity, self._framing_for(volume, self.bundle))
        self.view.learned.clear()
        self.view.refiner.clear()
        self._stored = None
        self._source, self._intensity = volume, intensity

    def _intensity_for(self, volume: Volume, bundle: ModelBundle | None) -> IntensityConfig:
        """The intensity preprocessing of ``volume`` with ``bundle``: the config's, else the bundle's,
        else CT windowing; RGB images always as RGB."""
        intensity = self.config.intensity or (bundle.intensity if bundle else IntensityConfig.ct())
        return IntensityConfig.rgb() if volume.is_rgb and intensity.mode != "rgb" else intensity

    @staticmethod
    def _framing_for(volume: Volume, bundle: ModelBundle | None) -> Framing:
        """How ``volume``'s slices are framed with ``bundle``: at the model pixel size it was taught at
        (see :mod:`automedsam.framing`); SAM's resize without one, and for RGB pictures."""
        return bundle.framing if bundle is not None and not volume.is_rgb else Framing()

    @property
    def intensity(self) -> IntensityConfig | None:
        """The intensity preprocessing of the current volume (None before :meth:`set_volume`)."""
        return self._intensity if self._source is not None else None

    def require_volume(self) -> Volume:
        """The volume; raises InvalidInputError when none was set."""
        if self._source is None:
            raise InvalidInputError("no volume set: call set_volume(volume) first")
        return self._source

    def check_slice(self, k) -> int:
        """``k`` as an int, or InvalidInputError naming the volume's slice range."""
        return self.require_volume().check_slice(k)

    def slice_view(self, k: int) -> tuple[SliceView, int]:
        """The view in which the volume's slice k is a model slice, and its index there: the main
        view when the model's slices are the volume's k-slices (in any order or mirrored), else a
        view of the slices as stored (made on first use)."""
        k = self.check_slice(k)
        if self.view.orientation.keeps_slices:
            return self.view, self.view.orientation.slice_to_canonical(k)
        if self._stored is None:
            self._stored = self._new_view(Reorientation.identity(self.require_volume().array.shape[:3]))
            volume = self.require_volume()
            self._stored.store.set_volume(volume, self._intensity, self._framing_for(volume, self.bundle))
        return self._stored, k

    def model_input(self, k: int) -> np.ndarray:
        """The volume's slice k as the backbone's ``(S, S, 3)`` float input in [0, 1]."""
        view, kv = self.slice_view(k)
        return view.store.model_input(kv)

    def encode(self, slices: Sequence[int]) -> int:
        """Encode the volume's ``slices`` now (see :meth:`EmbeddingStore.encode`); how many ran
        through the encoder."""
        by_view: dict[int, tuple[SliceView, list[int]]] = {}
        for k in slices:  # grouped per view, so each store still encodes in batches
            view, kv = self.slice_view(k)
            by_view.setdefault(id(view), (view, []))[1].append(kv)
        return sum(view.store.encode(ks) for view, ks in by_view.values())

    def features(self, k: int) -> ImageFeatures:
        """Float32 features of the volume's slice k on the backbone's device (batch of 1)."""
        view, kv = self.slice_view(k)
        return view.store.features(kv)

    @property
    def transform(self) -> SliceTransform:
        """Voxels of a model slice <-> the backbone's model input (see :mod:`automedsam.preprocess`)."""
        return self.store.transform

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
        """Automatic masks for ``classes`` on the volume's ``slices`` k (default: all), as a generator
        of events.

        One encoder pass per slice serves every class; per-slice objectness gating; optional 3-D
        cleanup (judged on the segmented slices). The final ``"done"`` event carries the
        :class:`SegmentationResult`: ``(K, J, I)`` masks on the volume's grid, False outside
        ``slices`` (the caller keeps what it has there). Stopping early (or ``cancel.set()``) gives
        no result. Bad input is refused when called, before any work.
        """
        volume = self.require_volume()
        if self.prompt_network is None:
            raise InvalidInputError("automatic segmentation needs a model bundle; without one use refine() with "
                                    "points or a box (manual mode)")
        if not classes:
            raise InvalidInputError(f"no classes given; the bundle has: {', '.join(self.class_catalog.names())}")
        infos = [self.class_info(c) for c in classes]
        ks = list(range(volume.num_slices)) if slices is None else [self.check_slice(k) for k in slices]
        if not ks:
            raise InvalidInputError("no slices to segment (empty slice range)")
        if cleanup not in (None, "largest_component", "none"):
            raise InvalidInputError(f"cleanup must be 'largest_component' or 'none', got {cleanup!r}")
        return self._segment_events(volume, infos, ks, cleanup or self.config.cleanup, cancel)

    def _segment_events(self, volume: Volume, infos: list[ClassInfo], ks: list[int], cleanup: str,
                        cancel: threading.Event | None) -> Iterator[ProgressEvent]:
        names = [c.name for c in infos]
        orientation, store = self.view.orientation, self.view.store
        if orientation.keeps_slices:
            model_ks = sorted(orientation.slice_to_canonical(k) for k in ks)
        else:  # the volume's k-slices are not the model's: segment every model slice, keep the asked ones
            model_ks = list(range(orientation.canonical_shape[0]))
        masks = {n: np.zeros(orientation.canonical_shape, bool) for n in names}
        # Voxel counts for the progress events, kept per slice: summing whole volumes after every
        # slice would cost more than the decoder on a large CT.
        counts = dict.fromkeys(names, 0)
        t0 = time.perf_counter()
        yield ProgressEvent("start", 0, len(model_ks), f"segmenting {len(names)} class(es) on {len(model_ks)} slice(s)")
        batch = store.batch_size
        for start in range(0, len(model_ks), batch):
            if cancel is not None and cancel.is_set():
                yield ProgressEvent("cancelled", start, len(model_ks), "cancelled; nothing was changed")
                return
            chunk = model_ks[start:start + batch]
            store.encode(chunk)
            for k in chunk:
                for name, mask in self.view.learned.slice_masks(k, names, self.config.objectness_threshold,
                                                                self.config.mask_threshold).items():
                    masks[name][k] = mask
                    counts[name] += int(np.count_nonzero(mask))
            done = min(start + batch, len(model_ks))
            yield ProgressEvent("segment", done, len(model_ks), partial=dict(counts))
        if cleanup == "largest_component":
            yield ProgressEvent("cleanup", len(model_ks), len(model_ks), "keeping the largest 3-D component per class")
            for n in names:
                masks[n] = largest_component(masks[n])
        outside = np.ones(volume.num_slices, bool)
        outside[ks] = False
        out, present = {}, {}
        for n in names:
            mask = np.ascontiguousarray(orientation.from_canonical(masks[n]))
            mask[outside] = False
            out[n] = mask
            present[n] = [k for k in ks if mask[k].any()]
        result = SegmentationResult(volume, out, infos, ks, present, time.perf_counter() - t0)
        yield ProgressEvent("done", len(model_ks), len(model_ks), "done", result=result)

    def segment_volume(self, classes: Sequence[str], slices: Sequence[int] | None = None, *,
                       cleanup: str | None = None, cancel: threading.Event | None = None) -> SegmentationResult:
        """Run :meth:`segment` to the end and return its result."""
        return result_of(self.segment(classes, slices, cleanup=cleanup, cancel=cancel))

    # ----------------------------------------------------------------------------- refine
    def refine(self, class_name: str, slice_index: int, points=None, point_labels=None, box=None,
               mode: str | None = None, reset: bool = False, mask=None) -> np.ndarray:
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
            mask: the slice's mask as the caller has it now, ``(J, I)`` bool (None: no mask yet).

        Interactive, as SAM's own loop (see :mod:`automedsam.refinement`): a refine builds on
        what was placed before on the slice as long as ``mask`` is the mask this engine last
        returned there; any other mask (the user edited it, undid a step, segmented again) starts
        a new interaction from that mask. Points placed before are not added twice when a caller
        re-sends them all, as Slicer's markups do. Decoder-only on the cached embedding.
        """
        k = self.check_slice(slice_index)
        mode = mode or ("semi" if self.prompt_network is not None else "manual")
        if mode not in ("semi", "manual"):
            raise InvalidInputError(f"mode must be 'semi' or 'manual', got {mode!r}")
        if mode == "semi" and self.prompt_network is None:
            raise InvalidInputError("semi-automatic refine needs a model bundle; use mode='manual'")
        name = self.class_info(class_name).name
        shape = self.require_volume().array.shape[1:3]
        current = None if mask is None else _slice_mask(mask, shape, "mask")
        view, kv = self.slice_view(k)
        o = view.orientation
        points = None if points is None or not len(points) else o.points_to_canonical(k, _points(points, shape))
        box = None if box is None else o.box_to_canonical(k, _box(box, shape))
        current = None if current is None else o.plane_to_canonical(current)
        _check_in_window(view.store.transform, points, box)
        new = view.refiner.refine(name, kv, current, points, point_labels, box, mode, reset)
        return np.ascontiguousarray(o.plane_from_canonical(new))

    # -------------------------------------------------------------------------- propagate
    def propagate(self, class_name: str, from_slice: int, seed, direction: str = "both",
                  max_slices: int | None = None, cancel: threading.Event | None = None) -> Iterator[ProgressEvent]:
        """Carry ``seed``, the class's mask on slice ``from_slice`` as the caller has it now
        (``(J, I)``, or the class's ``(K, J, I)`` masks), to the neighbouring slices until the object
        ends.

        SAM 2 backbones use their memory (the video predictor over slices); SAM backbones seed
        each next slice with the previous mask (box + mask prompt, plus the learned tokens when a
        bundle is loaded); box-only backbones (LiteMedSAM) teach a one-class class map from the
        seed slice in seconds and prompt the next slices with it. ``direction``: ``"forward"``
        (increasing k), ``"backward"`` or ``"both"``. Events carry the slice just written; the
        "done" event's ``result`` holds the class's ``(K, J, I)`` masks on the slices written
        (``result.slices``, also ``partial["slices"]``), False elsewhere. Bad input is refused when
        called, before any work.
        """
        k0 = self.check_slice(from_slice)
        if direction not in ("forward", "backward", "both"):
            raise InvalidInputError(f"direction must be forward, backward or both, got {direction!r}")
        if max_slices is not None and max_slices < 1:
            raise InvalidInputError(f"max_slices must be at least 1, got {max_slices}")
        info = self.class_info(class_name)
        volume = self.require_volume()
        seed = np.asarray(seed)
        if seed.ndim == 3:
            if seed.shape != volume.array.shape[:3]:
                raise InvalidInputError(f"seed masks {seed.shape} are not on the volume grid {volume.array.shape[:3]}")
            seed = seed[k0]
        seed = _slice_mask(seed, volume.array.shape[1:3], "seed")
        if not seed.any():
            raise InvalidInputError(f"slice {k0} has no mask for {info.name!r} to propagate; segment or refine it "
                                    "first")
        return self._propagate_events(info, k0, seed, direction, max_slices, cancel)

    def _propagate_events(self, info: ClassInfo, k0: int, seed: np.ndarray, direction: str, max_slices: int | None,
                          cancel: threading.Event | None) -> Iterator[ProgressEvent]:
        from .propagation import SliceSource, propagate_slices

        volume = self.require_volume()
        view, kv = self.slice_view(k0)
        o, store, c = view.orientation, view.store, self.config
        n = store.require_volume().num_slices
        limit = max_slices if max_slices is not None else n
        steps = [+1, -1] if direction == "both" else ([+1] if direction == "forward" else [-1])
        if o.flips[0]:  # the model's k runs against the volume's
            steps = [-s for s in steps]
        total = sum(min(limit, (n - 1 - kv) if s > 0 else kv) for s in steps)
        learned = None
        if self.prompt_network is not None:
            def learned(k, feats, name=info.name):
                return view.learned.prompts(name, k, feats)
        source = SliceSource(self.backbone, store.transform, n, store.model_input, store.features, learned,
                             o.plane_to_canonical(seed), info.type_modifier is not None, c.propagation,
                             c.mask_threshold, c.objectness_threshold, c.stop_fraction)
        t0 = time.perf_counter()
        masks = np.zeros(volume.array.shape[:3], bool)
        written: list[int] = []
        yield ProgressEvent("start", 0, total, f"propagating {info.name} from slice {k0}")
        for k, mask in propagate_slices(source, kv, steps, limit):
            if cancel is not None and cancel.is_set():
                yield ProgressEvent("cancelled", len(written), total, "cancelled; nothing was changed")
                return
            k_out = o.slice_from_canonical(k)
            masks[k_out] = o.plane_from_canonical(mask)
            written.append(k_out)
            yield ProgressEvent("propagate", len(written), total, partial={"slice": k_out, "voxels": int(mask.sum())})
        written.sort()
        result = SegmentationResult(volume, {info.name: masks}, [info], written,
                                    {info.name: [k for k in written if masks[k].any()]}, time.perf_counter() - t0)
        yield ProgressEvent("done", len(written), max(total, len(written)), f"propagated to {len(written)} slice(s)",
                            partial={"slices": written}, result=result)

    # ------------------------------------------------------------------------------ teach
    def teach(self, labels: np.ndarray, classes: dict[str, int], save_to: str | Path, *,
              prompt_network: str = DEFAULT_PROMPT_NETWORK, epochs: int = TEACH_EPOCHS,
              train_slices: str | None = None, val_slices: str | None = TEACH_VAL_SLICES, lr: float | None = None,
              decoder_lr: float = TEACH_DECODER_LR, use_now: bool = True, name: str = TEACH_NAME,
              cancel: threading.Event | None = None) -> Iterator[TrainEvent]:
        """Teach ``classes`` (name -> label value) from ``labels`` (``(K, J, I)`` label values on the
        volume's grid): train a prompt network of kind ``prompt_network`` on this engine's backbone
        (see :func:`automedsam.training.teach.teach_config`). ``train_slices`` / ``val_slices``
        select the volume's k-slices. The bundle is saved to ``save_to`` (a rescue folder if that
        fails); the "done" event's ``bundle_path`` says where. With ``use_now`` this engine
        segments with the new bundle from then on. Bad input is refused when called, before any work."""
        from .bundle import check_bundle_destination
        from .classes import check_classes_present
        from .training.teach import teach_config

        volume = self.require_volume()
        labels = np.asarray(labels)
        if labels.shape != volume.array.shape[:3]:
            raise InvalidInputError(f"labels {labels.shape} are not on the volume grid {volume.array.shape[:3]}")
        if train_slices and not self.orientation.keeps_slices:
            raise InvalidInputError(
                f"volume {volume.name!r} is stored in sagittal or coronal k-slices, but the model learns from axial "
                "slices: slices drawn on its k-slices cannot be told apart from unlabelled ones there. Teach from "
                "whole axial slices (train_slices=None) or from a volume stored axially")
        config = teach_config(self, classes, prompt_network=prompt_network, epochs=epochs, train_slices=train_slices,
                              val_slices=val_slices, lr=lr, decoder_lr=decoder_lr, name=name)
        check_classes_present(config.classes, [labels], "the label map")
        check_bundle_destination(save_to, overwrite=True)
        return self._teach_events(labels, config, Path(save_to), use_now, cancel)

    def _teach_events(self, labels, config, save_to: Path, use_now: bool, cancel) -> Iterator[TrainEvent]:
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
        volume. Embeddings are kept when the bundle sees the slices as this engine did (the same
        image encoder, intensity, slice orientation and framing); else they start over."""
        backbone = self.registry.for_bundle(bundle, Runtime(str(self.backbone.device), self.backbone.runtime))
        volume = self.volume
        same_slices = (volume is not None and backbone.same_encoder(self.backbone)
                       and bundle.slice_orientation == self.slice_orientation
                       and self._intensity_for(volume, bundle) == self._intensity
                       and self._frames_alike(backbone, bundle))
        if not same_slices:
            self._load(backbone, bundle)
            if volume is not None:
                self.set_volume(volume)
            return
        self.backbone, self.bundle = backbone, bundle
        for view in self._all_views():
            view.store.backbone = backbone
            view.refiner.clear()
        self.use_prompt_network(bundle.build_prompt_network(backbone.device), bundle.classes)

    def _frames_alike(self, backbone: Backbone, bundle: ModelBundle) -> bool:
        """Whether ``bundle``'s framing shows the current volume's slices as they are shown now (a
        bundle taught in this session records the pixel size the session's slices had)."""
        store = self.store
        framed = frame_slices(backbone, store.volume, self._framing_for(store.volume, bundle), store.intensity)
        return framed.describe() == store.transform.describe()

    # ---------------------------------------------------------------------- results, device
    def device_info(self) -> dict:
        """``{"device": "cpu" | "cuda:N", "gpu": {"name", "free_mb", "total_mb"} or None}``."""
        from .backbones import gpu_info

        return {"device": str(self.backbone.device), "gpu": gpu_info(self.backbone.device)}

    def close(self) -> None:
        """Drop the volume and cached embeddings (the model stays loaded)."""
        for view in self._all_views():
            view.store.clear()
            view.learned.clear()
            view.refiner.clear()
        self._stored = None
        self._source = None


def _check_in_window(transform: SliceTransform, points, box) -> None:
    """Refuse prompts outside the part of the slice the model sees (a bundle's framing crops slices
    larger than the field of view it was taught on): SAM would place them off its input."""
    j0, j1, i0, i1 = transform.window
    if (j0, j1, i0, i1) == (0, transform.height, 0, transform.width):
        return
    corners = [] if box is None else [np.asarray(box, float).reshape(2, 2)]
    for pts in [*([] if points is None else [np.asarray(points, float)]), *corners]:
        outside = (pts[:, 0] < i0 - 0.5) | (pts[:, 0] > i1 - 0.5) | (pts[:, 1] < j0 - 0.5) | (pts[:, 1] > j1 - 0.5)
        if outside.any():
            raise InvalidInputError(
                "a point or box lies outside the part of the slice this model bundle looks at (the body, at the "
                f"pixel size it was taught at: {(i1 - i0)} x {(j1 - j0)} voxels); segment there without the bundle "
                "(manual mode)")


def _slice_mask(mask, shape: tuple[int, int], what: str) -> np.ndarray:
    """A caller's ``(J, I)`` slice mask as bool, or InvalidInputError naming the expected shape."""
    mask = np.asarray(mask)
    if mask.shape != tuple(shape):
        raise InvalidInputError(f"{what} of shape {mask.shape} is not a slice of the volume: expected (J, I) = {shape}")
    return mask.astype(bool, copy=False)


def _points(points, shape: tuple[int, int]) -> np.ndarray:
    """Points ``(N, 2)`` (i, j) checked against a ``(J, I)`` slice."""
    p = np.asarray(points, dtype=float)
    if p.ndim == 1 and p.size == 2:
        p = p[None]
    if p.ndim != 2 or p.shape[1] != 2:
        raise InvalidInputError(f"points must be (i, j) pairs, got an array of shape {p.shape}")
    check_slice_points(p, shape, "point")
    return p


def _box(box, shape: tuple[int, int]) -> np.ndarray:
    """A box ``(i0, j0, i1, j1)`` checked against a ``(J, I)`` slice."""
    b = np.asarray(box, dtype=float).reshape(-1)
    if b.shape != (4,):
        raise InvalidInputError(f"box must be (i0, j0, i1, j1), got {box}")
    check_slice_points(b.reshape(2, 2), shape, "box corner")
    if b[0] > b[2] or b[1] > b[3]:
        raise InvalidInputError(f"box must be (i0, j0, i1, j1) with i0 <= i1 and j0 <= j1, got {box}")
    return b


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
