"""Organ and lesion classes: display names, colours and SNOMED CT codes as Slicer's terminology
uses them (category, type, type modifier such as left/right, optional anatomic region)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .catalog import load_validated
from .errors import InvalidInputError

Code = tuple[str, str, str]  # (coding scheme designator, code value, code meaning)

#: Slicer's terminology lists (the ``SegmentationCategoryTypeContextName`` of the files in Slicer's
#: Modules/Loadable/Terminologies/Resources): a segment's entry must name the list that holds its
#: type code, or Slicer's terminology selector cannot resolve it.
TERMINOLOGY_CONTEXTS = {
    "general_anatomy": "Segmentation category and type - 3D Slicer General Anatomy list",
    "dicom_master": "Segmentation category and type - DICOM master list",
    # Codes in neither list (Polyp): the module's own Resources/Terminology/*.term.json, loaded at startup.
    "automedsam": "Segmentation category and type - AutoMedSAM",
}
_ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"


@dataclass(frozen=True)
class ClassInfo:
    """One organ/lesion class.

    Attributes:
        name: identifier used on the command line and in bundles (``left_kidney``).
        display_name: human name shown in Slicer ("Left kidney").
        color: RGB 0..255.
        category, type: SNOMED CT codes, e.g. ``("SCT", "123037004", "Anatomical Structure")``.
        type_modifier: e.g. ``("SCT", "7771000", "Left")``.
        anatomic_region, anatomic_region_modifier: where a lesion sits (brain tumour -> Brain).
        aliases: other accepted names (``kidney_left`` as TotalSegmentator calls it).
        terminology_context: the Slicer terminology list holding ``type`` (a key of
            :data:`TERMINOLOGY_CONTEXTS`).
    """

    name: str
    display_name: str
    color: tuple[int, int, int]
    category: Code
    type: Code
    type_modifier: Code | None = None
    anatomic_region: Code | None = None
    anatomic_region_modifier: Code | None = None
    aliases: tuple[str, ...] = ()
    terminology_context: str = "general_anatomy"

    @property
    def color_float(self) -> tuple[float, float, float]:
        """RGB in 0..1, as segmentations store it."""
        return (self.color[0] / 255.0, self.color[1] / 255.0, self.color[2] / 255.0)

    def terminology_entry(self) -> str:
        """Slicer's terminology entry string for this class (a segment's ``TerminologyEntry`` tag)."""

        def fmt(code: Code | None) -> str:
            return "^".join(code) if code else "^^"

        return "~".join([
            TERMINOLOGY_CONTEXTS[self.terminology_context], fmt(self.category), fmt(self.type), fmt(self.type_modifier),
            _ANATOMIC_CONTEXT, fmt(self.anatomic_region), fmt(self.anatomic_region_modifier),
        ])

    def to_dict(self) -> dict:
        d = {"name": self.name, "display_name": self.display_name, "color": list(self.color),
             "category": list(self.category), "type": list(self.type)}
        for key in ("type_modifier", "anatomic_region", "anatomic_region_modifier"):
            if getattr(self, key):
                d[key] = list(getattr(self, key))
        if self.aliases:
            d["aliases"] = list(self.aliases)
        if self.terminology_context != "general_anatomy":
            d["terminology_context"] = self.terminology_context
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ClassInfo:
        def code(key: str) -> Code | None:
            return tuple(d[key]) if d.get(key) else None  # type: ignore[return-value]

        return cls(d["name"], d["display_name"], tuple(d["color"]), tuple(d["category"]),  # type: ignore[arg-type]
                   tuple(d["type"]), code("type_modifier"), code("anatomic_region"),  # type: ignore[arg-type]
                   code("anatomic_region_modifier"), tuple(d.get("aliases", ())),
                   d.get("terminology_context", "general_anatomy"))


def custom_class(name: str, display_name: str | None = None,
                 color: tuple[int, int, int] | None = None) -> ClassInfo:
    """A user-defined class without a specific SNOMED type (coded as generic 'Tissue'); its colour,
    unless given, comes from its name (:func:`name_color`), so two custom classes look different."""
    if not name or not name.replace("_", "").isalnum() or name != name.lower():
        raise InvalidInputError(f"class name {name!r} must be lower-case letters, digits and underscores")
    tissue = ("SCT", "85756007", "Tissue")
    return ClassInfo(name, display_name or name.replace("_", " ").capitalize(), color or name_color(name), tissue,
                     tissue)


def name_color(name: str) -> tuple[int, int, int]:
    """A bright, fairly saturated RGB colour whose hue is a hash of ``name``: the same every run, and
    different classes are told apart (hues spread over the whole circle)."""
    import colorsys
    import hashlib

    hue = int.from_bytes(hashlib.sha256(name.encode()).digest()[:2], "big") / 65536
    r, g, b = colorsys.hsv_to_rgb(hue, 0.65, 0.92)
    return round(r * 255), round(g * 255), round(b * 255)


class ClassCatalog:
    """The known classes, looked up by name or alias (case-insensitive)."""

    def __init__(self, classes: list[ClassInfo]):
        self.classes = list(classes)
        self._index: dict[str, ClassInfo] = {}
        for info in self.classes:
            for key in (info.name, *info.aliases):
                self._index[key.lower()] = info

    @classmethod
    def load(cls, source: str | os.PathLike | dict = "classes.json") -> ClassCatalog:
        data = load_validated(source, "classes.schema.json")
        return cls([ClassInfo.from_dict(d) for d in data["classes"]])

    def get(self, name: str) -> ClassInfo:
        try:
            return self._index[name.strip().lower().replace(" ", "_")]
        except KeyError:
            raise InvalidInputError(
                f"unknown class {name!r}; known classes: {', '.join(c.name for c in self.classes)}. "
                "User-defined classes are created with custom_class()."
            ) from None

    def __contains__(self, name: str) -> bool:
        return name.strip().lower().replace(" ", "_") in self._index

    def names(self) -> list[str]:
        return [c.name for c in self.classes]


@lru_cache(maxsize=1)
def default_class_catalog() -> ClassCatalog:
    """The shipped class catalog (parsed and validated once)."""
    return ClassCatalog.load()


def resolve_class(name: str) -> ClassInfo:
    """A class by name as every entry point resolves it: the shipped catalog's entry (names,
    aliases, case and spaces as :meth:`ClassCatalog.get`), else a new custom class named the same
    way (``"My Lesion"`` -> ``my_lesion``, shown as given)."""
    catalog = default_class_catalog()
    if name in catalog:
        return catalog.get(name)
    spelled = name.strip().lower().replace(" ", "_")
    return custom_class(spelled, name.strip() if spelled != name else None)


def canonical_class_mapping(classes: dict[str, int]) -> dict[str, int]:
    """Class names as the class catalog spells them (``kidney_right``, ``Right Kidney`` ->
    ``right_kidney``), so every later lookup (bundle, validation, engine) agrees; names the
    catalog does not know must be valid custom class names.

    Raises:
        InvalidInputError: a name is given twice (also as synonyms), or a label value is < 1.
    """
    out: dict[str, int] = {}
    for name, value in classes.items():
        canonical = resolve_class(name).name
        if canonical in out:
            raise InvalidInputError(f"class {name!r} is given twice (as {canonical!r}); name each class once")
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise InvalidInputError(f"label value of class {name!r} must be an integer >= 1, got {value!r}")
        out[canonical] = int(value)
    if not out:
        raise InvalidInputError("no classes given (e.g. liver=5,spleen=1)")
    return out


def check_classes_present(classes: dict[str, int], label_maps: Sequence[np.ndarray], where: str) -> None:
    """Refuse classes whose label value occurs in none of ``label_maps`` (a typo in a label value
    would otherwise train a class from background alone).

    Raises:
        InvalidInputError: names the absent classes and the label values that do occur.
    """
    present: set[int] = set()
    for labels in label_maps:
        flat = np.asarray(labels).reshape(-1)
        if flat.dtype.kind == "u" and flat.dtype.itemsize <= 2:
            present.update(np.flatnonzero(np.bincount(flat)).tolist())
        else:
            present.update(int(v) for v in np.unique(flat))
    absent = [f"{name}={value}" for name, value in classes.items() if value not in present]
    if absent:
        values = sorted(present - {0})
        shown = ", ".join(map(str, values[:30])) + (" ..." if len(values) > 30 else "") if values else "none"
        raise InvalidInputError(
            f"{', '.join(absent)}: no voxel of {where} has this label value (label values present: {shown}). "
            "Check the name=value pairs.")
