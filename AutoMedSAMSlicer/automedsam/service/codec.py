"""Binary encodings shared by the service and its client (numpy only).

Masks travel as ``np.packbits`` of the C-order boolean array with the shape alongside; volumes as
raw C-order bytes with dtype and shape declared beforehand.
"""

from __future__ import annotations

import base64

import numpy as np

from ..errors import InvalidInputError

VOLUME_DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64")


def pack_mask(mask: np.ndarray) -> bytes:
    return np.packbits(np.asarray(mask, bool).reshape(-1)).tobytes()


def unpack_mask(data: bytes, shape: tuple[int, ...]) -> np.ndarray:
    n = int(np.prod(shape))
    expected = (n + 7) // 8
    if len(data) != expected:  # exact: np.unpackbits would pad a short body with zeros
        raise InvalidInputError(f"mask data has {len(data)} bytes, but a mask of shape {list(shape)} packs into "
                                f"{expected}")
    return np.unpackbits(np.frombuffer(data, np.uint8), count=n).astype(bool).reshape(shape)


def mask_to_json(mask: np.ndarray) -> dict:
    return {"shape": list(mask.shape), "bits": base64.b64encode(pack_mask(mask)).decode()}


def mask_from_json(d: dict) -> np.ndarray:
    try:
        bits = base64.b64decode(d["bits"], validate=True)
    except (ValueError, TypeError):  # binascii.Error is a ValueError
        raise InvalidInputError("mask bits are not valid base64") from None
    return unpack_mask(bits, tuple(d["shape"]))


def array_from_bytes(data: bytes, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Raw C-order bytes -> array, checking the byte count against dtype and shape."""
    if dtype not in VOLUME_DTYPES:
        raise InvalidInputError(f"dtype {dtype!r} is not supported; use one of {', '.join(VOLUME_DTYPES)}")
    expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if len(data) != expected:
        raise InvalidInputError(
            f"volume data has {len(data)} bytes, but shape {list(shape)} of {dtype} needs {expected}"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)
