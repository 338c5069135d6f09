"""Progress bars (tqdm on stderr) around the engine's long runs, shared by the commands."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def run_segment(engine, classes: Sequence[str], slices: Sequence[int] | None = None):
    """Run :meth:`Engine.segment` to the end with a progress bar; returns the result."""
    from tqdm import tqdm

    from ..contract import CancelledError

    total = engine.volume.num_slices if slices is None else len(slices)
    result = None
    with tqdm(total=total, unit="slice", desc="segment", file=sys.stderr) as bar:
        for event in engine.segment(list(classes), slices):
            bar.update(event.done - bar.n)
            if event.result is not None:
                result = event.result
    if result is None:
        raise CancelledError("segmentation ended without a result")
    return result
