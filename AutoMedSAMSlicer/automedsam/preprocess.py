"""Slice preprocessing for SAM-family inputs and its exact inverse.

Two steps turn a volume slice into a model input:

1. Intensity: :class:`IntensityConfig` maps voxel values to ``[0, 1]`` float32 (a CT window such as
   abdomen W400/L40, percentile clipping for MR and others, or 0..255 for RGB pictures). The
   backbone then applies its own pixel normalisation (SAM's mean/std, MedSAM's none, SAM 2's
   ImageNet mean/std).
2. Geometry: :class:`SliceTransform` takes a window of the slice (by default all of it), resizes
   it (by default so its longest side equals the backbone's input size ``S``; with an explicit scale,
   to a physical model pixel size, see :mod:`automedsam.framing`) and pads bottom/right with zeros
   to ``S x S`` (as SAM and MedSAM were trained).

Coordinates: a slice is ``slice[j, i]`` (rows j, columns i) of a KJI volume. Model pixel coordinates
are ``(x, y)`` = (column, row), so voxel ``(i, j)`` maps to model ``(x, y)`` with the same axis
order. The mapping is pixel-centre exact: voxel index ``i`` covers ``[i, i + 1)`` in continuous
units; with the window starting at voxel column ``i0`` and ``s_x = resized_w / window_width``, its
centre lands at model pixel index ``x = (i - i0 + 0.5) * s_x - 0.5`` (SAM's prompt encoder adds
the 0.5 back). Voxels outside the window are outside the model input: masks there are empty and
logits :data:`OUTSIDE_LOGIT`. Boxes are ``(i0, j0, i1,
j1)`` indices of their extreme voxels (inclusive); in model space they become the extreme model
pixels those voxels cover, the convention SAM boxes were trained with (extreme mask pixels at
model resolution).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from .errors import InvalidInputError

#: Logit given to voxels outside the window the model saw (sigmoid ~ 4e-44: never foreground).
OUTSIDE_LOGIT = -100.0


@dataclass(frozen=True)
class WindowPreset:
    """A CT display window in Hounsfield units."""

    name: str
    level: float
    width: float


WINDOW_PRESETS: dict[str, WindowPreset] = {
    p.name: p
    for p in (
        WindowPreset("abdomen", 40.0, 400.0),
        WindowPreset("soft_tissue", 50.0, 350.0),
        WindowPreset("liver", 60.0, 160.0),
        WindowPreset("lung", -600.0, 1500.0),
        WindowPreset("bone", 400.0, 1800.0),
        WindowPreset("brain", 40.0, 80.0),
        WindowPreset("mediastinum", 50.0, 350.0),
    )
}


@dataclass(frozen=True)
class IntensityConfig:
    """How voxel values become ``[0, 1]`` model intensities.

    Attributes:
        mode: ``"window"`` (CT level/width in HU), ``"percentile"`` (clip to the volume's
            ``lower``/``upper`` percentiles, for MR and other modalities), ``"minmax"`` or
            ``"rgb"`` (8-bit pictures: divide by 255).
        level, width: the CT window (mode ``"window"``).
        lower, upper: percentiles in 0..100 (mode ``"percentile"``).
    """

    mode: Literal["window", "percentile", "minmax", "rgb"] = "window"
    level: float = 40.0
    width: float = 400.0
    lower: float = 0.5
    upper: float = 99.5

    def __post_init__(self) -> None:
        if not all(isinstance(v, (int, float)) and math.isfinite(v)
                   for v in (self.level, self.width, self.lower, self.upper)):
            raise InvalidInputError(f"intensity settings must be finite numbers, got level {self.level}, width "
                                    f"{self.width}, lower {self.lower}, upper {self.upper}")
        if self.mode not in ("window", "percentile", "minmax", "rgb"):
            raise InvalidInputError(f"intensity mode must be window, percentile, minmax or rgb, got {self.mode!r}")
        if self.mode == "window" and not self.width > 0:
            raise InvalidInputError(f"CT window width must be > 0 HU, got {self.width}")
        if self.mode == "percentile" and not 0 <= self.lower < self.upper <= 100:
            raise InvalidInputError(
                f"percentiles must satisfy 0 <= lower < upper <= 100, got {self.lower}, {self.upper}"
            )

    @classmethod
    def ct(cls, preset: str = "abdomen", level: float | None = None, width: float | None = None) -> IntensityConfig:
        """A CT window from a preset name, optionally overriding level and/or width (HU)."""
        if preset not in WINDOW_PRESETS:
            raise InvalidInputError(f"unknown CT window preset {preset!r}; choose from {', '.join(WINDOW_PRESETS)}")
        p = WINDOW_PRESETS[preset]
        return cls("window", p.level if level is None else level, p.width if width is None else width)

    @classmethod
    def rgb(cls) -> IntensityConfig:
        """8-bit colour or grey pictures: 0..255 -> 0..1."""
        return cls("rgb")

    @classmethod
    def mr(cls, lower: float = 0.5, upper: float = 99.5) -> IntensityConfig:
        """MR and other non-CT modalities: clip to the volume's percentiles."""
        return cls("percentile", lower=lower, upper=upper)

    def value_range(self, array: np.ndarray) -> tuple[float, float]:
        """The (low, high) voxel values mapped to 0 and 1, computed once per volume."""
        if self.mode == "window":
            return (self.level - self.width / 2, self.level + self.width / 2)
        if self.mode == "rgb":
            return (0.0, 255.0)
        sample = np.asarray(array).reshape(-1)
        if sample.size > 2_000_000:  # percentiles of a strided sample are stable and 10x faster
            sample = sample[:: sample.size // 1_000_000]
        if self.mode == "minmax":
            lo, hi = float(sample.min()), float(sample.max())
        else:
            lo, hi = (float(v) for v in np.percentile(sample, [self.lower, self.upper]))
        return (lo, hi if hi > lo else lo + 1.0)

    def to_dict(self) -> dict:
        return {"mode": self.mode, "level": self.level, "width": self.width, "lower": self.lower,
                "upper": self.upper}


def normalize_intensity(array: np.ndarray, value_range: tuple[float, float]) -> np.ndarray:
    """Linearly map ``value_range`` to ``[0, 1]`` and clip; returns float32 of the same shape."""
    lo, hi = value_range
    out = (np.asarray(array, dtype=np.float32) - np.float32(lo)) / np.float32(hi - lo)
    return np.clip(out, 0.0, 1.0, out=out)


def _to_torch(array):
    import torch

    return array if isinstance(array, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(array))


@dataclass(frozen=True)
class SliceTransform:
    """Between a ``(height, width)`` slice and an ``S x S`` model input: a window of the slice, resized
    and padded bottom/right.

    Attributes:
        height: slice rows (J voxels).
        width: slice columns (I voxels).
        size: the backbone's square input size S (1024 for SAM/MedSAM/SAM 2.1, 256 for LiteMedSAM).
        interpolation: image resizing: ``"bilinear"`` (antialiased when shrinking) or ``"area"``
            (OpenCV's INTER_AREA when shrinking, as LiteMedSAM's reference inference; bilinear when
            enlarging, see :meth:`image_to_model`).
        minmax: min-max the resized image to [0, 1] before padding (LiteMedSAM's reference).
        crop: ``(j0, j1, i0, i1)`` half-open voxel window of the slice the model sees (None: the whole
            slice).
        scale: ``(s_x, s_y)`` model pixels per voxel along columns and rows (None: the window's
            longest side becomes S, SAM's resize, whatever the voxel spacing); the resized window
            must fit in S x S.
        via: ``(rows, columns)`` of a coarser grid the window is resampled to (area average) before
            it is resized to the model: a finer scan shown at the resolution a prompt network was
            taught at (see :mod:`automedsam.framing`); None: straight to the model size.
    """

    height: int
    width: int
    size: int
    interpolation: Literal["bilinear", "area"] = "bilinear"
    minmax: bool = False
    crop: tuple[int, int, int, int] | None = None
    scale: tuple[float, float] | None = None
    via: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if min(self.height, self.width, self.size) < 1:
            raise InvalidInputError(f"slice size {self.height}x{self.width} and model size {self.size} must be >= 1")
        if self.interpolation not in ("bilinear", "area"):
            raise InvalidInputError(f"interpolation must be bilinear or area, got {self.interpolation!r}")
        if self.crop is not None:
            j0, j1, i0, i1 = self.crop
            if not (0 <= j0 < j1 <= self.height and 0 <= i0 < i1 <= self.width):
                raise InvalidInputError(f"window {self.crop} (j0, j1, i0, i1) is not a non-empty part of the "
                                        f"{self.height}x{self.width} slice")
        if self.scale is not None:
            if not all(np.isfinite(v) and v > 0 for v in self.scale):
                raise InvalidInputError(f"scale {self.scale} must be two model-pixels-per-voxel factors > 0")
            j0, j1, i0, i1 = self.window
            rh, rw = (j1 - j0) * self.scale[1], (i1 - i0) * self.scale[0]
            if max(rh, rw) > self.size + 0.5:
                raise InvalidInputError(f"window {self.window} at scale {self.scale} is {rw:.0f}x{rh:.0f} model "
                                        f"pixels, more than the model input {self.size}x{self.size}")

    @property
    def window(self) -> tuple[int, int, int, int]:
        """``(j0, j1, i0, i1)``: the half-open voxel window of the slice the model sees."""
        return self.crop if self.crop is not None else (0, self.height, 0, self.width)

    @property
    def origin(self) -> tuple[int, int]:
        """``(i0, j0)``: the voxel at the window's top-left corner."""
        j0, _, i0, _ = self.window
        return (i0, j0)

    @property
    def resized_shape(self) -> tuple[int, int]:
        """(rows, columns) of the resized window inside the padded input (SAM's rounding)."""
        j0, j1, i0, i1 = self.window
        h, w = j1 - j0, i1 - i0
        if self.scale is None:
            scale = self.size / max(h, w)
            return (int(h * scale + 0.5), int(w * scale + 0.5))
        sx, sy = self.scale
        return (min(self.size, max(1, int(h * sy + 0.5))), min(self.size, max(1, int(w * sx + 0.5))))

    @property
    def scale_xy(self) -> tuple[float, float]:
        """Per-axis scale (columns, rows) from voxels to model pixels."""
        j0, j1, i0, i1 = self.window
        rh, rw = self.resized_shape
        return (rw / (i1 - i0), rh / (j1 - j0))

    def describe(self) -> dict:
        """The framing as plain data (part of embedding cache keys and reports)."""
        return {"window": list(self.window), "resized": list(self.resized_shape), "size": self.size,
                "interpolation": self.interpolation, "minmax": self.minmax,
                "via": list(self.via) if self.via else None}

    # ---------------------------------------------------------------------- coordinates
    def points_to_model(self, points_ij: np.ndarray) -> np.ndarray:
        """Voxel points ``(N, 2)`` as (i, j) -> model pixel coordinates ``(N, 2)`` as (x, y)."""
        pts = np.asarray(points_ij, dtype=np.float64).reshape(-1, 2)
        return (pts - np.array(self.origin) + 0.5) * np.array(self.scale_xy) - 0.5

    def points_from_model(self, points_xy: np.ndarray) -> np.ndarray:
        """Model pixel coordinates ``(N, 2)`` as (x, y) -> continuous voxel (i, j) (exact inverse)."""
        pts = np.asarray(points_xy, dtype=np.float64).reshape(-1, 2)
        return (pts + 0.5) / np.array(self.scale_xy) - 0.5 + np.array(self.origin)

    def box_to_model(self, box_ij: np.ndarray) -> np.ndarray:
        """Box ``(i0, j0, i1, j1)`` of extreme voxel indices -> model ``(x0, y0, x1, y1)``: the
        extreme model pixels those voxels cover, as SAM's training boxes were the extreme pixels of
        a mask at model resolution (at scale 1 the box is unchanged). Voxel ``i`` covers model
        pixels ``(i - i0) * s_x`` to ``(i - i0 + 1) * s_x - 1``."""
        b = np.asarray(box_ij, dtype=np.float64).reshape(4) - np.array(self.origin * 2)
        s = np.array(self.scale_xy * 2)
        lo, hi = b[:2] * s[:2], (b[2:] + 1) * s[2:] - 1
        return np.concatenate([lo, np.maximum(hi, lo)])

    def box_from_model(self, box_xy: np.ndarray) -> np.ndarray:
        """Model box ``(x0, y0, x1, y1)`` -> voxel ``(i0, j0, i1, j1)`` (the inverse of
        :meth:`box_to_model` for boxes at least one voxel wide)."""
        b = np.asarray(box_xy, dtype=np.float64).reshape(4)
        s = np.array(self.scale_xy * 2)
        return np.concatenate([b[:2] / s[:2], (b[2:] + 1) / s[2:] - 1]) + np.array(self.origin * 2)

    def check_points(self, points_ij: np.ndarray, what: str = "point") -> None:
        """Raise :class:`InvalidInputError` if any (i, j) is NaN/infinite or lies outside the slice."""
        check_slice_points(points_ij, (self.height, self.width), what)

    # ---------------------------------------------------------------------------- images
    def image_to_model(self, image: np.ndarray) -> np.ndarray:
        """Slice ``(J, I)`` or ``(J, I, 3)`` float in [0, 1] -> padded model input ``(S, S, 3)`` float32.

        Resampling with pixel-centre alignment: bilinear (antialiased when shrinking), or with
        ``"area"`` OpenCV's INTER_AREA when shrinking and bilinear when enlarging. (INTER_AREA
        enlarges by near-nearest-neighbour blocks, unlike the area-shrunk images LiteMedSAM was
        trained on; on the shared 3 mm CT, enlarged 2.1x, box-prompted DSC was 0.010 lower for the
        liver and spleen with it.) Only the window is resized; then, with ``minmax``, the resized image
        is stretched to [0, 1] (a constant image becomes 0); grey slices are repeated to 3 channels;
        padding is 0.
        """
        img = np.asarray(image, dtype=np.float32)
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        if img.shape[:2] != (self.height, self.width):
            raise InvalidInputError(
                f"slice shape {img.shape[:2]} does not match the transform ({self.height}, {self.width})"
            )
        j0, j1, i0, i1 = self.window
        img = img[j0:j1, i0:i1]
        if self.via is not None and self.via[0] < img.shape[0] and self.via[1] < img.shape[1]:
            import cv2

            img = cv2.resize(np.ascontiguousarray(img), (self.via[1], self.via[0]), interpolation=cv2.INTER_AREA)
        rh, rw = self.resized_shape
        if (rh, rw) == img.shape[:2]:
            resized = img
        elif self.interpolation == "area" and rh <= img.shape[0] and rw <= img.shape[1]:
            import cv2

            resized = cv2.resize(np.ascontiguousarray(img), (rw, rh), interpolation=cv2.INTER_AREA)
        else:
            import torch
            import torch.nn.functional as F  # noqa: N812

            t = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))[None]
            t = F.interpolate(t, size=(rh, rw), mode="bilinear", align_corners=False,
                              antialias=rh < img.shape[0] or rw < img.shape[1])
            resized = t[0].numpy().transpose(1, 2, 0)
        if self.minmax:
            lo, hi = float(resized.min()), float(resized.max())
            resized = (resized - lo) / max(hi - lo, 1e-8)
        out = np.zeros((self.size, self.size, 3), dtype=np.float32)
        out[:rh, :rw] = resized
        return out

    # ----------------------------------------------------------------------------- masks
    def _source_index(self, n_out: int, out_to_model: float, first: int, last: int, scale: float) -> np.ndarray:
        """Nearest voxel index (window ``first..last - 1``) for each of ``n_out`` output pixels (-1
        where outside)."""
        model_pos = (np.arange(n_out) + 0.5) * out_to_model  # continuous model coordinate (edges at ints)
        idx = np.floor(model_pos / scale).astype(np.int64)
        idx[(idx < 0) | (idx >= last - first)] = -1
        return np.where(idx >= 0, idx + first, -1)

    def mask_to_model(self, mask: np.ndarray, out_size: int | None = None) -> np.ndarray:
        """Slice mask ``(J, I)`` -> model-space mask ``(L, L)`` by nearest neighbour, ``L`` =
        ``out_size`` or ``S`` (use ``S // 4`` for SAM's 256x256 mask prompt). Padding is False."""
        m = np.asarray(mask)
        if m.shape != (self.height, self.width):
            raise InvalidInputError(f"mask shape {m.shape} does not match the slice ({self.height}, {self.width})")
        n = out_size or self.size
        sx, sy = self.scale_xy
        j0, j1, i0, i1 = self.window
        rows = self._source_index(n, self.size / n, j0, j1, sy)
        cols = self._source_index(n, self.size / n, i0, i1, sx)
        out = np.zeros((n, n), dtype=m.dtype)
        r_ok, c_ok = rows >= 0, cols >= 0
        out[np.ix_(r_ok, c_ok)] = m[np.ix_(rows[r_ok], cols[c_ok])]
        return out

    def mask_from_model(self, mask_model: np.ndarray) -> np.ndarray:
        """Model-space mask ``(L, L)`` (any L) -> slice mask ``(J, I)``: each voxel of the window takes
        the model pixel under its centre; voxels outside the window are 0. Exact inverse of
        :meth:`mask_to_model` when the window is not shrunk."""
        m = np.asarray(mask_model)
        n = m.shape[-1]
        sx, sy = self.scale_xy
        j0, j1, i0, i1 = self.window
        to_out = n / self.size
        rows = np.floor((np.arange(j1 - j0) + 0.5) * sy * to_out).astype(np.int64).clip(0, n - 1)
        cols = np.floor((np.arange(i1 - i0) + 0.5) * sx * to_out).astype(np.int64).clip(0, n - 1)
        inside = m[..., rows[:, None], cols[None, :]]
        if (j0, j1, i0, i1) == (0, self.height, 0, self.width):
            return inside
        out = np.zeros((*m.shape[:-2], self.height, self.width), m.dtype)
        out[..., j0:j1, i0:i1] = inside
        return out

    def logits_to_slice(self, logits, crop: tuple[int, int, int, int] | None = None):
        """Mask logits ``(..., L, L)`` covering the padded model input -> ``(..., J, I)`` logits, or
        only the voxels of ``crop`` = ``(j0, j1, i0, i1)`` (half-open voxel ranges) as
        ``(..., j1 - j0, i1 - i0)``.

        Bilinear sampling at every voxel centre directly from the low-resolution logits (no
        intermediate S x S upsampling): the same values as SAM's upsample-crop-resize path up to
        interpolation order, at the cost of one sample per voxel. Voxels outside the transform's
        window get :data:`OUTSIDE_LOGIT`. Accepts numpy arrays or torch tensors and returns the same
        kind (float32).
        """
        import torch
        import torch.nn.functional as F  # noqa: N812

        j0, j1, i0, i1 = crop if crop is not None else (0, self.height, 0, self.width)
        was_numpy = not isinstance(logits, torch.Tensor)
        t = _to_torch(logits).float()
        lead = t.shape[:-2]
        t = t.reshape(-1, 1, *t.shape[-2:])
        sx, sy = self.scale_xy
        oi, oj = self.origin
        # Normalised grid coordinates (align_corners=False): -1 and 1 are the outer edges of the
        # padded S x S input, whatever L is.
        xs = (torch.arange(i0 - oi, i1 - oi, dtype=torch.float32, device=t.device) + 0.5) * (2 * sx / self.size) - 1
        ys = (torch.arange(j0 - oj, j1 - oj, dtype=torch.float32, device=t.device) + 0.5) * (2 * sy / self.size) - 1
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)[None].expand(t.shape[0], -1, -1, -1)
        out = F.grid_sample(t, grid, mode="bilinear", padding_mode="border", align_corners=False)
        out = out.reshape(*lead, j1 - j0, i1 - i0)
        wj0, wj1, wi0, wi1 = self.window
        if j0 < wj0 or i0 < wi0 or j1 > wj1 or i1 > wi1:
            rows = torch.arange(j0, j1, device=t.device)
            cols = torch.arange(i0, i1, device=t.device)
            outside = ~(((rows >= wj0) & (rows < wj1))[:, None] & ((cols >= wi0) & (cols < wi1))[None, :])
            out = out.masked_fill(outside, OUTSIDE_LOGIT)
        return out.numpy() if was_numpy else out

    def logits_window(self, crop: tuple[int, int, int, int], mask_size: int) -> tuple[int, int, int, int]:
        """The ``(row0, row1, col0, col1)`` low-resolution pixels (half-open, on the ``L x L`` grid,
        ``L = mask_size``) that :meth:`logits_to_slice` reads for the voxels of ``crop`` =
        ``(j0, j1, i0, i1)``, with one pixel to spare on each side: a decode window
        (:meth:`automedsam.backbones.base.Backbone.decode`) that gives those voxels exact values."""
        j0, j1, i0, i1 = crop
        sx, sy = self.scale_xy
        oi, oj = self.origin

        def span(first: int, last: int, scale: float) -> tuple[int, int]:
            # Voxel v samples L pixels floor(u) and floor(u) + 1, u = (v + 0.5) * scale * L / S - 0.5
            # (v counted from the window's first voxel).
            def u(v):
                return (v + 0.5) * scale * mask_size / self.size - 0.5

            lo = int(np.floor(u(first))) - 1
            hi = int(np.floor(u(last))) + 3
            return min(max(lo, 0), mask_size - 1), max(min(hi, mask_size), 1)

        rows, cols = span(j0 - oj, j1 - 1 - oj, sy), span(i0 - oi, i1 - 1 - oi, sx)
        return (*rows, *cols)


def check_slice_points(points_ij: np.ndarray, shape: tuple[int, int], what: str = "point") -> None:
    """Raise :class:`InvalidInputError` if any point ``(i, j)`` is NaN/infinite or lies outside a
    ``(J, I)`` slice."""
    pts = np.asarray(points_ij, dtype=np.float64).reshape(-1, 2)
    if not np.all(np.isfinite(pts)):
        raise InvalidInputError(f"{what} coordinates must be finite numbers (i, j), got {pts.tolist()}")
    height, width = shape
    bad = (pts[:, 0] < -0.5) | (pts[:, 0] > width - 0.5) | (pts[:, 1] < -0.5) | (pts[:, 1] > height - 0.5)
    if np.any(bad):
        raise InvalidInputError(
            f"{what} {pts[bad][0].tolist()} (i, j) lies outside the slice, which spans i 0..{width - 1}, "
            f"j 0..{height - 1}"
        )
