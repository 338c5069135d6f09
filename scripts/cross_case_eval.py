#!/usr/bin/env python
"""Does a taught class transfer? Teach on one volume, segment another, score against its reference.

Every step is the command a user would run (``automedsam train``, ``segment``, ``evaluate``), so the
figures are what the CLI gives. Scenarios (data from ``../shared/data``):

- ``abdomen-xres``: taught on the 3 mm abdominal CT, segments the same patient's 0.98 mm DICOM series
  (another field of view and voxel order): liver, spleen, pancreas, aorta;
- ``sts-ct-1to2`` / ``sts-ct-2to1`` / ``sts-mr-1to2`` / ``sts-mr-2to1``: the sarcoma taught on one
  patient, segmented on the other (CT and T1 MR).

Usage::

    .venv/bin/python scripts/cross_case_eval.py [--shared ../shared] [--work DIR] [--only NAME ...]
        [--prompt-network classmap] [--epochs N]

Prints one JSON object: per scenario the training's held-out figures (the taught volume) and the
other volume's DSC/NSD per class, with the seconds each step took.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ABDOMEN = {"liver": 5, "spleen": 1, "pancreas": 7, "aorta": 52}


def scenarios(data: Path) -> dict[str, dict]:
    ab, sts = data / "ct_abdomen", data / "sts_ct_mr"
    out = {"abdomen-xres": {"train": (ab / "ct_lowres.nii.gz", ab / "ct_lowres_labels.nii.gz"),
                            "test": (ab / "ct_dicom", ab / "ct_dicom_labels.nii.gz"),
                            "classes": ABDOMEN, "window": "abdomen"}}
    for mod, window in (("CT", "soft_tissue"), ("MR_T1", "mr")):
        for a, b in (("001", "002"), ("002", "001")):
            out[f"sts-{mod.split('_')[0].lower()}-{a[-1]}to{b[-1]}"] = {
                "train": (sts / f"STS_{a}_{mod}_image.nii.gz", sts / f"STS_{a}_{mod}_mask.nii.gz"),
                "test": (sts / f"STS_{b}_{mod}_image.nii.gz", sts / f"STS_{b}_{mod}_mask.nii.gz"),
                "classes": {"tumor": 1}, "window": window}
    return out


def automedsam(*args: str) -> tuple[dict, float]:
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "automedsam", *args, "--json"], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"automedsam {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout), round(time.perf_counter() - t0, 1)


def run(name: str, s: dict, work: Path, prompt_network: str, epochs: int | None) -> dict:
    classes = ",".join(f"{n}={v}" for n, v in s["classes"].items())
    bundle, seg = work / f"{name}.zip", work / f"{name}.seg.nrrd"
    extra = ["--epochs", str(epochs)] if epochs else []
    trained, t_train = automedsam("train", "--image", str(s["train"][0]), "--labels", str(s["train"][1]),
                                  "--classes", classes, "--window", s["window"], "--prompt-network", prompt_network,
                                  "-o", str(bundle), "--overwrite", *extra)
    _, t_seg = automedsam("segment", str(s["test"][0]), "--model", str(bundle), "--classes", ",".join(s["classes"]),
                          "-o", str(seg), "--overwrite")
    scored, _ = automedsam("evaluate", "--pred", str(seg), "--ref", str(s["test"][1]), "--classes", classes)
    return {"taught_on": s["train"][0].name, "segmented": s["test"][0].name,
            "held_out_slices_of_taught_volume": trained["validation"],
            "other_volume": scored["classes"], "other_volume_mean_dsc": scored["mean"]["dsc"],
            "seconds": {"train": t_train, "segment": t_seg}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", default=str(Path(__file__).resolve().parents[1].parent / "shared"))
    parser.add_argument("--work", help="folder for bundles and masks (default: a temporary one)")
    parser.add_argument("--only", nargs="*", help="scenario names (default: all)")
    parser.add_argument("--prompt-network", default="classmap")
    parser.add_argument("--epochs", type=int)
    args = parser.parse_args()
    all_scenarios = scenarios(Path(args.shared) / "data")
    names = args.only or list(all_scenarios)
    unknown = [n for n in names if n not in all_scenarios]
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; choose from {list(all_scenarios)}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        report = {}
        for name in names:
            report[name] = run(name, all_scenarios[name], work, args.prompt_network, args.epochs)
            print(f"{name}: {json.dumps(report[name]['other_volume'])}", file=sys.stderr)
    print(json.dumps({"prompt_network": args.prompt_network, "scenarios": report}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
