"""The slice orientation the model sees: every volume is shown to the backbone in one canonical
voxel order, whatever order its file stored the voxels in.

The same CT stored with its rows and columns in the other order (a NIfTI export of a DICOM series,
say) describes the same physical space, but its ``array[k]`` is the slice upside down and mirrored:
a model taught on one order sees a rotated image in the other. :class:`Reorientation` maps a
volume's ``(K, J, I)`` array onto the *nearest axial LPS order* by permuting and flipping axes only
(no resampling, so the map and its inverse are exact):

- canonical ``i`` runs towards the patient's left (+L), ``j`` towards posterior (+P) and ``k``
  towards superior (+S): ``array[k]`` is an axial slice as a radiologist reads it (anterior at the
  top, the patient's right on the image's left);
- an oblique volume takes the voxel axes nearest to L, P and S (the assignment with the largest
  sum of ``|cos|``), so its slices stay its own slices, only reordered;
- sagittal- or coronal-stored volumes become axial stacks, where they resolve axial slices: a
  single slice, or a stack whose axial pixels would be more than :data:`MAX_AXIAL_ASPECT` times
  longer one way than the other (thick sagittal or coronal slices) or narrower than
  :data:`MIN_AXIAL_PIXELS`, keeps its own slices as stored (the backbone resizes slices by pixels, so
  such slices would reach it squashed).

Index conventions are :mod:`automedsam.volume`'s: arrays ``[k, j, i]`` (KJI), points ``(i, j)`` on a
k-slice, LPS millimetres. Numpy only.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from .errors import InvalidInputError
from .volume import Volume

#: How a model bundle's slices were oriented when it was taught (``preprocessing.orientation``):
#: the canonical order of this module, or (bundles made before it existed) the files' own order.
CANONICAL = "lps-axial"
STORAGE = "storage"
#: Largest ratio of the two pixel spacings of an axial slice made from a sagittal or coronal stack.
MAX_AXIAL_ASPECT = 2.0
#: Fewest pixels along either side of an axial slice made from a sagittal or coronal stack.
MIN_AXIAL_PIXELS = 16


@dataclass(frozen=True)
class Reorientation:
    """An exact map between a volume's KJI array ("source") and its canonical KJI array.

    Attributes:
        source_shape: ``(K, J, I)`` of the source array.
        axes: canonical array axis ``n`` (0: k, 1: j, 2: i) is source array axis ``axes[n]``.
        flips: whether canonical array axis ``n`` runs against source axis ``axes[n]``.
    """

    source_shape: tuple[int, int, int]
    axes: tuple[int, int, int] = (0, 1, 2)
    flips: tuple[bool, bool, bool] = (False, False, False)

    @classmethod
    def identity(cls, shape: tuple[int, ...]) -> Reorientation:
        """The map that changes nothing (the volume is shown in its stored order)."""
        return cls(tuple(int(n) for n in shape[:3]))

    @classmethod
    def nearest_axial_lps(cls, volume: Volume) -> Reorientation:
        """The map of ``volume`` onto the nearest axial LPS order (see the module docstring)."""
        direction = volume.direction  # columns: LPS unit vectors of voxel axes i, j, k
        # voxel_of[m]: the voxel axis (0 i, 1 j, 2 k) that runs closest to LPS axis m (0 L, 1 P, 2 S)
        voxel_of = max(itertools.permutations(range(3)),
                       key=lambda perm: sum(abs(direction[m, perm[m]]) for m in range(3)))
        axes, flips = [0, 0, 0], [False, False, False]
        for m, v in enumerate(voxel_of):
            n = 2 - m  # canonical array axis of canonical voxel axis m (KJI reverses IJK)
            axes[n], flips[n] = 2 - v, bool(direction[m, v] < 0)
        shape = tuple(int(n) for n in volume.array.shape[:3])
        if axes[0] != 0:  # the axial slices would cut across the stored ones: only where they resolve them
            spacing = [volume.spacing[2 - a] for a in axes[1:]]  # (s_j, s_i) of the axial slices
            sizes = [shape[a] for a in axes[1:]]
            if max(spacing) > MAX_AXIAL_ASPECT * min(spacing) or min(sizes) < MIN_AXIAL_PIXELS:
                return cls.identity(shape)
        return cls(shape, tuple(axes), tuple(flips))

    # ----------------------------------------------------------------------------- properties
    @property
    def is_identity(self) -> bool:
        return self.axes == (0, 1, 2) and not any(self.flips)

    @property
    def keeps_slices(self) -> bool:
        """Whether the source's k-slices are canonical k-slices (reordered or mirrored in plane)."""
        return self.axes[0] == 0

    @property
    def canonical_shape(self) -> tuple[int, int, int]:
        return tuple(self.source_shape[a] for a in self.axes)

    def describe(self) -> str:
        """E.g. ``"k, -j, -i"``: which source axis (and sign) each canonical axis (k, j, i) is."""
        names = "kji"
        return ", ".join(("-" if f else "") + names[a] for a, f in zip(self.axes, self.flips, strict=True))

    # --------------------------------------------------------------------------------- arrays
    def _check(self, array: np.ndarray, shape: tuple[int, ...], what: str) -> np.ndarray:
        array = np.asarray(array)
        if tuple(array.shape[:3]) != tuple(shape):
            raise InvalidInputError(f"{what} of shape {array.shape[:3]} is not on the expected (K, J, I) grid {shape}")
        return array

    def to_canonical(self, array: np.ndarray) -> np.ndarray:
        """A source ``(K, J, I[, C])`` array in canonical order (a view, no copy)."""
        array = self._check(array, self.source_shape, "array")
        out = np.transpose(array, (*self.axes, *range(3, array.ndim)))
        flipped = tuple(n for n in range(3) if self.flips[n])
        return np.flip(out, flipped) if flipped else out

    def from_canonical(self, array: np.ndarray) -> np.ndarray:
        """A canonical ``(K, J, I[, C])`` array in the source's order (a view, no copy)."""
        array = self._check(array, self.canonical_shape, "canonical array")
        flipped = tuple(n for n in range(3) if self.flips[n])
        out = np.flip(array, flipped) if flipped else array
        return np.transpose(out, (*np.argsort(self.axes), *range(3, array.ndim)))

    def volume(self, volume: Volume) -> Volume:
        """``volume`` in canonical order, with the geometry that keeps every voxel where it was in
        physical space (LPS)."""
        if self.is_identity:
            return volume
        corner = self.index_from_canonical(np.zeros((1, 3)))  # source (k, j, i) of canonical voxel 0
        origin = volume.index_to_lps(corner[:, ::-1])[0]
        direction, spacing = np.zeros((3, 3)), []
        for m in range(3):  # canonical voxel axis m (i, j, k) = canonical array axis 2 - m
            n = 2 - m
            v = 2 - self.axes[n]
            direction[:, m] = volume.direction[:, v] * (-1.0 if self.flips[n] else 1.0)
            spacing.append(volume.spacing[v])
        return Volume(self.to_canonical(volume.array), tuple(spacing), tuple(origin), direction, volume.name)

    # -------------------------------------------------------------------------------- indices
    def index_to_canonical(self, kji: np.ndarray) -> np.ndarray:
        """Source indices ``(N, 3)`` as (k, j, i) (continuous allowed) -> canonical (k, j, i)."""
        src = np.asarray(kji, float).reshape(-1, 3)
        out = src[:, list(self.axes)].copy()
        for n in range(3):
            if self.flips[n]:
                out[:, n] = self.source_shape[self.axes[n]] - 1 - out[:, n]
        return out

    def index_from_canonical(self, kji: np.ndarray) -> np.ndarray:
        """Canonical indices ``(N, 3)`` as (k, j, i) -> source (k, j, i)."""
        can = np.asarray(kji, float).reshape(-1, 3).copy()
        for n in range(3):
            if self.flips[n]:
                can[:, n] = self.source_shape[self.axes[n]] - 1 - can[:, n]
        out = np.empty_like(can)
        out[:, list(self.axes)] = can
        return out

    # ----------------------------------------------------------------- one source k-slice
    def _require_slices(self) -> None:
        if not self.keeps_slices:
            raise InvalidInputError(
                "this volume's k-slices are not axial slices (it is stored sagittally or coronally; "
                f"canonical axes from stored ones: {self.describe()}): give prompts on a slice of the "
                "view the engine uses (see Engine.slice_view)")

    def slice_to_canonical(self, k: int) -> int:
        """Source slice k -> canonical slice k (only when :attr:`keeps_slices`)."""
        self._require_slices()
        return int(self.source_shape[0] - 1 - k) if self.flips[0] else int(k)

    def slice_from_canonical(self, k: int) -> int:
        """Canonical slice k -> source slice k (the map is its own inverse on the slice axis)."""
        return self.slice_to_canonical(k)

    def plane_to_canonical(self, plane: np.ndarray) -> np.ndarray:
        """A source ``(J, I)`` slice array -> the canonical slice's ``(J, I)`` array (a view)."""
        self._require_slices()
        return self._plane(np.asarray(plane), forward=True)

    def plane_from_canonical(self, plane: np.ndarray) -> np.ndarray:
        """A canonical ``(J, I)`` slice array -> the source slice's ``(J, I)`` array (a view)."""
        self._require_slices()
        return self._plane(np.asarray(plane), forward=False)

    def _plane(self, plane: np.ndarray, forward: bool) -> np.ndarray:
        transposed = self.axes[1] == 2  # the slice's rows and columns trade places
        flipped = tuple(n - 1 for n in (1, 2) if self.flips[n])  # canonical in-plane axes that run backwards
        if forward:
            out = plane.T if transposed else plane
            return np.flip(out, flipped) if flipped else out
        out = np.flip(plane, flipped) if flipped else plane
        return out.T if transposed else out

    def points_to_canonical(self, k: int, points: np.ndarray) -> np.ndarray:
        """Points ``(N, 2)`` as (i, j) on source slice k -> (i, j) on the canonical slice."""
        p = np.asarray(points, float).reshape(-1, 2)
        kji = np.column_stack([np.full(len(p), float(k)), p[:, 1], p[:, 0]])
        out = self.index_to_canonical(kji)
        return out[:, [2, 1]]

    def box_to_canonical(self, k: int, box) -> np.ndarray:
        """A box ``(i0, j0, i1, j1)`` on source slice k -> the same box on the canonical slice."""
        b = np.asarray(box, float).reshape(-1)
        corners = self.points_to_canonical(k, b.reshape(2, 2))
        return np.concatenate([corners.min(axis=0), corners.max(axis=0)])
