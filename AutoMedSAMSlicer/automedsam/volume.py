"""The :class:`Volume` type: a voxel array with its exact physical geometry.

Axis order and frames (the rules every other module relies on):

- ``Volume.array`` is indexed ``array[k, j, i]`` (KJI: slice, row, column; ``i`` fastest), the order
  of SimpleITK's ``GetArrayFromImage`` and Slicer's ``arrayFromVolume``. A colour picture has a
  trailing channel axis: ``array[k, j, i, c]`` with ``c`` in RGB order.
- Voxel indices passed as points are ``(i, j, k)``; continuous indices are allowed (voxel centres
  sit at integer indices).
- ``spacing`` is ``(s_i, s_j, s_k)`` in millimetres, ``origin`` is the LPS position (mm) of the
  centre of voxel ``(0, 0, 0)``, and ``direction`` is a 3x3 matrix whose *columns* are the LPS unit
  vectors of the i, j and k axes (ITK's convention). Hence, in LPS millimetres::

      lps = origin + direction @ diag(spacing) @ (i, j, k)

- RAS (Slicer's world frame) differs from LPS by negating x and y: ``ras = diag(-1, -1, 1) @ lps``.
  :meth:`Volume.ijk_to_ras` is the matrix Slicer's ``vtkMRMLVolumeNode.GetIJKToRASMatrix`` returns.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import InvalidInputError

#: Converts LPS to RAS and back (the matrix is its own inverse).
LPS_TO_RAS_3X3 = np.diag([-1.0, -1.0, 1.0])
LPS_TO_RAS_4X4 = np.diag([-1.0, -1.0, 1.0, 1.0])

_SUPPORTED_CHANNELS = (3,)


def lps_to_ras(points: np.ndarray) -> np.ndarray:
    """Convert physical points (N, 3) or (3,) from LPS to RAS millimetres (exact sign flip)."""
    return np.asarray(points, dtype=float) * np.array([-1.0, -1.0, 1.0])


ras_to_lps = lps_to_ras  # the same flip in the other direction


def apply_affine(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 4x4 homogeneous matrix to points of shape (N, 3) or (3,); returns the same shape."""
    pts = np.asarray(points, dtype=float)
    flat = pts.reshape(-1, 3)
    out = flat @ matrix[:3, :3].T + matrix[:3, 3]
    return out.reshape(pts.shape)


def _as_triplet(values: Sequence[float], what: str) -> tuple[float, float, float]:
    arr = np.asarray(values, dtype=float).reshape(-1)
    if arr.shape != (3,) or not np.all(np.isfinite(arr)):
        raise InvalidInputError(f"{what} must be 3 finite numbers, got {values!r}")
    return (float(arr[0]), float(arr[1]), float(arr[2]))


