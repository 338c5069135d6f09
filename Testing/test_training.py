"""Training: events, leak-free splits, reproducibility, checkpoints and resume, cancel, and a bundle
that reproduces its validation numbers in the engine and the CLI."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch

from automedsam.bundle import load_bundle
from automedsam.cli.main import run
from automedsam.engine import Engine
from automedsam.errors import InvalidInputError
from automedsam.metrics import dice
from automedsam.training import AugmentConfig, TrainConfig, load_case, train
from automedsam.training.data import split_slices
from automedsam.training.losses import UncertaintyWeights, boxes_from_masks, focal_loss


@pytest.fixture(scope="module")
def case(ct_dir):
    return load_case(ct_dir / "ct_lowres.nii.gz", ct_dir / "ct_lowres_labels.nii.gz")


def small_config(tmp_path, **kw):
    base = dict(classes={"liver": 5, "spleen": 1}, prompt_network="ppn", backbone="tiny-sam2", weights="random",
                device="cpu", cpu_runtime="torch", epochs=1, train_slices="12:16", augment=AugmentConfig(copies=1),
                cache_dir=str(tmp_path / "cache"), lr=1e-3)
    return TrainConfig(**(base | kw))


def run_to_end(config, cases, cancel=None):
    events = list(train(config, cases, cancel=cancel))
    return events, events[-1]


def test_splits_never_leak(case):
    (s,) = split_slices([case], "0::3")
    assert set(s.train_slices).isdisjoint(s.val_slices) and len(s.train_slices) + len(s.val_slices) == 30
    assert s.val_slices == list(range(0, 30, 3))
    (t,) = split_slices([case], None, train_slices="1::3")
    assert t.train_slices == list(range(1, 30, 3)) and 1 not in t.val_slices
    held = split_slices([case, case], "0::3", val_cases=[1])
    assert held[1].train_slices == [] and held[1].val_slices == list(range(30))
    with pytest.raises(InvalidInputError, match="no training slices"):
        split_slices([case], "0:30")


@pytest.mark.parametrize("prompt_network", ["classmap", "ppn", "diffusion"])
def test_training_yields_events_and_a_bundle_that_reproduces_its_validation(case, tmp_path, prompt_network):
    config = small_config(tmp_path, prompt_network=prompt_network)
    events, done = run_to_end(config, [case])
    stages = [e.stage for e in events]
    assert stages[0] == "prepare" and "encode" in stages and "step" in stages and stages[-1] == "done"
    assert {"liver", "spleen"} == set(done.metrics)
    bundle = load_bundle(done.bundle.save(tmp_path / f"{prompt_network}.zip"))
    facts = bundle.manifest["training"]
    assert facts["train_slices"]["ct_lowres.nii.gz"] == [12, 13, 14, 15]
    assert 12 not in facts["val_slices"]["ct_lowres.nii.gz"]
    assert bundle.manifest["metrics"]["validation"] == done.metrics
    # The engine with the saved bundle gives the same validation numbers.
    engine = Engine.from_bundle(bundle, "cpu")
    engine.set_volume(case.image)
    val = facts["val_slices"]["ct_lowres.nii.gz"]
    result = engine.segment_volume(["liver"], val, cleanup="none")
    per_slice_stack = dice(result.masks["liver"][val], case.labels.array[val] == 5)
    assert per_slice_stack == pytest.approx(done.metrics["liver"]["dsc"], abs=1e-4)


def test_training_is_reproducible_and_resumes_exactly(case, tmp_path):
    config = small_config(tmp_path, epochs=2, checkpoint_dir=str(tmp_path / "ckpt_a"))
    _, a = run_to_end(config, [case])
    _, b = run_to_end(small_config(tmp_path, epochs=2), [case])
    for key, value in a.bundle.tensors.items():
        torch.testing.assert_close(value, b.bundle.tensors[key])
    # One epoch, then resume for the second: the same weights as two epochs in one go.
    one = small_config(tmp_path, epochs=1, checkpoint_dir=str(tmp_path / "ckpt_c"))
    run_to_end(one, [case])
    resumed_events, c = run_to_end(small_config(tmp_path, epochs=2, checkpoint_dir=str(tmp_path / "ckpt_c"),
                                                resume=True), [case])
    assert any(e.stage == "checkpoint" and "resumed" in e.message for e in resumed_events)
    for key, value in a.bundle.tensors.items():
        torch.testing.assert_close(value, c.bundle.tensors[key])


def test_cancel_writes_nothing(case, tmp_path):
    cancel = threading.Event()
    stages = []
    for event in train(small_config(tmp_path, epochs=3), [case], cancel=cancel):
        stages.append(event.stage)
        if event.stage == "step":
            cancel.set()
    assert stages[-1] == "cancelled" and "done" not in stages


def test_class_names_resolve_through_the_catalog_everywhere(case, tmp_path):
    config = small_config(tmp_path, classes={"kidney_right": 2, "Liver": 5, "Left Kidney": 3})
    assert config.classes == {"right_kidney": 2, "liver": 5, "left_kidney": 3}
    with pytest.raises(InvalidInputError, match="given twice"):
        small_config(tmp_path, classes={"kidney_right": 2, "right_kidney": 3})
    with pytest.raises(InvalidInputError, match="decoder"):
        small_config(tmp_path, prompt_network="classmap", finetune_decoder=True)
    # Training with the TotalSegmentator spelling validates and bundles under the catalog's names.
    _, done = run_to_end(small_config(tmp_path, prompt_network="classmap", classes={"kidney_right": 2, "Liver": 5}),
                         [case])
    assert set(done.metrics) == {"right_kidney", "liver"}
    assert [c.name for c in done.bundle.classes] == ["right_kidney", "liver"]


def test_losses_behave():
    target = torch.zeros(2, 8, 8)
    target[0, 2:5, 3:7] = 1
    good, bad = target * 20 - 10, -(target * 20 - 10)
    assert focal_loss(good, target) < 0.01 < focal_loss(bad, target)
    box = boxes_from_masks(target)
    np.testing.assert_allclose(box[0].numpy(), [3.5 / 8, 2.5 / 8, 6.5 / 8, 4.5 / 8])
    w = UncertaintyWeights(["a", "b"])
    total = w({"a": torch.tensor(2.0), "b": torch.tensor(0.5)})
    assert total.item() == pytest.approx(2 / 2 + 0.5 / 2 + 2 * np.log(2))


def test_train_cli_writes_a_bundle_and_a_json_summary(ct_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("AUTOMEDSAM_HOME", str(tmp_path / "home"))
    out = tmp_path / "liver.zip"
    code = run(["train", "--image", str(ct_dir / "ct_lowres.nii.gz"),
                "--labels", str(ct_dir / "ct_lowres_labels.nii.gz"), "--classes", "liver=5",
                "--generator", "diffusion", "--backbone", "tiny-sam", "--train-slices", "13:15",
                "--epochs", "1", "--augment-copies", "0", "--device", "cpu", "-o", str(out), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out)
    assert set(summary["validation"]) == {"liver"} and summary["bundle"] == str(out)
    assert load_bundle(out).prompt_network_kind == "diffusion"
    assert run(["train", "--image", "a.nii", "--image", "b.nii", "--labels", "l.nii", "--classes", "liver=5",
                "-o", str(tmp_path / "x.zip")]) == 2
    assert "2 --image but 1 --labels" in capsys.readouterr().err
