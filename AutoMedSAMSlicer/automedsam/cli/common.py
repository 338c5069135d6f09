"""What the commands share: JSON output, common options and the progress loops (tqdm on stderr)
around the library's long runs. Subcommands import from here, never from each other or from
:mod:`.main`."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Sequence


def emit_json(data) -> None:
    """Print one JSON document on stdout (the machine-readable output of ``--json``)."""
    print(json.dumps(data, indent=2, allow_nan=False))  # strict JSON: NaN/Infinity are a bug here


def add_command(sub, name: str, handler, help: str, description: str):
    """A subcommand parser whose handler is ``handler(args)``; ``description`` is reflowed."""
    parser = sub.add_parser(name, help=help, description=" ".join(description.split()))
    parser.set_defaults(handler=handler)
    return parser


def add_device_option(parser) -> None:
    """``--device`` and ``--cpu-runtime`` (applied by :func:`apply_cpu_runtime` before the command runs)."""
    from ..backbones.runtime import RUNTIMES

    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--cpu-runtime", choices=RUNTIMES, default=None,
                        help="how the CPU runs the image encoder and mask decoder: auto (OpenVINO if installed, "
                             "else ONNX Runtime, else PyTorch), openvino (bf16 linear layers), openvino-bf16, "
                             "openvino-f32, onnxruntime or torch "
                             "(default: $AUTOMEDSAM_CPU_RUNTIME, else auto)")


def apply_cpu_runtime(args) -> None:
    """Make ``--cpu-runtime`` (else ``$AUTOMEDSAM_CPU_RUNTIME``) the runtime of the process's model
    registry, so every backbone the command loads uses it; refuses a runtime that is not installed. It
    is passed on in ``$AUTOMEDSAM_CPU_RUNTIME`` to the workers and batch processes the command starts."""
    import os

    from ..backbones.registry import ModelRegistry, Runtime, set_default_registry
    from ..backbones.runtime import RUNTIME_ENV, resolve_runtime

    choice = getattr(args, "cpu_runtime", None)
    if choice:
        resolve_runtime(choice)
        os.environ[RUNTIME_ENV] = choice
    set_default_registry(ModelRegistry(Runtime.from_environment()))


@contextlib.contextmanager
def sigterm_as_interrupt():
    """While the block runs, SIGTERM (what SLURM, systemd, docker and ``kill`` send) raises
    KeyboardInterrupt as Ctrl-C does, so clean-up in ``finally`` blocks runs (workers stopped, the
    report written) instead of the process vanishing. Only the main thread can install it."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def add_json_option(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON")


def run_segment(engine, classes: Sequence[str], slices: Sequence[int] | None = None):
    """Run :meth:`Engine.segment` to the end with a progress bar; returns the result."""
    from tqdm import tqdm

    from ..contract import CancelledError

    total = engine.volume.num_slices if slices is None else len(slices)
    result = None
    with tqdm(total=total, unit="slice", desc="segment", file=sys.stderr) as bar:
        for event in engine.segment(list(classes), slices):
            bar.update(event.done - bar.n)
            if event.result is not None:
                result = event.result
    if result is None:
        raise CancelledError("segmentation ended without a result")
    return result


def run_training(config, cases, quiet: bool = False):
    """Run training with tqdm progress on stderr; returns the final event."""
    from tqdm import tqdm

    from ..training import train

    encode_bar = epoch_bar = None
    final = None
    try:
        for event in train(config, cases):
            if event.stage == "encode":
                encode_bar = encode_bar or tqdm(total=event.steps, desc="encode", unit="slice", file=sys.stderr,
                                                disable=quiet)
                encode_bar.update(event.step - encode_bar.n)
            elif event.stage in ("step", "epoch", "validate"):
                if encode_bar is not None and not encode_bar.disable:
                    encode_bar.close()  # encoding is over: keep its final time on screen
                epoch_bar = epoch_bar or tqdm(total=event.epochs, desc="train", unit="epoch", file=sys.stderr,
                                              disable=quiet)
                post = {"loss": event.losses.get("total")}
                if event.metrics:
                    post["val_dsc"] = round(sum(m["dsc"] for m in event.metrics.values()) / len(event.metrics), 3)
                epoch_bar.set_postfix(post, refresh=False)
                if event.stage == "epoch":
                    epoch_bar.update(event.epoch - epoch_bar.n)
            elif event.stage in ("done", "cancelled"):
                final = event
    finally:
        for bar in (encode_bar, epoch_bar):
            if bar is not None:
                bar.close()
    return final
