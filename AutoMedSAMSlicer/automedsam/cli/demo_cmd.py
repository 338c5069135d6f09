"""``automedsam demo``: the main job end to end on a public abdominal CT.

Fetch (or take) a CT with reference labels, teach liver, spleen and both kidneys from every third
slice, segment the whole volume, report DSC/NSD per class on the slices it was not taught, and
write the ``.seg.nrrd`` and the model bundle. ``--smoke`` runs the identical pipeline with the
random-weight test backbone so an offline machine can check the whole path.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import emit_json

# TotalSegmentator's public test files, pinned by commit and sha256 (label ids as in its "total" task).
_TS = ("https://raw.githubusercontent.com/wasserth/TotalSegmentator/c78d8800af7fe05b8efb3c4ed939db16b6c0be62/"
       "tests/reference_files/")
DEMO_FILES = {
    "image": (_TS + "example_ct_sm.nii.gz", "example_ct_sm.nii.gz",
              "e50c00b2914e2cac0aaee8e7f3b5f57d44d9f21bfd5c0577271c54c0cb49e9fb"),
    "labels": (_TS + "example_seg.nii.gz", "example_seg.nii.gz",
               "8be652475a4aaae83103a66bfb3345314b1fc06742807a06cf5005f7a7913a2d"),
}
DEMO_CLASSES = {"liver": 5, "spleen": 1, "left_kidney": 3, "right_kidney": 2}


def register(sub) -> None:
    from ..models import DEFAULT_BACKBONE
    from ..prompt_networks import DEFAULT_PROMPT_NETWORK, PROMPT_NETWORK_KINDS

    p = sub.add_parser("demo", help="teach 4 organs from a few slices of a public CT and segment the rest",
                       description=__doc__)
    p.add_argument("--image", help="local CT instead of the download (e.g. ../shared/data/ct_abdomen/ct_lowres.nii.gz)")
    p.add_argument("--labels", help="its reference label map (TotalSegmentator ids: liver 5, spleen 1, kidneys 2/3)")
    p.add_argument("--smoke", action="store_true", help="same pipeline with the random tiny test backbone (offline)")
    p.add_argument("--backbone", default=DEFAULT_BACKBONE, help=f"backbone (default {DEFAULT_BACKBONE})")
    p.add_argument("--prompt-network", "--generator", choices=PROMPT_NETWORK_KINDS, default=DEFAULT_PROMPT_NETWORK,
                   help=f"prompt network (default {DEFAULT_PROMPT_NETWORK})")
    p.add_argument("--train-slices", default="1::3", help="slices to teach from (default every third: 1::3)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default 40; 3 with --smoke)")
    p.add_argument("--lr", type=float, default=None,
                   help="prompt network learning rate (default: the prompt network's recipe)")
    p.add_argument("--finetune-decoder", action="store_true",
                   help="also train the mask decoder (ppn / diffusion only; the frozen decoder measured best)")
    p.add_argument("--decoder-lr", type=float, default=None,
                   help="mask decoder learning rate (default 1e-5 for pretrained weights, 3e-4 for random ones)")
    p.add_argument("--out", default="automedsam-demo", help="output folder (default ./automedsam-demo)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(handler=run)


def fetch_demo_data(home: Path) -> tuple[Path, Path]:
    """Download the pinned TotalSegmentator files (verified) or raise with what to get by hand."""
    from ..download import download_file
    from ..errors import DownloadError

    paths = []
    for url, name, sha in DEMO_FILES.values():
        dest = home / "demo" / name
        try:
            paths.append(download_file(url, dest, sha, timeout=(5.0, 60.0), max_retries=1, retry_wait_s=0.2))
        except DownloadError as exc:
            lines = "\n".join(f"  {u}\n    -> {home / 'demo' / n}  (sha256 {s})" for u, n, s in DEMO_FILES.values())
            raise DownloadError(
                f"{exc}\nThe demo needs these files (put them there by hand, or run with local data: "
                f"--image CT --labels LABELS, e.g. the team's ../shared/data/ct_abdomen/ct_lowres.nii.gz and "
                f"ct_lowres_labels.nii.gz; add --smoke to use the random test backbone):\n{lines}"
            ) from None
    return paths[0], paths[1]


def check_weights(backbone_id: str) -> None:
    """Fail fast (exit 3) when the backbone's weights are neither cached nor obtainable offline."""
    from ..download import packaged_weights_resource
    from ..errors import WeightsUnavailableError
    from ..models import BackboneCatalog

    catalog = BackboneCatalog.load()
    spec = catalog.get(backbone_id)
    if spec.test_only or catalog.cached_path(spec) is not None:
        return
    if spec.package:
        packaged_weights_resource(spec)  # raises with what to install
        return
    how = (f"automedsam models download {spec.id}" if spec.sha256 else
           f"automedsam models download {spec.id} --sha256 <the publisher's sha256>")
    raise WeightsUnavailableError(
        f"the demo needs {spec.display_name} weights at {catalog.expected_path(spec)} (from {spec.url}). "
        f"Run `{how}` or `automedsam models import {spec.id} FILE`, or use the default backbone (LiteMedSAM, which "
        "installs with the package), or --smoke for the random test backbone."
    )


