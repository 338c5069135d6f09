"""Label maps with named, coloured, terminology-coded segments (the model of a ``.seg.nrrd``).

A :class:`Segmentation` is one or more integer label-map layers on a single voxel grid. Slicer
stores non-overlapping segments in one layer and adds a layer wherever segments overlap; each
:class:`SegmentInfo` says which layer and label value hold it. Arrays are KJI-indexed like
:class:`~automedsam.volume.Volume`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from .errors import InvalidInputError
from .volume import Volume


@dataclass(frozen=True)
class SegmentInfo:
    """One segment of a segmentation.

    Attributes:
        name: display name ("liver").
        label_value: the integer that marks the segment's voxels in its layer (>= 1).
        color: RGB in 0..1.
        terminology: Slicer terminology entry string (``contextName~SCT^code^meaning~...``) or None.
        segment_id: Slicer segment id; defaults to the name.
        layer: index of the label-map layer holding the segment.
    """

    name: str
    label_value: int
    color: tuple[float, float, float] = (0.5, 0.5, 0.5)
    terminology: str | None = None
    segment_id: str = ""
    layer: int = 0

    def __post_init__(self) -> None:
        if int(self.label_value) < 1:
            raise InvalidInputError(f"segment {self.name!r}: label value must be >= 1, got {self.label_value}")
        color = tuple(float(c) for c in self.color)
        if len(color) != 3 or not all(0.0 <= c <= 1.0 for c in color):
            raise InvalidInputError(f"segment {self.name!r}: color must be 3 floats in 0..1, got {self.color}")
        object.__setattr__(self, "color", color)
        object.__setattr__(self, "label_value", int(self.label_value))
        if not self.segment_id:
            object.__setattr__(self, "segment_id", self.name)


@dataclass(frozen=True, eq=False)
class Segmentation:
    """Integer label-map layer(s) plus segment metadata on one grid.

    Attributes:
        layers: one or more integer label maps, each a :class:`Volume` of shape (K, J, I) on the
            same grid.
        segments: metadata of every segment; ``segment.layer`` indexes ``layers``.
    """

    layers: tuple[Volume, ...]
    segments: tuple[SegmentInfo, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not self.layers:
            raise InvalidInputError("a segmentation needs at least one label-map layer")
        grid = self.layers[0]
        for n, layer in enumerate(self.layers):
            if layer.is_rgb or not (np.issubdtype(layer.array.dtype, np.integer) or layer.array.dtype == bool):
                raise InvalidInputError(f"label-map layer {n} must be an integer array, got {layer.array.dtype}")
            if n and not layer.same_grid(grid):
                raise InvalidInputError(f"label-map layer {n} is not on the grid of layer 0")
        for seg in self.segments:
            if seg.layer >= len(self.layers):
                raise InvalidInputError(f"segment {seg.name!r} refers to missing layer {seg.layer}")
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "segments", tuple(self.segments))

    @property
    def grid(self) -> Volume:
        """The first layer; its geometry is the segmentation's geometry."""
        return self.layers[0]

    def segment(self, key: str | int) -> SegmentInfo:
        """Find a segment by name, id or (in layer 0) label value."""
        for seg in self.segments:
            if key in (seg.name, seg.segment_id) or (isinstance(key, int) and seg.label_value == key
                                                      and seg.layer == 0):
                return seg
        names = ", ".join(s.name for s in self.segments) or "(none)"
        raise InvalidInputError(f"no segment {key!r} in the segmentation; it has: {names}")

    def mask(self, key: str | int) -> np.ndarray:
        """Boolean KJI mask of one segment (by name, id or label value)."""
        seg = self.segment(key)
        return self.layers[seg.layer].array == seg.label_value

    def label_volume(self) -> Volume:
        """A single-layer label map. Overlapping layers are merged, later layers winning, with
        label values renumbered only if two layers use the same value."""
        if len(self.layers) == 1:
            return self.grid
        out = np.zeros(self.grid.array.shape, dtype=np.uint16)
        for seg in self.segments:
            out[self.mask(seg.segment_id)] = seg.label_value
        return self.grid.with_array(out)

    @classmethod
    def from_label_volume(cls, labels: Volume, segments: list[SegmentInfo] | None = None) -> Segmentation:
        """Wrap a single integer label map; without ``segments`` every value > 0 becomes a
        segment named ``label_<value>``."""
        if segments is None:
            values = [int(v) for v in np.unique(labels.array) if v > 0]
            segments = [SegmentInfo(name=f"label_{v}", label_value=v) for v in values]
        return cls((labels,), tuple(replace(s, layer=0) for s in segments))
