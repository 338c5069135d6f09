"""Model bundles: a trained prompt generator (plus any fine-tuned mask decoder) and its facts.

A bundle is a folder or a ``.zip`` holding ``manifest.json`` (validated against
``catalog/bundle.schema.json``: name, version, backbone id and weights fingerprint, generator type
and config, classes with colours and SNOMED CT codes, preprocessing, training facts and metrics)
and ``weights.safetensors`` (keys ``generator.*`` and, if fine-tuned, ``mask_decoder.*``).

Loading checks the format version, the weights file's sha256 against the manifest, that the
backbone is the one the bundle was trained with (id and weights fingerprint), and loads weights with
a strict key check.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__
from .catalog import load_validated
from .classes import ClassCatalog, ClassInfo
from .errors import CatalogError, InvalidInputError, WeightsLoadError
from .preprocess import IntensityConfig

if TYPE_CHECKING:
    import torch

    from .backbones import Backbone

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"


@dataclass(frozen=True, eq=False)
class ModelBundle:
    """A loaded bundle: the validated manifest and its tensors (CPU)."""

    manifest: dict
    tensors: dict
    path: Path | None = None

    # -------------------------------------------------------------------------------- facts
    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def generator_type(self) -> str:
        return self.manifest["generator"]["type"]

    @property
    def backbone_id(self) -> str:
        return self.manifest["backbone"]["id"]

    @property
    def backbone_weights(self) -> str:
        """``"random:seed=N"`` or ``"sha256:<hex>"``."""
        return self.manifest["backbone"]["weights"]

    @property
    def classes(self) -> list[ClassInfo]:
        """Classes in generator index order."""
        items = sorted(self.manifest["classes"], key=lambda c: c["index"])
        return [ClassInfo.from_dict({k: v for k, v in c.items() if k != "index"}) for c in items]

    @property
    def intensity(self) -> IntensityConfig:
        return IntensityConfig(**self.manifest["preprocessing"]["intensity"])

    def class_index(self, name: str) -> int:
        """Generator index of a class name or alias; unknown names list the bundle's classes."""
        catalog = ClassCatalog(self.classes)
        if name not in catalog:
            raise InvalidInputError(
                f"class {name!r} is not in bundle {self.name!r}; it has: {', '.join(catalog.names())}"
            )
        return catalog.names().index(catalog.get(name).name)

    # ---------------------------------------------------------------------------- building
    def check_backbone(self, backbone: Backbone) -> None:
        """Raise if ``backbone`` is not the one this bundle was trained with."""
        if backbone.id != self.backbone_id:
            raise InvalidInputError(
                f"bundle {self.name!r} was trained for backbone {self.backbone_id}, not {backbone.id}; "
                f"build backbone {self.backbone_id} to use it"
            )
        if backbone.weights_fingerprint != self.backbone_weights:
            raise InvalidInputError(
                f"bundle {self.name!r} needs {self.backbone_id} weights {self.backbone_weights}, but the backbone "
                f"has {backbone.weights_fingerprint}; its prompts would not fit these image features"
            )

    def build_generator(self, device=None) -> torch.nn.Module:
        """The prompt generator with the bundle's weights (eval mode)."""
        from .generators import build_generator

        generator = build_generator(self.generator_type, dict(self.manifest["generator"]["config"]))
        state = {k[len("generator."):]: v for k, v in self.tensors.items() if k.startswith("generator.")}
        _load_strict(generator, state, f"bundle {self.name!r} generator")
        return generator.eval().to(device) if device is not None else generator.eval()

    def apply_to_backbone(self, backbone: Backbone) -> None:
        """Check the backbone and load the fine-tuned mask decoder, if the bundle has one."""
        self.check_backbone(backbone)
        if self.manifest["decoder_finetuned"]:
            state = {k[len("mask_decoder."):]: v for k, v in self.tensors.items() if k.startswith("mask_decoder.")}
            _load_strict(backbone.mask_decoder, state, f"bundle {self.name!r} mask decoder")

    # ------------------------------------------------------------------------------ saving
    def save(self, path: str | os.PathLike) -> Path:
        """Write to a folder, or to a ``.zip`` if the name ends so; atomic (temp then rename)."""
        dest = Path(path)
        blob = _weights_blob(self.tensors)
        manifest = dict(self.manifest, weights_sha256=hashlib.sha256(blob).hexdigest())
        load_validated(manifest, "bundle.schema.json")
        text = json.dumps(manifest, indent=2)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.suffix.lower() == ".zip":
            tmp = dest.with_name(f".{dest.name}.tmp")
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
                z.writestr(MANIFEST, text)
                z.writestr(WEIGHTS, blob)
            os.replace(tmp, dest)
            return dest
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
        (tmp_dir / MANIFEST).write_text(text)
        (tmp_dir / WEIGHTS).write_bytes(blob)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp_dir, dest)
        return dest


