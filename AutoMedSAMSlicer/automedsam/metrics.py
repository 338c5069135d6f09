"""Segmentation metrics as the papers report them: Dice (DSC) and normalised surface Dice (NSD).

Both take boolean masks on one voxel grid (KJI arrays, or 2-D (J, I) slices) and the voxel spacing
in millimetres in the *same axis order as the array* (``(s_k, s_j, s_i)`` for a KJI volume, i.e.
``tuple(reversed(volume.spacing))``). NSD uses MONAI's ``compute_surface_dice`` (boundary voxels,
Euclidean distance with anisotropic spacing) at a tolerance in millimetres (default 2 mm, as in the
AutoMedSAM paper).

Empty masks (defined, not NaN): both empty -> DSC = NSD = 1 (nothing to find, nothing found);
exactly one empty -> DSC = NSD = 0.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from .errors import InvalidInputError

if TYPE_CHECKING:
    from .segmentation import Segmentation
    from .volume import Volume


def _check(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    if pred.shape != ref.shape:
        raise InvalidInputError(f"prediction {pred.shape} and reference {ref.shape} are not on the same grid")
    return pred, ref


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice similarity coefficient ``2|P∩R| / (|P| + |R|)`` (1.0 when both are empty)."""
    pred, ref = _check(pred, ref)
    total = int(pred.sum()) + int(ref.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, ref).sum()) / total


def normalized_surface_dice(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float],
                            tolerance_mm: float = 2.0) -> float:
    """NSD at ``tolerance_mm``: the fraction of both boundaries within the tolerance of the other.

    Args:
        spacing: voxel size in mm per array axis (same order as the array's axes).
    """
    import torch
    from monai.metrics import compute_surface_dice

    pred, ref = _check(pred, ref)
    if len(spacing) != pred.ndim:
        raise InvalidInputError(f"spacing {tuple(spacing)} must have one value per array axis ({pred.ndim})")
    if not (np.isfinite(tolerance_mm) and tolerance_mm >= 0):
        raise InvalidInputError(f"tolerance must be a finite number of mm >= 0, got {tolerance_mm}")
    p_any, r_any = bool(pred.any()), bool(ref.any())
    if not p_any and not r_any:
        return 1.0
    if p_any != r_any:
        return 0.0
    with warnings.catch_warnings():  # MONAI 1.5+ warns about its own internal use of a deprecated argument
        warnings.simplefilter("ignore", FutureWarning)
        value = compute_surface_dice(
            torch.from_numpy(pred[None, None].astype(np.float32)),
            torch.from_numpy(ref[None, None].astype(np.float32)),
            class_thresholds=[float(tolerance_mm)], include_background=True, spacing=[float(s) for s in spacing],
        )
    return float(value.reshape(-1)[0])


def evaluate_masks(pred: dict[str, np.ndarray], ref: dict[str, np.ndarray], spacing: Sequence[float],
                   tolerance_mm: float = 2.0) -> dict:
    """Per-class DSC/NSD and their means, as the papers' tables report them.

    A class empty in both prediction and reference (e.g. a mistyped label value) says nothing
    about the model: it is listed under ``absent`` and left out of ``classes`` and the means.

    Returns:
        ``{"classes": {name: {"dsc", "nsd", "pred_voxels", "ref_voxels"}}, "mean": {"dsc", "nsd"},
        "absent": [names], "tolerance_mm": t}`` (means are None when no class is present).
    """
    if not (np.isfinite(tolerance_mm) and tolerance_mm >= 0):
        raise InvalidInputError(f"tolerance must be a finite number of mm >= 0, got {tolerance_mm}")
    classes, absent = {}, []
    for name in ref:
        p, r = pred[name], ref[name]
        if not np.any(p) and not np.any(r):
            absent.append(name)
            continue
        classes[name] = {
            "dsc": round(dice(p, r), 4),
            "nsd": round(normalized_surface_dice(p, r, spacing, tolerance_mm), 4),
            "pred_voxels": int(np.count_nonzero(p)),
            "ref_voxels": int(np.count_nonzero(r)),
        }
    mean = {m: round(float(np.mean([c[m] for c in classes.values()])), 4) if classes else None
            for m in ("dsc", "nsd")}
    return {"classes": classes, "mean": mean, "absent": absent, "tolerance_mm": tolerance_mm}


def reference_masks(seg: Segmentation, classes: dict[str, int], grid: Volume) -> dict[str, np.ndarray]:
    """Boolean ``(K, J, I)`` masks on ``grid`` per class: the segment of that name (or its catalog
    spelling or display name) if the segmentation has one (a ``.seg.nrrd``), else the voxels with
    that label value; brought onto ``grid`` through physical space (nearest neighbour), so the two
    may store their voxels in different orders.

    Raises:
        GeometryError: the segmentation does not overlap ``grid`` at all."""
    from .classes import default_class_catalog
    from .resample import labels_onto_grid

    catalog = default_class_catalog()
    by_name = {key.lower(): s for s in seg.segments for key in (s.name, s.segment_id)}
    merged = None
    out = {}
    for name, value in classes.items():
        # The name as given, else its catalog spelling or display name (kidney_right -> right_kidney).
        known = catalog.get(name) if name in catalog else None
        keys = [name] + ([known.name, known.display_name] if known else [])
        info = next((by_name[k.lower()] for k in keys if k.lower() in by_name), None)
        if info is not None:
            layer = seg.layers[info.layer]
            mask = layer.with_array((layer.array == info.label_value).astype("uint8"))
        else:
            merged = merged if merged is not None else seg.label_volume()
            mask = merged.with_array((merged.array == value).astype("uint8"))
        out[name] = labels_onto_grid(mask, grid).array > 0
    return out
