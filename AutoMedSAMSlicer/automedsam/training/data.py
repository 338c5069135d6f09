"""Training data: cases, leak-free slice splits, augmentation and the on-disk embedding cache.

Geometry: label maps are brought onto each image's grid through physical space before anything
else; from then on a training item is a slice ``k`` of a case, in the backbone's model space
(S x S input, L x L mask grid), so augmentation and the cache never touch physical coordinates.

Augmentation and the frozen encoder: the encoder runs once per (slice, augmented copy). Copy 0 is
the slice itself; copies 1..A are random affine versions (rotation, shift, scale ~ Sam2Rad's
resized crops; horizontal flips only when no class is lateral, since a flip turns a left kidney
into a right one) applied to the model-space image (bilinear) and label map (nearest) together.
Their embeddings are stored once, as float16 in memory-mapped files, and every epoch reads them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import InvalidInputError
from ..framing import Framing, frame_slices
from ..io import read_image, read_segmentation
from ..orientation import Reorientation
from ..preprocess import IntensityConfig, normalize_intensity
from ..resample import labels_onto_grid
from ..selection import parse_slices
from ..volume import Volume

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AugmentConfig:
    """Augmented copies encoded once per training slice (copy 0 is the original).

    Attributes:
        copies: extra augmented copies per slice.
        rotation_deg, shift, scale: ranges of the random affine (degrees, fraction of S, factor).
        flips: horizontal flips; None = only when no class has a left/right modifier.
    """

    copies: int = 2
    rotation_deg: float = 10.0
    shift: float = 0.05
    scale: tuple[float, float] = (0.9, 1.1)
    flips: bool | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Case:
    """An image and its label map on the image's grid (KJI arrays).

    ``orientation`` is None for a case as read; :meth:`canonical` makes the case the model learns
    from (its slices in the nearest axial LPS order) and keeps the map from the stored grid there.
    """

    image: Volume
    labels: Volume
    name: str
    orientation: Reorientation | None = None

    def canonical(self) -> Case:
        """This case in the slice orientation the model learns from (see :mod:`automedsam.orientation`)."""
        if self.orientation is not None:
            return self
        o = Reorientation.nearest_axial_lps(self.image)
        return Case(o.volume(self.image), o.volume(self.labels), self.name, o)

    def select_slices(self, spec: str, what: str) -> list[int]:
        """The model slices a selection such as ``0::3`` names: the case's stored k-slices, mapped
        to the model's order (when the stored slices are not axial, the model's slices themselves)."""
        o = self.orientation
        if o is None or not o.keeps_slices:
            return parse_slices(spec, self.image.num_slices, what)
        return sorted(o.slice_to_canonical(k) for k in parse_slices(spec, o.source_shape[0], what))


def load_case(image_path: str, labels_path: str) -> Case:
    """Read an image and its labels (any voxel order; NIfTI, NRRD, DICOM, .seg.nrrd)."""
    image = read_image(image_path)
    labels = labels_onto_grid(read_segmentation(labels_path), image)
    return Case(image, labels, Path(str(image_path)).name)


#: Largest label value a label map can hold (uint32).
MAX_LABEL_VALUE = 2**32 - 1


def parse_class_mapping(spec: str) -> dict[str, int]:
    """``"liver=5,spleen=1"`` -> ``{"liver": 5, "spleen": 1}`` (label values of the label maps)."""
    out: dict[str, int] = {}
    for part in spec.split(","):
        name, _, value = part.strip().partition("=")
        value = value.strip()
        # ASCII digits only: str.isdigit() also accepts "²", which int() then refuses.
        if not name.strip() or not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= MAX_LABEL_VALUE:
            raise InvalidInputError(f"class mapping entry {part!r} must look like name=label_value with a label value "
                                    f"1..{MAX_LABEL_VALUE} (e.g. liver=5)")
        if name.strip() in out:
            raise InvalidInputError(f"class {name.strip()!r} is given twice in {spec!r}; name each class once")
        out[name.strip()] = int(value)
    if not out:
        raise InvalidInputError("no classes given (e.g. --classes liver=5,spleen=1)")
    return out


@dataclass
class SplitCase:
    case: Case
    train_slices: list[int]
    val_slices: list[int]


def split_slices(cases: list[Case], val_slices: str | None, val_cases: list[int] | None = None,
                 train_slices: str | None = None) -> list[SplitCase]:
    """Hold out slices (the same selection in every case) and/or whole cases for validation, or
    name the training slices (``train_slices``; then every other slice validates).

    A slice is either training or validation, never both; a validation case gives no training slice.
    """
    out = []
    for n, case in enumerate(cases):
        k = case.image.num_slices
        if val_cases and n in val_cases:
            out.append(SplitCase(case, [], list(range(k))))
            continue
        if train_slices:
            train = case.select_slices(train_slices, "--train-slices")
            val = [s for s in range(k) if s not in set(train)]
        else:
            val = case.select_slices(val_slices, "--val-slices") if val_slices else []
            train = [s for s in range(k) if s not in set(val)]
        out.append(SplitCase(case, train, val))
    if not any(s.train_slices for s in out):
        raise InvalidInputError("no training slices left after holding out the validation slices/cases")
    return out


def random_affine(rng: np.random.Generator, cfg: AugmentConfig, flips: bool) -> np.ndarray:
    """A 2x3 matrix in torch's normalised coordinates for ``affine_grid``."""
    a = np.deg2rad(rng.uniform(-cfg.rotation_deg, cfg.rotation_deg))
    s = rng.uniform(*cfg.scale)
    tx, ty = rng.uniform(-cfg.shift, cfg.shift, 2) * 2
    flip = -1.0 if flips and rng.random() < 0.5 else 1.0
    return np.array([[np.cos(a) / s * flip, -np.sin(a) / s, tx], [np.sin(a) / s * flip, np.cos(a) / s, ty]])


