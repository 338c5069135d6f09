"""The Python caller's masks and undo (:class:`automedsam.annotation.Annotation`): the engine keeps
none, so the helper hands each call the mask it holds and keeps every change undoable."""

from __future__ import annotations

import numpy as np
import pytest
from test_engine import Oracle, small_volume

from automedsam.annotation import Annotation
from automedsam.errors import InvalidInputError


def test_segment_refine_propagate_and_undo_through_the_callers_masks(make_engine):
    engine = make_engine("tiny-sam", "ppn", cleanup="none", objectness_threshold=-1e9)
    engine.set_volume(small_volume(8))
    truth = np.zeros((8, 40, 50), bool)
    truth[2:7, 12:28, 16:34] = True
    Oracle(engine, truth)
    notes = Annotation(engine)
    drawn = np.zeros((8, 40, 50), bool)
    drawn[:, 1:4, 1:4] = True
    notes.set("Liver", drawn)  # the user's own work; names resolve as the engine's do
    notes.segment(["liver"], slices=[3])
    after = notes.mask("liver")
    assert np.array_equal(after[3], truth[3])  # the segmented slice
    kept = [k for k in range(8) if k != 3]
    assert np.array_equal(after[kept], drawn[kept])  # the others keep the user's work
    erased = after.copy()
    erased[3] = False
    erased[3, 12:20, 16:34] = True
    notes.set("liver", erased)
    written = notes.propagate("liver", 3)
    assert written and all(np.array_equal(notes.mask("liver")[k], truth[k]) for k in written)
    assert np.array_equal(notes.mask("liver")[3], erased[3])  # the seed is the user's, untouched
    assert notes.undo("liver") == written and np.array_equal(notes.mask("liver"), erased)
    assert notes.undo() == list(range(8)) and np.array_equal(notes.mask("liver"), after)
    assert notes.undo("liver") == [3] and np.array_equal(notes.mask("liver"), drawn)
    assert notes.undo("liver") == list(range(8)) and not notes.mask("liver").any()
    assert notes.undo("liver") is None and not notes.can_undo()
    with pytest.raises(InvalidInputError, match="not on the volume grid"):
        notes.set("liver", drawn[:3])


def test_refine_starts_from_the_held_mask_and_is_one_undo_step(make_engine):
    engine = make_engine("tiny-sam", "ppn")
    engine.set_volume(small_volume(4))
    notes = Annotation(engine, undo_steps=2)
    first = notes.refine("liver", 1, box=[15, 10, 34, 29], mode="manual")
    second = notes.refine("liver", 1, points=[[20, 20]], point_labels=[0], mode="manual")
    notes.refine("liver", 2, box=[15, 10, 34, 29], mode="manual")
    assert np.array_equal(notes.mask("liver")[1], second)
    assert notes.undo("liver") == [2] and notes.undo("liver") == [1]
    assert np.array_equal(notes.mask("liver")[1], first)
    assert notes.undo("liver") is None  # bounded: the oldest step was dropped
