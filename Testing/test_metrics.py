"""DSC and NSD, checked against an independent computation written here with scipy alone."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from automedsam.cli.main import run
from automedsam.io import read_label_map, write_volume
from automedsam.metrics import dice, normalized_surface_dice
from automedsam.volume import Volume


def independent_nsd(pred, ref, spacing, tol):
    """Boundary voxels (mask minus its erosion); each boundary's voxels within tol mm of the other
    boundary, counted over both boundaries."""

    def border(m):
        return m & ~ndimage.binary_erosion(m, structure=ndimage.generate_binary_structure(m.ndim, 1),
                                           border_value=0)

    bp, br = border(pred), border(ref)
    dist_to_r = ndimage.distance_transform_edt(~br, sampling=spacing)
    dist_to_p = ndimage.distance_transform_edt(~bp, sampling=spacing)
    ok = (dist_to_r[bp] <= tol).sum() + (dist_to_p[br] <= tol).sum()
    return ok / (bp.sum() + br.sum())


@pytest.fixture(scope="module")
def liver(ct_dir):
    labels = read_label_map(ct_dir / "ct_lowres_labels.nii.gz")
    return labels, labels.array == 5


def test_dice_and_nsd_agree_with_an_independent_computation(liver):
    labels, ref = liver
    spacing = tuple(reversed(labels.spacing))
    rng = np.random.default_rng(0)
    for pred in (ndimage.binary_dilation(ref, iterations=1), ndimage.binary_erosion(ref, iterations=2),
                 np.roll(ref, 2, axis=2), ref & (rng.random(ref.shape) > 0.1)):
        d = 2 * (pred & ref).sum() / (pred.sum() + ref.sum())
        assert dice(pred, ref) == pytest.approx(d)
        for tol in (2.0, 3.0, 6.0):
            assert normalized_surface_dice(pred, ref, spacing, tol) == pytest.approx(
                independent_nsd(pred, ref, spacing, tol), abs=0.02)


def test_spacing_matters_and_empty_cases_are_defined(liver):
    _, ref = liver
    shifted = np.roll(ref, 1, axis=2)
    assert normalized_surface_dice(shifted, ref, (3, 3, 3), 2.0) < normalized_surface_dice(shifted, ref, (3, 3, 1),
                                                                                          2.0)
    empty = np.zeros_like(ref)
    assert dice(empty, empty) == 1.0 and normalized_surface_dice(empty, empty, (1, 1, 1)) == 1.0
    assert dice(empty, ref) == 0.0 and normalized_surface_dice(empty, ref, (1, 1, 1)) == 0.0


def test_evaluate_compares_in_physical_space(ct_dir, tmp_path, capsys):
    ref_path = ct_dir / "ct_dicom_labels.nii.gz"  # stored with a flipped j axis
    raw = read_label_map(ref_path)
    # The same labels in another voxel order (j flipped back, origin moved): identical in physical space.
    flipped = Volume(raw.array[:, ::-1, :].copy(), raw.spacing,
                     tuple(raw.index_to_lps(np.array([[0, raw.shape_ijk[1] - 1, 0]]))[0]),
                     raw.direction @ np.diag([1, -1, 1]))
    write_volume(flipped, tmp_path / "pred.nrrd")
    assert run(["evaluate", "--pred", str(tmp_path / "pred.nrrd"), "--ref", str(ref_path),
                "--classes", "liver=5,spleen=1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["classes"]["liver"]["dsc"] == 1.0 and report["classes"]["spleen"]["nsd"] == 1.0
    # Naively pairing voxels would have scored the flipped file badly.
    assert dice(flipped.array == 5, raw.array == 5) < 0.9
    eroded = raw.with_array(np.where(ndimage.binary_erosion(raw.array == 5), 5, 0).astype(np.uint8))
    write_volume(eroded, tmp_path / "eroded.nii.gz")
    assert run(["evaluate", "--pred", str(tmp_path / "eroded.nii.gz"), "--ref", str(ref_path),
                "--classes", "liver=5", "--tolerance-mm", "0.5", "--json"]) == 0
    liver = json.loads(capsys.readouterr().out)["classes"]["liver"]
    sp = tuple(reversed(raw.spacing))
    assert liver["dsc"] == pytest.approx(dice(eroded.array == 5, raw.array == 5), abs=1e-4)
    assert liver["nsd"] == pytest.approx(independent_nsd(eroded.array == 5, raw.array == 5, sp, 0.5), abs=0.02)
    assert run(["evaluate", "--pred", str(tmp_path / "pred.nrrd"), "--ref", str(ref_path), "--classes", "liver"]) == 2
    # Several cases: per case, and per class the mean over the cases.
    assert run(["evaluate", "--pred", str(tmp_path / "pred.nrrd"), "--ref", str(ref_path),
                "--pred", str(tmp_path / "eroded.nii.gz"), "--ref", str(ref_path),
                "--classes", "liver=5", "--json"]) == 0
    both = json.loads(capsys.readouterr().out)
    assert [c["classes"]["liver"]["dsc"] for c in both["cases"]] == [1.0, liver["dsc"]]
    assert both["classes"]["liver"]["dsc"] == pytest.approx((1.0 + liver["dsc"]) / 2, abs=1e-4)