def _weights_blob(tensors: dict) -> bytes:
    from safetensors.torch import save as save_bytes

    return save_bytes({k: v.contiguous().cpu() for k, v in tensors.items()})


def _load_strict(module, state: dict, what: str) -> None:
    expected, given = set(module.state_dict()), set(state)
    if expected != given:
        missing, unexpected = sorted(expected - given)[:6], sorted(given - expected)[:6]
        raise WeightsLoadError(f"{what}: weights do not fit (missing {missing}, unexpected {unexpected})")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsLoadError(f"{what}: {exc}") from None


def load_bundle(path: str | os.PathLike) -> ModelBundle:
    """Load a bundle folder or zip.

    Raises:
        InvalidInputError: missing path, not a bundle, newer format, corrupt weights (sha256).
    """
    from safetensors.torch import load as load_bytes

    p = Path(path).expanduser()
    if not p.exists():
        raise InvalidInputError(f"model bundle not found: {p}")
    try:
        if p.is_dir():
            manifest_text = (p / MANIFEST).read_text()
            blob = (p / WEIGHTS).read_bytes()
        else:
            with zipfile.ZipFile(p) as z:
                manifest_text = z.read(MANIFEST).decode()
                blob = z.read(WEIGHTS)
    except (OSError, KeyError, zipfile.BadZipFile) as exc:
        raise InvalidInputError(
            f"{p} is not a model bundle (a folder or zip with {MANIFEST} and {WEIGHTS}): {exc}"
        ) from None
    try:
        manifest = load_validated(json.loads(manifest_text), "bundle.schema.json")
    except (json.JSONDecodeError, CatalogError) as exc:
        raise InvalidInputError(f"bundle {p}: broken manifest: {exc}") from None
    if manifest["format_version"] > FORMAT_VERSION:
        raise InvalidInputError(
            f"bundle {p} has format version {manifest['format_version']}; this automedsam ({__version__}) reads "
            f"up to {FORMAT_VERSION}. Upgrade automedsam."
        )
    if hashlib.sha256(blob).hexdigest() != manifest["weights_sha256"]:
        raise InvalidInputError(f"bundle {p}: {WEIGHTS} does not match the sha256 in its manifest (corrupt copy?)")
    try:
        tensors = load_bytes(blob)
    except Exception as exc:  # safetensors raises its own error types for broken headers
        raise InvalidInputError(f"bundle {p}: cannot read {WEIGHTS}: {exc}") from None
    return ModelBundle(manifest, dict(tensors), p)


def create_bundle(backbone: Backbone, generator, classes: list[ClassInfo], intensity: IntensityConfig, *,
                  name: str, version: str = "1.0.0", description: str = "", decoder_finetuned: bool = False,
                  training: dict | None = None, metrics: dict | None = None) -> ModelBundle:
    """Assemble a bundle from a generator (and optionally the backbone's fine-tuned decoder)."""
    tensors = {f"generator.{k}": v.detach().cpu() for k, v in generator.state_dict().items()}
    if decoder_finetuned:
        tensors.update({f"mask_decoder.{k}": v.detach().cpu() for k, v in backbone.mask_decoder.state_dict().items()})
    if len(classes) != generator.config.num_classes:
        raise InvalidInputError(f"{len(classes)} classes given for a generator with {generator.config.num_classes}")
    manifest = {
        "format": "automedsam-bundle",
        "format_version": FORMAT_VERSION,
        "name": name,
        "version": version,
        "description": description,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "automedsam_version": __version__,
        "backbone": {"id": backbone.id, "weights": backbone.weights_fingerprint, "input_size": backbone.input_size},
        "generator": {"type": generator.kind, "config": generator.config.to_dict()},
        "decoder_finetuned": decoder_finetuned,
        "classes": [{"index": i, **c.to_dict()} for i, c in enumerate(classes)],
        "preprocessing": {"intensity": intensity.to_dict(), "input_size": backbone.input_size},
        "weights_sha256": hashlib.sha256(_weights_blob(tensors)).hexdigest(),
        "training": training or {},
        "metrics": metrics or {},
    }
    return ModelBundle(load_validated(manifest, "bundle.schema.json"), tensors, None)


def backbone_for_bundle(bundle: ModelBundle, device: str = "auto") -> Backbone:
    """Build the backbone a bundle was trained with (random seed or cached weights) and apply the
    bundle's fine-tuned decoder."""
    from .backbones import build_backbone

    fingerprint = bundle.backbone_weights
    if fingerprint.startswith("random:seed="):
        backbone = build_backbone(bundle.backbone_id, weights="random", device=device,
                                  seed=int(fingerprint.split("=", 1)[1]))
    else:
        backbone = build_backbone(bundle.backbone_id, device=device)
    bundle.apply_to_backbone(backbone)
    return backbone
