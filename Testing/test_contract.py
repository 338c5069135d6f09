"""One engine contract: the in-process Engine and the RemoteEngine (through a real worker on
127.0.0.1) have the same public signatures and pass the same behaviour suite: the same events,
results, masks, class names and named errors."""

from __future__ import annotations

import inspect
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from automedsam.client import RemoteEngine
from automedsam.contract import (
    CancelledError,
    ProgressEvent,
    SegmentationEngine,
    SegmentationResult,
    TrainEvent,
)
from automedsam.engine import Engine
from automedsam.errors import InvalidInputError, WeightsUnavailableError
from automedsam.worker import LocalWorker

REPO = Path(__file__).resolve().parents[1]
SLICES = [12, 13, 14]


def contract_members() -> list[str]:
    return [n for n in dir(SegmentationEngine) if not n.startswith("_")]


def test_both_engines_state_the_contract_with_the_same_signatures():
    members = contract_members()
    assert {"segment", "refine", "undo", "can_undo", "propagate", "set_masks", "masks_of", "teach", "class_info",
            "class_catalog", "segment_volume", "require_volume", "set_volume", "device_info", "close"} <= set(members)
    for name in members:
        ours = inspect.getattr_static(SegmentationEngine, name)
        for cls in (Engine, RemoteEngine):
            theirs = inspect.getattr_static(cls, name, None)
            if isinstance(ours, property) or name == "volume":  # an attribute or a property on either side
                continue
            assert callable(theirs), f"{cls.__name__}.{name} is missing"
            assert inspect.signature(theirs) == inspect.signature(ours), (
                f"{cls.__name__}.{name}{inspect.signature(theirs)} differs from {inspect.signature(ours)}")


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    home = tmp_path_factory.mktemp("contract-home")
    env = dict(os.environ, PYTHONPATH=str(REPO / "AutoMedSAMSlicer"), AUTOMEDSAM_HOME=str(home), TQDM_DISABLE="1")
    w = LocalWorker(device="cpu", env=env, extra_args=["--max-sessions", "8"])
    w.start()
    yield w
    w.stop()


@pytest.fixture(params=["inprocess", "remote"])
def open_engine(request, make_bundle):
    """``open_engine(bundle=True)`` -> the same model as an in-process Engine or a RemoteEngine."""
    opened = []

    def make(bundle: bool = True, backbone: str = "tiny-sam2"):
        path = str(make_bundle("tiny-sam2", "ppn")) if bundle else None
        if request.param == "inprocess":
            engine = Engine.from_bundle(path, "cpu") if bundle else Engine.manual(backbone, "cpu")
        else:
            engine = request.getfixturevalue("worker").client(bundle=path, backbone=None if bundle else backbone)
        opened.append(engine)
        return engine

    make.kind = request.param
    yield make
    for engine in opened:
        engine.close()


def test_it_is_a_segmentation_engine(open_engine):
    assert isinstance(open_engine(), SegmentationEngine)


def test_classes_resolve_the_same_way(open_engine):
    engine = open_engine()
    assert engine.class_info("Left Kidney").name == "left_kidney"
    assert "liver" in engine.class_catalog.names()
    with pytest.raises(InvalidInputError, match="not one the model knows"):
        engine.class_info("hippocampus")
    manual = open_engine(bundle=False)
    assert manual.class_catalog.classes == [] and manual.class_info("My Lesion").name == "my_lesion"
    assert manual.class_info("My Lesion").display_name == "My Lesion"


def test_segment_events_results_and_masks(open_engine, ct):
    engine = open_engine()
    with pytest.raises(InvalidInputError, match="no volume set"):
        engine.require_volume()
    engine.set_volume(ct)
    events = list(engine.segment(["Liver", "spleen"], SLICES, cleanup="none"))
    assert all(isinstance(e, ProgressEvent) for e in events) and events[-1].stage == "done"
    result = events[-1].result
    assert isinstance(result, SegmentationResult) and result.slices == SLICES
    assert [c.name for c in result.classes] == ["liver", "spleen"]
    assert set(result.masks) == {"liver", "spleen"} and result.masks["liver"].shape == ct.array.shape
    assert np.array_equal(engine.masks_of("liver"), result.masks["liver"])
    assert engine.can_undo("liver")
    again = engine.segment_volume(["liver"], SLICES, cleanup="none")
    assert np.array_equal(again.masks["liver"], result.masks["liver"])


