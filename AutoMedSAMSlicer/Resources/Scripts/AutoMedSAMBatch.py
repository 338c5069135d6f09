"""Segment a volume headless with AutoMedSAM and save the segmentation.

    Slicer --no-main-window --python-script AutoMedSAMBatch.py \\
        --input CT.nrrd --classes liver,spleen --model bundle.zip --output seg.seg.nrrd

Exit codes (as the ``automedsam`` CLI): 0 done, 1 failed, 2 bad input or arguments,
3 model weights unavailable (download them first).
"""

import argparse
import logging
import sys
from pathlib import Path

import slicer

# The module folder (two levels up) holds AutoMedSAMSlicerLib and the automedsam package.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_WEIGHTS = 0, 1, 2, 3


def parseArguments(argv):
    parser = argparse.ArgumentParser(
        prog="Slicer --no-main-window --python-script AutoMedSAMBatch.py",
        description="Segment organ/lesion classes of a volume with an AutoMedSAM model bundle.")
    parser.add_argument("--input", required=True, help="image file or DICOM folder Slicer can load")
    parser.add_argument("--classes", required=True, help="comma-separated class names, e.g. liver,spleen")
    parser.add_argument("--model", required=True, help="model bundle (.zip or folder)")
    parser.add_argument("--output", required=True, help="output segmentation (.seg.nrrd, or .nii.gz/.nrrd labelmap)")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--slices", default=None, help="k-slices to segment, e.g. 10:80 or 3,7,9 (default: all)")
    return parser.parse_args(argv)


def main(argv) -> int:
    try:
        args = parseArguments(argv)
    except SystemExit as exc:  # --help (0) or bad arguments (2)
        return int(exc.code or 0)
    from AutoMedSAMSlicerLib.logic import AutoMedSAMSlicerLogic

    from automedsam.errors import WeightsUnavailableError
    from automedsam.selection import parse_slices

    if not Path(args.input).exists():
        sys.stderr.write(f"error: --input {args.input} does not exist\n")
        return EXIT_BAD_INPUT
    if not Path(args.model).exists():
        sys.stderr.write(f"error: --model {args.model} does not exist (a model bundle .zip or folder)\n")
        return EXIT_BAD_INPUT
    logic = AutoMedSAMSlicerLogic()
    try:
        volumeNode = slicer.util.loadVolume(args.input)
        if not volumeNode:
            sys.stderr.write(f"error: Slicer could not load {args.input} as a volume\n")
            return EXIT_BAD_INPUT
        logic.configureBackend("inprocess", device=args.device)
        slices = None
        if args.slices:
            slices = parse_slices(args.slices, slicer.util.arrayFromVolume(volumeNode).shape[0])
        segmentationNode = logic.segment(
            volumeNode, args.classes, model=args.model, slices=slices,
            progressCallback=lambda fraction, message: logging.info("%3d%% %s", round(100 * fraction), message))
        if not slicer.util.saveNode(segmentationNode, args.output):
            sys.stderr.write(f"error: could not write {args.output} (folder missing or not writable?)\n")
            return EXIT_FAILED
    except WeightsUnavailableError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return EXIT_WEIGHTS
    except ValueError as exc:  # bad input, including automedsam's InvalidInputError
        sys.stderr.write(f"error: {exc}\n")
        return EXIT_BAD_INPUT
    except Exception as exc:
        logging.exception("AutoMedSAM batch run failed")
        sys.stderr.write(f"error: {exc}\n")
        return EXIT_FAILED
    finally:
        logic.shutdown()
    print(f"wrote {args.output}")
    return EXIT_OK


if __name__ == "__main__":
    slicer.util.exit(main(sys.argv[1:]))
