"""``automedsam evaluate-interactive``: the simulated user, per case, with propagation (tiny test
backbone for speed; LiteMedSAM's clicks are tested in test_litemedsam.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from automedsam.cli.main import run
from automedsam.interactive_eval import ClickProtocol, evaluate_clicks
from automedsam.metrics import dice


def test_cli_reports_clicks_latency_and_propagation_per_case(ct_dir, capsys):
    image, labels = str(ct_dir / "ct_lowres.nii.gz"), str(ct_dir / "ct_lowres_labels.nii.gz")
    code = run(["evaluate-interactive", "--image", image, "--labels", labels, "--image", image, "--labels", labels,
                "--classes", "kidney_right=2,liver=5", "--backbone", "tiny-sam", "--slices", "13:16",
                "--clicks", "2", "--propagation", "--device", "cpu", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out)
    assert report["start"] == "box" and report["clicks"] == 2 and report["backbone"] == "tiny-sam"
    assert len(report["cases"]) == 2
    assert [c["classes"]["liver"]["dsc_by_click"] for c in report["cases"]] == [report["classes"]["liver"]
                                                                                 ["dsc_by_click"]] * 2
    case = report["cases"][0]
    assert case["image"] == image and set(case["classes"]) == {"right_kidney", "liver"}  # catalog spelling
    liver = case["classes"]["liver"]
    assert len(liver["dsc_by_click"]) == 3 and liver["slices"] == 3
    assert all(0.0 <= v <= 1.0 for v in liver["dsc_by_click"]) and liver["ms_per_interaction"]["p50"] > 0
    assert 0 <= liver["clicks_to_target"] <= 2 and 0.0 <= liver["reached_target"] <= 1.0
    prop = case["propagation"]["liver"]
    assert 0.0 <= prop["dsc"] <= 1.0 and prop["slices_reference"] == 30
    assert set(report["classes"]) == {"right_kidney", "liver"}


def test_cli_rejects_auto_start_without_a_bundle_and_unpaired_cases(ct_dir, capsys):
    image, labels = str(ct_dir / "ct_lowres.nii.gz"), str(ct_dir / "ct_lowres_labels.nii.gz")
    assert run(["evaluate-interactive", "--image", image, "--labels", labels, "--classes", "liver=5",
                "--start", "auto", "--backbone", "tiny-sam"]) == 2
    assert "--start auto needs a model bundle" in capsys.readouterr().err
    assert run(["evaluate-interactive", "--image", image, "--image", image, "--labels", labels,
                "--classes", "liver=5"]) == 2
    assert "2 --image but 1 --labels" in capsys.readouterr().err


class _PerfectClicks:
    """An engine stand-in whose refine fills the clicked region from the reference: the protocol's
    bookkeeping (click index, DSC, click counts) must follow exactly."""

    def __init__(self, ref: np.ndarray):
        self.ref, self.masks = ref, {}

    def encode(self, ks):
        pass

    def refine(self, name, k, points=None, point_labels=None, box=None, mode=None, reset=False, mask=None):
        current = self.masks.setdefault(k, np.zeros(self.ref.shape[1:], bool))
        if box is not None:  # a box gives the left half of the object
            current[:] = False
            cols = np.flatnonzero(self.ref[k].any(axis=0))
            current[:, cols[: len(cols) // 2]] = self.ref[k][:, cols[: len(cols) // 2]]
        if points is not None:
            current |= self.ref[k]
        return current.copy()


def test_protocol_bookkeeping_with_a_perfect_second_click():
    ref = np.zeros((3, 20, 20), bool)
    ref[1, 4:12, 4:16] = True
    out = evaluate_clicks(_PerfectClicks(ref), ref.astype(np.uint8), {"liver": 1}, ClickProtocol(clicks=2))
    liver = out["liver"]
    half = np.zeros((20, 20), bool)
    half[4:12, 4:10] = True
    assert liver["slices"] == 1 and liver["dsc_by_click"] == [round(dice(half, ref[1]), 4), 1.0, 1.0]
    assert liver["clicks_to_target"] == 1 and liver["reached_target"] == 1.0 and liver["worse_clicks"] == 0.0


def test_protocol_checks_its_settings():
    with pytest.raises(ValueError, match="start"):
        ClickProtocol(start="scribble")
    with pytest.raises(ValueError, match="clicks"):
        ClickProtocol(clicks=-1)
