"""Model bundles: a trained prompt network (plus any fine-tuned mask decoder) and its facts.

A bundle is a folder or a ``.zip`` holding ``manifest.json`` (validated against
``catalog/bundle.schema.json``: name, version, backbone id and weights fingerprint, the prompt
network's type and config, classes with colours and SNOMED CT codes, preprocessing, training facts
and metrics) and ``weights.safetensors`` (the prompt network's keys ``generator.*`` and, if
fine-tuned, ``mask_decoder.*``). The files keep the name ``generator`` for the prompt network, so
bundles written before the code was renamed still load.

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
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__
from .backbones.base import load_state_strict
from .catalog import load_validated
from .classes import ClassCatalog, ClassInfo
from .errors import CatalogError, InvalidInputError
from .framing import Framing
from .orientation import CANONICAL, STORAGE
from .preprocess import IntensityConfig

if TYPE_CHECKING:
    import torch

    from .backbones.base import Backbone

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
    def prompt_network_kind(self) -> str:
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
        """Classes in the prompt network's index order."""
        items = sorted(self.manifest["classes"], key=lambda c: c["index"])
        return [ClassInfo.from_dict({k: v for k, v in c.items() if k != "index"}) for c in items]

    @property
    def slice_orientation(self) -> str:
        """The slice orientation the prompt network was taught in (:mod:`automedsam.orientation`):
        ``"lps-axial"``, or ``"storage"`` for bundles made before it was recorded."""
        return self.manifest["preprocessing"].get("orientation", STORAGE)

    @property
    def intensity(self) -> IntensityConfig:
        return IntensityConfig(**self.manifest["preprocessing"]["intensity"])

    @property
    def framing(self) -> Framing:
        """The model pixel size the prompt network was taught at (:mod:`automedsam.framing`); SAM's
        resize for bundles made before it was recorded."""
        return Framing.from_dict(self.manifest["preprocessing"].get("framing"))

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
        config = self.manifest["generator"]["config"]
        for key, value in (("embedding_size", backbone.embedding_size), ("input_size", backbone.input_size),
                           ("num_sparse_tokens", backbone.box_tokens)):
            if key in config and config[key] != value:
                raise InvalidInputError(
                    f"bundle {self.name!r}: its prompt network's {key} is {config[key]}, but backbone "
                    f"{backbone.id} has {value}; the manifest does not describe a network for this backbone")

    def build_prompt_network(self, device=None) -> torch.nn.Module:
        """The prompt network with the bundle's weights (eval mode)."""
        from .prompt_networks import build_prompt_network

        prompt_network = build_prompt_network(self.prompt_network_kind, dict(self.manifest["generator"]["config"]))
        state = {k[len("generator."):]: v for k, v in self.tensors.items() if k.startswith("generator.")}
        load_state_strict(prompt_network, state, f"bundle {self.name!r} (its prompt network, the generator)")
        return prompt_network.eval().to(device) if device is not None else prompt_network.eval()

    def decoder_state(self) -> dict | None:
        """The fine-tuned mask decoder's state dict (CPU tensors), or None when the bundle keeps the
        backbone's own decoder. A backbone view carries it (see
        :meth:`automedsam.backbones.registry.ModelRegistry.for_bundle`); the shared backbone never does."""
        if not self.manifest["decoder_finetuned"]:
            return None
        return {k[len("mask_decoder."):]: v for k, v in self.tensors.items() if k.startswith("mask_decoder.")}

    @property
    def weights_sha256(self) -> str:
        """The sha256 of the bundle's weights (identifies its fine-tuned decoder)."""
        return self.manifest["weights_sha256"]

    # ------------------------------------------------------------------------------ saving
    def save(self, path: str | os.PathLike) -> Path:
        """Write to a folder, or to a ``.zip`` if the name ends so. Atomic: written aside, then
        swapped in. An existing ``path`` is replaced only if it is a bundle of the same kind."""
        dest = Path(path)
        blob = _weights_blob(self.tensors)
        manifest = dict(self.manifest, weights_sha256=hashlib.sha256(blob).hexdigest())
        load_validated(manifest, "bundle.schema.json")
        text = json.dumps(manifest, indent=2)
        as_zip = dest.suffix.lower() == ".zip"
        why = _not_replaceable(dest) if dest.exists() or dest.is_symlink() else None
        if why:
            raise InvalidInputError(f"{dest} {why}; only bundles are replaced, so nothing was touched. "
                                    "Choose another name.")
        dest.parent.mkdir(parents=True, exist_ok=True)
        if as_zip:
            fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
            os.close(fd)
            try:
                with zipfile.ZipFile(name, "w", zipfile.ZIP_DEFLATED) as z:
                    z.writestr(MANIFEST, text)
                    z.writestr(WEIGHTS, blob)
                os.replace(name, dest)
            finally:
                if os.path.exists(name):
                    os.unlink(name)
            return dest
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
        try:
            (tmp_dir / MANIFEST).write_text(text)
            (tmp_dir / WEIGHTS).write_bytes(blob)
            if not dest.exists():
                os.replace(tmp_dir, dest)
                return dest
            # Swap: the old bundle moves aside, the new one in (the old one back if that fails).
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old.", dir=dest.parent))
            os.replace(dest, old / dest.name)
            try:
                os.replace(tmp_dir, dest)
            except OSError:
                os.replace(old / dest.name, dest)
                raise
            finally:
                if (old / dest.name).exists() and dest.exists():
                    shutil.rmtree(old)
                elif not any(old.iterdir()):
                    old.rmdir()
        finally:
            if tmp_dir.exists():
                shutil.rmtree(tmp_dir)
        return dest