def run(args: argparse.Namespace) -> int:
    import time

    from ..backbones.registry import Runtime
    from ..engine import Engine, EngineConfig
    from ..errors import InvalidInputError
    from ..io import write_segmentation
    from ..metrics import evaluate_masks
    from ..models import BackboneCatalog, automedsam_home
    from ..rescue import save_or_rescue
    from ..training import AugmentConfig, TrainConfig, embedding_cache_dir, load_case
    from .common import run_segment, run_training

    t0 = time.perf_counter()
    if bool(args.image) != bool(args.labels):
        raise InvalidInputError("give both --image and --labels (or neither, to download the demo CT)")
    backbone_id = "tiny-sam2" if args.smoke else args.backbone
    check_weights(backbone_id)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InvalidInputError(f"--out {out} exists and is not a folder")
    if args.image:
        image_path, labels_path = Path(args.image), Path(args.labels)
    else:
        print("fetching the demo CT (TotalSegmentator test files, pinned by sha256) ...", file=sys.stderr)
        image_path, labels_path = fetch_demo_data(automedsam_home())
    case = load_case(str(image_path), str(labels_path))
    if case.image.num_slices < 3:
        raise InvalidInputError(
            f"{image_path} has {case.image.num_slices} slice(s); the demo teaches from some slices of a volume and "
            "scores the others, so it needs a 3-D image (a CT series or a NIfTI/NRRD volume), not a single slice")
    out.mkdir(parents=True, exist_ok=True)
    random_backbone = BackboneCatalog.load().get(backbone_id).test_only  # its decoder must learn too
    epochs = args.epochs or (3 if args.smoke else 40)
    config = TrainConfig(
        classes=DEMO_CLASSES, prompt_network=args.prompt_network, backbone=backbone_id, device=args.device,
        cpu_runtime=Runtime.from_environment().cpu,
        epochs=epochs, lr=args.lr, finetune_decoder=args.finetune_decoder,
        decoder_lr=args.decoder_lr or (3e-4 if random_backbone else 1e-5),
        train_slices=args.train_slices, val_slices=None, augment=AugmentConfig(copies=2),
        # Scored once, after the last epoch: the reported slices never pick the weights.
        validate_every=epochs, name=f"demo-{args.prompt_network}-{backbone_id}")
    print(f"teaching {', '.join(DEMO_CLASSES)} from slices {args.train_slices} of {case.name} "
          f"({case.image.num_slices} slices) with {backbone_id} + {args.prompt_network}", file=sys.stderr)
    final = run_training(config, [case])
    bundle_path = save_or_rescue(final.bundle, out / "demo_bundle.zip")
    taught = final.bundle.manifest["training"]["train_slices"][case.name]
    held_out = [k for k in range(case.image.num_slices) if k not in set(taught)]

    engine = Engine.from_bundle(final.bundle, args.device, EngineConfig(cache_dir=str(embedding_cache_dir(config))))
    engine.set_volume(case.image)
    result = run_segment(engine, list(DEMO_CLASSES))
    seg_path = write_segmentation(result.to_segmentation(), out / "demo.seg.nrrd")
    spacing = tuple(reversed(case.image.spacing))
    pred = {n: result.masks[n][held_out] for n in DEMO_CLASSES}
    ref = {n: case.labels.array[held_out] == v for n, v in DEMO_CLASSES.items()}
    report = evaluate_masks(pred, ref, spacing, 2.0)
    seconds = round(time.perf_counter() - t0, 1)
    summary = {"backbone": backbone_id, "prompt_network": args.prompt_network,
               "validation": {n: {"dsc": m["dsc"], "nsd": m["nsd"]} for n, m in report["classes"].items()},
               "validation_kind": "untaught slices of the taught volume (within-volume, not other cases; "
                                  "see scripts/cross_case_eval.py for other volumes)",
               "teach_seconds": {"encode": final.bundle.manifest["training"]["encode_seconds"],
                                 "train": final.bundle.manifest["training"]["seconds"]},
               "seconds": seconds, "mean": report["mean"], "tolerance_mm": 2.0, "image": str(image_path),
               "taught_slices": taught, "evaluated_slices": len(held_out), "bundle": str(bundle_path),
               "segmentation": str(seg_path), "smoke": args.smoke}
    if args.json:
        emit_json(summary)
    else:
        print(f"\nDSC / NSD@2mm on the {len(held_out)} slices not taught (reference: {labels_path.name}; "
              "within the taught volume, not other cases)")
        for name, m in report["classes"].items():
            print(f"  {name:<14} DSC {m['dsc']:.3f}  NSD {m['nsd']:.3f}")
        print(f"  {'mean':<14} DSC {report['mean']['dsc']:.3f}  NSD {report['mean']['nsd']:.3f}")
        taught_in = summary["teach_seconds"]
        print(f"wrote {seg_path} and {bundle_path} ({seconds:.0f} s in all; teaching: "
              f"{taught_in['encode']:.0f} s encoding, {taught_in['train']:.0f} s training)")
        if args.smoke:
            print("(smoke run: random-weight test backbone, numbers are not meaningful)")
    return 0
