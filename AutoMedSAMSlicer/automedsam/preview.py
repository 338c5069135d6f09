"""A picture to check a segmentation at a glance: a PNG montage of a few axial slices and one
coronal slice with every class's mask overlaid in its colour (filled, with an opaque outline).

Orientation: whatever the volume's voxel order (KJI array, any direction matrix), the slices are
shown the radiological way. The array is first reordered and flipped to the nearest LPS axes
(index increasing towards patient Left, Posterior, Superior; an oblique volume goes to the axes
closest to its own), then

- axial tiles: anterior at the top, the patient's right on the left of the picture;
- the coronal tile: superior at the top, the patient's right on the left,

each drawn in physical proportions (millimetres, not voxels) in a box 256 pixels high. Axial slices are taken at 20, 40,
60 and 80 % of the superior-inferior extent of all masks together (of the whole volume when
every mask is empty); the coronal one through the masks' centre.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .errors import InvalidInputError
from .io import temporary_name
from .preprocess import IntensityConfig, normalize_intensity
from .volume import Volume

#: Height in pixels of each tile of the montage.
TILE_PX = 256
#: Opacity of the filled masks (their outlines are opaque).
FILL_ALPHA = 0.35


def to_lps_axes(volume: Volume, arrays: Sequence[np.ndarray]) -> tuple[list[np.ndarray], tuple[float, float, float]]:
    """Reorder ``(K, J, I)`` arrays of ``volume``'s grid to ``(S, P, L)``: axis 0 increasing towards
    Superior, axis 1 towards Posterior, axis 2 towards the patient's Left (nearest axes of the
    direction matrix). Returns the reordered arrays (views) and their voxel spacing in mm in that
    order."""
    direction = np.asarray(volume.direction, float).reshape(3, 3)  # columns: i, j, k axes in LPS
    array_axis_of_index = {0: 2, 1: 1, 2: 0}  # index axis (i, j, k) -> array axis (KJI)
    order: list[int] = [0, 0, 0]
    flips: list[bool] = [False, False, False]
    spacing = [0.0, 0.0, 0.0]
    # Physical axes L (0), P (1), S (2) -> target array positions 2, 1, 0.
    used: set[int] = set()
    for physical, target in ((2, 0), (1, 1), (0, 2)):
        weights = [abs(direction[physical, index]) if index not in used else -1.0 for index in range(3)]
        index = int(np.argmax(weights))
        used.add(index)
        order[target] = array_axis_of_index[index]
        flips[target] = direction[physical, index] < 0
        spacing[target] = float(volume.spacing[index])
    out = []
    for array in arrays:
        moved = np.transpose(array[..., 0] if array.ndim == 4 else array, order)
        for axis, flip in enumerate(flips):
            if flip:
                moved = np.flip(moved, axis)
        out.append(moved)
    return out, (spacing[0], spacing[1], spacing[2])


def _slices_to_show(union_s: np.ndarray, count: int) -> list[int]:
    """Axial positions (S index) at 20..80 % of the masks' extent, else of the whole volume."""
    filled = np.flatnonzero(union_s)
    lo, hi = (int(filled[0]), int(filled[-1])) if filled.size else (0, len(union_s) - 1)
    picks = [round(lo + (hi - lo) * f) for f in np.linspace(0.2, 0.8, count)] if count > 1 else [(lo + hi) // 2]
    return list(dict.fromkeys(int(p) for p in picks))


def _tile(gray: np.ndarray, masks: list[tuple[np.ndarray, tuple[int, int, int]]], size_mm: tuple[float, float]):
    """One RGB tile (PIL image) of a 2-D grey slice with its masks, scaled to physical proportions."""
    from PIL import Image
    from scipy import ndimage

    rgb = np.repeat((gray * 255).astype(np.float32)[..., None], 3, axis=2)
    for mask, color in masks:
        if not mask.any():
            continue
        rgb[mask] = (1 - FILL_ALPHA) * rgb[mask] + FILL_ALPHA * np.asarray(color, np.float32)
        outline = mask & ~ndimage.binary_erosion(mask)
        rgb[outline] = color
    height_mm, width_mm = size_mm
    # Physical proportions inside a box TILE_PX high and 2 TILE_PX wide (a thin slab's coronal
    # slice would otherwise be a strip thousands of pixels wide).
    scale = min(TILE_PX / height_mm, 2 * TILE_PX / width_mm)
    picture = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    return picture.resize((max(1, round(width_mm * scale)), max(1, round(height_mm * scale))),
                          Image.Resampling.NEAREST)


def render_preview(volume: Volume, masks: Mapping[str, np.ndarray], colors: Mapping[str, tuple[int, int, int]],
                   title: str = "", lines: Sequence[str] = (), intensity: IntensityConfig | None = None,
                   axial: int = 4):
    """The montage as a PIL RGB image.

    Args:
        volume: the image (KJI array, LPS geometry).
        masks: class name -> ``(K, J, I)`` bool mask on ``volume``'s grid.
        colors: class name -> RGB 0..255.
        title: first caption line (e.g. the case id); ``lines``: more caption lines (scores).
        intensity: display window (the bundle's; default: CT abdomen for integer CT-like data, the
            0.5-99.5 percentiles otherwise).
        axial: number of axial tiles.
    """
    from PIL import Image, ImageDraw, ImageFont

    if volume.is_rgb:
        raise InvalidInputError("a preview needs a scalar volume, not a colour picture")
    for name, mask in masks.items():
        if mask.shape != volume.array.shape[:3]:
            raise InvalidInputError(f"mask {name!r} has shape {mask.shape}, the volume {volume.array.shape[:3]}")
    if intensity is None:
        intensity = IntensityConfig.ct() if float(np.min(volume.array)) < -500 else IntensityConfig.mr()
    image = normalize_intensity(volume.array, intensity.value_range(volume.array))
    names = list(masks)
    (image, *reordered), (s_s, s_p, s_l) = to_lps_axes(volume, [image, *(np.asarray(masks[n], bool) for n in names)])
    union = np.zeros(image.shape, bool)
    for m in reordered:
        union |= m
    tiles = []
    for s in _slices_to_show(union.any(axis=(1, 2)), axial):
        tiles.append(_tile(image[s], [(m[s], colors[n]) for m, n in zip(reordered, names, strict=True)],
                           (image.shape[1] * s_p, image.shape[2] * s_l)))
    p_centre = int(np.flatnonzero(union.any(axis=(0, 2))).mean()) if union.any() else image.shape[1] // 2
    tiles.append(_tile(image[::-1, p_centre], [(m[::-1, p_centre], colors[n]) for m, n in zip(reordered, names,
                                                                                              strict=True)],
                       (image.shape[0] * s_s, image.shape[2] * s_l)))
    font = ImageFont.load_default()
    captions = [title, *lines] if title else list(lines)
    legend_h = 18
    caption_h = 16 * len(captions) + legend_h + 8
    width = sum(t.width for t in tiles) + 4 * (len(tiles) + 1)
    canvas = Image.new("RGB", (width, TILE_PX + caption_h + 8), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    y = 4
    for text in captions:
        draw.text((6, y), text, fill=(255, 255, 255), font=font)
        y += 16
    x = 6
    for name in names:
        draw.rectangle((x, y + 2, x + 10, y + 12), fill=tuple(colors[name]))
        draw.text((x + 14, y), name, fill=(255, 255, 255), font=font)
        x += 24 + int(draw.textlength(name, font=font))
    x = 4
    for tile in tiles:
        canvas.paste(tile, (x, caption_h + 4 + (TILE_PX - tile.height) // 2))
        x += tile.width + 4
    return canvas


def write_preview(path: str | os.PathLike, *args, **kwargs) -> Path:
    """Render (see :func:`render_preview`) and save as PNG atomically (written aside, then renamed)."""
    p = Path(path)
    if p.suffix.lower() != ".png":
        raise InvalidInputError(f"a preview is a PNG picture; name it *.png, not {p.name}")
    if not p.parent.is_dir():
        raise InvalidInputError(f"preview folder {p.parent} does not exist; create it first")
    picture = render_preview(*args, **kwargs)
    tmp = temporary_name(p, ".png")
    picture.save(tmp, format="PNG", optimize=False)
    os.replace(tmp, p)
    return p
