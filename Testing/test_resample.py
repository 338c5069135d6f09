"""Label maps meet image grids through physical space, never by voxel order."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from automedsam.errors import GeometryError
from automedsam.io import read_image, read_label_map
from automedsam.resample import label_statistics, labels_onto_grid, physical_coverage, resample_to_grid
from automedsam.volume import Volume


def independent_nearest(labels: Volume, image: Volume) -> np.ndarray:
    """Nearest-neighbour lookup written with numpy alone (no SimpleITK): image voxel centres ->
    LPS -> label continuous index -> rounded index."""
    k, j, i = np.meshgrid(*(np.arange(n) for n in image.array.shape[:3]), indexing="ij")
    ijk = np.stack([i, j, k], -1).reshape(-1, 3).astype(float)
    src = np.floor(labels.lps_to_index(image.index_to_lps(ijk)) + 0.5).astype(int)
    ni, nj, nk = labels.shape_ijk
    inside = (src >= 0).all(1) & (src[:, 0] < ni) & (src[:, 1] < nj) & (src[:, 2] < nk)
    out = np.zeros(len(src), labels.array.dtype)
    s = src[inside]
    out[inside] = labels.array[s[:, 2], s[:, 1], s[:, 0]]
    return out.reshape(image.array.shape[:3])


def test_flipped_dicom_label_map_lines_up_with_the_series(ct_dir):
    image = read_image(ct_dir / "ct_dicom")
    raw = read_label_map(ct_dir / "ct_dicom_labels.nii.gz")
    assert raw.direction[1, 1] == -1 and not raw.same_grid(image)  # the trap is really there
    on_grid = labels_onto_grid(raw, image)
    assert on_grid.same_grid(image)
    np.testing.assert_array_equal(on_grid.array, independent_nearest(raw, image))
    # The files differ by a flip of j: reading voxel order naively would be wrong ...
    assert not np.array_equal(on_grid.array, raw.array)
    # ... and the physical pairing is exactly that flip.
    np.testing.assert_array_equal(on_grid.array, raw.array[:, ::-1, :])
    liver = on_grid.array == 5
    assert liver.sum() == (raw.array == 5).sum() == 366708
    # The liver sits on the patient's right (LPS x < 0 side of the spleen).
    stats = label_statistics(on_grid)
    assert stats[5]["max_ijk"][0] < stats[1]["min_ijk"][0]


def test_aligned_liver_covers_liver_tissue_and_naive_pairing_does_not(ct_dir):
    """Liver parenchyma is homogeneous soft tissue: inside the aligned mask almost every voxel is
    within 0..200 HU. The naive (voxel-order) mask also covers fat, air and bone."""
    image = read_image(ct_dir / "ct_dicom")
    raw = read_label_map(ct_dir / "ct_dicom_labels.nii.gz")
    on_grid = labels_onto_grid(raw, image)

    def soft_tissue_fraction(mask):
        hu = image.array[mask]
        return float(((hu > 0) & (hu < 200)).mean())

    assert soft_tissue_fraction(on_grid.array == 5) > 0.95
    assert soft_tissue_fraction(raw.array == 5) < soft_tissue_fraction(on_grid.array == 5) - 0.1


def test_oblique_grid_matches_independent_computation():
    rng = np.random.default_rng(1)
    labels = Volume(rng.integers(0, 4, (6, 10, 12)).astype(np.uint8), (2.0, 1.5, 3.0), (5.0, -3.0, 1.0))
    a = np.deg2rad(25)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]) @ np.diag([1, -1, 1])
    image = Volume(np.zeros((8, 9, 11), np.int16), (1.3, 1.1, 2.2), (12.0, 3.0, 2.5), rot)
    got = resample_to_grid(labels, image)
    want = independent_nearest(labels, image)
    # Nearest neighbour may break exact ties differently; they are measure-zero here.
    assert (got.array != want).mean() < 0.002


def test_no_overlap_raises_geometry_error_and_partial_overlap_warns(caplog):
    image = Volume(np.zeros((4, 4, 4), np.int16))
    far = Volume(np.ones((4, 4, 4), np.uint8), origin=(500.0, 0.0, 0.0))
    with pytest.raises(GeometryError, match=r"covers 0\.0%"):
        labels_onto_grid(far, image)
    half = Volume(np.ones((4, 4, 4), np.uint8), origin=(2.0, 0.0, 0.0))
    assert physical_coverage(half, image) == pytest.approx(0.5)
    with caplog.at_level(logging.WARNING):
        out = labels_onto_grid(half, image)
    assert "covers only 50.0%" in caplog.text
    assert out.array.sum() == 32


def test_label_statistics_bounding_boxes_are_in_ijk_order():
    arr = np.zeros((5, 6, 7), np.uint8)
    arr[1:3, 2:5, 4:7] = 9  # k 1..2, j 2..4, i 4..6
    stats = label_statistics(Volume(arr))
    assert stats == {9: {"voxels": 18, "min_ijk": [4, 2, 1], "max_ijk": [6, 4, 2]}}
