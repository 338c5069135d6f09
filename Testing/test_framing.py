"""Framing: slices shown to the model at the physical pixel size (and voxel blur) a bundle was taught
at, through a window of the slice, with exact ways back; and what it buys on real data (a class
taught on the 3 mm CT segments the same patient's 0.98 mm DICOM series)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from automedsam.backbones import build_backbone
from automedsam.bundle import create_bundle, load_bundle
from automedsam.engine import Engine
from automedsam.errors import InvalidInputError
from automedsam.framing import Framing, body_window, fit_pixel_mm, frame_slices, teaching_framing
from automedsam.io import read_image, read_label_map
from automedsam.metrics import dice
from automedsam.preprocess import OUTSIDE_LOGIT, IntensityConfig, SliceTransform
from automedsam.resample import labels_onto_grid

#: (height, width, size, window (j0, j1, i0, i1), scale (s_x, s_y), via)
WINDOWED = [
    (512, 512, 256, (153, 426, 64, 440), (0.68, 0.68), None),
    (512, 512, 256, (153, 426, 64, 440), (0.68, 0.68), (89, 122)),
    (101, 122, 256, None, (2.0, 2.5), None),  # anisotropic pixels become square model pixels
    (300, 40, 1024, (10, 290, 0, 40), (3.5, 3.5), None),
]


@pytest.fixture(scope="module")
def lite():
    return build_backbone("litemedsam", device="cpu", runtime="torch")


@pytest.fixture(scope="module")
def dicom(ct_dir):
    image = read_image(ct_dir / "ct_dicom")
    return image, labels_onto_grid(read_label_map(ct_dir / "ct_dicom_labels.nii.gz"), image)


@pytest.mark.parametrize(("h", "w", "s", "crop", "scale", "via"), WINDOWED)
def test_windowed_points_boxes_masks_and_logits_round_trip(h, w, s, crop, scale, via):
    t = SliceTransform(h, w, s, crop=crop, scale=scale, via=via)
    j0, j1, i0, i1 = t.window
    rng = np.random.default_rng(h + w)
    pts = rng.uniform([i0, j0], [i1 - 1, j1 - 1], (50, 2))
    np.testing.assert_allclose(t.points_from_model(t.points_to_model(pts)), pts, atol=1e-9)
    box = np.array([i0 + 2, j0 + 3, i1 - 3, j1 - 2], float)
    np.testing.assert_allclose(t.box_from_model(t.box_to_model(box)), box, atol=1e-9)
    # The window's corners are the resized region's corners.
    rh, rw = t.resized_shape
    np.testing.assert_allclose(t.points_to_model([[i0 - 0.5, j0 - 0.5], [i1 - 0.5, j1 - 0.5]]),
                               [[-0.5, -0.5], [rw - 0.5, rh - 0.5]])
    # A mask inside the window comes back exactly when the window is not shrunk; outside it is empty.
    mask = np.zeros((h, w), bool)
    mask[j0 + (j1 - j0) // 4: j1 - (j1 - j0) // 3, i0 + (i1 - i0) // 3: i1 - (i1 - i0) // 4] = True
    model = t.mask_to_model(mask)
    back = t.mask_from_model(model)
    if min(t.scale_xy) >= 1:
        np.testing.assert_array_equal(back, mask)
    else:
        assert dice(back, mask) > 0.97
    everywhere = t.mask_from_model(np.ones((s, s), bool))
    assert everywhere[j0:j1, i0:i1].all() and everywhere.sum() == (j1 - j0) * (i1 - i0)
    # Logits: the same voxels (> 0) as the mask; outside the window never foreground.
    logits = np.where(t.mask_to_model(mask, out_size=s // 4), 8.0, -8.0).astype(np.float32)
    full = t.logits_to_slice(logits)
    assert full.shape == (h, w)
    outside = ~everywhere
    assert (full[outside] == OUTSIDE_LOGIT).all()
    # A part of the slice reads only the low-resolution pixels logits_window names.
    part = (max(0, j0 - 5), min(h, j0 + 40), max(0, i0 - 7), min(w, i0 + 33))
    r0, r1, c0, c1 = t.logits_window(part, s // 4)
    cut = np.full_like(logits, 1e6)
    cut[r0:r1, c0:c1] = logits[r0:r1, c0:c1]
    np.testing.assert_allclose(t.logits_to_slice(cut, part), full[part[0]:part[1], part[2]:part[3]])


def test_window_image_lands_where_points_say_and_via_blurs_it():
    t = SliceTransform(512, 512, 256, crop=(153, 426, 64, 440), scale=(0.68, 0.68))
    img = np.zeros((512, 512), np.float32)
    img[300:304, 200:204] = 1.0  # a 4-voxel square at j 300..303, i 200..203
    img[10, 10] = 1.0  # outside the window: not shown
    model = t.image_to_model(img)[..., 0]
    y, x = np.unravel_index(np.argmax(model), model.shape)
    px, py = t.points_to_model([[201.5, 301.5]])[0]
    assert abs(x - px) <= 1 and abs(y - py) <= 1
    rh, rw = t.resized_shape
    assert model[rh:].sum() == 0 and model[:, rw:].sum() == 0
    assert model.sum() == pytest.approx(16 * 0.68 ** 2, rel=0.1)  # the outside voxel is not in
    dot = np.zeros((512, 512), np.float32)
    dot[300, 200] = 1.0  # one 0.98 mm voxel
    sharp = t.image_to_model(dot)[..., 0]
    coarse = dataclasses.replace(t, via=(89, 122)).image_to_model(dot)[..., 0]  # through 3 mm voxels
    assert coarse.max() < 0.5 * sharp.max()  # spread over a 3 mm voxel
    assert coarse.sum() == pytest.approx(sharp.sum(), rel=0.15)  # the same signal, blurred


def test_bad_windows_are_refused():
    with pytest.raises(InvalidInputError, match="window"):
        SliceTransform(100, 100, 256, crop=(0, 120, 0, 50))
    with pytest.raises(InvalidInputError, match="more than the model input"):
        SliceTransform(100, 100, 256, scale=(3.0, 3.0))
    with pytest.raises(InvalidInputError, match="pixel_mm"):
        Framing(pixel_mm=-1.0)


def test_taught_framing_shows_the_taught_volume_as_before(lite, ct):
    # A bundle taught on this volume frames it exactly as the session showed it: its embeddings stay.
    framing = teaching_framing([ct], lite.input_size)
    assert framing.pixel_mm == pytest.approx(122 * 3 / 256) and framing.voxel_mm == 3.0
    framed = frame_slices(lite, ct, framing, IntensityConfig.ct())
    assert framed.describe() == lite.slice_transform(*ct.array.shape[1:3]).describe()


def test_body_window_finds_the_trunk_not_the_arms(dicom):
    image, labels = dicom
    j0, j1, i0, i1 = body_window(image, IntensityConfig.ct())
    si, sj = image.spacing[:2]
    assert (i1 - i0) * si < 380 and (j1 - j0) * sj < 300  # the trunk; the slice is 500 x 500 mm
    organs = np.isin(labels.array, [1, 5, 7, 52])  # spleen, liver, pancreas, aorta
    _ks, js, is_ = np.nonzero(organs)
    assert j0 <= js.min() and js.max() < j1 and i0 <= is_.min() and is_.max() < i1
    arms = np.isin(labels.array, [69, 70])  # humeri: outside
    assert arms.any() and not arms[:, j0:j1, i0:i1].any()


def test_body_window_on_mr_holds_the_tumour(ct_dir):
    sts = ct_dir.parent / "sts_ct_mr"
    image = read_image(sts / "STS_001_MR_T1_image.nii.gz")
    mask = labels_onto_grid(read_label_map(sts / "STS_001_MR_T1_mask.nii.gz"), image).array > 0
    j0, j1, i0, i1 = body_window(image, IntensityConfig.mr())
    _ks, js, is_ = np.nonzero(mask)
    assert j0 <= js.min() and js.max() < j1 and i0 <= is_.min() and is_.max() < i1


def test_another_scan_is_shown_at_the_taught_pixel_size_and_blur(lite, ct, dicom):
    image, labels = dicom
    framing = teaching_framing([ct], lite.input_size)
    t = frame_slices(lite, image, framing, IntensityConfig.ct())
    si, sj = image.spacing[:2]
    # Model pixels of the same physical size as in the taught volume (1.43 mm), within 1 %.
    assert si / t.scale_xy[0] == pytest.approx(framing.pixel_mm, rel=0.01)
    assert sj / t.scale_xy[1] == pytest.approx(framing.pixel_mm, rel=0.01)
    # Averaged to 3 mm voxels first, as the taught slices were.
    j0, j1, i0, i1 = t.window
    assert t.via == (round((j1 - j0) * sj / 3.0), round((i1 - i0) * si / 3.0))
    # Every organ voxel is inside the window the model sees.
    js, is_ = np.nonzero(np.isin(labels.array, [1, 5, 7, 52]).any(axis=0))
    assert j0 <= js.min() and js.max() < j1 and i0 <= is_.min() and is_.max() < i1
    # Without a recorded framing (bundles made before), SAM's resize: the 500 mm field of view fills S.
    assert frame_slices(lite, image, Framing()).describe() == lite.slice_transform(512, 512).describe()
    assert fit_pixel_mm(image, 256) == pytest.approx(500 / 256)


def test_bundles_record_their_framing_and_old_ones_read_as_sams_resize(lite, tmp_path):
    from automedsam.classes import default_class_catalog
    from automedsam.prompt_networks import build_prompt_network, default_config

    net = build_prompt_network("classmap", default_config("classmap", lite, 1))
    classes = [default_class_catalog().get("liver")]
    framing = Framing(1.43, 3.0)
    bundle = create_bundle(lite, net, classes, IntensityConfig.ct(), name="framed", framing=framing)
    assert load_bundle(bundle.save(tmp_path / "framed.zip")).framing == framing
    old = create_bundle(lite, net, classes, IntensityConfig.ct(), name="old")
    del old.manifest["preprocessing"]["framing"]
    assert load_bundle(old.save(tmp_path / "old.zip")).framing == Framing()


def test_a_class_taught_on_the_3mm_ct_segments_the_0_98mm_dicom_series(lowres_bundle, dicom):
    # Issue 30's cross-resolution case: same patient, 0.98 mm voxels, 500 mm field of view, another
    # voxel order. Before framing: liver 0.00, spleen 0.04 (the organs looked 27 % smaller).
    image, labels = dicom
    engine = Engine(build_backbone("litemedsam", device="cpu", runtime="torch"), lowres_bundle)
    engine.set_volume(image)
    result = engine.segment_volume(["liver", "spleen"])
    scores = {name: dice(result.masks[name], labels.array == value) for name, value in (("liver", 5), ("spleen", 1))}
    print("DICOM series with the 3 mm bundle:", scores)  # the figures for the record (-s)
    assert scores["liver"] >= 0.85 and scores["spleen"] >= 0.85, scores
    # A click where the bundle does not look (the arm, outside the body window) is refused, clearly.
    j0, j1, i0, _ = engine.transform.window
    assert i0 > 5
    with pytest.raises(InvalidInputError, match="outside the part of the slice this model bundle looks at"):
        engine.refine("liver", 10, points=[[5, (j0 + j1) // 2]], point_labels=[1], mask=result.masks["liver"][10])
