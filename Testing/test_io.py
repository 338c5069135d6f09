"""Reading and writing real medical images and segmentations with their geometry."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import SimpleITK as sitk

from automedsam.errors import InvalidInputError
from automedsam.io import read_image, read_label_map, read_segmentation, write_segmentation, write_volume
from automedsam.segmentation import Segmentation, SegmentInfo
from automedsam.volume import Volume


def test_dicom_series_geometry_matches_the_slice_headers(ct_dir):
    volume = read_image(ct_dir / "ct_dicom")
    assert volume.shape_ijk == (512, 512, 20)
    assert volume.array.dtype == np.int16
    np.testing.assert_allclose(volume.spacing, (0.9765625, 0.9765625, 2.0), atol=1e-6)
    # Independent check: ImagePositionPatient (LPS mm) of every file must be the position of the
    # voxel (0, 0, k) of the slice holding that file's pixels.
    positions = []
    for path in sorted((ct_dir / "ct_dicom").iterdir()):
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        positions.append([float(v) for v in reader.GetMetaData("0020|0032").split("\\")])
    positions = np.array(sorted(positions, key=lambda p: p[2]))
    corners = volume.index_to_lps(np.array([[0, 0, k] for k in range(20)]))
    np.testing.assert_allclose(np.array(sorted(corners.tolist(), key=lambda p: p[2])), positions, atol=1e-3)


def test_nifti_reads_in_lps_with_its_direction(ct_dir):
    volume = read_image(ct_dir / "ct_lowres.nii.gz")
    assert volume.shape_ijk == (122, 101, 30)
    np.testing.assert_allclose(volume.spacing, (3.0, 3.0, 3.0))
    # The NIfTI header stores RAS; ITK reads LPS, so a RAS-aligned x axis becomes direction -1.
    header = sitk.ReadImage(str(ct_dir / "ct_lowres.nii.gz"))
    np.testing.assert_allclose(volume.direction.reshape(-1), header.GetDirection())


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz", ".mha", ".nii"])
def test_write_then_read_keeps_values_and_oblique_geometry(tmp_path, suffix):
    a = np.deg2rad(20)
    direction = np.array([[np.cos(a), 0, np.sin(a)], [0, -1, 0], [-np.sin(a), 0, np.cos(a)]])
    rng = np.random.default_rng(0)
    original = Volume(rng.integers(-1000, 1000, (3, 4, 5)).astype(np.int16), (0.7, 0.9, 3.0),
                      (1.5, -2.5, 30.0), direction, "x")
    path = write_volume(original, tmp_path / f"out{suffix}")
    back = read_image(path)
    np.testing.assert_array_equal(back.array, original.array)
    np.testing.assert_allclose(back.ijk_to_lps(), original.ijk_to_lps(), atol=1e-4)
    assert not list(tmp_path.glob(".*tmp*")), "temporary file left behind"


def test_seg_nrrd_round_trip_keeps_names_colors_terminology_and_geometry(tmp_path, ct_dir):
    image = read_image(ct_dir / "ct_lowres.nii.gz")
    labels = read_label_map(ct_dir / "ct_lowres_labels.nii.gz")
    liver_term = ("Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical "
                  "Structure~SCT^10200004^Liver~^^~Anatomic codes - DICOM master list~^^~^^")
    segments = [SegmentInfo("liver", 5, (0.86, 0.5, 0.4), liver_term), SegmentInfo("spleen", 1, (0.6, 0.4, 0.6))]
    seg = Segmentation((image.with_array(labels.array),), tuple(segments))
    path = write_segmentation(seg, tmp_path / "case.seg.nrrd")
    back = read_segmentation(path)
    assert [s.name for s in back.segments] == ["liver", "spleen"]
    assert back.segment("liver").terminology == liver_term
    np.testing.assert_allclose(back.segment("liver").color, (0.86, 0.5, 0.4), atol=1e-5)
    np.testing.assert_array_equal(back.mask("liver"), labels.array == 5)
    np.testing.assert_array_equal(back.mask("spleen"), labels.array == 1)
    np.testing.assert_allclose(back.grid.ijk_to_lps(), image.ijk_to_lps(), atol=1e-6)
    # Slicer reads the header fields: check them in the raw file too.
    import nrrd

    header = nrrd.read_header(str(path))
    assert header["Segment0_Name"] == "liver" and header["Segment0_LabelValue"] == "5"


def test_seg_nrrd_with_overlapping_segments_keeps_both_layers(tmp_path):
    grid = Volume(np.zeros((2, 3, 4), np.uint8))
    a = np.zeros((2, 3, 4), np.uint8)
    a[0] = 1
    b = np.zeros((2, 3, 4), np.uint8)
    b[:, 0] = 1  # overlaps a at slice 0, row 0
    seg = Segmentation((grid.with_array(a), grid.with_array(b)),
                       (SegmentInfo("a", 1, layer=0), SegmentInfo("b", 1, layer=1)))
    back = read_segmentation(write_segmentation(seg, tmp_path / "o.seg.nrrd"))
    assert len(back.layers) == 2
    np.testing.assert_array_equal(back.mask("a"), a == 1)
    np.testing.assert_array_equal(back.mask("b"), b == 1)


def test_png_loads_as_single_slice_volume(tmp_path):
    from PIL import Image

    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[5, 7] = (255, 10, 20)
    Image.fromarray(rgb).save(tmp_path / "endo.png")
    v = read_image(tmp_path / "endo.png")
    assert v.array.shape == (1, 20, 30, 3) and v.is_rgb
    assert tuple(v.array[0, 5, 7]) == (255, 10, 20)  # row j=5, column i=7
    grey = np.arange(20 * 30, dtype=np.uint8).reshape(20, 30)
    Image.fromarray(grey).save(tmp_path / "xray.jpg", quality=100)
    g = read_image(tmp_path / "xray.jpg")
    assert g.array.shape == (1, 20, 30) and not g.is_rgb


def test_missing_empty_and_truncated_files_get_specific_errors(tmp_path, ct_dir):
    with pytest.raises(InvalidInputError, match="not found"):
        read_image(tmp_path / "nope.nii.gz")
    (tmp_path / "empty.nrrd").write_bytes(b"")
    with pytest.raises(InvalidInputError, match="empty file"):
        read_image(tmp_path / "empty.nrrd")
    data = (ct_dir / "ct_lowres.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(data[: len(data) // 3])
    with pytest.raises(InvalidInputError, match=r"cut\.nii\.gz.*truncated or corrupt"):
        read_image(tmp_path / "cut.nii.gz")
    # An uncompressed NIfTI cut short: ITK alone would zero-fill it silently.
    raw = gzip.decompress(data)
    (tmp_path / "cut.nii").write_bytes(raw[: len(raw) - 1000])
    with pytest.raises(InvalidInputError, match="truncated: its header announces"):
        read_image(tmp_path / "cut.nii")
    write_volume(read_image(ct_dir / "ct_lowres.nii.gz"), tmp_path / "x.nrrd")
    cut = (tmp_path / "x.nrrd").read_bytes()
    (tmp_path / "cut.nrrd").write_bytes(cut[: len(cut) // 2])
    with pytest.raises(InvalidInputError, match=r"could not read .*cut\.nrrd"):
        read_image(tmp_path / "cut.nrrd")
    (tmp_path / "notdicom").mkdir()
    (tmp_path / "notdicom" / "a.txt").write_text("hello")
    with pytest.raises(InvalidInputError, match="no DICOM series"):
        read_image(tmp_path / "notdicom")


def test_4d_and_nan_volumes_are_refused(tmp_path):
    img4 = sitk.GetImageFromArray(np.zeros((2, 3, 4, 5), np.float32), isVector=False)
    sitk.WriteImage(img4, str(tmp_path / "t.nii.gz"))
    with pytest.raises(InvalidInputError, match="4-D"):
        read_image(tmp_path / "t.nii.gz")
    arr = np.zeros((3, 4, 5), np.float32)
    arr[1, 2, 3] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(tmp_path / "nan.nrrd"))
    with pytest.raises(InvalidInputError, match="NaN"):
        read_image(tmp_path / "nan.nrrd")


def test_non_integer_label_map_is_refused(tmp_path):
    with pytest.raises(InvalidInputError, match="non-integer"):
        arr = np.full((3, 4, 5), 0.5, np.float32)
        sitk.WriteImage(sitk.GetImageFromArray(arr), str(tmp_path / "f.nrrd"))
        read_label_map(tmp_path / "f.nrrd")


def test_labels_json_matches_the_label_file(ct_dir):
    names = json.loads((ct_dir / "labels.json").read_text())
    values = set(np.unique(read_label_map(ct_dir / "ct_lowres_labels.nii.gz").array).tolist()) - {0}
    assert {5, 1, 2, 3} <= values and all(str(v) in names for v in values)


def test_gzip_header_is_really_compressed_output(tmp_path):
    v = Volume(np.zeros((2, 2, 2), np.uint8))
    p = write_volume(v, tmp_path / "z.nii.gz")
    with gzip.open(p) as f:
        assert len(f.read(348)) == 348  # a NIfTI-1 header inside gzip