def test_the_same_masks_in_process_and_through_the_worker(worker, make_bundle, ct):
    path = str(make_bundle("tiny-sam2", "ppn"))
    engines = [Engine.from_bundle(path, "cpu"), worker.client(bundle=path)]
    outputs = []
    for engine in engines:
        engine.set_volume(ct)
        seg = engine.segment_volume(["liver"], SLICES, cleanup="none").masks["liver"]
        refined = engine.refine("liver", 13, points=[[60, 50], [10, 10]], point_labels=[1, 0])
        propagated = list(engine.propagate("liver", 13, "forward", max_slices=2))[-1].partial["slices"]
        outputs.append((seg, refined, propagated, engine.masks_of("liver")))
        engine.close()
    for a, b in zip(*outputs, strict=True):
        assert np.array_equal(a, b)


def test_refine_undo_and_set_masks(open_engine, ct):
    engine = open_engine()
    engine.set_volume(ct)
    assert not engine.can_undo("liver") and engine.undo("liver") is None
    mask = engine.refine("liver", 13, box=[40, 30, 90, 80], mode="manual")
    assert mask.shape == ct.array.shape[1:] and mask.dtype == bool
    assert np.array_equal(engine.masks_of("liver")[13], mask) and engine.can_undo("liver")
    assert engine.undo("liver") == [13] and not engine.masks_of("liver")[13].any()
    drawn = np.zeros(ct.array.shape, bool)
    drawn[13, 40:60, 50:70] = True
    engine.set_masks("Liver", drawn)
    assert np.array_equal(engine.masks_of("liver"), drawn)
    with pytest.raises(InvalidInputError, match="not on the volume grid"):
        engine.set_masks("liver", drawn[:3])
    with pytest.raises(InvalidInputError, match="out of range"):
        engine.refine("liver", 999, box=[40, 30, 90, 80])


def test_propagate_events(open_engine, ct):
    engine = open_engine()
    engine.set_volume(ct)
    engine.refine("liver", 13, box=[40, 30, 90, 80], mode="manual")
    events = list(engine.propagate("liver", 13, "forward", max_slices=2))
    assert all(isinstance(e, ProgressEvent) for e in events) and events[-1].stage == "done"
    written = events[-1].partial["slices"]
    assert set(written) <= {14, 15}
    with pytest.raises(InvalidInputError, match="no mask"):
        list(engine.propagate("spleen", 13))
    with pytest.raises(InvalidInputError, match="direction"):
        list(engine.propagate("liver", 13, "sideways"))


def test_bad_input_and_cancel_raise_the_same_named_errors(open_engine, ct):
    engine = open_engine()
    engine.set_volume(ct)
    with pytest.raises(InvalidInputError, match="out of range"):
        list(engine.segment(["liver"], [999]))
    with pytest.raises(InvalidInputError, match="not one the model knows"):
        list(engine.segment(["hippocampus"]))
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(CancelledError):
        engine.segment_volume(["liver"], SLICES, cancel=cancel)
    assert not engine.masks_of("liver").any()  # a cancelled run changes nothing


def test_missing_weights_arrive_as_weights_unavailable(open_engine):
    with pytest.raises(WeightsUnavailableError, match="sam_vit_b"):
        engine = open_engine(bundle=False, backbone="sam_vit_b")
        engine.class_catalog  # noqa: B018 (a remote session opens, and loads the model, on first use)


def test_teach_saves_the_bundle_and_uses_it(open_engine, ct, ct_dir, tmp_path):
    from automedsam.io import read_label_map

    engine = open_engine(bundle=False)
    engine.set_volume(ct)
    labels = read_label_map(ct_dir / "ct_lowres_labels.nii.gz").array
    with pytest.raises(InvalidInputError, match="no voxel"):
        list(engine.teach(labels, {"liver": 5, "spleen": 250}, tmp_path / "x.zip", epochs=1))
    events = list(engine.teach(labels, {"liver": 5}, tmp_path / "taught.zip", epochs=1, train_slices="13:15"))
    assert all(isinstance(e, TrainEvent) for e in events) and events[-1].stage == "done"
    assert events[-1].bundle_path == str(tmp_path / "taught.zip") and Path(events[-1].bundle_path).is_file()
    assert engine.class_catalog.names() == ["liver"]  # use_now: the engine runs the new bundle
    assert engine.segment_volume(["liver"], [14]).masks["liver"].shape == ct.array.shape


def test_device_info(open_engine):
    info = open_engine().device_info()
    assert info["device"].startswith("cpu") and info["gpu"] is None


def test_every_request_model_field_is_a_parameter_of_its_contract_method():
    """The worker calls the engine with a request's fields as keyword arguments, so adding a
    parameter means the contract, the engine, the client and one request model, nothing else."""
    from automedsam.service import protocol as p

    for model, method in ((p.SegmentRequest, "segment"), (p.RefineRequest, "refine"),
                          (p.PropagateRequest, "propagate"), (p.TeachRequest, "teach")):
        parameters = inspect.signature(getattr(SegmentationEngine, method)).parameters
        assert set(model.model_fields) <= set(parameters), (model.__name__, set(model.model_fields) - set(parameters))
