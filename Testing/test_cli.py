"""The ``automedsam`` command: JSON output on real data, exit codes and messages for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from automedsam.cli.main import run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.path.join(REPO, "AutoMedSAMSlicer"))
    return subprocess.run([sys.executable, "-m", "automedsam.cli.main", *args], capture_output=True, text=True,
                          env=env, timeout=300, check=False)


def test_inspect_json_reports_labels_on_the_image_grid(ct_dir):
    proc = cli("inspect", str(ct_dir / "ct_dicom"), "--labels", str(ct_dir / "ct_dicom_labels.nii.gz"), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["size_ijk"] == [512, 512, 20] and report["dtype"] == "int16"
    liver = report["labels"]["5"]
    assert liver["voxels"] == 366708
    # Independent bounding box: the label file's voxels, its j axis mapped through physical space
    # by hand (origins and directions differ: j_image = (y_label0 - y_image0) / dy - j_label).
    raw_img = sitk.ReadImage(str(ct_dir / "ct_dicom_labels.nii.gz"))
    raw = sitk.GetArrayFromImage(raw_img)
    k, j, i = np.nonzero(raw == 5)
    dy = raw_img.GetSpacing()[1]
    image_y0 = report["origin_lps"][1]
    label_y0 = raw_img.GetOrigin()[1]
    j_img = np.rint((label_y0 - j * dy - image_y0) / dy).astype(int)
    assert liver["min_ijk"] == [int(i.min()), int(j_img.min()), int(k.min())]
    assert liver["max_ijk"] == [int(i.max()), int(j_img.max()), int(k.max())]


def test_inspect_text_output(ct_dir, capsys):
    assert run(["inspect", str(ct_dir / "ct_lowres.nii.gz")]) == 0
    out = capsys.readouterr().out
    assert "size (i,j,k) [122, 101, 30]" in out


def _bad_inputs(tmp_path, ct_dir):
    arr = np.zeros((3, 4, 5), np.float32)
    arr[0, 0, 0] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(tmp_path / "nan.nrrd"))
    four_d = sitk.GetImageFromArray(np.zeros((2, 3, 4, 5), np.int16), isVector=False)
    sitk.WriteImage(four_d, str(tmp_path / "t4.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(np.full((3, 4, 5), 0.3, np.float32)), str(tmp_path / "float.nrrd"))
    far = sitk.GetImageFromArray(np.ones((3, 4, 5), np.uint8))
    far.SetOrigin((9000.0, 0.0, 0.0))
    sitk.WriteImage(far, str(tmp_path / "far.nrrd"))
    data = (ct_dir / "ct_lowres.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(data[:5000])
    (tmp_path / "zero.nrrd").write_bytes(b"")
    lowres = str(ct_dir / "ct_lowres.nii.gz")
    return [
        (["inspect", str(tmp_path / "missing.nii.gz")], "not found"),
        (["inspect", str(tmp_path / "zero.nrrd")], "empty file"),
        (["inspect", str(tmp_path / "cut.nii.gz")], "truncated"),
        (["inspect", str(tmp_path / "t4.nii.gz")], "4-D"),
        (["inspect", str(tmp_path / "nan.nrrd")], "NaN"),
        (["inspect", lowres, "--labels", str(tmp_path / "float.nrrd")], "non-integer"),
        (["inspect", lowres, "--labels", str(tmp_path / "far.nrrd")], "covers 0.0%"),
        (["backbones", "check", "sam_vit_q", "--image", lowres], "unknown backbone id"),
    ]


def test_bad_input_exits_2_with_a_specific_message_and_no_traceback(tmp_path, ct_dir, capsys):
    for args, message in _bad_inputs(tmp_path, ct_dir):
        code = run(args)
        err = capsys.readouterr().err
        assert code == 2, (args, err)
        assert message in err and "Traceback" not in err, (args, err)


def test_usage_errors_exit_2_in_a_real_process():
    proc = cli("inspect")
    assert proc.returncode == 2 and "usage:" in proc.stderr
    proc = cli("inspect", "/definitely/missing.nrrd")
    assert proc.returncode == 2 and "not found" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_weights_exit_3(ct_dir, capsys):
    assert run(["backbones", "check", "sam_vit_b", "--image", str(ct_dir / "ct_lowres.nii.gz")]) == 3
    assert "models download sam_vit_b" in capsys.readouterr().err


@pytest.mark.parametrize("backbone_id", ["tiny-sam", "tiny-sam2"])
def test_backbones_check_runs_a_real_slice_end_to_end(ct_dir, capsys, backbone_id):
    assert run(["backbones", "check", backbone_id, "--image", str(ct_dir / "ct_lowres.nii.gz"), "--json",
                "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["test_only"] and report["slice_shape_ji"] == [101, 122]
    assert report["model_input_shape"] == [1, 256, 256, 3]
    e = report["embedding_shape"][-1]
    assert report["mask_logits_shape"] == [1, 1, 4 * e, 4 * e]