def is_bundle(path: str | os.PathLike) -> bool:
    """True for a zip or folder holding exactly a bundle's two files whose manifest says it is an
    AutoMedSAM bundle (what ``--overwrite`` may replace; ``manifest.json`` alone is a common name)."""
    p = Path(path)
    try:
        if p.is_dir():
            if sorted(c.name for c in p.iterdir()) != sorted((MANIFEST, WEIGHTS)):
                return False
            text = (p / MANIFEST).read_bytes()[:MAX_MANIFEST_BYTES]
        elif p.is_file() and zipfile.is_zipfile(p):
            with zipfile.ZipFile(p) as z:
                if sorted(z.namelist()) != sorted((MANIFEST, WEIGHTS)):
                    return False
                text = _read_member(z, MANIFEST, MAX_MANIFEST_BYTES)
        else:
            return False
        return json.loads(text).get("format") == "automedsam-bundle"
    except (OSError, ValueError, RuntimeError, NotImplementedError, EOFError, zlib.error, zipfile.BadZipFile,
            InvalidInputError, AttributeError):
        return False


def _not_replaceable(dest: Path) -> str | None:
    """Why an existing ``dest`` must not be replaced by a bundle of the kind its name asks for
    (None: it is such a bundle, holding nothing but a bundle's files)."""
    as_zip = dest.suffix.lower() == ".zip"
    if dest.is_dir() == as_zip or not is_bundle(dest):
        return (f"exists and is not a model bundle ({'a .zip' if as_zip else 'a folder'} holding only an AutoMedSAM "
                f"{MANIFEST} and {WEIGHTS})")
    return None


def check_bundle_destination(path: str | os.PathLike, overwrite: bool) -> Path:
    """Check where a bundle will be written before any work starts.

    Raises:
        InvalidInputError: no file name, the path exists (without ``overwrite``, or holding
            anything but a bundle), or its folder cannot be written.
    """
    dest = Path(path).expanduser()
    if dest.name in ("", ".", ".."):
        raise InvalidInputError(f"output {str(path)!r} names no bundle; give a name such as model.zip or models/liver")
    if dest.exists() or dest.is_symlink():
        if not overwrite:
            raise InvalidInputError(f"{dest} exists; pass --overwrite to replace it (or choose another name)")
        why = _not_replaceable(dest)
        if why:
            raise InvalidInputError(f"{dest} {why}; --overwrite replaces only bundles, so nothing was touched. "
                                    "Choose another output name.")
    parent = dest.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise InvalidInputError(f"cannot write the bundle {dest}: {parent} is not a writable folder")
    return dest


def _weights_blob(tensors: dict) -> bytes:
    from safetensors.torch import save as save_bytes

    return save_bytes({k: v.contiguous().cpu() for k, v in tensors.items()})


#: Largest manifest read (a manifest is a few kB; this guards against zip bombs).
MAX_MANIFEST_BYTES = 16 * 2**20


def _read_member(z: zipfile.ZipFile, name: str, limit: int) -> bytes:
    """A zip member's bytes, refusing more than ``limit`` once decompressed (the declared size can
    lie, so the bytes are counted as they come)."""
    info = z.getinfo(name)
    if info.file_size > limit:
        raise InvalidInputError(f"{name} would unpack to {info.file_size} bytes, more than the {limit} allowed")
    with z.open(info) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise InvalidInputError(f"{name} unpacks to more than the {limit} bytes allowed")
    return data


