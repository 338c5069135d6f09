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
    writtenTag: str = ""  # the segment's "written by AutoMedSAM" fingerprint before the step

    def restore(self, segmentationNode, volumeNode) -> None:
        if self.created:
            segmentationNode.GetSegmentation().RemoveSegment(self.segmentId)
            return
        before = self.packed.unpack()
        if self.slices is None:
            mask = before
        else:
            mask = nodes.readSegmentMask(segmentationNode, self.segmentId, volumeNode)
            mask[self.slices] = before
        nodes.writeSegmentMask(segmentationNode, self.segmentId, mask, volumeNode)
        # Restore ownership too: a segment the user had edited must count as edited again.
        segmentationNode.SetAttribute(nodes.WRITTEN_MASK_ATTRIBUTE + self.segmentId, self.writtenTag)


@dataclass
class UndoStep:
    """One user action (segment, refine, propagate) on one segmentation node."""

    label: str
    segmentationNode: object
    volumeNode: object
    before: list[_SegmentBefore] = field(default_factory=list)

    def recordCreated(self, segmentId: str) -> None:
        self.before.append(_SegmentBefore(segmentId, True, None))

    def recordMask(self, segmentId: str, mask: np.ndarray, slices: list[int] | None = None) -> None:
        kept = mask if slices is None else mask[slices]
        tag = self.segmentationNode.GetAttribute(nodes.WRITTEN_MASK_ATTRIBUTE + segmentId) or ""
        self.before.append(_SegmentBefore(segmentId, False, slices, PackedMask.of(kept), tag))


class UndoHistory:
    """A bounded stack of :class:`UndoStep` (oldest dropped first), filed by segmentation node."""

    def __init__(self, maxSteps: int = 30):
        self._stack: UndoStack[UndoStep] = UndoStack(maxSteps)

    def push(self, step: UndoStep) -> None:
        if step.before:
            self._stack.push(step.segmentationNode, step)

    def canUndo(self, segmentationNode=None) -> bool:
        return self._stack.can_undo(ANY if segmentationNode is None else segmentationNode)

    def undo(self, segmentationNode=None) -> str | None:
        """Undo the newest step (on ``segmentationNode`` if given); returns its label or None."""
        step = self._stack.pop(ANY if segmentationNode is None else segmentationNode)
        if step is None:
            return None
        for before in reversed(step.before):
            before.restore(step.segmentationNode, step.volumeNode)
        return step.label

    def clear(self) -> None:
        self._stack.clear()
