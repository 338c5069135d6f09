"""Volume geometry: IJK <-> LPS/RAS transforms and validation of bad arrays."""

from __future__ import annotations

import numpy as np
import pytest

from automedsam.errors import InvalidInputError
from automedsam.volume import Volume, lps_to_ras, ras_to_lps


def rotation_z(deg: float) -> np.ndarray:
    a = np.deg2rad(deg)
    return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])


def make_volume(direction=None) -> Volume:
    return Volume(np.zeros((4, 5, 6), np.int16), spacing=(0.5, 0.8, 2.5), origin=(10.0, -20.0, 30.0),
                  direction=np.eye(3) if direction is None else direction, name="v")


def test_shape_ijk_is_reverse_of_kji_array():
    v = make_volume()
    assert v.shape_ijk == (6, 5, 4)
    assert v.num_slices == 4


def test_ijk_to_lps_follows_itk_formula_for_oblique_grid():
    d = rotation_z(30) @ np.diag([1, -1, 1])  # rotated and flipped
    v = make_volume(d)
    ijk = np.array([[0, 0, 0], [1, 0, 0], [2, 3, 1], [5.5, 4.25, 3]])
    expected = np.array(v.origin) + (d @ np.diag(v.spacing) @ ijk.T).T
    np.testing.assert_allclose(v.index_to_lps(ijk), expected, atol=1e-12)
    np.testing.assert_allclose(v.lps_to_index(v.index_to_lps(ijk)), ijk, atol=1e-12)


def test_ras_is_lps_with_x_and_y_negated_both_ways():
    v = make_volume(rotation_z(10))
    ijk = np.array([[1.0, 2.0, 3.0]])
    lps = v.index_to_lps(ijk)
    ras = v.index_to_ras(ijk)
    np.testing.assert_allclose(ras, lps * [-1, -1, 1], atol=1e-12)
    np.testing.assert_allclose(ras_to_lps(lps_to_ras(lps)), lps)
    np.testing.assert_allclose(v.ras_to_index(ras), ijk, atol=1e-12)


def test_from_ijk_to_ras_rebuilds_the_same_geometry_as_slicer_would_hand_it_over():
    v = make_volume(rotation_z(-45) @ np.diag([-1, 1, 1]))
    w = Volume.from_ijk_to_ras(v.array, v.ijk_to_ras())
    assert w.same_grid(v)
    np.testing.assert_allclose(w.spacing, v.spacing)
    np.testing.assert_allclose(w.direction, v.direction, atol=1e-12)


def test_content_hash_changes_with_values_and_geometry():
    v = make_volume()
    same = Volume(v.array.copy(), v.spacing, v.origin, v.direction)
    assert v.content_hash() == same.content_hash()
    changed = v.array.copy()
    changed[0, 0, 0] = 1
    assert v.with_array(changed).content_hash() != v.content_hash()
    moved = Volume(v.array, v.spacing, (11.0, -20.0, 30.0), v.direction)
    assert moved.content_hash() != v.content_hash()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"array": np.zeros((0, 4, 4))}, "empty"),
        ({"array": np.zeros((2, 3, 4, 5))}, "4-D"),
        ({"array": np.zeros((4, 4))}, "must be 3-D"),
        ({"array": np.array([[[1.0, np.nan]]])}, "NaN"),
        ({"array": np.array([[[1.0, np.inf]]])}, "NaN or infinite"),
        ({"array": np.zeros((2, 2, 2)), "spacing": (1, 0, 1)}, "positive"),
        ({"array": np.zeros((2, 2, 2)), "spacing": (1, 1)}, "3 finite numbers"),
        ({"array": np.zeros((2, 2, 2)), "direction": np.zeros((3, 3))}, "singular"),
        ({"array": np.array([[["a"]]])}, "non-numeric"),
    ],
)
def test_bad_arrays_and_geometry_are_rejected_with_specific_messages(kwargs, message):
    with pytest.raises(InvalidInputError, match=message):
        Volume(**kwargs)


def test_rgb_pictures_keep_a_channel_axis():
    v = Volume(np.zeros((1, 4, 5, 3), np.uint8))
    assert v.is_rgb and v.shape_ijk == (5, 4, 1)


def test_with_array_rejects_other_grids():
    with pytest.raises(InvalidInputError, match="does not match"):
        make_volume().with_array(np.zeros((4, 5, 7)))