@dataclass(frozen=True, eq=False)
class Volume:
    """A 3-D image (or a stack of 2-D slices) with its geometry.

    Attributes:
        array: voxel values, shape ``(K, J, I)`` or ``(K, J, I, 3)`` for RGB pictures; any numeric
            dtype. Indexed ``array[k, j, i]``.
        spacing: ``(s_i, s_j, s_k)`` voxel size in millimetres, all > 0.
        origin: LPS position in millimetres of the centre of voxel ``(i, j, k) = (0, 0, 0)``.
        direction: 3x3 float matrix; column ``n`` is the LPS unit vector of voxel axis ``n``
            (i, j, k). Columns are normalised on construction.
        name: a label for messages (usually the file name).

    Raises:
        InvalidInputError: for empty arrays, unsupported dimensionality (e.g. 4-D time series),
            NaN/inf voxels, non-positive spacing or a singular direction matrix.
    """

    array: np.ndarray
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    name: str = ""

    def __post_init__(self) -> None:
        where = f" in {self.name}" if self.name else ""
        array = np.asarray(self.array)
        if array.ndim == 4 and array.shape[-1] not in _SUPPORTED_CHANNELS:
            raise InvalidInputError(
                f"4-D voxel array{where} with shape {array.shape} is not supported: AutoMedSAM "
                "segments 3-D volumes (or RGB pictures). Split a time series or multi-component "
                "image into 3-D volumes first (e.g. Slicer's Sequences module or SimpleITK "
                "Extract)."
            )
        if array.ndim not in (3, 4):
            raise InvalidInputError(
                f"voxel array{where} must be 3-D (K, J, I) or RGB (K, J, I, 3), got shape "
                f"{array.shape}"
            )
        if array.size == 0 or min(array.shape) == 0:
            raise InvalidInputError(f"voxel array{where} is empty (shape {array.shape}); nothing to segment")
        if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
            raise InvalidInputError(f"voxel array{where} has non-numeric dtype {array.dtype}")
        if np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.complexfloating):
            bad = int(array.size - np.count_nonzero(np.isfinite(array)))
            if bad:
                raise InvalidInputError(
                    f"voxel array{where} contains {bad} NaN or infinite value(s); replace them "
                    "(e.g. with the background value) before segmenting"
                )
        spacing = _as_triplet(self.spacing, f"spacing{where}")
        if min(spacing) <= 0:
            raise InvalidInputError(f"spacing{where} must be positive millimetres, got {spacing}")
        origin = _as_triplet(self.origin, f"origin{where}")
        direction = np.array(self.direction, dtype=float)
        if direction.shape != (3, 3) or not np.all(np.isfinite(direction)):
            raise InvalidInputError(f"direction{where} must be a finite 3x3 matrix, got {self.direction!r}")
        norms = np.linalg.norm(direction, axis=0)
        if np.any(norms < 1e-9) or abs(np.linalg.det(direction / norms)) < 1e-6:
            raise InvalidInputError(f"direction{where} is singular: {direction.tolist()}")
        direction = direction / norms
        direction.setflags(write=False)
        object.__setattr__(self, "array", array)
        object.__setattr__(self, "spacing", spacing)
        object.__setattr__(self, "origin", origin)
        object.__setattr__(self, "direction", direction)

    # ----------------------------------------------------------------------------------- shape
    @property
    def shape_ijk(self) -> tuple[int, int, int]:
        """Number of voxels along i, j, k (the reverse of ``array.shape[:3]``)."""
        k, j, i = self.array.shape[:3]
        return (i, j, k)

    @property
    def num_slices(self) -> int:
        """Number of k-slices (``array.shape[0]``)."""
        return int(self.array.shape[0])

    def check_slice(self, k) -> int:
        """``k`` as an int, or InvalidInputError naming the volume's slice range (``0..K-1``)."""
        n = self.num_slices
        if not isinstance(k, (int, np.integer)) or not 0 <= int(k) < n:
            raise InvalidInputError(f"slice index {k} is out of range: the volume has slices 0..{n - 1} (k)")
        return int(k)

    @property
    def is_rgb(self) -> bool:
        """True for colour pictures (a trailing channel axis of length 3)."""
        return self.array.ndim == 4

    # -------------------------------------------------------------------------------- geometry
    def ijk_to_lps(self) -> np.ndarray:
        """4x4 matrix from voxel index ``(i, j, k, 1)`` to LPS millimetres."""
        m = np.eye(4)
        m[:3, :3] = self.direction @ np.diag(self.spacing)
        m[:3, 3] = self.origin
        return m

    def ijk_to_ras(self) -> np.ndarray:
        """4x4 matrix from voxel index ``(i, j, k, 1)`` to RAS millimetres (Slicer's IJKToRAS)."""
        return LPS_TO_RAS_4X4 @ self.ijk_to_lps()

    def lps_to_ijk(self) -> np.ndarray:
        """4x4 matrix from LPS millimetres to continuous voxel index ``(i, j, k)``."""
        return np.linalg.inv(self.ijk_to_lps())

    def ras_to_ijk(self) -> np.ndarray:
        """4x4 matrix from RAS millimetres to continuous voxel index ``(i, j, k)``."""
        return np.linalg.inv(self.ijk_to_ras())

    def index_to_lps(self, ijk: np.ndarray) -> np.ndarray:
        """Voxel indices ``(N, 3)`` in (i, j, k) order -> LPS points ``(N, 3)`` in mm."""
        return apply_affine(self.ijk_to_lps(), ijk)

    def lps_to_index(self, lps: np.ndarray) -> np.ndarray:
        """LPS points ``(N, 3)`` in mm -> continuous voxel indices ``(N, 3)`` in (i, j, k) order."""
        return apply_affine(self.lps_to_ijk(), lps)

    def index_to_ras(self, ijk: np.ndarray) -> np.ndarray:
        """Voxel indices ``(N, 3)`` in (i, j, k) order -> RAS points ``(N, 3)`` in mm."""
        return apply_affine(self.ijk_to_ras(), ijk)

    def ras_to_index(self, ras: np.ndarray) -> np.ndarray:
        """RAS points ``(N, 3)`` in mm -> continuous voxel indices ``(N, 3)`` in (i, j, k) order."""
        return apply_affine(self.ras_to_ijk(), ras)

    def same_grid(self, other: Volume, atol_mm: float = 1e-4) -> bool:
        """True if ``other`` has the same voxel count and voxel centres (within ``atol_mm``)."""
        if self.shape_ijk != other.shape_ijk:
            return False
        return bool(np.allclose(self.ijk_to_lps(), other.ijk_to_lps(), atol=atol_mm, rtol=0))

    # ------------------------------------------------------------------------------- builders
    @classmethod
    def from_ijk_to_lps(cls, array: np.ndarray, matrix: np.ndarray, name: str = "") -> Volume:
        """Build a volume from a KJI array and a 4x4 IJK->LPS matrix (e.g. a NRRD header)."""
        matrix = np.asarray(matrix, dtype=float)
        if matrix.shape != (4, 4):
            raise InvalidInputError(f"IJK-to-LPS matrix must be 4x4, got shape {matrix.shape}")
        linear = matrix[:3, :3]
        spacing = np.linalg.norm(linear, axis=0)
        if np.any(spacing <= 0):
            raise InvalidInputError(f"IJK-to-LPS matrix has a zero-length axis: {matrix.tolist()}")
        return cls(array, tuple(spacing), tuple(matrix[:3, 3]), linear / spacing, name)

    @classmethod
    def from_ijk_to_ras(cls, array: np.ndarray, matrix: np.ndarray, name: str = "") -> Volume:
        """Build a volume from a KJI array and a 4x4 IJK->RAS matrix (Slicer's ``GetIJKToRASMatrix``)."""
        return cls.from_ijk_to_lps(array, LPS_TO_RAS_4X4 @ np.asarray(matrix, dtype=float), name)

    def with_array(self, array: np.ndarray, name: str | None = None) -> Volume:
        """A new volume on the same grid with another array of the same (K, J, I) shape."""
        array = np.asarray(array)
        if array.shape[:3] != self.array.shape[:3]:
            raise InvalidInputError(
                f"array shape {array.shape} does not match the volume grid {self.array.shape[:3]} (K, J, I)"
            )
        return Volume(array, self.spacing, self.origin, self.direction, self.name if name is None else name)

    # --------------------------------------------------------------------------------- helpers
    def content_hash(self) -> str:
        """sha256 hex digest of the voxel bytes, dtype, shape and geometry (cache key)."""
        h = hashlib.sha256()
        arr = np.ascontiguousarray(self.array)
        h.update(str((arr.dtype.str, arr.shape)).encode())
        h.update(np.asarray(self.ijk_to_lps(), dtype="<f8").tobytes())
        h.update(memoryview(arr).cast("B"))
        return h.hexdigest()

    def geometry_dict(self) -> dict:
        """JSON-ready geometry: size (i, j, k), spacing, origin (LPS and RAS), direction rows."""
        return {
            "size_ijk": list(self.shape_ijk),
            "spacing": list(self.spacing),
            "origin_lps": list(self.origin),
            "origin_ras": lps_to_ras(np.asarray(self.origin)).tolist(),
            "direction": self.direction.tolist(),
            "frame": "LPS",
        }

    def __repr__(self) -> str:
        return (
            f"Volume(name={self.name!r}, size_ijk={self.shape_ijk}, dtype={self.array.dtype}, "
            f"spacing={tuple(round(s, 4) for s in self.spacing)}, "
            f"origin_lps={tuple(round(o, 3) for o in self.origin)})"
        )
