"""Bringing one volume onto another's voxel grid through physical (LPS) space.

Label maps are never paired with images voxel-by-voxel: two files of the same patient may store
the same physical space in different voxel orders (a flipped axis, another origin). Every voxel
centre of the target grid is mapped to LPS millimetres and looked up in the source with
SimpleITK's resampler (nearest neighbour for labels).
"""

from __future__ import annotations

import logging

import numpy as np

from .errors import GeometryError
from .io import as_label_array, sitk_to_volume, volume_to_sitk
from .segmentation import Segmentation
from .volume import Volume

log = logging.getLogger(__name__)


def resample_to_grid(source: Volume, reference: Volume, *, interpolation: str = "nearest",
                     default_value: float = 0.0) -> Volume:
    """Resample ``source`` onto ``reference``'s grid (shape, spacing, origin, direction).

    Args:
        source: volume to resample (KJI array, LPS geometry).
        reference: the target grid; its voxel values are not used.
        interpolation: ``"nearest"`` (labels) or ``"linear"`` (intensities).
        default_value: value for target voxels whose centre falls outside ``source``.

    Returns:
        A volume with ``reference``'s geometry and ``source``'s dtype.
    """
    import SimpleITK as sitk

    if source.same_grid(reference):
        return reference.with_array(source.array, name=source.name)
    methods = {"nearest": sitk.sitkNearestNeighbor, "linear": sitk.sitkLinear}
    if interpolation not in methods:
        raise ValueError(f"interpolation must be one of {sorted(methods)}, got {interpolation!r}")
    ref_img = volume_to_sitk(reference.with_array(np.zeros(reference.array.shape[:3], np.uint8)))
    out = sitk.Resample(volume_to_sitk(source), ref_img, sitk.Transform(), methods[interpolation],
                        default_value)
    result = sitk_to_volume(out, name=source.name, allow_rgb=source.is_rgb)
    return reference.with_array(result.array.astype(source.array.dtype, copy=False), name=source.name)


def physical_coverage(source: Volume, reference: Volume) -> float:
    """Fraction (0..1) of ``reference``'s voxel centres that fall inside ``source``'s grid."""
    if source.same_grid(reference):
        return 1.0
    ones = source.with_array(np.ones(source.array.shape[:3], dtype=np.uint8))
    covered = resample_to_grid(ones, reference, interpolation="nearest", default_value=0)
    return float(np.count_nonzero(covered.array)) / covered.array.size


def labels_onto_grid(labels: Volume | Segmentation, image: Volume, *, min_coverage: float = 0.0) -> Volume:
    """Bring a label map onto an image's grid through physical space (nearest neighbour).

    Args:
        labels: an integer label map (or a segmentation, merged to one label map) on any grid.
        image: the image whose grid (KJI array shape, LPS geometry) the result takes.
        min_coverage: raise if less than this fraction of the image lies inside the label map
            (0 means: only raise when they do not overlap at all).

    Returns:
        An unsigned-integer label volume on ``image``'s grid.

    Raises:
        GeometryError: the label map and the image do not overlap in physical space (wrong file,
            or a header with a wrong origin/direction).
        InvalidInputError: non-integer or negative label values.
    """
    if isinstance(labels, Segmentation):
        labels = labels.label_volume()
    labels = labels.with_array(as_label_array(labels.array, f"label map {labels.name}".strip()))
    coverage = physical_coverage(labels, image)
    if coverage <= 0.0 or coverage < min_coverage:
        raise GeometryError(
            f"label map {labels.name or ''} covers {coverage:.1%} of image {image.name or ''} in physical "
            f"space (labels: origin {np.round(labels.origin, 2).tolist()} mm LPS, size {labels.shape_ijk}; "
            f"image: origin {np.round(image.origin, 2).tolist()} mm LPS, size {image.shape_ijk}). "
            "Check that both files belong to the same scan and that their headers are intact."
        )
    if coverage < 1.0:
        log.warning("label map %s covers only %.1f%% of image %s; the rest is labelled 0",
                    labels.name, 100 * coverage, image.name)
    return resample_to_grid(labels, image, interpolation="nearest", default_value=0)


def label_statistics(labels: Volume) -> dict[int, dict]:
    """Per label value > 0: voxel count and bounding box as inclusive min/max voxel index in
    (i, j, k) order of ``labels``' grid.

    Returns:
        ``{value: {"voxels": int, "min_ijk": [i, j, k], "max_ijk": [i, j, k]}}`` sorted by value.
    """
    from scipy import ndimage

    array = as_label_array(labels.array)
    counts = np.bincount(array.reshape(-1))
    boxes = ndimage.find_objects(array)
    stats: dict[int, dict] = {}
    for value, box in enumerate(boxes, start=1):
        if box is None:
            continue
        k, j, i = box
        stats[value] = {
            "voxels": int(counts[value]),
            "min_ijk": [i.start, j.start, k.start],
            "max_ijk": [i.stop - 1, j.stop - 1, k.stop - 1],
        }
    return stats