def augment_pair(image: np.ndarray, labels: np.ndarray, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Apply one affine to a model-space image ``(S, S, 3)`` (bilinear) and label map ``(S, S)``
    (nearest); padding stays 0."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    size = image.shape[0]
    grid = F.affine_grid(torch.tensor(theta, dtype=torch.float32)[None], [1, 1, size, size], align_corners=False)
    img = F.grid_sample(torch.from_numpy(image.transpose(2, 0, 1))[None], grid, mode="bilinear",
                        padding_mode="zeros", align_corners=False)[0].numpy().transpose(1, 2, 0)
    lab = F.grid_sample(torch.from_numpy(labels.astype(np.float32))[None, None], grid, mode="nearest",
                        padding_mode="zeros", align_corners=False)[0, 0].numpy()
    return np.ascontiguousarray(img), lab.astype(labels.dtype)


def downsample_labels(labels: np.ndarray, out_size: int) -> np.ndarray:
    """Model-space label map ``(S, S)`` -> ``(L, L)`` by the label at each low-res pixel centre."""
    size = labels.shape[0]
    idx = np.floor((np.arange(out_size) + 0.5) * size / out_size).astype(int)
    return labels[np.ix_(idx, idx)]


class TrainingData:
    """Encoded training items: embeddings (memory-mapped float16) and L x L label maps.

    Attributes:
        labels: ``(n, L, L)`` label values in model space per item.
        item_case, item_slice, item_copy: where each item comes from.
    """

    def __init__(self, folder: Path, n: int, shapes: dict[str, tuple[int, ...]], mode: str):
        self.folder = folder
        self.arrays = {name: np.lib.format.open_memmap(folder / f"{name}.npy", mode=mode, dtype=np.float16,
                                                       shape=(n, *shape) if mode == "w+" else None)
                       for name, shape in shapes.items()}

    def put(self, n: int, features, index: int) -> None:
        """Store item ``n`` from batch entry ``index`` of ``features`` (an ImageFeatures)."""
        self.arrays["embeddings"][n] = features.embeddings[index].cpu().numpy()
        for h, tensor in enumerate(features.high_res):
            self.arrays[f"high_res_{h}"][n] = tensor[index].cpu().numpy()

    def features(self, index: np.ndarray, device):
        import torch

        from ..backbones import ImageFeatures

        def get(name):
            return torch.from_numpy(np.asarray(self.arrays[name][index], dtype=np.float32)).to(device)

        high = tuple(get(f"high_res_{n}") for n in range(len(self.arrays) - 1))
        return ImageFeatures(get("embeddings"), high)


def encode_training_items(split: list[SplitCase], backbone, intensity: IntensityConfig, framing: Framing,
                          augment: AugmentConfig, lateral: bool, seed: int, cache_root: Path,
                          known: list | None = None):
    """Generator: encodes every (training slice, copy) once; yields ``(done, total)`` progress and
    finally the :class:`TrainingData` plus per-item metadata arrays.

    ``known``: per split case, an :class:`~automedsam.embeddings.EmbeddingStore` of its image with
    the same intensity (a session's) or None; copy 0 of a slice (the slice itself) is read from it
    instead of encoded again.

    The cache folder is keyed by the cases' content, backbone, preprocessing, augmentation and seed,
    so an identical rerun (or a resumed run) reads it instead of encoding again.
    """
    flips = (not lateral) if augment.flips is None else augment.flips
    transforms = [frame_slices(backbone, s.case.image, framing, intensity) for s in split]
    key_src = json.dumps({
        "cases": [(s.case.image.content_hash(), s.case.labels.content_hash(), s.train_slices) for s in split],
        "backbone": [backbone.id, backbone.weights_fingerprint, backbone.input_size],
        "intensity": intensity.to_dict(), "augment": augment.to_dict(), "flips": flips, "seed": seed,
        "framing": [t.describe() for t in transforms],
    }, sort_keys=True)
    folder = cache_root / hashlib.sha256(key_src.encode()).hexdigest()[:24]
    rng = np.random.default_rng(seed)
    plan = [(ci, k, c) for ci, s in enumerate(split) for k in s.train_slices for c in range(augment.copies + 1)]
    thetas = [random_affine(rng, augment, flips) if c else None for _, _, c in plan]
    e, low = backbone.embedding_size, backbone.mask_size
    shapes = {"embeddings": (256, e, e), **backbone.high_res_shapes()}
    done_marker = folder / "complete.json"
    meta = {"case": np.array([p[0] for p in plan]), "slice": np.array([p[1] for p in plan]),
            "copy": np.array([p[2] for p in plan])}
    if done_marker.exists():
        labels = np.load(folder / "labels.npy")
        yield len(plan), len(plan)
        yield TrainingData(folder, len(plan), shapes, "r"), labels, meta
        return
    folder.mkdir(parents=True, exist_ok=True)
    data = TrainingData(folder, len(plan), shapes, "w+")
    labels = np.zeros((len(plan), low, low), np.uint16)
    normalized = [normalize_intensity(s.case.image.array, intensity.value_range(s.case.image.array)) for s in split]
    batch = 4
    for start in range(0, len(plan), batch):
        todo, images = [], []
        for n in range(start, min(start + batch, len(plan))):
            ci, k, _ = plan[n]
            t = transforms[ci]
            img = t.image_to_model(normalized[ci][k])
            lab = t.mask_to_model(split[ci].case.labels.array[k])
            if thetas[n] is not None:
                img, lab = augment_pair(img, lab, thetas[n])
            labels[n] = downsample_labels(lab, low)
            if thetas[n] is None and known is not None and known[ci] is not None:
                data.put(n, known[ci].features(k), 0)
            else:
                todo.append(n)
                images.append(img)
        if images:
            feats = backbone.encode(np.stack(images))
            for idx, n in enumerate(todo):
                data.put(n, feats, idx)
        yield min(start + batch, len(plan)), len(plan)
    for array in data.arrays.values():
        array.flush()
    np.save(folder / "labels.npy", labels)
    done_marker.write_text(json.dumps({"items": len(plan)}))
    yield TrainingData(folder, len(plan), shapes, "r"), labels, meta
