"""Which of the panel's markups are prompts for the next refine.

Prompts belong to one class and one slice: the + / - points and the box the user places for the
liver are not the spleen's, a box is used once per placement (a later click must not bring it
back), and the slice a propagation starts from is the active class's last refined slice. The panel
keeps one :class:`PromptTracker` and tells it when the class changes or the scene closes.
"""

from __future__ import annotations

import numpy as np

from . import nodes


class PromptTracker:
    """Prompt state of the panel: the active class, the box last used and the slice last refined."""

    def __init__(self) -> None:
        self.activeClass: str | None = None
        self.lastRefinedSlice: int | None = None
        self._usedBox: tuple | None = None

    def classChanged(self, className: str | None, pointNodes=(), boxNode=None) -> None:
        """Another class is active: the points and the box placed for the previous one are cleared
        (they would refine the new class with the old class's intent) and propagation starts over."""
        if className == self.activeClass:
            return
        if self.activeClass is not None:  # a switch (the first class keeps what was placed for it)
            for node in (*pointNodes, boxNode):
                if node is not None:
                    node.RemoveAllControlPoints()
        self.activeClass = className
        self.lastRefinedSlice = None
        self._usedBox = None

    def sceneClosed(self) -> None:
        """Nothing of a closed scene carries over."""
        self.activeClass = None
        self.lastRefinedSlice = None
        self._usedBox = None

    def box(self, boxNode):
        """``boxNode`` when it is completely placed and not yet used as it is now, else None."""
        if not nodes.roiPlaced(boxNode):
            return None
        return None if _boxKey(boxNode) == self._usedBox else boxNode

    def refined(self, k: int, boxNode=None) -> None:
        """A refine on slice k finished; ``boxNode`` (if it was a prompt) is used up."""
        self.lastRefinedSlice = int(k)
        if boxNode is not None:
            self._usedBox = _boxKey(boxNode)

    def points(self, volumeNode, positiveNode, negativeNode, reference=None) -> tuple[list, list]:
        """World RAS points and labels (1: +, 0: -) of the placed points on one k-slice: the slice
        of ``reference`` (the point just placed), else of the last placed point. Points left on other
        slices belong to earlier corrections."""
        points, labels = [], []
        for node, label in ((positiveNode, 1), (negativeNode, 0)):
            if node is not None:
                xyz = nodes.definedControlPoints(node)  # never the preview point under the mouse
                points += list(xyz)
                labels += [label] * len(xyz)
        if not points:
            return [], []
        reference = points[-1] if reference is None else reference
        ks = nodes.worldToIjk(volumeNode, np.array([*points, reference]))[:, 2]
        keep = np.abs(ks[:-1] - ks[-1]) < 0.5
        return ([p for p, kept in zip(points, keep, strict=True) if kept],
                [lb for lb, kept in zip(labels, keep, strict=True) if kept])


def _boxKey(boxNode) -> tuple:
    bounds = [0.0] * 6
    boxNode.GetRASBounds(bounds)
    return tuple(round(b, 4) for b in bounds)