def load_bundle(path: str | os.PathLike, max_weights_bytes: int | None = None) -> ModelBundle:
    """Load a bundle folder or zip.

    Args:
        max_weights_bytes: refuse weights larger than this once unpacked (the worker passes its
            upload limit, so a small zip cannot unpack to gigabytes).

    Raises:
        InvalidInputError: missing path, not a bundle, newer format, corrupt weights (sha256).
    """
    from safetensors.torch import load as load_bytes

    p = Path(path).expanduser()
    try:
        exists = p.exists()
    except OSError as exc:  # e.g. a name longer than the file system allows
        raise InvalidInputError(f"model bundle path is not usable ({exc.strerror}): {str(p)[:200]}") from None
    if not exists:
        raise InvalidInputError(f"model bundle not found: {p}")
    if not (p.is_dir() or p.is_file()):  # stat only: a FIFO or device is never opened
        raise InvalidInputError(f"{p} is neither a file nor a folder; a model bundle is a .zip or a folder")
    limit = max_weights_bytes or 2**40
    try:
        if p.is_dir():
            if (p / WEIGHTS).stat().st_size > limit:
                raise InvalidInputError(f"{WEIGHTS} is larger than the {limit} bytes allowed")
            manifest_text = (p / MANIFEST).read_text(encoding="utf-8")
            blob = (p / WEIGHTS).read_bytes()
        else:
            with zipfile.ZipFile(p) as z:
                manifest_text = _read_member(z, MANIFEST, MAX_MANIFEST_BYTES).decode("utf-8")
                blob = _read_member(z, WEIGHTS, limit)
    # A zip can fail in many ways (bad UTF-8, encryption, unknown compression, corrupt data).
    except (OSError, KeyError, ValueError, RuntimeError, NotImplementedError, EOFError, zlib.error,
            zipfile.BadZipFile) as exc:
        raise InvalidInputError(
            f"{p} is not a model bundle (a folder or zip with {MANIFEST} and {WEIGHTS}): {exc}"
        ) from None
    try:
        manifest = load_validated(json.loads(manifest_text, parse_constant=_reject_constant), "bundle.schema.json")
    except (ValueError, CatalogError) as exc:  # JSONDecodeError, or NaN / Infinity
        raise InvalidInputError(f"bundle {p}: broken manifest: {exc}") from None
    if manifest["format_version"] > FORMAT_VERSION:
        raise InvalidInputError(
            f"bundle {p} has format version {manifest['format_version']}; this automedsam ({__version__}) reads "
            f"up to {FORMAT_VERSION}. Upgrade automedsam."
        )
    _check_unique_classes(manifest["classes"], f"bundle {p}")
    _check_settings(manifest, f"bundle {p}")
    if hashlib.sha256(blob).hexdigest() != manifest["weights_sha256"]:
        raise InvalidInputError(f"bundle {p}: {WEIGHTS} does not match the sha256 in its manifest (corrupt copy?)")
    try:
        tensors = load_bytes(blob)
    except Exception as exc:  # safetensors raises its own error types for broken headers
        raise InvalidInputError(f"bundle {p}: cannot read {WEIGHTS}: {exc}") from None
    _check_finite(tensors, f"bundle {p}")
    check_network(manifest, tensors, f"bundle {p}")
    return ModelBundle(manifest, dict(tensors), p)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def _check_settings(manifest: dict, where: str) -> None:
    """The manifest's settings that the schema cannot judge: a backbone the catalog knows, with its
    input size; intensity and framing settings that make sense (finite, in range)."""
    from .models import BackboneCatalog

    catalog = BackboneCatalog.load()
    backbone = manifest["backbone"]
    if backbone["id"] not in {s.id for s in catalog.all()}:
        raise InvalidInputError(f"{where}: backbone {backbone['id']!r} is not in the model catalog")
    spec = catalog.get(backbone["id"])
    if backbone.get("input_size", spec.input_size) != spec.input_size:
        raise InvalidInputError(f"{where}: backbone {spec.id} takes {spec.input_size}-pixel inputs, the manifest says "
                                f"{backbone['input_size']}")
    try:
        IntensityConfig(**manifest["preprocessing"]["intensity"])
        Framing.from_dict(manifest["preprocessing"].get("framing"))
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"{where}: preprocessing settings are invalid: {exc}") from None


