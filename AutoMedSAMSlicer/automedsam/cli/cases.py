"""The labelled cases a command works on: ``--image IMG --labels LBL`` pairs (repeatable) and
``--classes name=value,...``, shared by ``train`` and ``evaluate-interactive``."""

from __future__ import annotations

import argparse


def add_case_arguments(p: argparse.ArgumentParser, labels_help: str) -> None:
    """Add ``--image`` / ``--labels`` (one pair per case, repeatable) and ``--classes``."""
    p.add_argument("--image", action="append", required=True, help="image (repeat with --labels for more cases)")
    p.add_argument("--labels", action="append", required=True, help=labels_help)
    p.add_argument("--classes", required=True, help="name=label_value pairs, e.g. liver=5,spleen=1")


def check_case_arguments(args: argparse.Namespace) -> None:
    """One label map per image, before anything is read."""
    from ..errors import InvalidInputError

    if len(args.image) != len(args.labels):
        raise InvalidInputError(f"{len(args.image)} --image but {len(args.labels)} --labels; give one per image")


def load_cases(args: argparse.Namespace) -> list:
    """The :class:`~automedsam.training.Case` of every ``--image`` / ``--labels`` pair."""
    from ..training import load_case

    check_case_arguments(args)
    return [load_case(img, lab) for img, lab in zip(args.image, args.labels, strict=True)]
