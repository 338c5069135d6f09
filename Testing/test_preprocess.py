"""Intensity windows, resize-and-pad to the model input, and the exact way back."""

from __future__ import annotations

import numpy as np
import pytest

from automedsam.errors import InvalidInputError
from automedsam.io import read_image, read_label_map
from automedsam.preprocess import WINDOW_PRESETS, IntensityConfig, SliceTransform, normalize_intensity
from automedsam.resample import labels_onto_grid


def test_ct_window_maps_level_and_edges():
    cfg = IntensityConfig.ct("abdomen")
    lo, hi = cfg.value_range(np.zeros(1))
    assert (lo, hi) == (-160.0, 240.0)
    out = normalize_intensity(np.array([-1000, -160, 40, 240, 3000]), (lo, hi))
    np.testing.assert_allclose(out, [0, 0, 0.5, 1, 1])
    custom = IntensityConfig.ct("lung", level=-500)
    assert custom.value_range(np.zeros(1)) == (-500 - 750, -500 + 750)
    assert set(WINDOW_PRESETS) >= {"abdomen", "lung", "bone", "brain"}
    with pytest.raises(InvalidInputError, match="unknown CT window preset"):
        IntensityConfig.ct("heart")


def test_percentile_normalisation_uses_volume_percentiles():
    rng = np.random.default_rng(0)
    arr = rng.normal(300, 50, (10, 32, 32))
    lo, hi = IntensityConfig.mr(1, 99).value_range(arr)
    assert lo == pytest.approx(np.percentile(arr, 1)) and hi == pytest.approx(np.percentile(arr, 99))


@pytest.mark.parametrize(("h", "w", "s"), [(512, 512, 1024), (101, 122, 256), (101, 122, 1024), (37, 300, 1024),
                                           (700, 90, 256)])
def test_points_and_boxes_round_trip_exactly(h, w, s):
    t = SliceTransform(h, w, s)
    rng = np.random.default_rng(h * w)
    pts = rng.uniform(0, [w - 1, h - 1], (50, 2))
    np.testing.assert_allclose(t.points_from_model(t.points_to_model(pts)), pts, atol=1e-9)
    box = np.array([3, 4, w - 2, h - 5], float)
    np.testing.assert_allclose(t.box_from_model(t.box_to_model(box)), box, atol=1e-9)
    # Voxel corners map to the resized region's corners: (-0.5, -0.5) -> (-0.5, -0.5) and
    # (w - 0.5, h - 0.5) -> (resized_w - 0.5, resized_h - 0.5).
    rh, rw = t.resized_shape
    np.testing.assert_allclose(t.points_to_model([[-0.5, -0.5], [w - 0.5, h - 0.5]]),
                               [[-0.5, -0.5], [rw - 0.5, rh - 0.5]])
    assert max(rh, rw) == s


def test_out_of_slice_points_are_rejected():
    t = SliceTransform(10, 20, 256)
    t.check_points([[0, 0], [19, 9]])
    with pytest.raises(InvalidInputError, match="outside the slice"):
        t.check_points([[20.2, 3]], "box corner")


def test_image_to_model_places_a_voxel_where_points_to_model_says(ct_dir):
    t = SliceTransform(101, 122, 256)
    img = np.zeros((101, 122), np.float32)
    img[40, 90] = 1.0  # j = 40, i = 90
    model = t.image_to_model(img)
    assert model.shape == (256, 256, 3)
    y, x = np.unravel_index(np.argmax(model[..., 0]), model.shape[:2])
    px, py = t.points_to_model([[90, 40]])[0]
    assert abs(x - px) <= 1 and abs(y - py) <= 1
    rh, rw = t.resized_shape
    assert (rh, rw) == (212, 256)  # 101 * 256 / 122 = 211.9
    assert model[rh:].max() == 0  # zero padding below the resized slice


def _real_masks(ct_dir):
    image = read_image(ct_dir / "ct_dicom")
    labels = labels_onto_grid(read_label_map(ct_dir / "ct_dicom_labels.nii.gz"), image)
    low = read_label_map(ct_dir / "ct_lowres_labels.nii.gz")
    return [labels.array[k] == 5 for k in (0, 10, 19)] + [low.array[k] == v for k, v in ((12, 5), (15, 2))]


@pytest.mark.parametrize("size", [256, 1024])
def test_real_masks_round_trip_exactly_through_model_space(ct_dir, size):
    for mask in _real_masks(ct_dir):
        h, w = mask.shape
        if max(h, w) > size:
            continue  # shrinking cannot be exact; not a supported round trip
        t = SliceTransform(h, w, size)
        model_mask = t.mask_to_model(mask)
        assert model_mask.shape == (size, size)
        np.testing.assert_array_equal(t.mask_from_model(model_mask), mask)
        # Mask logits over the model input come back onto the same voxels.
        logits = np.where(model_mask, 8.0, -8.0).astype(np.float32)
        np.testing.assert_array_equal(t.logits_to_slice(logits) > 0, mask)
        # Through SAM's 4x-smaller mask-prompt grid the area is kept to within the boundary band.
        low = t.mask_to_model(mask, out_size=size // 4)
        back = t.mask_from_model(low)
        assert abs(int(back.sum()) - int(mask.sum())) <= 0.1 * mask.sum() + 50


def test_logits_to_slice_accepts_batches_and_tensors():
    import torch

    t = SliceTransform(50, 60, 256)
    logits = torch.randn(2, 3, 64, 64)
    out = t.logits_to_slice(logits)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3, 50, 60)
