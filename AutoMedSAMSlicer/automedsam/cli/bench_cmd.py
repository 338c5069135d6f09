"""``automedsam bench``: speed and memory of the engine against the stock predictors (JSON)."""

from __future__ import annotations

import argparse
import sys

from .common import add_command, add_device_option, emit_json

#: ``automedsam bench``: what ``--help`` says.
HELP = "measure encoder, click-to-mask and whole-volume speed (JSON)"
DESCRIPTION = """\
Benchmarks each backbone (real weights where they are at hand offline, LiteMedSAM's always;
random ones otherwise, so nothing is downloaded) on a phantom or given volume: encoder ms/slice,
refine latency p50/p95 next to the stock predictor, 1- and 5-class whole-volume time, the naive
per-slice-per-class baseline, re-segmenting from the embedding cache, peak memory. On the CPU the
encoder runs through the CPU runtime (--cpu-runtime) and, in the same run, through PyTorch fp32
(encoder_ms_per_slice vs encoder_ms_per_slice_torch).
"""


def register(sub) -> None:
    from ..prompt_networks import DEFAULT_PROMPT_NETWORK, PROMPT_NETWORK_KINDS

    p = add_command(sub, "bench", run, HELP, DESCRIPTION)
    p.add_argument("--backbones", default="litemedsam,sam2.1_hiera_t,sam_vit_b", help="comma-separated backbone ids")
    p.add_argument("--slices", type=int, default=6, help="number of slices (default 6)")
    p.add_argument("--repeats", type=int, default=20, help="refine/predict repetitions (default 20)")
    p.add_argument("--image", help="volume to use (its first --slices slices) instead of the phantom")
    p.add_argument("--weights", default="auto", choices=["auto", "random", "cached"],
                   help="auto (default): the real weights where they are cached or ship in a package, else random")
    p.add_argument("--prompt-network", "--generator", default=DEFAULT_PROMPT_NETWORK, choices=PROMPT_NETWORK_KINDS,
                   help="prompt network")
    add_device_option(p)
    p.add_argument("--no-service", action="store_true", help="skip refine latency through a local worker")
    p.add_argument("--no-naive", action="store_true",
                   help="skip the naive per-slice-per-class baseline (5 encoder passes per slice; for large volumes)")
    p.add_argument("--json", action="store_true", help="print JSON (the default output is JSON too)")


def run(args: argparse.Namespace) -> int:
    from ..backbones import resolve_device
    from ..bench import bench_backbone, environment, phantom_volume
    from ..errors import InvalidInputError
    from ..io import read_image

    if args.slices < 1 or args.repeats < 1:
        raise InvalidInputError("--slices and --repeats must be >= 1")
    device = str(resolve_device(args.device))
    if args.image:
        volume = read_image(args.image)
        volume = volume.with_array(volume.array) if volume.num_slices <= args.slices else _first(volume, args.slices)
    else:
        volume = phantom_volume(args.slices)
    results = []
    for backbone_id in [b.strip() for b in args.backbones.split(",") if b.strip()]:
        print(f"bench {backbone_id} ...", file=sys.stderr)
        results.append(bench_backbone(backbone_id, volume, repeats=args.repeats, device=device,
                                      weights=_weights(backbone_id, args.weights),
                                      prompt_network=args.prompt_network, service=not args.no_service,
                                      naive=not args.no_naive))
    emit_json(environment(device) | {"volume": volume.name, "results": results})
    return 0


def _weights(backbone_id: str, choice: str) -> str | None:
    """``None`` (the real, cached weights) or ``"random"`` for ``build_backbone``."""
    from ..models import BackboneCatalog

    if choice != "auto":
        return None if choice == "cached" else "random"
    catalog = BackboneCatalog.load()
    spec = catalog.get(backbone_id)
    available = not spec.test_only and (spec.package is not None or catalog.cached_path(spec) is not None)
    return None if available else "random"


def _first(volume, n: int):
    from ..volume import Volume

    return Volume(volume.array[:n], volume.spacing, volume.origin, volume.direction, volume.name)
