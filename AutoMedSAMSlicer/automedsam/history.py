"""Undo: one bounded stack of steps, each filed under a key, used by the Python API's
:class:`~automedsam.annotation.Annotation` (per class name) and the Slicer layer (per segmentation
node) alike; masks kept for undo are bit-packed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

Step = TypeVar("Step")

#: Matches every key in :meth:`UndoStack.pop` and :meth:`UndoStack.can_undo`.
ANY = object()


@dataclass(frozen=True)
class PackedMask:
    """A boolean array kept for undo at one bit per voxel (``shape`` is the array's, e.g. KJI)."""

    bits: bytes
    shape: tuple[int, ...]

    @classmethod
    def of(cls, mask: np.ndarray) -> PackedMask:
        mask = np.asarray(mask, bool)
        return cls(np.packbits(mask.reshape(-1)).tobytes(), tuple(mask.shape))

    def unpack(self) -> np.ndarray:
        count = int(np.prod(self.shape))
        return np.unpackbits(np.frombuffer(self.bits, np.uint8), count=count).astype(bool).reshape(self.shape)


class UndoStack(Generic[Step]):
    """Undo steps, newest last, each under a key; at most ``max_steps`` in all (the oldest go first)."""

    def __init__(self, max_steps: int = 30):
        if max_steps < 1:
            raise ValueError(f"max_steps must be at least 1, got {max_steps}")
        self.max_steps = max_steps
        self._steps: list[tuple[object, Step]] = []

    def push(self, key, step: Step) -> None:
        self._steps.append((key, step))
        del self._steps[:-self.max_steps]

    @staticmethod
    def _matches(key, wanted) -> bool:
        return wanted is ANY or key is wanted or key == wanted

    def can_undo(self, key=ANY) -> bool:
        return any(self._matches(k, key) for k, _ in self._steps)

    def peek(self, key=ANY) -> Step | None:
        """The newest step under ``key`` (any key by default), left on the stack; None if none."""
        for k, step in reversed(self._steps):
            if self._matches(k, key):
                return step
        return None

    def pop(self, key=ANY) -> Step | None:
        """The newest step under ``key`` (any key by default), taken off the stack; None if none."""
        for n in range(len(self._steps) - 1, -1, -1):
            if self._matches(self._steps[n][0], key):
                return self._steps.pop(n)[1]
        return None

    def clear(self) -> None:
        self._steps.clear()

    def __len__(self) -> int:
        return len(self._steps)
