"""``automedsam batch``: pre-annotate a whole dataset, resumable, on this machine or a Ray cluster."""

from __future__ import annotations

import argparse
import sys

from .common import add_command, add_device_option, emit_json, sigterm_as_interrupt

#: ``automedsam batch``: what ``--help`` says.
HELP = "segment every volume of a folder or CSV list (resumable; local workers or Ray)"
DESCRIPTION = """\
Segment the given classes in every case of --input (a folder searched for NIfTI, NRRD, MetaImage
files and DICOM series folders, or a CSV list with an image column and optionally a reference
column) with a model bundle loaded once per worker. Each case is written atomically to
OUTPUT/<case>.seg.nrrd (or .nii.gz) beside OUTPUT/<case>.json and OUTPUT/previews/<case>.png; a
rerun skips finished cases and redoes interrupted ones; a case that fails is reported with its
reason and never stops the others. OUTPUT/batch_report.csv, batch_report.json and index.html (the
previews, worst first) report voxels, mL, slices, seconds and, with references, DSC and NSD per
case and class. Exit code 4: some cases failed (the others are written).
"""


def register(sub) -> None:
    p = add_command(sub, "batch", run, HELP, DESCRIPTION)
    p.add_argument("--model", required=True, help="model bundle (folder or .zip)")
    p.add_argument("--classes", required=True,
                   help="comma-separated class names (liver,spleen); name=value (liver=5,spleen=1) also gives the "
                        "label values of the references (default: 1..N in this order, or segment names in .seg.nrrd)")
    p.add_argument("--input", required=True, help="folder of volumes / DICOM series folders, or a .csv list")
    p.add_argument("--output", required=True, help="output folder (created if missing)")
    p.add_argument("--image-column", default="image", help="CSV column of the image paths (default: image)")
    p.add_argument("--reference-column", help="CSV column of reference label maps or .seg.nrrd files to score against")
    p.add_argument("--case-column", default="case", help="CSV column of case ids, if any (default: case)")
    p.add_argument("--pattern", help="in a folder, only files whose name matches this glob, e.g. '*_0000.nii.gz'")
    p.add_argument("--format", choices=("seg.nrrd", "nifti"), default="seg.nrrd",
                   help="seg.nrrd: named, coloured segments (default); nifti: a .nii.gz label map, values 1..N")
    p.add_argument("--workers", type=int, help="worker processes (or Ray actors); default: one per GPU, else one")
    add_device_option(p)
    p.add_argument("--ray", metavar="auto|local|ADDRESS",
                   help="run on Ray: auto (the running cluster), local (start one here) or a cluster address; "
                        "needs pip install 'automedsam[cluster]'")
    p.add_argument("--no-preview", action="store_true", help="do not write the PNG previews")
    p.add_argument("--no-cleanup", action="store_true", help="keep every connected component (default: largest)")
    p.add_argument("--tolerance-mm", type=float, default=2.0, help="NSD tolerance in mm (default 2)")
    p.add_argument("--retry-failed", action="store_true", help="do failed cases again even if their input is unchanged")
    p.add_argument("--overwrite", action="store_true",
                   help="redo cases the output folder holds from another model, classes or settings")
    p.add_argument("--json", action="store_true", help="print the JSON report's summary on stdout")


def parse_classes(text: str) -> tuple[tuple[str, ...], dict[str, int] | None]:
    """``liver,spleen`` -> names; ``liver=5,spleen=1`` -> names and reference label values."""
    from ..errors import InvalidInputError
    from ..training.data import parse_class_mapping

    if "=" in text:
        mapping = parse_class_mapping(text)
        return tuple(mapping), mapping
    names = tuple(c.strip() for c in text.split(",") if c.strip())
    if not names:
        raise InvalidInputError("--classes names no class; give e.g. liver,spleen")
    return names, None


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..batch import BatchConfig

    names, values = parse_classes(args.classes)
    config = BatchConfig(model=Path(args.model), classes=names, output=Path(args.output), reference_values=values,
                         format=args.format, device=args.device, cleanup=not args.no_cleanup,
                         preview=not args.no_preview, tolerance_mm=args.tolerance_mm,
                         retry_failed=args.retry_failed, overwrite=args.overwrite)
    try:
        with sigterm_as_interrupt():
            report = _run_with_progress(args, config)
    except KeyboardInterrupt:
        page = Path(config.output) / "index.html"
        print("interrupted: the finished cases are kept; run the same command again to do the rest"
              + (f" (report: {page})" if page.is_file() else ""), file=sys.stderr)
        return 130
    summary = report["summary"]
    if args.json:
        emit_json(summary | {"output": str(config.output), "classes": report["classes"]})
    else:
        for name, c in report["classes"].items():
            print(f"{name:<20} mean DSC {c['dsc']:.4f}  NSD {c['nsd']:.4f}  over {c['cases']} case(s)")
        rate = f", {summary['cases_per_min']:.2f} cases/min" if summary["cases_per_min"] else ""
        print(f"{summary['done']} done, {summary['failed']} failed, {summary['skipped']} finished earlier "
              f"({summary['processed']} this run in {summary['seconds']:.1f} s{rate}); report: "
              f"{Path(config.output) / 'index.html'}")
    return 4 if summary["failed"] else 0


def _run_with_progress(args: argparse.Namespace, config) -> dict:
    """Run the batch with a tqdm bar on stderr; returns the JSON report."""
    from tqdm import tqdm

    from ..batch import run_batch

    bar = None
    report = None
    try:
        for event in run_batch(config, args.input, pattern=args.pattern, image_column=args.image_column,
                               reference_column=args.reference_column, case_column=args.case_column,
                               workers=args.workers, ray=args.ray):
            if event.stage == "start":
                print(event.message, file=sys.stderr)
                bar = tqdm(total=event.total, unit="case", desc="batch", file=sys.stderr)
            elif event.stage == "case":
                bar.update(1)
                bar.set_postfix(failed=event.failed, refresh=False)
                if event.record["status"] != "done":
                    tqdm.write(f"failed: {event.record['case']}: {event.record['error']['message']}", file=sys.stderr)
            elif event.stage == "done":
                report = event.report
    finally:
        if bar is not None:
            bar.close()
    return report
