"""``automedsam inspect``: geometry, intensities and (optionally) per-label extents of an image."""

from __future__ import annotations

import argparse

import numpy as np

from .common import add_json_option, emit_json


def register(sub) -> None:
    p = sub.add_parser("inspect", help="show an image's geometry and value range (and label extents)",
                       description="Read an image (NIfTI, NRRD, MHA, DICOM folder, PNG/JPG) and report "
                                   "size (i, j, k), spacing (mm), origin (LPS and RAS mm), direction, dtype "
                                   "and value range. With --labels, the label map is brought onto the image "
                                   "grid through physical space and every label's voxel count and bounding "
                                   "box (min/max voxel index, (i, j, k) order of the image grid) is listed.")
    p.add_argument("path", help="image file or DICOM series folder")
    p.add_argument("--labels", help="label map or .seg.nrrd of the same patient (any voxel order)")
    add_json_option(p)
    p.set_defaults(handler=run)


def inspect_image(path: str, labels: str | None = None) -> dict:
    """The report as a dict (see the command's help)."""
    from ..io import read_image, read_segmentation
    from ..resample import label_statistics, labels_onto_grid

    image = read_image(path)
    report = {
        "path": str(path),
        **image.geometry_dict(),
        "dtype": str(image.array.dtype),
        "channels": 3 if image.is_rgb else 1,
        "min": float(np.min(image.array)),
        "max": float(np.max(image.array)),
    }
    if labels:
        seg = read_segmentation(labels)
        on_grid = labels_onto_grid(seg, image)
        report["labels_path"] = str(labels)
        # Only a .seg.nrrd names its segments; plain label maps have numbers alone.
        named = str(labels).lower().endswith(".seg.nrrd") and len(seg.layers) == 1
        names = {s.label_value: s.name for s in seg.segments} if named else {}
        report["labels"] = {str(v): ({"name": names[v]} if v in names else {}) | s
                            for v, s in label_statistics(on_grid).items()}
    return report


def run(args: argparse.Namespace) -> int:
    report = inspect_image(args.path, args.labels)
    if args.json:
        emit_json(report)
        return 0
    print(f"{report['path']}: size (i,j,k) {report['size_ijk']}, spacing {report['spacing']} mm, "
          f"dtype {report['dtype']}, values {report['min']:g}..{report['max']:g}")
    print(f"  origin LPS {np.round(report['origin_lps'], 3).tolist()} mm, direction {report['direction']}")
    for value, s in report.get("labels", {}).items():
        print(f"  label {value:>4} {s.get('name', ''):<20} {s['voxels']:>9} voxels  "
              f"ijk {s['min_ijk']}..{s['max_ijk']}")
    return 0
