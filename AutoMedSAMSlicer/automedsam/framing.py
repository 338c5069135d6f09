"""How a volume's slices are framed in the model input: at the physical pixel size a prompt network
was taught at, so an organ covers as many model pixels in every volume it segments.

Why: SAM's resize (a slice's longest side becomes the model input side ``S``) ties the size of a
structure in the model input to the scanner's field of view. A class map taught on a 366 mm field
of view (the shared 3 mm CT: 1.43 mm per model pixel) saw the same patient's 500 mm DICOM series at
1.95 mm per model pixel, 27 % smaller, and found neither liver nor spleen there (DSC 0.00 / 0.00).
With that bundle framed at 1.43 mm: liver 0.90, spleen 0.29; averaged to the taught 3 mm voxels as
well: 0.97 / 0.79; a bundle taught with the framing: 0.97 / 0.86 (``scripts/cross_case_eval.py``,
README "Across cases").

A :class:`Framing` with ``pixel_mm`` (recorded in a model bundle) turns into a
:class:`~automedsam.preprocess.SliceTransform` per volume:

- slices that fit in ``S * pixel_mm`` mm are scaled to ``pixel_mm`` per model pixel along both
  in-plane axes (anisotropic voxels become square model pixels) and padded;
- larger slices are cropped to a window of ``S * pixel_mm`` mm centred on the body
  (:func:`body_window`: arms, table and air do not pull the window off the trunk);
- when the body itself is larger, the window is the body and the scale the largest that fits
  (a ``coarser`` framing, logged; the learned prompts then see structures smaller than taught);
- with ``voxel_mm``, slices with finer voxels than taught are averaged to that voxel size first
  (:attr:`~automedsam.preprocess.SliceTransform.via`).

Coordinates: voxel indices ``(i, j)`` of the volume's KJI slices; spacing in mm from
:attr:`automedsam.volume.Volume.spacing` (``(x, y, z)`` = along i, j, k).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .errors import InvalidInputError

if TYPE_CHECKING:
    from .backbones import Backbone
    from .preprocess import IntensityConfig, SliceTransform
    from .volume import Volume

log = logging.getLogger(__name__)

#: Slices sampled (evenly) for the body window of a volume.
BODY_SAMPLE_SLICES = 24
#: Body-window margin on each side, in mm.
BODY_MARGIN_MM = 5.0
#: CT voxels above this (HU) are body: fat (-100), muscle and organs; not air, lung or padding.
CT_BODY_HU = -300.0


@dataclass(frozen=True)
class Framing:
    """How slices become model inputs.

    Attributes:
        pixel_mm: physical size of one model pixel, in mm (isotropic); None: SAM's resize (the
            slice's longest side becomes ``S`` whatever its voxel spacing), as for manual prompts
            and bundles made before framing was recorded.
        voxel_mm: the coarsest in-plane voxel spacing the prompt network was taught on; slices with
            finer voxels are first averaged to it, so they look as the taught ones did (a 3 mm
            teach and a 0.98 mm scan: the same blur); None: as they are.
    """

    pixel_mm: float | None = None
    voxel_mm: float | None = None

    def __post_init__(self) -> None:
        for name in ("pixel_mm", "voxel_mm"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise InvalidInputError(f"framing {name} must be a finite number of mm > 0, got {value}")

    def to_dict(self) -> dict:
        return {"pixel_mm": self.pixel_mm, "voxel_mm": self.voxel_mm}

    @classmethod
    def from_dict(cls, data: dict | None) -> Framing:
        data = data or {}
        return cls(data.get("pixel_mm"), data.get("voxel_mm"))


def in_plane_spacing(volume: Volume) -> tuple[float, float]:
    """``(s_i, s_j)``: mm between voxel centres along columns and rows of a slice."""
    return float(volume.spacing[0]), float(volume.spacing[1])


def fit_pixel_mm(volume: Volume, size: int) -> float:
    """The model pixel size (mm) at which the volume's slices just fit in ``size`` pixels: their
    longest physical side over ``size`` (SAM's resize for square voxels)."""
    j, i = volume.array.shape[1:3]
    si, sj = in_plane_spacing(volume)
    return max(i * si, j * sj) / size


def teaching_framing(volumes: list[Volume], size: int) -> Framing:
    """The framing a prompt network learns at from ``volumes``: the coarsest of their fitting pixel
    sizes, so every training slice is seen whole, and the coarsest of their in-plane voxels."""
    if not volumes:
        raise ValueError("no volumes to frame")
    return Framing(max(fit_pixel_mm(v, size) for v in volumes), max(max(in_plane_spacing(v)) for v in volumes))


def body_window(volume: Volume, intensity: IntensityConfig | None = None) -> tuple[int, int, int, int]:
    """``(j0, j1, i0, i1)``: half-open voxel box of the body in the volume's slices, plus
    :data:`BODY_MARGIN_MM`: on each of :data:`BODY_SAMPLE_SLICES` sampled slices the largest
    foreground region (after a 5 mm opening, which cuts thin links such as a table edge or an arm
    touching the side), and of their boxes the 10th-90th percentile extent (an arm that touches the
    trunk on a few slices does not widen it). Foreground: above -300 HU for CT (``intensity`` a CT
    window: fat, muscle and organs, not air, lung or padding), else a quarter of the way from the
    1st to the 99th intensity percentile. The whole slice when nothing stands out."""
    from scipy import ndimage

    array = volume.array
    k, j, i = array.shape[:3]
    picks = np.unique(np.linspace(0, k - 1, min(k, BODY_SAMPLE_SLICES)).round().astype(int))
    sample = np.asarray(array[picks], dtype=np.float32)
    if sample.ndim == 4:  # RGB: brightness
        sample = sample.mean(axis=-1)
    if intensity is not None and intensity.mode == "window":
        threshold = CT_BODY_HU
    else:
        lo, hi = np.percentile(sample[:, ::4, ::4], [1, 99])
        if not hi > lo:
            return (0, j, 0, i)
        threshold = lo + 0.25 * (hi - lo)
    si, sj = in_plane_spacing(volume)
    radius = (max(1, round(2.5 / sj)), max(1, round(2.5 / si)))
    opening = np.ones((2 * radius[0] + 1, 2 * radius[1] + 1), bool)
    boxes = []
    for plane in sample:
        labels, count = ndimage.label(ndimage.binary_opening(plane > threshold, structure=opening))
        if count:
            rows, cols = np.nonzero(labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1)
            boxes.append((rows.min(), rows.max() + 1, cols.min(), cols.max() + 1))
    if not boxes:
        return (0, j, 0, i)
    b = np.asarray(boxes, dtype=np.float64)
    r0, c0 = np.percentile(b[:, 0], 10), np.percentile(b[:, 2], 10)
    r1, c1 = np.percentile(b[:, 1], 90), np.percentile(b[:, 3], 90)
    mj, mi = math.ceil(BODY_MARGIN_MM / sj), math.ceil(BODY_MARGIN_MM / si)
    return (max(0, int(r0) - mj), min(j, math.ceil(r1) + mj), max(0, int(c0) - mi), min(i, math.ceil(c1) + mi))


def frame_slices(backbone: Backbone, volume: Volume, framing: Framing,
                 intensity: IntensityConfig | None = None) -> SliceTransform:
    """The :class:`~automedsam.preprocess.SliceTransform` of ``volume``'s slices under ``framing``
    (see the module docstring); ``intensity`` tells :func:`body_window` how to find the body."""
    j, i = volume.array.shape[1:3]
    base = backbone.slice_transform(j, i)
    if framing.pixel_mm is None:
        return base
    framed = _window(base, volume, framing.pixel_mm, intensity)
    if framing.voxel_mm is None:
        return framed
    j0, j1, i0, i1 = framed.window
    si, sj = in_plane_spacing(volume)
    model_mm = min(si / framed.scale_xy[0], sj / framed.scale_xy[1])
    if min(si, sj) >= 0.9 * framing.voxel_mm or model_mm >= 0.9 * framing.voxel_mm:
        return framed  # voxels (or model pixels) as coarse as taught: nothing to average
    via = (max(1, round((j1 - j0) * sj / framing.voxel_mm)), max(1, round((i1 - i0) * si / framing.voxel_mm)))
    return dataclasses.replace(framed, via=via)


def _window(base: SliceTransform, volume: Volume, p: float, intensity: IntensityConfig | None) -> SliceTransform:
    """``base`` with the window and scale that show ``volume`` at ``p`` mm per model pixel."""
    j, i = volume.array.shape[1:3]
    size = base.size
    si, sj = in_plane_spacing(volume)
    # Voxels per window side; a hair of slack so a slice that fits exactly is not cropped by rounding.
    span_i, span_j = int(size * p / si + 1e-6), int(size * p / sj + 1e-6)
    if i <= span_i and j <= span_j:
        return dataclasses.replace(base, scale=_scale(size, (i, j), (si / p, sj / p)))
    j0, j1, i0, i1 = body_window(volume, intensity)
    if (i1 - i0) <= span_i and (j1 - j0) <= span_j:
        ci, cj = (i0 + i1) / 2, (j0 + j1) / 2
        n_i, n_j = min(i, span_i), min(j, span_j)
        a = int(np.clip(round(ci - n_i / 2), 0, i - n_i))
        b = int(np.clip(round(cj - n_j / 2), 0, j - n_j))
        return dataclasses.replace(base, crop=(b, b + n_j, a, a + n_i),
                                   scale=_scale(size, (n_i, n_j), (si / p, sj / p)))
    coarser = max((i1 - i0) * si, (j1 - j0) * sj) / size
    log.log(logging.WARNING if coarser > 1.05 * p else logging.INFO,
            "%s: the body spans %.0f x %.0f mm, more than the %.0f mm the model was taught to see at %.2f mm per "
            "pixel; framed at %.2f mm per pixel (structures look %.0f%% smaller than taught)", volume.name,
            (i1 - i0) * si, (j1 - j0) * sj, size * p, p, coarser, 100 * (1 - p / coarser))
    return dataclasses.replace(base, crop=(j0, j1, i0, i1),
                               scale=_scale(size, (i1 - i0, j1 - j0), (si / coarser, sj / coarser)))


def _scale(size: int, window_ij: tuple[int, int], scale: tuple[float, float]) -> tuple[float, float]:
    """``scale`` shrunk just enough that the window's rounded model size stays within ``size``."""
    fit = min(1.0, *(size / (n * s) for n, s in zip(window_ij, scale, strict=True)))
    return (scale[0] * fit, scale[1] * fit)
