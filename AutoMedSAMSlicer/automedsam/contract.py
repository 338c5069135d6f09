"""The segmentation engine's public contract, stated once.

:class:`SegmentationEngine` is what every engine offers, whether it computes in this process
(:class:`automedsam.engine.Engine`) or in a worker (:class:`automedsam.client.RemoteEngine`); the
Slicer layer, the CLI and the benchmarks program against it. Both return the types defined here and
raise the same named errors (:mod:`automedsam.errors`), so a caller never asks which one it holds.

Coordinates in every call are voxel indices of the volume given to ``set_volume``: ``slice_index``
is ``k`` (``volume.array[k]``); points are ``(i, j)`` (column, row) on that slice; boxes are
``(i0, j0, i1, j1)``, the indices of the object's extreme voxels (inclusive). Masks are boolean
arrays ``(J, I)`` per slice or ``(K, J, I)`` per volume ("KJI", slices, rows, columns) on the volume's
own grid, so they carry its geometry (any direction, flipped or oblique) unchanged; physical
positions (LPS millimetres) live in the :class:`~automedsam.volume.Volume`, never in these calls.
The same volume stored in another voxel order gives the same masks (the engine shows the model
one slice orientation, see :mod:`automedsam.orientation`).

The caller owns the masks: an engine returns them and takes them back as arguments (``refine``'s
``mask``, ``propagate``'s ``seed``); it holds no copy of its own, so nothing is lost when a worker
restarts, and an edit made elsewhere (Slicer's Segment Editor, an undo) is what the next call
starts from. Undo is the caller's (Slicer's history, :class:`automedsam.annotation.Annotation`).

Long work (``segment``, ``propagate``, ``teach``) is a generator of events; the result comes on the
last event of a completed run: a consumer that stops iterating, or a ``cancel`` event that is set,
gets none. Numpy only: importing this never imports torch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from .classes import ClassCatalog, ClassInfo
from .errors import AutoMedSAMError
from .segmentation import Segmentation, SegmentInfo
from .volume import Volume

if TYPE_CHECKING:
    import threading
    from pathlib import Path


#: Teaching defaults, stated once for the engine, the remote client, the wire protocol, the
#: training configuration, the CLI and the Slicer Logic.
DEFAULT_PROMPT_NETWORK = "classmap"
TEACH_EPOCHS = 40
TEACH_VAL_SLICES = "0::3"
TEACH_DECODER_LR = 1e-5
TEACH_NAME = "taught-in-session"


class CancelledError(AutoMedSAMError):
    """A run was cancelled before it finished; nothing was changed."""


@dataclass
class SegmentationResult:
    """Masks of one ``segment`` (or ``propagate``) run.

    Attributes:
        masks: class name -> ``(K, J, I)`` bool mask on the volume's grid (False outside ``slices``).
        classes: the classes, in the order asked for.
        slices: the slice indices k that were segmented (or propagated to).
        present_slices: class name -> slice indices where the class was predicted present.
        seconds: wall time of the run.
    """

    volume: Volume
    masks: dict[str, np.ndarray]
    classes: list[ClassInfo]
    slices: list[int]
    present_slices: dict[str, list[int]]
    seconds: float

    def to_segmentation(self) -> Segmentation:
        """Named, coloured, terminology-coded segments (label value = position + 1) on the volume's
        grid; overlapping classes go to extra layers, as Slicer stores them."""
        layers: list[np.ndarray] = []
        segments = []
        shape = self.volume.array.shape[:3]
        for value, info in enumerate(self.classes, start=1):
            mask = self.masks[info.name]
            layer = next((n for n, arr in enumerate(layers) if not arr[mask].any()), None)
            if layer is None:
                layers.append(np.zeros(shape, np.uint8 if len(self.classes) < 255 else np.uint16))
                layer = len(layers) - 1
            layers[layer][mask] = value
            segments.append(SegmentInfo(info.display_name, value, info.color_float, info.terminology_entry(),
                                        segment_id=info.name, layer=layer))
        if not layers:
            layers.append(np.zeros(shape, np.uint8))
        return Segmentation(tuple(self.volume.with_array(arr) for arr in layers), tuple(segments))

    def summary(self) -> dict:
        """Per class: voxels, number of slices with mask; plus wall time."""
        spacing = float(np.prod(self.volume.spacing))
        return {
            "seconds": round(self.seconds, 3),
            "slices": len(self.slices),
            "classes": {
                info.name: {
                    "voxels": int(self.masks[info.name].sum()),
                    "volume_ml": round(float(self.masks[info.name].sum()) * spacing / 1000.0, 3),
                    "slices_with_mask": int(self.masks[info.name].any(axis=(1, 2)).sum()),
                }
                for info in self.classes
            },
        }


@dataclass(frozen=True)
class ProgressEvent:
    """One step of a long run.

    Attributes:
        stage: ``"start"``, ``"segment"``, ``"propagate"``, ``"cleanup"``, ``"done"`` or ``"cancelled"``.
        done, total: progress in slices.
        message: human-readable status (e.g. a CPU fall-back after CUDA out-of-memory).
        partial: class name -> voxels so far (``segment``) or the slice just written (``propagate``).
        result: on the ``"done"`` event of ``segment`` and ``propagate``, the :class:`SegmentationResult`.
    """

    stage: str
    done: int
    total: int
    message: str = ""
    partial: dict = field(default_factory=dict)
    result: SegmentationResult | None = None

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0


@dataclass(frozen=True)
class TrainEvent:
    """Progress of a training (or teaching) run.

    Attributes:
        stage: prepare, encode, step, epoch, validate, checkpoint, done or cancelled.
        epoch, epochs, step, steps: progress (epochs count from 1).
        message: human-readable status.
        losses: mean losses of the epoch so far; metrics: class -> {"dsc", "nsd"} on validation.
        bundle: the trained :class:`~automedsam.bundle.ModelBundle` on the "done" event of a
            training run in this process.
        bundle_path: where :meth:`SegmentationEngine.teach` saved the bundle, on its "done" event.
    """

    stage: str
    epoch: int = 0
    epochs: int = 0
    step: int = 0
    steps: int = 0
    message: str = ""
    losses: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    bundle: object = None
    bundle_path: str | None = None

    @property
    def fraction(self) -> float:
        return self.epoch / self.epochs if self.epochs else 0.0


def result_of(events: Iterator[ProgressEvent]) -> SegmentationResult:
    """Run a ``segment`` generator to its end: its result, or :class:`CancelledError`."""
    for event in events:
        if event.stage == "cancelled":
            raise CancelledError(event.message or "cancelled; nothing was changed")
        if event.result is not None:
            return event.result
    raise CancelledError("segmentation ended without a result")


@runtime_checkable
class SegmentationEngine(Protocol):
    """What every engine offers (in this process or through a worker). See the module docstring
    for coordinates and shapes; every method raises :class:`~automedsam.errors.InvalidInputError`
    for bad input (an unknown class, a slice out of range, masks off the volume's grid)."""

    @property
    def volume(self) -> Volume | None:
        """The volume given to :meth:`set_volume` (None before)."""

    @property
    def class_catalog(self) -> ClassCatalog:
        """The model's classes (empty in manual mode, where any class name is accepted)."""

    def class_info(self, name: str) -> ClassInfo:
        """The class for a name, display name or alias, in any case or spacing (``"Left Kidney"``
        is ``left_kidney``). Manual mode also takes names the model does not know: the shipped
        catalog's class of that name, else a new custom class."""

    def require_volume(self) -> Volume:
        """The volume; raises InvalidInputError when none was set."""

    def set_volume(self, volume: Volume) -> None:
        """Take a volume (any geometry, any voxel order)."""

    def segment(self, classes: Sequence[str], slices: Sequence[int] | None = None, *, cleanup: str | None = None,
                cancel: threading.Event | None = None) -> Iterator[ProgressEvent]:
        """Automatic masks of ``classes`` on ``slices`` k (default all). The "done" event carries the
        :class:`SegmentationResult`, whose masks are False outside ``slices``. ``cleanup``:
        ``"largest_component"`` or ``"none"`` (default: the engine's configuration)."""

    def segment_volume(self, classes: Sequence[str], slices: Sequence[int] | None = None, *,
                       cleanup: str | None = None, cancel: threading.Event | None = None) -> SegmentationResult:
        """:meth:`segment` run to its end; raises :class:`CancelledError` when cancelled."""

    def refine(self, class_name: str, slice_index: int, points=None, point_labels=None, box=None,
               mode: str | None = None, reset: bool = False, mask=None) -> np.ndarray:
        """Correct slice k of a class with ``points`` ``(N, 2)`` (i, j) and ``point_labels`` ``(N,)``
        (1 include, 0 exclude) and/or a ``box`` (i0, j0, i1, j1); ``mask`` is the slice's ``(J, I)``
        bool mask as the caller has it now (None: none yet). Returns the new ``(J, I)`` bool mask.
        ``mode``: ``"semi"`` (the model's learned prompts plus these) or ``"manual"``. Clicks build
        on the prompts placed before on the slice while ``mask`` is what the engine last returned
        there; ``reset`` (or any other ``mask``) starts a new interaction."""

    def propagate(self, class_name: str, from_slice: int, seed, direction: str = "both",
                  max_slices: int | None = None, cancel: threading.Event | None = None) -> Iterator[ProgressEvent]:
        """Carry ``seed`` (the class's ``(J, I)`` mask on ``from_slice`` as the caller has it, or its
        ``(K, J, I)`` masks) to the neighbouring slices (``"forward"``: increasing k, ``"backward"``
        or ``"both"``) until the object ends. The "done" event's ``result`` holds the class's masks
        on the slices written (``result.slices``, also ``partial["slices"]``)."""

    def teach(self, labels: np.ndarray, classes: dict[str, int], save_to: str | Path, *,
              prompt_network: str = DEFAULT_PROMPT_NETWORK, epochs: int = TEACH_EPOCHS,
              train_slices: str | None = None, val_slices: str | None = TEACH_VAL_SLICES, lr: float | None = None,
              decoder_lr: float = TEACH_DECODER_LR, use_now: bool = True, name: str = TEACH_NAME,
              cancel: threading.Event | None = None) -> Iterator[TrainEvent]:
        """Teach ``classes`` (name -> label value) from ``labels`` (``(K, J, I)`` label values on the
        volume's grid) by training a prompt network on this engine's backbone. The bundle (called
        ``name``) is saved to ``save_to`` on this machine (a rescue folder if that fails, never
        lost); the "done" event's ``bundle_path`` says where. With ``use_now`` the engine segments
        with it from then on. Bad input is refused when called, before any work."""

    def device_info(self) -> dict:
        """``{"device": ..., "gpu": {"name", "free_mb", "total_mb"} or None}`` of where it computes."""

    def close(self) -> None:
        """Release what the engine holds (a worker session)."""