def check_network(manifest: dict, tensors: dict, where: str) -> None:
    """Check, before a prompt network is built, that the manifest describes the network its weights
    are for: the config's keys (a network built on torch's ``meta`` device, which allocates
    nothing, so a tampered size costs no memory), one class per class output, and every tensor's
    name and shape. A fine-tuned decoder's weights must be there when the manifest says so.

    Raises:
        InvalidInputError: what does not match.
    """
    import torch

    from .prompt_networks import build_prompt_network

    kind, config = manifest["generator"]["type"], manifest["generator"]["config"]
    if config.get("num_classes", len(manifest["classes"])) != len(manifest["classes"]):
        raise InvalidInputError(f"{where}: the manifest lists {len(manifest['classes'])} classes but its prompt "
                                f"network has {config['num_classes']} class outputs")
    try:
        with torch.device("meta"):
            network = build_prompt_network(kind, dict(config))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InvalidInputError(f"{where}: the {kind} prompt network's config is invalid: {exc}") from None
    expected = {k: tuple(v.shape) for k, v in network.state_dict().items()}
    given = {k[len("generator."):]: tuple(v.shape) for k, v in tensors.items() if k.startswith("generator.")}
    missing, unexpected = sorted(expected.keys() - given.keys()), sorted(given.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & given.keys() if expected[k] != given[k])
    if missing or unexpected or wrong:
        parts = [f"missing {', '.join(missing[:3])}" if missing else "",
                 f"unexpected {', '.join(unexpected[:3])}" if unexpected else "",
                 "; ".join(f"{k} is {list(given[k])} in the weights, {list(expected[k])} in the config"
                           for k in wrong[:3])]
        raise InvalidInputError(f"{where}: its weights are not those of the {kind} prompt network its manifest "
                                f"describes ({'; '.join(p for p in parts if p)})")
    if manifest["decoder_finetuned"] and not any(k.startswith("mask_decoder.") for k in tensors):
        raise InvalidInputError(f"{where}: the manifest says its mask decoder was fine-tuned, but the weights hold "
                                "no mask decoder")


def _check_unique_classes(classes: list[dict], where: str) -> None:
    """Every class name, alias and prompt network index once: a duplicate would make a name answer
    with another class's masks."""
    indices = sorted(c["index"] for c in classes)
    if indices != list(range(len(classes))):
        raise InvalidInputError(f"{where}: class indices must be 0..{len(classes) - 1} once each, got {indices}")
    owner: dict[str, dict] = {}
    for c in classes:
        for key in {c["name"], *c.get("aliases", ())}:  # a class may list its own name as an alias
            first = owner.setdefault(key.strip().lower().replace(" ", "_"), c)
            if first is not c:
                raise InvalidInputError(f"{where}: the class name {key!r} is used twice (classes {first['index']} "
                                        f"{first['name']!r} and {c['index']} {c['name']!r}); each name may mean one "
                                        "class only")


def _check_finite(tensors: dict, what: str) -> None:
    import torch

    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise InvalidInputError(f"{what}: weights {', '.join(bad[:5])} hold NaN or infinite values (training "
                                "diverged; lower the learning rate); no bundle was made from them")


def create_bundle(backbone: Backbone, prompt_network, classes: list[ClassInfo], intensity: IntensityConfig, *,
                  name: str, framing: Framing | None = None, version: str = "1.0.0", description: str = "",
                  decoder_finetuned: bool = False, training: dict | None = None,
                  metrics: dict | None = None) -> ModelBundle:
    """Assemble a bundle from a prompt network (and optionally the backbone's fine-tuned decoder)
    taught on slices framed as ``framing`` (default: SAM's resize)."""
    tensors = {f"generator.{k}": v.detach().cpu() for k, v in prompt_network.state_dict().items()}
    if decoder_finetuned:
        tensors.update({f"mask_decoder.{k}": v.detach().cpu() for k, v in backbone.mask_decoder.state_dict().items()})
    _check_finite(tensors, f"bundle {name!r}")
    if len(classes) != prompt_network.config.num_classes:
        raise InvalidInputError(f"{len(classes)} classes given for a prompt network with "
                                f"{prompt_network.config.num_classes}")
    manifest = {
        "format": "automedsam-bundle",
        "format_version": FORMAT_VERSION,
        "name": name,
        "version": version,
        "description": description,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "automedsam_version": __version__,
        "backbone": {"id": backbone.id, "weights": backbone.weights_fingerprint, "input_size": backbone.input_size},
        "generator": {"type": prompt_network.kind, "config": prompt_network.config.to_dict()},
        "decoder_finetuned": decoder_finetuned,
        "classes": [{"index": i, **c.to_dict()} for i, c in enumerate(classes)],
        "preprocessing": {"intensity": intensity.to_dict(), "input_size": backbone.input_size,
                          "orientation": CANONICAL, "framing": (framing or Framing()).to_dict()},
        "weights_sha256": hashlib.sha256(_weights_blob(tensors)).hexdigest(),
        "training": training or {},
        "metrics": metrics or {},
    }
    _check_unique_classes(manifest["classes"], f"bundle {name!r}")
    return ModelBundle(load_validated(manifest, "bundle.schema.json"), tensors, None)
