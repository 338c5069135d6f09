"""The masks of one volume as a Python caller owns them, with undo: what a script or the CLI uses
where Slicer uses its segmentation node and its undo history.

An engine (:class:`~automedsam.contract.SegmentationEngine`) keeps no masks; :class:`Annotation`
holds them (``(K, J, I)`` bool per class on the volume's grid), hands them to the engine as each
call needs them (``refine``'s slice mask, ``propagate``'s seed), writes back what comes out, and
keeps every change as one undo step (bit-packed, bounded).

Example::

    notes = Annotation(engine)              # engine.set_volume(volume) was called
    notes.segment(["liver"])
    notes.refine("liver", 40, points=[(120, 88)], point_labels=[0])
    notes.undo("liver")                     # slice 40 as segmented
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .contract import CancelledError, SegmentationEngine, SegmentationResult, result_of
from .errors import InvalidInputError
from .history import ANY, PackedMask, UndoStack

#: One undo step: the class name and its (slice k, mask before) pairs; k None: the whole
#: ``(K, J, I)`` masks before (None: the class had none).
UndoStep = tuple[str, list[tuple[int | None, PackedMask | None]]]


class Annotation:
    """Masks of ``engine``'s volume, edited through the engine, with ``undo_steps`` of undo."""

    def __init__(self, engine: SegmentationEngine, undo_steps: int = 30):
        self.engine = engine
        self.shape = tuple(engine.require_volume().array.shape[:3])
        self.masks: dict[str, np.ndarray] = {}
        self.history: UndoStack[UndoStep] = UndoStack(undo_steps)

    def _name(self, class_name: str) -> str:
        return self.engine.class_info(class_name).name

    def mask(self, class_name: str) -> np.ndarray:
        """A copy of the class's ``(K, J, I)`` masks (all False where it has none)."""
        masks = self.masks.get(self._name(class_name))
        return masks.copy() if masks is not None else np.zeros(self.shape, bool)

    # ------------------------------------------------------------------------------- edits
    def set(self, class_name: str, masks: np.ndarray) -> None:
        """Replace the class's ``(K, J, I)`` masks (an edit made by hand); one undo step."""
        masks = np.asarray(masks)
        if masks.shape != self.shape:
            raise InvalidInputError(f"masks {masks.shape} are not on the volume grid {self.shape}")
        name = self._name(class_name)
        before = self.masks.get(name)
        self.history.push(name, (name, [(None, None if before is None else PackedMask.of(before))]))
        self.masks[name] = masks.astype(bool, copy=True)

    def _write_slices(self, name: str, new: dict[int, np.ndarray]) -> None:
        current = self.masks.setdefault(name, np.zeros(self.shape, bool))
        self.history.push(name, (name, [(k, PackedMask.of(current[k])) for k in new]))
        for k, m in new.items():
            current[k] = m

    def segment(self, classes: Sequence[str], slices: Sequence[int] | None = None, **options) -> SegmentationResult:
        """:meth:`SegmentationEngine.segment` to its end; the segmented slices replace the classes'
        masks there (one undo step per class), other slices keep theirs."""
        result = result_of(self.engine.segment(classes, slices, **options))
        for info in result.classes:
            self._write_slices(info.name, {k: result.masks[info.name][k] for k in result.slices})
        return result

    def refine(self, class_name: str, slice_index: int, **prompts) -> np.ndarray:
        """:meth:`SegmentationEngine.refine` from the slice's current mask; one undo step."""
        name = self._name(class_name)
        k = int(slice_index)
        current = self.masks[name][k] if name in self.masks and 0 <= k < self.shape[0] else None
        mask = self.engine.refine(name, k, mask=current, **prompts)
        self._write_slices(name, {k: mask})
        return mask

    def propagate(self, class_name: str, from_slice: int, direction: str = "both", max_slices: int | None = None,
                  cancel=None) -> list[int]:
        """:meth:`SegmentationEngine.propagate` from the class's current mask on ``from_slice``; the
        slices written (one undo step). Raises :class:`CancelledError` when cancelled."""
        name = self._name(class_name)
        result = None
        for event in self.engine.propagate(name, from_slice, self.mask(name)[int(from_slice)], direction, max_slices,
                                           cancel=cancel):
            if event.stage == "cancelled":
                raise CancelledError(event.message or "cancelled; nothing was changed")
            result = event.result or result
        if result is None:
            raise CancelledError("propagation ended without a result")
        if result.slices:
            self._write_slices(name, {k: result.masks[name][k] for k in result.slices})
        return list(result.slices)

    # -------------------------------------------------------------------------------- undo
    def undo(self, class_name: str | None = None) -> list[int] | None:
        """Undo the last change (to ``class_name`` if given); the slices it touched, or None."""
        key = ANY if class_name is None else self._name(class_name)
        found = self.history.pop(key)
        if found is None:
            return None
        name, group = found
        changed: list[int] = []
        for k, old in reversed(group):
            if k is None:
                if old is None:
                    self.masks.pop(name, None)
                else:
                    self.masks[name] = old.unpack()
                changed = list(range(self.shape[0]))
            else:
                self.masks[name][k] = old.unpack()
                changed.append(k)
        return sorted(set(changed))

    def can_undo(self, class_name: str | None = None) -> bool:
        return self.history.can_undo(ANY if class_name is None else self._name(class_name))
