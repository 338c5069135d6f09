"""Interactive accuracy, measured as click-based interactive-segmentation benchmarks do.

For each class and each slice k that holds the object, a simulated user starts from

- ``"box"``: the reference mask's box on the slice (manual mode, plain SAM prompting), or
- ``"auto"``: the bundle's automatic result on the slice (semi-automatic mode),

then clicks up to N times. Each click goes to the point deepest inside the largest error region
(Euclidean distance to the region's edge, the slice border counting as edge): a + click in a missed
region, a - click in a false one. Every refine builds on the prompts placed before on that slice
and on the previous low-resolution logits (:meth:`automedsam.engine.Engine.refine`), as SAM's own
interactive loop does.

Propagation accuracy: from the reference mask on one slice per class (the middle of the slices
that hold it), :meth:`~automedsam.engine.Engine.propagate` both ways, scored in 3-D.

Masks are ``(K, J, I)`` bool arrays on the image grid (KJI); click points are voxel ``(i, j)``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import InvalidInputError
from .metrics import dice

START_MODES = ("box", "auto")


@dataclass(frozen=True)
class ClickProtocol:
    """How the simulated user behaves.

    Attributes:
        clicks: clicks after the start (box or automatic result).
        start: ``"box"`` or ``"auto"`` (needs a model bundle).
        target_dsc: the DSC whose click count is reported (NoC@90 for 0.9).
    """

    clicks: int = 5
    start: str = "box"
    target_dsc: float = 0.9

    def __post_init__(self) -> None:
        if self.start not in START_MODES:
            raise InvalidInputError(f"start must be one of {', '.join(START_MODES)}, got {self.start!r}")
        if not 0 <= self.clicks <= 100:
            raise InvalidInputError(f"clicks must be between 0 and 100, got {self.clicks}")
        if not 0.0 < self.target_dsc <= 1.0:
            raise InvalidInputError(f"target DSC must be in (0, 1], got {self.target_dsc}")


def next_click(pred: np.ndarray, ref: np.ndarray) -> tuple[tuple[int, int], int] | None:
    """The next simulated click on a ``(J, I)`` slice: ``((i, j), label)`` with label 1 (+, in a
    missed region) or 0 (-, in a false region), or None when the mask is already exact."""
    from scipy import ndimage

    best = None
    for error, label in ((ref & ~pred, 1), (pred & ~ref, 0)):
        regions, count = ndimage.label(error)
        if count == 0:
            continue
        sizes = np.bincount(regions.reshape(-1))
        sizes[0] = 0
        largest = int(sizes.argmax())
        if best is None or sizes[largest] > best[0]:
            best = (int(sizes[largest]), regions == largest, label)
    if best is None:
        return None
    depth = ndimage.distance_transform_edt(np.pad(best[1], 1))[1:-1, 1:-1]
    j, i = np.unravel_index(int(depth.argmax()), depth.shape)
    return (int(i), int(j)), best[2]


def box_of(mask: np.ndarray) -> tuple[int, int, int, int]:
    """``(i0, j0, i1, j1)`` extreme voxel indices of a non-empty ``(J, I)`` mask."""
    jj, ii = np.nonzero(mask)
    return int(ii.min()), int(jj.min()), int(ii.max()), int(jj.max())


def simulate_slice(engine, name: str, k: int, ref: np.ndarray, protocol: ClickProtocol) -> dict:
    """One slice: the start mask, then up to ``protocol.clicks`` clicks.

    Returns:
        ``{"masks": [(J, I) bool per click index], "ms": [ms per refine]}`` (index 0 = start).
    """
    times: list[float] = []
    if protocol.start == "box":
        mode = "manual"
        t = time.perf_counter()
        mask = engine.refine(name, k, box=box_of(ref), mode=mode, reset=True)
        times.append((time.perf_counter() - t) * 1000.0)
    else:
        mode = "semi"
        result = engine.segment_volume([name], [k], cleanup="none")
        mask = result.masks[name][k]
    masks = [mask]
    for _ in range(protocol.clicks):
        click = next_click(mask, ref)
        if click is not None:
            (i, j), label = click
            t = time.perf_counter()
            mask = engine.refine(name, k, points=[(i, j)], point_labels=[label], mode=mode, mask=mask)
            times.append((time.perf_counter() - t) * 1000.0)
        masks.append(mask)
    return {"masks": masks, "ms": times}


def evaluate_clicks(engine, labels: np.ndarray, classes: dict[str, int], protocol: ClickProtocol,
                    slices: Sequence[int] | None = None) -> dict:
    """Simulate the user on every slice of ``slices`` (default all) that holds each class.

    Args:
        engine: an :class:`~automedsam.engine.Engine` with the case's volume set.
        labels: ``(K, J, I)`` reference label values on the volume's grid.
        classes: class name -> label value.

    Returns:
        per class: ``dsc_by_click`` (DSC over the stack of evaluated slices after 0..N clicks;
        index 0 = box or automatic result), ``slice_dsc_by_click`` (mean per-slice DSC),
        ``clicks_to_target`` (mean clicks until a slice reaches the target DSC; slices that never
        do count N), ``reached_target`` (fraction of slices that do), ``worse_clicks`` (fraction of
        clicks that lowered a slice's DSC), ``ms_per_interaction`` (mean and p50 of refines) and
        ``slices``.
    """
    out = {}
    ks_all = range(labels.shape[0]) if slices is None else slices
    for name, value in classes.items():
        ref = labels == value
        ks = [int(k) for k in ks_all if ref[k].any()]
        if not ks:
            out[name] = {"slices": 0, "note": "the class is on none of the evaluated slices"}
            continue
        engine.encode(ks)  # interaction latency is decoder time, as on slices a user has open
        steps = protocol.clicks + 1
        pred = np.zeros((steps, len(ks), *ref.shape[1:]), bool)
        slice_dsc = np.zeros((steps, len(ks)))
        times: list[float] = []
        for n, k in enumerate(ks):
            run = simulate_slice(engine, name, k, ref[k], protocol)
            times += run["ms"]
            for c, mask in enumerate(run["masks"]):
                pred[c, n] = mask
                slice_dsc[c, n] = dice(mask, ref[k])
        reached = slice_dsc >= protocol.target_dsc
        first = np.where(reached.any(axis=0), reached.argmax(axis=0), protocol.clicks)
        changes = np.diff(slice_dsc, axis=0)
        out[name] = {
            "dsc_by_click": [round(dice(pred[c], ref[ks]), 4) for c in range(steps)],
            "slice_dsc_by_click": [round(float(v), 4) for v in slice_dsc.mean(axis=1)],
            "clicks_to_target": round(float(first.mean()), 2),
            "reached_target": round(float(reached.any(axis=0).mean()), 3),
            "worse_clicks": round(float((changes < -1e-9).mean()), 3) if changes.size else 0.0,
            "ms_per_interaction": {"mean": round(float(np.mean(times)), 1) if times else None,
                                   "p50": round(float(np.median(times)), 1) if times else None},
            "slices": len(ks),
        }
    return out


def evaluate_propagation(engine, labels: np.ndarray, classes: dict[str, int]) -> dict:
    """Per class: seed the reference mask of the middle slice holding it, propagate both ways
    (nothing else seeded) and score the whole volume in 3-D."""
    from .contract import CancelledError

    out = {}
    for name, value in classes.items():
        ref = labels == value
        ks = np.flatnonzero(ref.any(axis=(1, 2)))
        if not len(ks) or labels.shape[0] < 2:
            out[name] = {"dsc": None, "note": "the class is not in this volume" if not len(ks) else
                         "a single slice: nothing to propagate to"}
            continue
        k0 = int(ks[len(ks) // 2])
        t = time.perf_counter()
        result = None
        for event in engine.propagate(name, k0, ref[k0], "both"):
            if event.stage == "cancelled":
                raise CancelledError(event.message)
            result = event.result or result
        pred = result.masks[engine.class_info(name).name].copy()
        pred[k0] = ref[k0]  # the seed slice stays as the user drew it
        out[name] = {"dsc": round(dice(pred, ref), 4), "from_slice": k0,
                     "slices_predicted": int(pred.any(axis=(1, 2)).sum()), "slices_reference": len(ks),
                     "seconds": round(time.perf_counter() - t, 2)}
    return out
