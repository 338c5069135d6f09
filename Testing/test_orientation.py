"""One slice orientation for the model: the same CT stored in another voxel order (flipped rows and
columns, as NIfTI and DICOM exports commonly differ, or stored sagittally) reaches the model as the
same slices and gives the same masks, mapped back exactly onto each file's own grid."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from automedsam.errors import InvalidInputError
from automedsam.io import read_image, write_volume
from automedsam.orientation import Reorientation
from automedsam.volume import Volume


def stored_otherwise(path, tmp_path, flip=(True, True, False), order=(0, 1, 2), name="other.nii.gz") -> Volume:
    """The image at ``path`` written again in another voxel order (same physical space) and read back."""
    image = sitk.ReadImage(str(path))
    if any(flip):
        image = sitk.Flip(image, list(flip))
    if tuple(order) != (0, 1, 2):
        image = sitk.PermuteAxes(image, list(order))
    out = tmp_path / name
    sitk.WriteImage(image, str(out))
    return read_image(out)


def on_grid_of(mask_other: np.ndarray, other: Volume, reference: Volume) -> np.ndarray:
    """A ``(K, J, I)`` mask on ``other``'s grid moved onto ``reference``'s grid through physical
    space (voxel centres; the two grids hold the same voxels in another order)."""
    ref_shape = reference.array.shape[:3]
    k, j, i = np.meshgrid(*[np.arange(n) for n in ref_shape], indexing="ij")
    lps = reference.index_to_lps(np.column_stack([i.ravel(), j.ravel(), k.ravel()]))
    ijk = np.rint(other.lps_to_index(lps)).astype(int)
    return mask_other[ijk[:, 2], ijk[:, 1], ijk[:, 0]].reshape(ref_shape)


@pytest.mark.parametrize("flip, order", [((True, True, False), (0, 1, 2)), ((False, True, True), (0, 1, 2)),
                                         ((False, False, False), (1, 0, 2)), ((True, False, False), (2, 1, 0)),
                                         ((False, True, False), (0, 2, 1))])
def test_every_voxel_order_of_the_ct_gives_the_same_canonical_volume(ct_dir, tmp_path, flip, order):
    original = read_image(ct_dir / "ct_lowres.nii.gz")
    other = stored_otherwise(ct_dir / "ct_lowres.nii.gz", tmp_path, flip, order)
    assert not np.array_equal(other.array.shape, original.array.shape) or not np.array_equal(other.array,
                                                                                             original.array)
    a = Reorientation.nearest_axial_lps(original).volume(original)
    b = Reorientation.nearest_axial_lps(other).volume(other)
    assert np.array_equal(a.array, b.array)
    assert a.same_grid(b)  # and the same physical geometry
    # canonical order: i towards L, j towards P, k towards S
    assert np.all(np.diag(a.direction) > 0.99)
    sagittal_or_coronal = order in ((2, 1, 0), (0, 2, 1))
    assert Reorientation.nearest_axial_lps(other).keeps_slices is not sagittal_or_coronal


def test_the_map_and_its_inverse_are_exact_and_keep_physical_positions(ct_dir, tmp_path):
    other = stored_otherwise(ct_dir / "ct_lowres.nii.gz", tmp_path, (True, False, True), (1, 0, 2))
    o = Reorientation.nearest_axial_lps(other)
    canonical = o.volume(other)
    assert np.array_equal(o.from_canonical(o.to_canonical(other.array)), other.array)
    rng = np.random.default_rng(0)
    kji = rng.uniform(0, 1, (20, 3)) * (np.array(other.array.shape) - 1)
    back = o.index_from_canonical(o.index_to_canonical(kji))
    assert np.allclose(back, kji)
    lps_source = other.index_to_lps(kji[:, ::-1])
    lps_canonical = canonical.index_to_lps(o.index_to_canonical(kji)[:, ::-1])
    assert np.allclose(lps_source, lps_canonical, atol=1e-6)
    # one k-slice: points, boxes and slice masks agree with the 3-D map
    k = 7
    plane = rng.uniform(size=other.array.shape[1:]) > 0.5
    volume_mask = np.zeros(other.array.shape, bool)
    volume_mask[k] = plane
    assert np.array_equal(o.plane_to_canonical(plane), o.to_canonical(volume_mask)[o.slice_to_canonical(k)])
    assert np.array_equal(o.plane_from_canonical(o.plane_to_canonical(plane)), plane)
    ij = np.array([[3.0, 5.0], [40.0, 20.0]])
    mapped = o.points_to_canonical(k, ij)
    for (i, j), (ci, cj) in zip(ij, mapped, strict=True):
        assert o.to_canonical(_one_voxel(other.array.shape, k, int(j), int(i)))[o.slice_to_canonical(k), int(cj),
                                                                                int(ci)]
    box = o.box_to_canonical(k, [3, 5, 40, 20])
    assert box[0] <= box[2] and box[1] <= box[3]


def _one_voxel(shape, k, j, i):
    out = np.zeros(shape, bool)
    out[k, j, i] = True
    return out


def test_a_sagittal_stack_has_no_axial_k_slices(ct_dir, tmp_path):
    other = stored_otherwise(ct_dir / "ct_lowres.nii.gz", tmp_path, (False, False, False), (2, 1, 0))
    o = Reorientation.nearest_axial_lps(other)
    with pytest.raises(InvalidInputError, match="sagittally or coronally"):
        o.slice_to_canonical(0)


def test_an_oblique_volume_takes_its_nearest_axes():
    angle = np.deg2rad(20)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    direction = rot @ np.diag([-1.0, 1.0, 1.0])  # i runs towards R, tilted 20 degrees
    volume = Volume(np.arange(24, dtype=np.int16).reshape(2, 3, 4), direction=direction)
    o = Reorientation.nearest_axial_lps(volume)
    assert o.axes == (0, 1, 2) and o.flips == (False, False, True)
    canonical = o.volume(volume)
    assert np.array_equal(canonical.array, volume.array[:, :, ::-1])
    assert np.allclose(canonical.index_to_lps(np.zeros((1, 3))), volume.index_to_lps(np.array([[3.0, 0, 0]])))


def test_the_same_ct_in_another_voxel_order_gets_the_same_masks(make_engine, make_bundle, ct_dir, tmp_path):
    """The issue's case: SimpleITK.Flip(img, [True, True, False]) (identical physical space) gave
    spleen DSC 0.00 against the original. Now the model sees the same slices: the masks agree
    voxel for voxel in physical space, for a volume stored flipped and for one stored sagittally."""
    from automedsam.bundle import load_bundle
    from automedsam.engine import Engine

    bundle = load_bundle(make_bundle("tiny-sam2", "ppn", seed=2))
    engine = Engine.from_bundle(bundle, "cpu")
    original = read_image(ct_dir / "ct_lowres.nii.gz")
    engine.set_volume(original)
    reference = engine.segment_volume(["liver", "spleen"])
    assert reference.masks["liver"].any() and reference.masks["spleen"].any()
    for flip, order in (((True, True, False), (0, 1, 2)), ((False, False, False), (2, 1, 0))):
        other = stored_otherwise(ct_dir / "ct_lowres.nii.gz", tmp_path, flip, order)
        engine.set_volume(other)
        result = engine.segment_volume(["liver", "spleen"])
        for name in ("liver", "spleen"):
            assert result.masks[name].shape == other.array.shape
            assert np.array_equal(on_grid_of(result.masks[name], other, original), reference.masks[name])


def test_refine_and_propagate_on_a_flipped_volume_land_where_the_caller_points(make_engine, ct_dir, tmp_path):
    """Clicks and seeds given on the caller's grid come back on the caller's grid: a refine on the
    flipped copy equals the refine on the original at the same physical spot."""
    engine = make_engine("tiny-sam", "ppn")
    original = read_image(ct_dir / "ct_lowres.nii.gz")
    other = stored_otherwise(ct_dir / "ct_lowres.nii.gz", tmp_path, (True, True, True))
    engine.set_volume(original)
    k, (i, j) = 12, (40, 60)
    box = [30, 50, 70, 80]
    a = engine.refine("liver", k, box=box, mode="manual")
    # the same physical slice, point and box on the flipped grid
    kf, jf = other.array.shape[0] - 1 - k, other.array.shape[1] - 1 - j
    i_f = other.array.shape[2] - 1 - i
    flipped_box = [other.array.shape[2] - 1 - box[2], other.array.shape[1] - 1 - box[3],
                   other.array.shape[2] - 1 - box[0], other.array.shape[1] - 1 - box[1]]
    engine.set_volume(other)
    b = engine.refine("liver", kf, box=flipped_box, mode="manual")
    assert a.any() and np.array_equal(b, a[::-1, ::-1])
    events = list(engine.propagate("liver", kf, b, max_slices=2))
    assert events[-1].result.slices == sorted(events[-1].result.slices)
    assert all(abs(s - kf) <= 2 for s in events[-1].result.slices)
    assert (i_f, jf) != (i, j)  # the test really moved the prompts


def test_a_bundle_records_the_orientation_it_was_taught_in(make_bundle):
    from automedsam.bundle import load_bundle

    bundle = load_bundle(make_bundle("tiny-sam2", "ppn"))
    assert bundle.manifest["preprocessing"]["orientation"] == "lps-axial"
    assert bundle.slice_orientation == "lps-axial"
    legacy = dict(bundle.manifest, preprocessing={k: v for k, v in bundle.manifest["preprocessing"].items()
                                                  if k != "orientation"})
    assert type(bundle)(legacy, bundle.tensors, None).slice_orientation == "storage"


def test_volumes_written_back_keep_their_own_voxel_order(ct_dir, tmp_path):
    """Masks are returned on the caller's grid, so writing them with the caller's geometry needs no
    resampling (the map is exact): a round trip through a file keeps every voxel."""
    other = stored_otherwise(ct_dir / "ct_lowres.nii.gz", tmp_path, (True, False, True), (1, 0, 2))
    o = Reorientation.nearest_axial_lps(other)
    mask = o.from_canonical(o.to_canonical(other.array > 100))
    path = write_volume(other.with_array(mask.astype(np.uint8)), tmp_path / "mask.nii.gz")
    assert np.array_equal(read_image(path).array > 0, other.array > 100)


@pytest.fixture(scope="module")
def flipped_ct(ct_dir, tmp_path_factory):
    """The shared CT and a copy with rows and columns stored the other way (same physical space)."""
    tmp = tmp_path_factory.mktemp("flipped")
    return read_image(ct_dir / "ct_lowres.nii.gz"), stored_otherwise(ct_dir / "ct_lowres.nii.gz", tmp), tmp


def test_the_cli_writes_the_same_masks_for_either_voxel_order(make_bundle, flipped_ct, ct_dir):
    from automedsam.cli.main import run
    from automedsam.io import read_label_map

    original, other, tmp = flipped_ct
    bundle = str(make_bundle("tiny-sam2", "ppn", seed=2))
    outputs = {}
    for name, image in (("original", str(ct_dir / "ct_lowres.nii.gz")), ("flipped", str(tmp / "other.nii.gz"))):
        out = tmp / f"{name}.nii.gz"
        assert run(["segment", image, "--model", bundle, "--classes", "liver,spleen", "-o", str(out),
                    "--device", "cpu"]) == 0
        outputs[name] = read_label_map(out)
    assert outputs["flipped"].same_grid(other)  # written on the input's own grid
    assert (outputs["original"].array > 0).any()
    moved = on_grid_of(outputs["flipped"].array, other, original)
    assert np.array_equal(moved, outputs["original"].array)


def test_the_worker_gives_the_same_masks_for_either_voxel_order(make_bundle, flipped_ct, tmp_path):
    import os
    from pathlib import Path

    from automedsam.worker import LocalWorker

    original, other, _ = flipped_ct
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(repo / "AutoMedSAMSlicer"), AUTOMEDSAM_HOME=str(tmp_path))
    with LocalWorker(device="cpu", env=env) as worker:
        remote = worker.client(bundle=str(make_bundle("tiny-sam2", "ppn", seed=2)))
        remote.set_volume(original)
        a = remote.segment_volume(["liver"]).masks["liver"]
        remote.set_volume(other)
        b = remote.segment_volume(["liver"]).masks["liver"]
        remote.close()
    assert a.any() and np.array_equal(on_grid_of(b, other, original), a)


def test_the_slicer_logic_gives_the_same_segments_for_either_voxel_order(slicer, make_bundle, flipped_ct):
    from AutoMedSAMSlicerLib.backends import InProcessBackend
    from AutoMedSAMSlicerLib.logic import AutoMedSAMSlicerLogic
    from slicer_mrml import volume_node

    from automedsam.engine import Engine

    original, other, _ = flipped_ct
    engines = InProcessBackend()
    engines.adopt("test", "auto", Engine.from_bundle(str(make_bundle("tiny-sam2", "ppn", seed=2)), "cpu"))
    logic = AutoMedSAMSlicerLogic(engines)
    logic.backendName, logic.defaultModel = "inprocess", "test"
    written = {}
    for name, volume in (("original", original), ("flipped", other)):
        node = volume_node(volume.array, volume.ijk_to_ras(), name)
        seg_node = logic.segment(node, "liver", model="test")
        sid = seg_node.GetSegmentation().GetSegmentIdBySegmentName("Liver")
        written[name] = slicer.util.arrayFromSegmentBinaryLabelmap(seg_node, sid, node) > 0
    assert written["original"].any()
    assert np.array_equal(on_grid_of(written["flipped"], other, original), written["original"])


def test_a_bundle_taught_before_orientation_was_recorded_keeps_its_stored_order(make_bundle, flipped_ct, tmp_path):
    """Such a bundle learnt from slices in its files' stored order: it is shown slices that way."""
    import json
    import zipfile

    from automedsam.bundle import load_bundle
    from automedsam.engine import Engine

    original, _, _ = flipped_ct  # stored as NIfTI writes it: rows and columns run against LPS
    source = make_bundle("tiny-sam2", "ppn")
    legacy = tmp_path / "legacy.zip"
    with zipfile.ZipFile(source) as z, zipfile.ZipFile(legacy, "w") as out:
        manifest = json.loads(z.read("manifest.json"))
        del manifest["preprocessing"]["orientation"]
        out.writestr("manifest.json", json.dumps(manifest))
        out.writestr("weights.safetensors", z.read("weights.safetensors"))
    engine = Engine.from_bundle(load_bundle(legacy), "cpu")
    engine.set_volume(original)
    assert engine.slice_orientation == "storage" and engine.orientation.is_identity
    engine = Engine.from_bundle(str(source), "cpu")
    engine.set_volume(original)
    assert engine.slice_orientation == "lps-axial" and not engine.orientation.is_identity


@pytest.mark.parametrize("shape, spacing", [((1, 64, 48), (0.8, 0.8, 1.0)),  # one sagittal image
                                            ((30, 256, 256), (0.5, 0.5, 4.0)),  # thick sagittal slices
                                            ((8, 256, 256), (1.0, 1.0, 1.0))])  # a slab of 8 slices
def test_a_sagittal_stack_that_resolves_no_axial_slices_keeps_its_own(shape, spacing):
    """Axial slices cut from one sagittal image, from 4 mm sagittal slices (8:1 pixels) or from a
    thin slab would reach the model squashed or a few pixels wide: such stacks keep their slices."""
    sagittal = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])  # i: P, j: -S, k: L
    volume = Volume(np.zeros(shape, np.int16), spacing, direction=sagittal)
    assert Reorientation.nearest_axial_lps(volume).is_identity
    isotropic = Volume(np.zeros((64, 64, 48), np.int16), (1.0, 1.0, 1.0), direction=sagittal)
    assert not Reorientation.nearest_axial_lps(isotropic).keeps_slices  # a real 3-D stack is resliced
