"""Entry point of the ``automedsam`` command: argument parsing and error-to-exit-code mapping."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .. import __version__
from ..errors import AutoMedSAMError, InvalidInputError, UnavailableError
from .common import apply_cpu_runtime

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT, EXIT_WEIGHTS = 0, 1, 2, 3


def build_parser() -> argparse.ArgumentParser:
    from . import (
        backbones_cmd,
        batch_cmd,
        bench_cmd,
        demo_cmd,
        evaluate_cmd,
        evaluate_interactive_cmd,
        inspect_cmd,
        models_cmd,
        segment_cmd,
        serve_cmd,
        train_cmd,
    )

    parser = argparse.ArgumentParser(
        prog="automedsam",
        description="Learned-prompt SAM / MedSAM / SAM 2.1 segmentation of medical volumes.",
        epilog="Exit codes: 0 ok, 1 internal error, 2 bad input or usage, 3 weights, network or cluster missing, "
               "4 (batch) some cases failed.",
    )
    parser.add_argument("--version", action="version", version=f"automedsam {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output on stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    demo_cmd.register(sub)
    inspect_cmd.register(sub)
    models_cmd.register(sub)
    backbones_cmd.register(sub)
    segment_cmd.register(sub)
    batch_cmd.register(sub)
    bench_cmd.register(sub)
    evaluate_cmd.register(sub)
    evaluate_interactive_cmd.register(sub)
    train_cmd.register(sub)
    serve_cmd.register(sub)
    return parser


def run(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the command; returns the exit code (never raises for user errors)."""
    parser = build_parser()
    args = parser.parse_args(argv)  # usage errors exit 2 inside argparse
    logging.basicConfig(level=logging.WARNING - 10 * min(args.verbose, 2), stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        apply_cpu_runtime(args)
        return int(args.handler(args) or EXIT_OK)
    except InvalidInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except UnavailableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_WEIGHTS
    except AutoMedSAMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INTERNAL
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the last line of defence: a message, not a traceback
        if os.environ.get("AUTOMEDSAM_DEBUG"):
            raise
        print(f"internal error: {type(exc).__name__}: {exc}. Re-run with AUTOMEDSAM_DEBUG=1 for a traceback "
              "and report it.", file=sys.stderr)
        return EXIT_INTERNAL


def main() -> None:
    """Console-script entry point."""
    sys.exit(run())


if __name__ == "__main__":
    main()
