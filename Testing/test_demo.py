"""``automedsam demo``: the pipeline end to end (smoke), the verified download, and the fast offline exit."""

from __future__ import annotations

import hashlib
import json

from automedsam.cli import demo_cmd
from automedsam.cli.main import run
from automedsam.io import read_image, read_segmentation

from http_fixture import FaultyFileServer


def test_smoke_demo_runs_the_whole_pipeline_on_local_files(ct_dir, tmp_path, capsys):
    out = tmp_path / "demo"
    code = run(["demo", "--smoke", "--image", str(ct_dir / "ct_lowres.nii.gz"), "--labels",
                str(ct_dir / "ct_lowres_labels.nii.gz"), "--epochs", "1", "--out", str(out), "--device", "cpu",
                "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out)
    assert summary["taught_slices"] == list(range(1, 30, 3)) and summary["evaluated_slices"] == 20
    assert set(summary["validation"]) == {"liver", "spleen", "left_kidney", "right_kidney"}
    assert all(set(m) == {"dsc", "nsd"} for m in summary["validation"].values())
    assert summary["backbone"] == "tiny-sam2" and summary["prompt_network"] == "classmap" and summary["seconds"] > 0
    seg = read_segmentation(out / "demo.seg.nrrd")
    assert seg.grid.same_grid(read_image(ct_dir / "ct_lowres.nii.gz"))
    assert (out / "demo_bundle.zip").is_file()
    assert "encode" in captured.err and "segment" in captured.err  # progress all the way


def test_demo_downloads_verified_files(ct_dir, tmp_path, monkeypatch, capsys):
    image, labels = (ct_dir / "ct_lowres.nii.gz").read_bytes(), (ct_dir / "ct_lowres_labels.nii.gz").read_bytes()
    with FaultyFileServer({"ct.nii.gz": image, "seg.nii.gz": labels}) as server:
        monkeypatch.setattr(demo_cmd, "DEMO_FILES", {
            "image": (f"{server.url}/ok/ct.nii.gz", "ct.nii.gz", hashlib.sha256(image).hexdigest()),
            "labels": (f"{server.url}/ok/seg.nii.gz", "seg.nii.gz", hashlib.sha256(labels).hexdigest()),
        })
        ct_path, seg_path = demo_cmd.fetch_demo_data(tmp_path)
    assert ct_path.read_bytes() == image and seg_path.read_bytes() == labels


def test_offline_demo_exits_3_fast_with_what_to_download(tmp_path, monkeypatch, capsys):
    with FaultyFileServer({}) as server:
        url = server.url  # closed once we leave the block: connection refused
    monkeypatch.setattr(demo_cmd, "DEMO_FILES", {
        "image": (f"{url}/ok/ct.nii.gz", "example_ct_sm.nii.gz", "a" * 64),
        "labels": (f"{url}/ok/seg.nii.gz", "example_seg.nii.gz", "b" * 64),
    })
    assert run(["demo", "--smoke", "--out", str(tmp_path / "o")]) == 3
    err = capsys.readouterr().err
    assert "example_ct_sm.nii.gz" in err and "a" * 64 in err and "--image CT --labels LABELS" in err
    # The default backbone's weights install with the package: only the data is missing.
    assert run(["demo", "--out", str(tmp_path / "o")]) == 3
    assert "example_ct_sm.nii.gz" in capsys.readouterr().err
    assert run(["demo", "--backbone", "sam2.1_hiera_t", "--out", str(tmp_path / "o")]) == 3  # not cached
    assert "models download sam2.1_hiera_t" in capsys.readouterr().err


def test_demo_refuses_a_single_slice_with_a_clear_message(ct_dir, tmp_path, capsys):
    import SimpleITK as sitk

    for name in ("ct_lowres.nii.gz", "ct_lowres_labels.nii.gz"):
        sitk.WriteImage(sitk.ReadImage(str(ct_dir / name))[:, :, 15], str(tmp_path / name))
    assert run(["demo", "--smoke", "--image", str(tmp_path / "ct_lowres.nii.gz"), "--labels",
                str(tmp_path / "ct_lowres_labels.nii.gz"), "--out", str(tmp_path / "o")]) == 2
    assert "has 1 slice(s)" in capsys.readouterr().err and not (tmp_path / "o").exists()
