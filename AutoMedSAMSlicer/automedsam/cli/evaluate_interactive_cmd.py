"""``automedsam evaluate-interactive``: DSC after 0..N simulated clicks, clicks to DSC 0.9, latency,
and propagation from one reference slice, per case and class (see :mod:`automedsam.interactive_eval`)."""

from __future__ import annotations

import argparse
import sys

from .cases import add_case_arguments, check_case_arguments, load_cases
from .common import add_command, add_json_option, emit_json

#: ``automedsam evaluate-interactive``: what ``--help`` says.
HELP = "simulate clicks: DSC by click, clicks to DSC 0.9, ms per interaction"
DESCRIPTION = """\
For each class and each slice holding it, start from the reference box (--start box, manual
mode) or the bundle's automatic result (--start auto, semi mode), then click up to --clicks
times at the point deepest inside the largest error region (+ in a missed, - in a false region);
every refine builds on the earlier clicks and the previous low-resolution logits. With
--propagation, also propagate from the middle reference slice of each class both ways and score
the volume in 3-D.
"""


def register(sub) -> None:
    from ..models import DEFAULT_BACKBONE

    p = add_command(sub, "evaluate-interactive", run, HELP, DESCRIPTION)
    add_case_arguments(p, "reference label map for each --image")
    p.add_argument("--model", help="model bundle (needed for --start auto)")
    p.add_argument("--backbone", default=DEFAULT_BACKBONE,
                   help=f"backbone without --model (manual mode; default {DEFAULT_BACKBONE})")
    p.add_argument("--start", choices=["box", "auto"], default="box", help="what the user starts from (default box)")
    p.add_argument("--clicks", type=int, default=5, help="clicks after the start (default 5)")
    p.add_argument("--slices", help="slice selection (k) to evaluate: start:stop[:step] or a list; default all")
    p.add_argument("--propagation", action="store_true", help="also score propagation from one slice per class")
    p.add_argument("--window", default="abdomen", help="CT window preset without --model, or 'mr'")
    p.add_argument("--device", default="auto")
    add_json_option(p)


def _engine(args: argparse.Namespace):
    from ..engine import Engine, EngineConfig
    from ..errors import InvalidInputError
    from ..preprocess import IntensityConfig

    if args.model:
        return Engine.from_bundle(args.model, args.device, EngineConfig(cleanup="none"))
    if args.start == "auto":
        raise InvalidInputError("--start auto needs a model bundle (--model); without one use --start box")
    intensity = IntensityConfig.mr() if args.window == "mr" else IntensityConfig.ct(args.window)
    return Engine.manual(args.backbone, args.device, config=EngineConfig(cleanup="none", intensity=intensity))


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from ..classes import canonical_class_mapping
    from ..interactive_eval import ClickProtocol, evaluate_clicks, evaluate_propagation
    from ..selection import parse_slices
    from ..training import parse_class_mapping

    check_case_arguments(args)
    protocol = ClickProtocol(clicks=args.clicks, start=args.start)
    classes = canonical_class_mapping(parse_class_mapping(args.classes))
    cases = load_cases(args)
    engine = _engine(args)
    if engine.prompt_network is not None:
        for name in classes:
            engine.class_info(name)  # classes the bundle does not know fail before any model work
    report: dict = {"start": args.start, "clicks": args.clicks, "target_dsc": protocol.target_dsc,
                    "backbone": engine.backbone.id, "model": args.model, "cases": []}
    for case, image_path, labels_path in zip(cases, args.image, args.labels, strict=True):
        print(f"evaluating {case.name} ...", file=sys.stderr)
        engine.set_volume(case.image)
        slices = parse_slices(args.slices, case.image.num_slices) if args.slices else None
        labels = case.labels.array
        entry = {"name": case.name, "image": image_path, "labels": labels_path,
                 "classes": evaluate_clicks(engine, labels, classes, protocol, slices)}
        if args.propagation:
            entry["propagation"] = evaluate_propagation(engine, labels, classes)
        report["cases"].append(entry)
    # Over all cases: the mean of the per-case figures, per class.
    overall = {}
    for name in classes:
        rows = [c["classes"][name] for c in report["cases"] if c["classes"][name].get("slices")]
        if rows:
            overall[name] = {
                "dsc_by_click": [round(float(v), 4) for v in np.mean([r["dsc_by_click"] for r in rows], axis=0)],
                "clicks_to_target": round(float(np.mean([r["clicks_to_target"] for r in rows])), 2),
                "ms_per_interaction_p50": round(float(np.median([r["ms_per_interaction"]["p50"] for r in rows
                                                                if r["ms_per_interaction"]["p50"] is not None]
                                                               or [np.nan])), 1),
            }
    report["classes"] = overall
    if args.json:
        emit_json(report)
        return 0
    header = "  ".join(f"{c:>6}" for c in ["start", *[f"+{n}" for n in range(1, args.clicks + 1)]])
    print(f"{'class':<16} DSC by click: {header}   clicks to {protocol.target_dsc:g}   ms p50")
    for name, r in overall.items():
        row = "  ".join(f"{v:6.3f}" for v in r["dsc_by_click"])
        print(f"{name:<16}               {row}   {r['clicks_to_target']:>14.2f}   {r['ms_per_interaction_p50']:>6}")
    for entry in report["cases"]:
        for name, prop in entry.get("propagation", {}).items():
            if prop.get("dsc") is not None:
                print(f"propagation {entry['image']} {name}: 3-D DSC {prop['dsc']:.3f} from slice {prop['from_slice']}")
    return 0
