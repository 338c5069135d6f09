"""``automedsam segment``: automatic masks for a whole volume with a model bundle."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .common import add_command, add_device_option, emit_json

#: ``automedsam segment``: what ``--help`` says.
HELP = "segment classes in a volume with a model bundle"
DESCRIPTION = """\
Segment the given classes on every slice (or --slices) of INPUT with a model bundle's learned
prompts and write a .seg.nrrd (named, coloured, terminology-coded segments) or a NIfTI/NRRD
label map in the input's geometry.
"""


def register(sub) -> None:
    p = add_command(sub, "segment", run, HELP, DESCRIPTION)
    p.add_argument("input", help="image file or DICOM folder")
    p.add_argument("--model", required=True, help="model bundle (folder or .zip)")
    p.add_argument("--classes", required=True, help="comma-separated class names, e.g. liver,spleen")
    p.add_argument("-o", "--output", required=True, help="output .seg.nrrd, .nii.gz or .nrrd")
    add_device_option(p)
    p.add_argument("--slices", help="slice selection (k): start:stop[:step] or a comma list; default all")
    p.add_argument("--no-cleanup", action="store_true", help="keep every connected component (default: largest)")
    p.add_argument("--cache-dir", help="reuse image embeddings across runs from this folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--preview", metavar="PNG", help="also write a picture to check the result at a glance: a few axial "
                                                    "slices and one coronal with the masks in their colours")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")


def check_preview(path: str, overwrite: bool) -> Path:
    """The preview's file name, checked before any work (a .png in an existing folder)."""
    from ..errors import InvalidInputError

    p = Path(path).expanduser()
    if p.suffix.lower() != ".png":
        raise InvalidInputError(f"--preview {p.name}: the preview is a PNG picture; name it *.png")
    if not p.parent.is_dir():
        raise InvalidInputError(f"--preview folder {p.parent} does not exist; create it first")
    if p.exists() and not overwrite:
        raise InvalidInputError(f"--preview {p} exists; pass --overwrite to replace it")
    return p


def run(args: argparse.Namespace) -> int:
    from ..bundle import load_bundle
    from ..engine import Engine, EngineConfig
    from ..errors import InvalidInputError
    from ..io import check_output, read_image, write_segmentation
    from ..selection import parse_slices
    from .common import run_segment

    out = check_output(args.output, args.overwrite)  # before segmenting, not after
    preview = check_preview(args.preview, args.overwrite) if args.preview else None
    if out.exists() and Path(args.input).exists() and os.path.samefile(out, args.input):
        raise InvalidInputError(f"the output {out} is the input image; --overwrite never replaces the input. "
                                "Choose another output name.")
    names = [c.strip() for c in args.classes.split(",") if c.strip()]
    if not names:
        raise InvalidInputError("--classes names no class; give e.g. liver,spleen")
    volume = read_image(args.input)
    slices = parse_slices(args.slices, volume.num_slices)
    bundle = load_bundle(args.model)
    for name in names:
        bundle.class_index(name)  # unknown classes fail before any model work
    engine = Engine.from_bundle(bundle, args.device, EngineConfig(
        cleanup="none" if args.no_cleanup else "largest_component", cache_dir=args.cache_dir))
    engine.set_volume(volume)
    result = run_segment(engine, names, slices)
    for message in engine.messages:
        print(f"note: {message}", file=sys.stderr)
    write_segmentation(result.to_segmentation(), out)
    summary = result.summary() | {"output": str(out), "device": str(engine.backbone.device),
                                  "bundle": bundle.name, "backbone": bundle.backbone_id}
    if preview is not None:
        from ..preview import write_preview

        write_preview(preview, volume, result.masks, {c.name: c.color for c in result.classes},
                      title=Path(args.input).name, intensity=bundle.intensity,
                      lines=["; ".join(f"{n}: {s['volume_ml']:.1f} mL" for n, s in summary["classes"].items())])
        summary["preview"] = str(preview)
    if args.json:
        emit_json(summary)
    else:
        for name, s in summary["classes"].items():
            print(f"{name:<20} {s['voxels']:>9} voxels  {s['volume_ml']:>9.1f} ml  on {s['slices_with_mask']} slices")
        print(f"wrote {out} in {summary['seconds']:.1f} s")
    return 0
