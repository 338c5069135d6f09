"""Segment a volume headless with AutoMedSAM and save the segmentation.

    Slicer --no-main-window --python-script AutoMedSAMBatch.py -- \\
        --input CT.nrrd --classes liver,spleen --model bundle.zip --output seg.seg.nrrd

The ``--`` keeps Slicer from reading the script's options as its own (Slicer's command-line parser
consumes every option it knows, ``--help`` included, wherever it stands; see
Base/QTCore/qSlicerCoreCommandOptions.cxx and its ``--ignore-rest``). ``--input`` may be an image
file Slicer reads or a DICOM series folder (read with SimpleITK, refusing uneven slice spacing).
``--output`` ending in ``.seg.nrrd`` keeps named, coloured segments; ``.nrrd``, ``.nii.gz``,
``.nii`` or ``.mha`` writes a label map (values 1..N in the order of ``--classes``).

A whole dataset: ``--input`` a folder of volumes (NIfTI, NRRD, MetaImage, DICOM series folders)
or a ``.csv`` list, and ``--output`` a folder. That runs the same code as ``automedsam batch``
(:mod:`automedsam.batch`: resumable, one record and preview per case, a report with an HTML index)
in Slicer's Python, the model loaded once.

Exit codes (as the ``automedsam`` CLI): 0 done, 1 failed, 2 bad input or arguments,
3 model weights unavailable (download them first), 4 some cases of a folder failed (the others
are written).
"""

import argparse
import logging
import sys
from pathlib import Path

import slicer

# The module folder (two levels up) holds AutoMedSAMSlicerLib and the automedsam package.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_WEIGHTS, EXIT_CASES_FAILED, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130
LABELMAP_SUFFIXES = (".nrrd", ".nii.gz", ".nii", ".mha")


def parseArguments(argv):
    parser = argparse.ArgumentParser(
        prog="Slicer --no-main-window --python-script AutoMedSAMBatch.py --",
        description="Segment organ/lesion classes of a volume with an AutoMedSAM model bundle.")
    parser.add_argument("--input", required=True,
                        help="image file or DICOM series folder; with an output folder: a folder of volumes or a .csv")
    parser.add_argument("--classes", required=True, help="comma-separated class names, e.g. liver,spleen")
    parser.add_argument("--model", required=True, help="model bundle (.zip or folder)")
    parser.add_argument("--output", required=True,
                        help="output .seg.nrrd (segments), or a label map: .nrrd, .nii.gz, .nii, .mha; "
                             "or a folder for a whole dataset")
    parser.add_argument("--workers", type=int, default=None, help="dataset: worker processes (default: one per GPU, "
                                                                   "else one)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--slices", default=None, help="k-slices to segment, e.g. 10:80 or 3,7,9 (default: all)")
    if argv and argv[0] == "--":  # the separator, if Slicer passed it on
        argv = argv[1:]
    return parser.parse_args(argv)


def loadInput(path: Path):
    """A scalar volume node for an image file (Slicer's readers) or a DICOM folder (SimpleITK)."""
    if path.is_dir():
        from automedsam.io import read_image

        volume = read_image(path)  # refuses folders without a series and unevenly spaced slices
        return slicer.util.addVolumeFromArray(volume.array, volume.ijk_to_ras(), volume.name or path.name)
    try:
        return slicer.util.loadVolume(str(path))
    except RuntimeError as exc:  # loadNodeFromFile raises on failure (Base/Python/slicer/util.py)
        from automedsam.errors import InvalidInputError

        raise InvalidInputError(f"Slicer could not load {path} as a volume: {exc}") from None


def saveOutput(segmentationNode, volumeNode, output: Path, classNames) -> None:
    if output.name.lower().endswith(".seg.nrrd"):
        node = segmentationNode
    else:  # one label map on the input's grid, values in the order of the classes
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", f"{output.name} labels")
        if not slicer.modules.segmentations.logic().ExportVisibleSegmentsToLabelmapNode(
                segmentationNode, node, volumeNode):
            raise RuntimeError("exporting the segments to a label map failed")
        for value, name in enumerate(classNames, start=1):
            print(f"label {value}: {name}")
    if not slicer.util.saveNode(node, str(output)):
        raise RuntimeError(f"could not write {output} (folder missing or not writable?)")


def isDataset(args) -> bool:
    """A whole dataset: the output names a folder (no file suffix) and the input is a .csv or a
    folder that is not itself a DICOM series."""
    output = Path(args.output)
    name = output.name.lower()
    if name.endswith(".seg.nrrd") or name.endswith(LABELMAP_SUFFIXES):
        return False
    from automedsam.batch.cases import is_dicom_file

    source = Path(args.input)
    if source.is_file():
        return source.suffix.lower() == ".csv"
    return source.is_dir() and not any(is_dicom_file(p) for p in source.iterdir() if p.is_file())


