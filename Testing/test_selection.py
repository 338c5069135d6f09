"""Slice selections (``--slices``, ``--val-slices``)."""

from __future__ import annotations

import pytest

from automedsam.errors import InvalidInputError
from automedsam.selection import parse_slices


@pytest.mark.parametrize(("spec", "expected"), [(None, [0, 1, 2, 3, 4, 5]), ("1:4", [1, 2, 3]), ("0::3", [0, 3]),
                                                ("-2:", [4, 5]), ("5,1,1", [1, 5]), (" 2 ", [2])])
def test_valid(spec, expected):
    assert parse_slices(spec, 6) == expected


@pytest.mark.parametrize(("spec", "message"), [("a:b", "not a slice selection"), ("1:2:0", "not a slice selection"),
                                               ("7", "out of range"), ("4:2", "selects no slice"),
                                               ("1:2:3:4", "not a slice selection")])
def test_invalid(spec, message):
    with pytest.raises(InvalidInputError, match=message):
        parse_slices(spec, 6)
