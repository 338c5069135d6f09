"""``automedsam evaluate``: per-class DSC and NSD of a prediction against a reference."""

from __future__ import annotations

import argparse
import sys

from .common import add_command, add_json_option, emit_json

#: ``automedsam evaluate``: what ``--help`` says.
HELP = "DSC and NSD per class of a prediction against a reference"
DESCRIPTION = """\
Compares PRED with REF in physical space (PRED is brought onto REF's grid, nearest neighbour, so
their voxel orders may differ). Classes: name=value pairs (the label value in both files; in a
.seg.nrrd the segment of that name is used), or by default every label value of REF. Empty vs
empty scores 1, empty vs non-empty 0.
"""


def register(sub) -> None:
    p = add_command(sub, "evaluate", run, HELP, DESCRIPTION)
    p.add_argument("--pred", action="append", required=True,
                   help="predicted label map or .seg.nrrd (repeat with --ref for more cases)")
    p.add_argument("--ref", action="append", required=True, help="reference label map or .seg.nrrd for each --pred")
    p.add_argument("--classes", help="e.g. liver=5,spleen=1 (default: all reference labels)")
    p.add_argument("--tolerance-mm", type=float, default=2.0, help="NSD tolerance in mm (default 2)")
    add_json_option(p)


def run(args: argparse.Namespace) -> int:
    import math

    import numpy as np

    from ..errors import InvalidInputError
    from ..io import read_segmentation
    from ..metrics import evaluate_masks, reference_masks
    from ..training.data import parse_class_mapping

    if len(args.pred) != len(args.ref):
        raise InvalidInputError(f"{len(args.pred)} --pred but {len(args.ref)} --ref; give one reference per prediction")
    if not (math.isfinite(args.tolerance_mm) and args.tolerance_mm >= 0):
        raise InvalidInputError(f"--tolerance-mm must be a finite number of mm >= 0, got {args.tolerance_mm}")
    given = parse_class_mapping(args.classes) if args.classes else None
    cases = []
    for pred_path, ref_path in zip(args.pred, args.ref, strict=True):
        ref = read_segmentation(ref_path)
        pred = read_segmentation(pred_path)
        classes = given
        if classes is None:
            values = [int(v) for v in np.unique(ref.label_volume().array) if v > 0]
            classes = {f"label_{v}": v for v in values}
        grid = ref.grid
        report = evaluate_masks(reference_masks(pred, classes, grid), reference_masks(ref, classes, grid),
                                tuple(reversed(grid.spacing)), args.tolerance_mm)
        for name in report["absent"]:
            print(f"warning: class {name} (label {classes[name]}) is in neither {pred_path} nor {ref_path}; it is "
                  "left out of the mean (a typo in --classes?)", file=sys.stderr)
        cases.append(report | {"pred": pred_path, "ref": ref_path})
    if len(cases) == 1:
        report = cases[0]
    else:  # per case, and per class the mean over the cases that have it
        names = list(dict.fromkeys(n for c in cases for n in c["classes"]))
        classes_mean = {n: {m: round(float(np.mean([c["classes"][n][m] for c in cases if n in c["classes"]])), 4)
                            for m in ("dsc", "nsd")} for n in names}
        report = {"cases": cases, "classes": classes_mean, "tolerance_mm": args.tolerance_mm,
                  "absent": [n for n in dict.fromkeys(a for c in cases for a in c["absent"]) if n not in names],
                  "mean": {m: round(float(np.mean([v[m] for v in classes_mean.values()])), 4) if names else None
                           for m in ("dsc", "nsd")}}
    if not report["classes"]:
        raise InvalidInputError("none of the classes occurs in the predictions or the references; nothing to score. "
                                "Check --classes (name=label_value)")
    if args.json:
        emit_json(report)
        return 0
    for case in cases if len(cases) > 1 else []:
        if case["classes"]:
            print(f"{case['pred']} vs {case['ref']}: mean DSC {case['mean']['dsc']:.4f}  NSD {case['mean']['nsd']:.4f}")
    for name, c in report["classes"].items():
        print(f"{name:<20} DSC {c['dsc']:.4f}  NSD@{args.tolerance_mm:g}mm {c['nsd']:.4f}")
    print(f"{'mean':<20} DSC {report['mean']['dsc']:.4f}  NSD {report['mean']['nsd']:.4f}")
    return 0
