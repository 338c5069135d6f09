"""Undo for everything AutoMedSAM writes into a segmentation node.

Each step records, per segment, what was there before (bit-packed, whole volume or just the
slices that changed) or that the segment did not exist, so a user's segment is never lost to a
model result. The steps sit on the core's :class:`automedsam.history.UndoStack`, filed under
their segmentation node.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from automedsam.history import ANY, PackedMask, UndoStack

from . import nodes


@dataclass
class _SegmentBefore:
    segmentId: str
    created: bool
    slices: list[int] | None  # None: the whole volume was replaced
    packed: PackedMask | None = None
    writtenSlices: str = ""  # the segment's per-slice record before the step (which slices were the user's)

    def restore(self, segmentationNode, volumeNode) -> None:
        if self.created:
            segmentationNode.GetSegmentation().RemoveSegment(self.segmentId)
            return
        before = self.packed.unpack()
        if self.slices is None:
            nodes.writeSegmentMask(segmentationNode, self.segmentId, before, volumeNode)
        else:  # only the slices the step changed, as the click itself wrote them
            nodes.writeSegmentSlices(segmentationNode, self.segmentId, dict(zip(self.slices, before, strict=True)),
                                     volumeNode)
        # Ownership too: slices the user had drawn count as theirs again.
        segmentationNode.SetAttribute(nodes.WRITTEN_SLICES_ATTRIBUTE + self.segmentId, self.writtenSlices)


@dataclass
class UndoStep:
    """One user action (segment, refine, propagate) on one segmentation node: what each segment held
    before, and the fingerprints of the slices the step wrote (so an edit made there since is recognised)."""

    label: str
    segmentationNode: object
    volumeNode: object
    before: list[_SegmentBefore] = field(default_factory=list)
    written: dict[str, dict[int, str]] = field(default_factory=dict)

    def recordWritten(self, segmentId: str, planes: dict) -> None:
        """The slices (k -> ``(J, I)`` mask) the step wrote into ``segmentId``."""
        self.written[segmentId] = {int(k): nodes.sliceFingerprint(p) for k, p in planes.items()}

    def editedSince(self) -> list[str]:
        """Names of the segments whose slices this step wrote changed since (drawn, erased, or changed
        by a later step), or that were removed. Only those slices matter: undo resets nothing else."""
        segmentation = self.segmentationNode.GetSegmentation()
        changed = []
        for segmentId, fingerprints in self.written.items():
            segment = segmentation.GetSegment(segmentId)
            if segment is None:
                changed.append(segmentId)
                continue
            ks = sorted(fingerprints)
            now = nodes.readSegmentSlices(self.segmentationNode, segmentId, self.volumeNode, ks)
            if any(nodes.sliceFingerprint(plane) != fingerprints[k] for k, plane in zip(ks, now, strict=True)):
                changed.append(segment.GetName())
        return changed

    def recordCreated(self, segmentId: str) -> None:
        self.before.append(_SegmentBefore(segmentId, True, None))

    def recordMask(self, segmentId: str, mask: np.ndarray, slices: list[int] | None = None) -> None:
        """What ``segmentId`` held before: ``mask`` is its whole ``(K, J, I)`` mask (``slices`` None),
        or its planes on ``slices`` (``(len(slices), J, I)``)."""
        perSlice = self.segmentationNode.GetAttribute(nodes.WRITTEN_SLICES_ATTRIBUTE + segmentId) or ""
        self.before.append(_SegmentBefore(segmentId, False, slices, PackedMask.of(mask), perSlice))


class EditedSinceError(ValueError):
    """An undo refused because segments changed after the step (``segments``: their names)."""

    def __init__(self, message: str, segments: list[str]):
        super().__init__(message)
        self.segments = segments


class UndoHistory:
    """A bounded stack of :class:`UndoStep` (oldest dropped first), filed by segmentation node."""

    def __init__(self, maxSteps: int = 30):
        self._stack: UndoStack[UndoStep] = UndoStack(maxSteps)

    def push(self, step: UndoStep) -> None:
        if step.before:
            self._stack.push(step.segmentationNode, step)

    def canUndo(self, segmentationNode=None) -> bool:
        return self._stack.can_undo(ANY if segmentationNode is None else segmentationNode)

    def undo(self, segmentationNode=None, onEditedSince="refuse") -> str | None:
        """Undo the newest step (on ``segmentationNode`` if given); returns its label or None.

        A segment edited after the step wrote it would lose that edit: with ``onEditedSince``
        ``"refuse"`` (the default) nothing changes and :class:`EditedSinceError` names the segments;
        ``"overwrite"`` undoes anyway; a callable gets the segment names and returns either.
        """
        which = ANY if segmentationNode is None else segmentationNode
        step = self._stack.peek(which)
        if step is None:
            return None
        edited = step.editedSince()
        if edited:
            decision = onEditedSince(edited) if callable(onEditedSince) else onEditedSince
            if decision not in ("refuse", "overwrite"):
                raise ValueError(f"onEditedSince must be 'refuse' or 'overwrite', got {decision!r}")
            if decision == "refuse":
                raise EditedSinceError(
                    f"not undone: {', '.join(edited)} changed after '{step.label}' (edited by hand or by a later "
                    "step); undoing it would lose those changes. Undo them first with Slicer's own undo, or undo "
                    "with onEditedSince='overwrite'", edited)
        self._stack.pop(which)
        for before in reversed(step.before):
            before.restore(step.segmentationNode, step.volumeNode)
        return step.label

    def clear(self) -> None:
        self._stack.clear()
