"""Interactive correction of one slice with points and boxes, as SAM's own loop: a refine builds
on what was placed before on that (class, slice) (its points, its box unless a new one is given,
and the previous low-resolution logits as the mask prompt), as long as the slice still shows the
mask that refine wrote. Box-only backbones (LiteMedSAM) edit the current mask locally per click.

Voxel coordinates in: points ``(N, 2)`` as (i, j) on slice k, boxes (i0, j0, i1, j1) extreme voxel
indices; masks out: ``(J, I)`` bool on the slice. Model coordinates (x, y in the backbone's input)
stay inside this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .errors import InvalidInputError

if TYPE_CHECKING:
    import torch

    from .automatic import LearnedPrompts
    from .embeddings import EmbeddingStore


@dataclass(frozen=True)
class Interaction:
    """Prompts placed so far on one (class, slice), in model coordinates, and their result."""

    mode: str
    points: np.ndarray | None  # (1, N, 2) model (x, y)
    labels: np.ndarray | None  # (1, N)
    box: np.ndarray | None  # (1, 4) model (x0, y0, x1, y1)
    logits: torch.Tensor | None  # (1, 1, L, L) low-resolution logits, the next mask prompt
    mask: np.ndarray  # (J, I) bool: what the refine wrote


def _without_placed(points, labels, state: Interaction):
    """``(1, N, 2)`` model points and ``(1, N)`` labels minus those already placed in ``state``."""
    if points is None or state.points is None:
        return points, labels
    placed = state.points[0]
    fresh = [n for n, p in enumerate(points[0])
             if not any(np.allclose(p, q, atol=1e-6) and labels[0, n] == state.labels[0, m]
                        for m, q in enumerate(placed))]
    if not fresh:
        return None, None
    return points[:, fresh], labels[:, fresh]


def _placed(state: Interaction | None, points, labels):
    """All points of the interaction: the earlier ones, then the new ones."""
    if state is None or state.points is None:
        return points, labels
    if points is None:
        return state.points, state.labels
    return np.concatenate([state.points, points], axis=1), np.concatenate([state.labels, labels], axis=1)


def distance_to_outside(side: np.ndarray, j: int, i: int) -> float:
    """Euclidean distance (voxels) from (j, i) to the nearest voxel of the ``(J, I)`` slice outside
    ``side``, the slice's border counting as outside. Computed in a window around the voxel that
    doubles until the answer cannot lie beyond it: a click costs its neighbourhood, not the slice."""
    from scipy import ndimage

    height, width = side.shape
    reach = 16
    while True:
        j0, j1, i0, i1 = max(j - reach, 0), min(j + reach + 1, height), max(i - reach, 0), min(i + reach + 1, width)
        # Padding marks the window's edge as outside: exact at the slice's border; elsewhere it lies
        # more than ``reach`` away, so any distance up to ``reach`` is the true one.
        depth = float(ndimage.distance_transform_edt(np.pad(side[j0:j1, i0:i1], 1))[j - j0 + 1, i - i0 + 1])
        if depth <= reach or (j0, i0, j1, i1) == (0, 0, height, width):
            return depth
        reach *= 2


def disk_bounds(shape: tuple[int, int], j: int, i: int, radius: float) -> tuple[int, int, int, int]:
    """``(j0, j1, i0, i1)``: the half-open voxel ranges of the square around the disk of ``radius``
    (voxels) at (j, i), clipped to a ``(J, I)`` slice."""
    r = int(np.floor(radius))
    return max(j - r, 0), min(j + r + 1, shape[0]), max(i - r, 0), min(i + r + 1, shape[1])


def disk(shape: tuple[int, int], j: int, i: int, radius: float) -> np.ndarray:
    """``(J, I)`` bool: the voxels within ``radius`` (voxels) of (j, i)."""
    out = np.zeros(shape, bool)
    j0, j1, i0, i1 = disk_bounds(shape, j, i, radius)
    jj, ii = np.ogrid[j0:j1, i0:i1]
    out[j0:j1, i0:i1] = (jj - j) ** 2 + (ii - i) ** 2 <= radius ** 2
    return out


class Refiner:
    """Refines slices of the store's volume; remembers each (class, slice)'s interaction."""

    def __init__(self, store: EmbeddingStore, learned: LearnedPrompts, mask_threshold: float = 0.0):
        self.store = store
        self.learned = learned
        self.mask_threshold = mask_threshold
        self._interactions: dict[tuple[str, int], Interaction] = {}

    def clear(self) -> None:
        self._interactions = {}

    def refine(self, name: str, k: int, current: np.ndarray | None, points=None, point_labels=None, box=None,
               mode: str = "manual", reset: bool = False) -> np.ndarray:
        """The new ``(J, I)`` mask of class ``name`` on slice k, whose current ``(J, I)`` mask is
        ``current`` (None: the class has none). See :meth:`automedsam.engine.Engine.refine`."""
        with self.store.backbone.one_torch_thread():
            return self._refine(name, k, current, points, point_labels, box, mode, reset)

    def _refine(self, name: str, k: int, current: np.ndarray | None, points, point_labels, box, mode: str,
                reset: bool) -> np.ndarray:
        backbone = self.store.backbone
        new_points, new_labels, new_box = self.manual_prompts(points, point_labels, box)
        state = None if reset else self._interaction(name, k, mode, current)
        if state is not None:  # a caller that re-sends every point (Slicer's markups) adds none twice
            new_points, new_labels = _without_placed(new_points, new_labels, state)
            if new_box is not None and state.box is not None and np.allclose(new_box, state.box):
                new_box = None
        pts, lbl = _placed(state, new_points, new_labels)
        bx = new_box if new_box is not None else (state.box if state is not None else None)
        if backbone.box_only:
            if new_points is not None or (state is not None and new_box is None):
                mask = self._click_edits(name, k, current, mode, new_points, new_labels, new_box)
                self._interactions[(name, k)] = Interaction(mode, pts, lbl, bx, None, mask.copy())
                return mask
            # a new box (or the first prompt) starts over: no points, no logits as a mask prompt
            return self._decode(name, k, mode, None, None, bx, None, None)
        return self._decode(name, k, mode, pts, lbl, bx, state.logits if state is not None else None, current)

    def _decode(self, name: str, k: int, mode: str, pts, lbl, bx, previous, shown: np.ndarray | None) -> np.ndarray:
        """Decode the slice's mask from the interaction's prompts (model space): points ``pts``
        ``(1, N, 2)`` with ``lbl``, box ``bx`` ``(1, 4)``, the previous low-resolution logits (or,
        in semi mode, the logits of the ``shown`` mask) as the mask prompt; remembers the interaction."""
        import torch

        from .prompt_networks import decoder_prompts

        backbone = self.store.backbone
        if mode == "manual" and pts is None and bx is None:
            raise InvalidInputError("manual refine needs at least one point or a box")
        with torch.inference_mode():
            feats = self.store.features(k)
            gen = self.learned.prompts(name, k, feats) if mode == "semi" else None
            if previous is None and mode == "semi" and shown is not None:
                previous = self.learned.shown_logits(name, k, shown, self.mask_threshold)
            sparse, dense = decoder_prompts(backbone, gen, pts, lbl, bx, masks=previous)
            # A single click alone is ambiguous (SAM's advice): decode 3 candidates and keep the best.
            multimask = gen is None and bx is None and previous is None and pts is not None and pts.shape[1] == 1
            out = backbone.decode(feats, sparse, dense, multimask=multimask)
            pick = int(out.iou[0].argmax()) if multimask else 0
            logits = out.mask_logits[0, pick].float()
        mask = (self.store.transform.logits_to_slice(logits.cpu()) > self.mask_threshold).numpy()
        self._interactions[(name, k)] = Interaction(mode, pts, lbl, bx, logits[None, None], mask.copy())
        return mask

    def _interaction(self, name: str, k: int, mode: str, current: np.ndarray | None) -> Interaction | None:
        """The prompts placed so far on (class, slice), if the slice still shows their result."""
        state = self._interactions.get((name, k))
        if state is None or state.mode != mode or current is None or not np.array_equal(current, state.mask):
            self._interactions.pop((name, k), None)
            return None
        return state

    def _click_edits(self, name: str, k: int, current: np.ndarray | None, mode: str, points, labels,
                     box) -> np.ndarray:
        """Clicks on a backbone trained with boxes only (LiteMedSAM), whose masks get worse with
        point prompts or its own logits as a mask prompt: each click edits the slice's current
        mask locally. The model proposes the region at the click (its best of three candidates for
        that single point); a + click adds the part of it outside the mask that touches the click, a -
        click removes the part inside the mask that touches the click, both within the click's
        reach: twice its distance to the mask's edge plus 2 voxels (and at least the click's voxel).
        "Touches" is judged inside the square around that reach. Far parts of the mask never
        change. The start is the slice's current mask, or what the box (or, in semi mode, the
        learned prompts) decodes to when a box is given or the slice is empty.
        """
        import torch
        from scipy import ndimage

        from .prompt_networks import decoder_prompts

        backbone, t = self.store.backbone, self.store.transform
        mask = current.copy() if box is None and current is not None and current.any() else None
        with torch.inference_mode():
            feats = self.store.features(k)
            if mask is None and (box is not None or mode == "semi"):
                gen = self.learned.prompts(name, k, feats) if mode == "semi" else None
                sparse, dense = decoder_prompts(backbone, gen, None, None, box)
                logits = backbone.decode(feats, sparse, dense).mask_logits[0, 0].float().cpu()
                mask = (t.logits_to_slice(logits) > self.mask_threshold).numpy()
            if mask is None:
                mask = np.zeros(self.store.require_volume().array.shape[1:3], bool)
            if points is None:
                return mask
            voxels = t.points_from_model(points[0])
            for (x, y), (fi, fj), label in zip(points[0], voxels, labels[0], strict=True):
                i, j = int(np.clip(round(fi), 0, mask.shape[1] - 1)), int(np.clip(round(fj), 0, mask.shape[0] - 1))
                side = ~mask if label == 1 else mask  # where this click can change voxels
                # Reach: a click far from the mask's edge fixes a large error, one next to it a
                # sliver; the edit stays within twice that distance (plus 2 voxels) of the click,
                # so the model's proposal is only needed there (a decode window: the decoder's
                # upscaling then costs that area, not the slice).
                reach = 2 * distance_to_outside(side, j, i) + 2
                crop = disk_bounds(mask.shape, j, i, reach)
                area = (slice(crop[0], crop[1]), slice(crop[2], crop[3]))
                sparse, dense = backbone.embed_prompts(np.array([[[x, y]]]), np.array([[1]]))
                out = backbone.decode(feats, sparse, dense, multimask=True,
                                      window=t.logits_window(crop, backbone.mask_size))
                best = int(out.iou[0].argmax())
                proposal = t.logits_to_slice(out.mask_logits[0, best].float().cpu(), crop).numpy() > self.mask_threshold
                parts, _ = ndimage.label(proposal & side[area])
                cj, ci = j - crop[0], i - crop[2]
                touched = parts == parts[cj, ci] if parts[cj, ci] else np.zeros_like(proposal)
                touched &= disk(proposal.shape, cj, ci, reach)
                touched |= disk(proposal.shape, cj, ci, np.sqrt(2))
                mask[area] = (mask[area] | touched) if label == 1 else (mask[area] & ~touched)
        return mask

    def manual_prompts(self, points, point_labels, box):
        """Voxel prompts checked and mapped to model space: ``(1, N, 2)`` points, ``(1, N)`` labels,
        ``(1, 4)`` box (each None when not given)."""
        t = self.store.transform
        pts = lbl = bx = None
        if points is not None and len(points):
            p = np.asarray(points, dtype=float)
            if p.ndim == 1 and p.size == 2:
                p = p[None]
            if p.ndim != 2 or p.shape[1] != 2:
                raise InvalidInputError(f"points must be (i, j) pairs, got an array of shape {p.shape}")
            labels = np.ones(len(p), int) if point_labels is None else np.asarray(point_labels).reshape(-1)
            if labels.shape != (len(p),) or not np.isin(labels, (0, 1)).all():
                raise InvalidInputError(f"point_labels must be {len(p)} values of 1 (include) or 0 (exclude)")
            t.check_points(p, "point")
            pts, lbl = t.points_to_model(p)[None], labels[None]
        if box is not None:
            b = np.asarray(box, dtype=float).reshape(-1)
            if b.shape != (4,) or b[0] > b[2] or b[1] > b[3]:
                raise InvalidInputError(f"box must be (i0, j0, i1, j1) with i0 <= i1 and j0 <= j1, got {box}")
            t.check_points(b.reshape(2, 2), "box corner")
            bx = t.box_to_model(b)[None]
        return pts, lbl, bx
