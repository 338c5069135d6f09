"""``automedsam train``: teach classes from labelled volumes; writes a model bundle."""

from __future__ import annotations

import argparse
from pathlib import Path

from .cases import add_case_arguments, check_case_arguments, load_cases
from .common import add_command, emit_json, run_training

#: ``automedsam train``: what ``--help`` says.
HELP = "train a prompt network from labelled volumes (writes a model bundle)"
DESCRIPTION = """\
Trains a prompt network (the class-map network, Sam2Rad's PPN or AutoMedSAM's diffusion class
prompt encoder) on a frozen backbone (the mask decoder too with --finetune-decoder), validating
on held-out slices or cases with the real engine, and writes the best epoch as a model bundle.
"""


def register(sub) -> None:
    from ..models import DEFAULT_BACKBONE
    from ..prompt_networks import DEFAULT_PROMPT_NETWORK, PROMPT_NETWORK_KINDS

    p = add_command(sub, "train", run, HELP, DESCRIPTION)
    add_case_arguments(p, "label map / .seg.nrrd for each --image")
    p.add_argument("--prompt-network", "--generator", choices=PROMPT_NETWORK_KINDS, default=DEFAULT_PROMPT_NETWORK,
                   help=f"prompt network (default {DEFAULT_PROMPT_NETWORK})")
    p.add_argument("--backbone", default=DEFAULT_BACKBONE, help=f"backbone id (default {DEFAULT_BACKBONE})")
    p.add_argument("--weights", default=None, help="'random', a weights file, or the cached file (default)")
    p.add_argument("--val-slices", default="0::3", help="held-out slices: start:stop[:step] or a list (default 0::3)")
    p.add_argument("--train-slices", help="instead of --val-slices: the slices to learn from; the rest validate")
    p.add_argument("--val-cases", default="", help="comma list of case indices (0-based) held out whole")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, help="prompt network learning rate (default: the paper's recipe)")
    p.add_argument("--decoder-lr", type=float, default=1e-5,
                   help="mask decoder learning rate (default 1e-5, the recipe for pretrained decoders; a random "
                        "test backbone's decoder needs ~3e-4)")
    p.add_argument("--augment-copies", type=int, default=2, help="augmented copies per slice, encoded once")
    decoder = p.add_mutually_exclusive_group()
    decoder.add_argument("--finetune-decoder", action="store_true",
                         help="also train the mask decoder (ppn / diffusion; default: frozen, which measured best)")
    decoder.add_argument("--no-finetune-decoder", action="store_true", help="keep the mask decoder frozen (default)")
    p.add_argument("--window", default="abdomen", help="CT window preset, or 'mr' for percentile normalisation")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-dir", help="write a checkpoint every epoch here")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint-dir/last.pt")
    p.add_argument("--name", default=None, help="bundle name (default: the output file's stem)")
    p.add_argument("-o", "--output", required=True, help="bundle to write (.zip or folder)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle")
    p.add_argument("--json", action="store_true", help="print a JSON summary")


def config_from_args(args: argparse.Namespace):
    from ..backbones.registry import Runtime
    from ..errors import InvalidInputError
    from ..preprocess import IntensityConfig
    from ..training import AugmentConfig, TrainConfig, parse_class_mapping

    check_case_arguments(args)
    intensity = IntensityConfig.mr() if args.window == "mr" else IntensityConfig.ct(args.window)
    try:
        val_cases = tuple(int(v) for v in args.val_cases.split(",") if v.strip()) if args.val_cases else ()
    except ValueError:
        raise InvalidInputError(f"--val-cases {args.val_cases!r} must be case indices such as 0 or 1,3") from None
    if any(not 0 <= n < len(args.image) for n in val_cases):
        raise InvalidInputError(f"--val-cases {args.val_cases!r}: there are cases 0..{len(args.image) - 1}")
    weights = args.weights if args.weights not in (None, "cached") else None  # test-only backbones: random
    return TrainConfig(
        classes=parse_class_mapping(args.classes), prompt_network=args.prompt_network, backbone=args.backbone,
        weights=weights, device=args.device, cpu_runtime=Runtime.from_environment().cpu, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr,
        decoder_lr=args.decoder_lr, finetune_decoder=args.finetune_decoder,
        val_slices=None if args.train_slices else args.val_slices, train_slices=args.train_slices,
        val_cases=val_cases, augment=AugmentConfig(copies=args.augment_copies),
        intensity=intensity, seed=args.seed, checkpoint_dir=args.checkpoint_dir, resume=args.resume,
        name=args.name or Path(args.output).expanduser().resolve().stem)


def run(args: argparse.Namespace) -> int:
    from ..bundle import check_bundle_destination
    from ..rescue import save_or_rescue
    from ..training.loop import check_checkpoint_dir

    out = check_bundle_destination(args.output, args.overwrite)  # before hours of training, not after
    config = config_from_args(args)
    check_checkpoint_dir(config.checkpoint_dir, config.resume)
    cases = load_cases(args)
    final = run_training(config, cases)
    if final is None or final.bundle is None:
        return 130  # cancelled: nothing to write
    path = save_or_rescue(final.bundle, out)
    training = final.bundle.manifest["training"]
    summary = {"bundle": str(path), "prompt_network": config.prompt_network, "backbone": config.backbone,
               "validation": final.metrics, "validation_kind": training["validation_kind"],
               "best_epoch": training["best_epoch"], "seconds": training["seconds"],
               "encode_seconds": training["encode_seconds"], "device": training["device"],
               "framing": training["framing"]}
    if args.json:
        emit_json(summary)
    else:
        if final.metrics:
            print(f"validation on {training['validation_kind']}:")
        for name, m in final.metrics.items():
            print(f"{name:<20} DSC {m['dsc']:.4f}  NSD {m['nsd']:.4f}")
        print(f"wrote {path} (best epoch {summary['best_epoch']}; {summary['encode_seconds']} s encoding, "
              f"{summary['seconds']} s training)")
    return 0