def runDataset(args) -> int:
    """The dataset through automedsam.batch, in this process (Slicer's Python), with progress in the log."""
    from automedsam.batch import BatchConfig
    from automedsam.cli.batch_cmd import parse_classes
    from automedsam.cli.common import sigterm_as_interrupt

    names, values = parse_classes(args.classes)
    config = BatchConfig(model=Path(args.model), classes=names, output=Path(args.output), reference_values=values,
                         device=args.device, overwrite=args.overwrite)
    try:
        with sigterm_as_interrupt():  # a cluster's scheduler stops jobs with SIGTERM: workers stop, report written
            summary = followBatch(config, args)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted: the finished cases are kept; run the same command again to do the rest\n")
        return EXIT_INTERRUPTED
    print(f"{summary['done']} done, {summary['failed']} failed, {summary['skipped']} finished earlier; report: "
          f"{Path(args.output) / 'index.html'}")
    return EXIT_CASES_FAILED if summary["failed"] else EXIT_OK


def followBatch(config, args) -> dict:
    """Run the batch, one log line per finished case; returns the report's summary."""
    from automedsam.batch import run_batch

    summary = None
    for event in run_batch(config, args.input, workers=args.workers):
        if event.stage == "start":
            logging.info("%s", event.message)
        elif event.stage == "case":
            record = event.record
            reason = f": {record['error']['message']}" if record["status"] != "done" else ""
            print(f"{event.done}/{event.total} {record['case']} {record['status']}{reason}")
        elif event.stage == "done":
            summary = event.report["summary"]
    return summary


def checkPaths(args) -> str | None:
    """What is wrong with the paths, checked before any work, or None."""
    output = Path(args.output)
    if not Path(args.input).exists():
        return f"--input {args.input} does not exist"
    if not Path(args.model).exists():
        return f"--model {args.model} does not exist (a model bundle .zip or folder)"
    name = output.name.lower()
    if not (name.endswith(".seg.nrrd") or name.endswith(LABELMAP_SUFFIXES)):
        return f"--output {output.name} must end in .seg.nrrd or one of {', '.join(LABELMAP_SUFFIXES)}"
    if not output.parent.is_dir():
        return f"--output folder {output.parent} does not exist"
    if output.exists() and not args.overwrite:
        return f"--output {output} exists; pass --overwrite to replace it"
    return None


def exitCodeFor(exc: Exception) -> int:
    """Report an error on stderr; the exit code that names its kind."""
    from automedsam.errors import InvalidInputError, UnavailableError

    sys.stderr.write(f"error: {exc}\n")
    if isinstance(exc, UnavailableError):  # weights, network or cluster
        return EXIT_WEIGHTS
    if isinstance(exc, (InvalidInputError, ValueError)):  # bad input
        return EXIT_BAD_INPUT
    logging.exception("AutoMedSAM batch run failed")
    return EXIT_FAILED


def runOne(args) -> int:
    """One volume through the module's logic (in process)."""
    from AutoMedSAMSlicerLib.logic import AutoMedSAMSlicerLogic

    from automedsam.selection import parse_slices

    logic = AutoMedSAMSlicerLogic()
    try:
        volumeNode = loadInput(Path(args.input))
        logic.configureBackend("inprocess", device=args.device)
        slices = None
        if args.slices:
            slices = parse_slices(args.slices, slicer.util.arrayFromVolume(volumeNode).shape[0])
        classNames = [c.strip() for c in args.classes.split(",") if c.strip()]
        segmentationNode = logic.segment(
            volumeNode, classNames, model=args.model, slices=slices,
            progressCallback=lambda fraction, message: logging.info("%3d%% %s", round(100 * fraction), message))
        saveOutput(segmentationNode, volumeNode, Path(args.output), classNames)
    finally:
        logic.shutdown()
    print(f"wrote {args.output}")
    return EXIT_OK


def main(argv) -> int:
    try:
        args = parseArguments(argv)
    except SystemExit as exc:  # --help (0) or bad arguments (2)
        return int(exc.code or 0)
    dataset = isDataset(args)
    problem = None if dataset else checkPaths(args)
    if problem:
        sys.stderr.write(f"error: {problem}\n")
        return EXIT_BAD_INPUT
    try:
        return runDataset(args) if dataset else runOne(args)
    except Exception as exc:
        return exitCodeFor(exc)


if __name__ == "__main__":
    slicer.util.exit(main(sys.argv[1:]))
