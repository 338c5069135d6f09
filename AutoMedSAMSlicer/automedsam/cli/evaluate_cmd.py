"""``automedsam evaluate``: per-class DSC and NSD of a prediction against a reference."""

from __future__ import annotations

import argparse

from .main import emit_json


def register(sub) -> None:
    p = sub.add_parser(
        "evaluate", help="DSC and NSD per class of a prediction against a reference",
        description="Compares PRED with REF in physical space (PRED is brought onto REF's grid, nearest neighbour, "
                    "so their voxel orders may differ). Classes: name=value pairs (the label value in both files; in "
                    "a .seg.nrrd the segment of that name is used), or by default every label value of REF. "
                    "Empty vs empty scores 1, empty vs non-empty 0.")
    p.add_argument("--pred", required=True, help="predicted label map or .seg.nrrd")
    p.add_argument("--ref", required=True, help="reference label map or .seg.nrrd")
    p.add_argument("--classes", help="e.g. liver=5,spleen=1 (default: all reference labels)")
    p.add_argument("--tolerance-mm", type=float, default=2.0, help="NSD tolerance in mm (default 2)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=run)


def class_masks(seg, classes: dict[str, int], grid) -> dict:
    """Boolean masks on ``grid`` per class: the segment of that name if the file has one (a
    .seg.nrrd), else the voxels with that label value; brought onto ``grid`` in physical space."""
    from ..resample import labels_onto_grid

    by_name = {key.lower(): s for s in seg.segments for key in (s.name, s.segment_id)}
    merged = None
    out = {}
    for name, value in classes.items():
        info = by_name.get(name.lower())
        if info is not None:
            layer = seg.layers[info.layer]
            mask = layer.with_array((layer.array == info.label_value).astype("uint8"))
        else:
            merged = merged if merged is not None else seg.label_volume()
            mask = merged.with_array((merged.array == value).astype("uint8"))
        out[name] = labels_onto_grid(mask, grid).array > 0
    return out


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from ..io import read_segmentation
    from ..metrics import evaluate_masks

    ref = read_segmentation(args.ref)
    pred = read_segmentation(args.pred)
    from ..training.data import parse_class_mapping

    classes = parse_class_mapping(args.classes) if args.classes else None
    if classes is None:
        values = [int(v) for v in np.unique(ref.label_volume().array) if v > 0]
        classes = {f"label_{v}": v for v in values}
    grid = ref.grid
    report = evaluate_masks(class_masks(pred, classes, grid), class_masks(ref, classes, grid),
                            tuple(reversed(grid.spacing)), args.tolerance_mm)
    report |= {"pred": args.pred, "ref": args.ref}
    if args.json:
        emit_json(report)
    else:
        for name, c in report["classes"].items():
            print(f"{name:<20} DSC {c['dsc']:.4f}  NSD@{args.tolerance_mm:g}mm {c['nsd']:.4f}")
        print(f"{'mean':<20} DSC {report['mean']['dsc']:.4f}  NSD {report['mean']['nsd']:.4f}")
    return 0
