"""Data safety and input validation of the commands: nothing the program did not create is ever
destroyed, long work survives a failure at its end, and bad input is exit 2 with a clear message."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from automedsam.bundle import ModelBundle, load_bundle
from automedsam.cli.main import run


@pytest.fixture()
def case(ct_dir):
    return str(ct_dir / "ct_lowres.nii.gz"), str(ct_dir / "ct_lowres_labels.nii.gz")


def train_args(case, *extra: str) -> list[str]:
    image, labels = case
    return ["train", "--image", image, "--labels", labels, "--backbone", "tiny-sam2", "--epochs", "1",
            "--augment-copies", "0", "--train-slices", "12:15", "--decoder-lr", "3e-4", *extra]


def edited_bundle(source: Path, target: Path, edit) -> str:
    """A copy of a bundle zip with its manifest changed by ``edit(manifest)``."""
    with zipfile.ZipFile(source) as z:
        manifest, weights = json.loads(z.read("manifest.json")), z.read("weights.safetensors")
    edit(manifest)
    with zipfile.ZipFile(target, "w") as z:
        z.writestr("manifest.json", json.dumps(manifest))
        z.writestr("weights.safetensors", weights)
    return str(target)


def _bad_cases(tmp, case, make_bundle, ct_dir):
    image, labels = case
    bundle = make_bundle()
    precious = tmp / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("years of work")
    (tmp / "nofolder.txt").write_text("a file, not a folder")
    nan = np.zeros((4, 5, 6), np.float32)
    nan[1, 2, 3] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(nan), str(tmp / "nan.nii.gz"))
    gap = tmp / "dicom_gap"
    gap.mkdir()
    for n, f in enumerate(sorted((ct_dir / "ct_dicom").iterdir())):
        if n != 7:
            (gap / f.name).write_bytes(f.read_bytes())

    def dup(m):
        m["classes"][1]["aliases"] = ["Liver"]

    def seed(m):
        m["backbone"]["weights"] = "random:seed=" + "9" * 40

    segment = ["segment", image, "--model", str(bundle), "--classes", "liver"]
    own = tmp / "mine.nii.gz"  # a copy: if the check failed, only the copy would be lost
    own.write_bytes(Path(image).read_bytes())
    out = str(tmp / "new.zip")
    return [
        (train_args(case, "--classes", "liver=5", "-o", str(precious), "--overwrite"), "not a model bundle"),
        (train_args(case, "--classes", "liver=5", "-o", ".", "--overwrite"), "names no bundle"),
        (train_args(case, "--classes", "liver=5", "-o", str(tmp / "nofolder.txt" / "x.zip")), "not a writable"),
        (train_args(case, "--classes", "liver=²", "-o", out), "name=label_value"),
        (train_args(case, "--classes", "liver=5,liver=1", "-o", out), "given twice"),
        (train_args(case, "--classes", "liver=5,Liver=1", "-o", out), "given twice"),
        (train_args(case, "--classes", "liver=5,livr=250", "-o", out), "livr=250: no voxel"),
        (train_args(case, "--classes", "liver=5", "--val-cases", "x", "-o", out), "--val-cases"),
        (train_args(case, "--classes", "liver=5", "--epochs", "0", "-o", out), "epochs"),
        (train_args(case, "--classes", "liver=5", "--resume", "-o", out), "give the --checkpoint-dir"),
        (train_args(case, "--classes", "liver=5", "--checkpoint-dir", str(tmp / "nofolder.txt"), "-o", out),
         "is a file"),
        (train_args(case, "--classes", "liver=5", "--checkpoint-dir", str(tmp / "ckpt"), "--resume", "-o", out),
         "holds no checkpoint"),
        ([*segment[:-2], "--classes", ",", "-o", str(tmp / "a.seg.nrrd")], "names no class"),
        ([*segment, "-o", str(tmp / "missing" / "a.seg.nrrd")], "does not exist"),
        ([*segment, "-o", str(tmp / "a.txt")], "must end in"),
        ([*segment, "-o", str(tmp)], "is a folder"),
        (["segment", str(own), "--model", str(bundle), "--classes", "liver", "-o", str(own), "--overwrite"],
         "is the input image"),
        ([*segment, "--slices", "0:99999:0", "-o", str(tmp / "a.seg.nrrd")], "not a slice selection"),
        (["segment", image, "--model", "b" * 100_000, "--classes", "liver", "-o", str(tmp / "b.seg.nrrd")],
         "not usable"),
        (["segment", str(tmp / "nan.nii.gz"), "--model", str(bundle), "--classes", "liver", "-o",
          str(tmp / "c.seg.nrrd")], "NaN"),
        (["segment", image, "--model", edited_bundle(bundle, tmp / "dup.zip", dup), "--classes", "liver", "-o",
          str(tmp / "d.seg.nrrd")], "used twice"),
        (["segment", image, "--model", edited_bundle(bundle, tmp / "seed.zip", seed), "--classes", "liver", "-o",
          str(tmp / "e.seg.nrrd")], "broken manifest"),
        (["inspect", str(gap)], "not evenly spaced"),
        (["evaluate", "--pred", labels, "--ref", labels, "--tolerance-mm", "nan"], "finite"),
        (["evaluate", "--pred", labels, "--ref", labels, "--tolerance-mm", "inf", "--json"], "finite"),
        (["evaluate", "--pred", labels, "--ref", labels, "--classes", "livr=250"], "nothing to score"),
        (["models", "download", "litemedsam", "--sha256", "0" * 64], "contradicts"),
        (["models", "download", "litemedsam", "--url", "file:///etc/passwd"], "only http"),
    ]


def test_bad_input_exits_2_with_a_clear_message(tmp_path, case, make_bundle, ct_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "input.txt").write_text("keep me")
    for args, words in _bad_cases(tmp_path, case, make_bundle, ct_dir):
        code = run(args)
        err = capsys.readouterr().err
        assert code == 2 and words in err, (args[:3], code, err[-400:])
        assert "Traceback" not in err and "internal error" not in err
    assert (tmp_path / "precious" / "thesis.txt").read_text() == "years of work"
    assert (tmp_path / "input.txt").read_text() == "keep me"
    assert (tmp_path / "mine.nii.gz").read_bytes() == (ct_dir / "ct_lowres.nii.gz").read_bytes()
    assert not list(tmp_path.glob("*.seg.nrrd")) and not (tmp_path / "new.zip").exists()


def test_serve_refuses_a_token_file_others_can_read(tmp_path, capsys):
    token = tmp_path / "token"
    token.write_text("a-token-of-more-than-16-characters")
    token.chmod(0o644)
    assert run(["serve", "--token-file", str(token)]) == 2
    assert "can be read or changed by other users (mode -rw-r--r--)" in capsys.readouterr().err
    os.mkfifo(tmp_path / "pipe")  # opening it would wait for a writer forever
    assert run(["serve", "--token-file", str(tmp_path / "pipe")]) == 2
    assert "named pipe" in capsys.readouterr().err


def test_models_download_repairs_a_folder_where_the_weights_belong(capsys):
    from automedsam.models import BackboneCatalog

    catalog = BackboneCatalog.load()
    dest = catalog.expected_path(catalog.get("litemedsam"))
    (dest / "stray").mkdir(parents=True)  # a folder with something in it: moved aside, never deleted
    assert run(["models", "download", "litemedsam"]) == 0
    assert dest.is_file() and [p for p in dest.parent.iterdir() if p.name.startswith(dest.name + ".folder-")]
    dest.unlink()
    dest.mkdir()  # an empty folder: removed
    assert run(["models", "download", "litemedsam"]) == 0 and dest.is_file()


def test_usage_errors_of_serve_exit_2():
    for args in (["serve", "--port", "99999"], ["serve", "--max-sessions", "0"], ["serve", "--port", "x"]):
        with pytest.raises(SystemExit) as info:
            run(args)
        assert info.value.code == 2


def test_overwrite_replaces_a_bundle_and_catalog_spellings_train(tmp_path, case, capsys):
    out = tmp_path / "model"
    assert run(train_args(case, "--classes", "kidney_right=2,Liver=5", "-o", str(out), "--json")) == 0
    first = load_bundle(out)
    assert [c.name for c in first.classes] == ["right_kidney", "liver"]
    assert set(json.loads(capsys.readouterr().out)["validation"]) == {"right_kidney", "liver"}
    (out / "notes.txt").write_text("the user's, not the program's")
    assert run(train_args(case, "--classes", "Spleen=1", "-o", str(out), "--overwrite")) == 2
    assert "not a model bundle" in capsys.readouterr().err and (out / "notes.txt").exists()
    (out / "notes.txt").unlink()
    assert run(train_args(case, "--classes", "Spleen=1", "-o", str(out), "--overwrite", "--seed", "1")) == 0
    assert [c.name for c in load_bundle(out).classes] == ["spleen"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # swapped in, nothing left aside


def test_a_failed_save_keeps_the_trained_bundle(tmp_path, case, capsys, monkeypatch, isolated_home):
    out = tmp_path / "model.zip"
    real_save = ModelBundle.save

    def disk_full(self, path):
        if Path(path) == out:
            raise OSError(28, "No space left on device")
        return real_save(self, path)

    monkeypatch.setattr(ModelBundle, "save", disk_full)
    assert run(train_args(case, "--classes", "liver=5", "-o", str(out))) == 1
    err = capsys.readouterr().err
    kept = list((isolated_home / "rescue").glob("*/*.zip"))
    assert len(kept) == 1 and str(kept[0]) in err and "No space left" in err
    assert [c.name for c in load_bundle(kept[0]).classes] == ["liver"]


def test_a_failure_late_in_training_keeps_the_epochs_and_resume_finishes(tmp_path, case, capsys, monkeypatch):
    from automedsam.training import loop

    out = tmp_path / "model.zip"
    real_validate = loop._validate
    calls = []

    def fails_at_epoch_2(engines, prompt_network, *args, **kwargs):
        calls.append({k: v.detach().clone() for k, v in prompt_network.state_dict().items()})
        if len(calls) == 2:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real_validate(engines, prompt_network, *args, **kwargs)

    monkeypatch.setattr(loop, "_validate", fails_at_epoch_2)
    args = train_args(case, "--classes", "liver=5", "-o", str(out))
    args[args.index("--epochs") + 1] = "3"
    assert run(args) == 1
    err = capsys.readouterr().err
    assert "after epoch 1" in err and "--resume" in err and "illegal memory access" in err
    checkpoint_dir = err.split("--checkpoint-dir ")[1].split(" --resume")[0]
    assert (Path(checkpoint_dir) / "last.pt").is_file() and not out.exists()
    kept = torch.load(Path(checkpoint_dir) / "last.pt", weights_only=True)
    assert kept["epoch"] == 1 and kept["run"]["classes"] == {"liver": 5}
    for name, value in calls[0].items():  # exactly epoch 1's weights, not epoch 2's half-way state
        assert torch.equal(kept["generator"][name], value), name
    assert any(not torch.equal(calls[1][n], v) for n, v in calls[0].items())  # epoch 2 had moved them
    monkeypatch.setattr(loop, "_validate", real_validate)
    # Resuming with other classes is refused, with the same ones it finishes the remaining epochs.
    assert run([*args[:args.index("--classes")], "--classes", "spleen=1", "-o", str(out), "--checkpoint-dir",
                checkpoint_dir, "--resume"]) == 2
    assert "belongs to another run" in capsys.readouterr().err
    assert run([*args, "--checkpoint-dir", checkpoint_dir, "--resume"]) == 0
    history = load_bundle(out).manifest["training"]["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]


def test_evaluate_leaves_classes_absent_from_both_sides_out_of_the_mean(case, capsys):
    _, labels = case
    assert run(["evaluate", "--pred", labels, "--ref", labels, "--classes", "liver=5", "--json"]) == 0
    alone = json.loads(capsys.readouterr().out)
    assert run(["evaluate", "--pred", labels, "--ref", labels, "--classes", "liver=5,livr=250", "--json"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["mean"] == alone["mean"] and report["absent"] == ["livr"] and "livr" not in report["classes"]
    assert "livr (label 250) is in neither" in captured.err
