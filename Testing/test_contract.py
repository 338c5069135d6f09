"""One engine contract: the in-process Engine and the RemoteEngine (through a real worker on
127.0.0.1) have the same public signatures and defaults and pass the same behaviour suite: the same
events, results, masks, class names and named errors. Neither holds masks: the caller owns them."""

from __future__ import annotations

import inspect
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from automedsam import contract
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
    """Signatures include the defaults: a default that drifts on one side fails here."""
    members = contract_members()
    assert {"segment", "refine", "propagate", "teach", "class_info", "class_catalog", "segment_volume",
            "require_volume", "set_volume", "device_info", "close"} <= set(members)
    for stateful in ("undo", "can_undo", "set_masks", "masks_of", "masks", "history"):  # the caller owns masks
        assert not any(hasattr(cls, stateful) for cls in (SegmentationEngine, Engine, RemoteEngine)), stateful
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
        path = str(make_bundle("tiny-sam2", "ppn", seed=2)) if bundle else None  # seed 2: non-empty masks
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
    assert all(result.masks["liver"][k].any() for k in SLICES)
    others = [k for k in range(ct.num_slices) if k not in SLICES]
    assert not result.masks["liver"][others].any()  # the caller keeps what it has on the other slices
    again = engine.segment_volume(["liver"], SLICES, cleanup="none")
    assert np.array_equal(again.masks["liver"], result.masks["liver"])


def test_the_same_masks_in_process_and_through_the_worker(worker, make_bundle, ct):
    path = str(make_bundle("tiny-sam2", "ppn", seed=2))
    engines = [Engine.from_bundle(path, "cpu"), worker.client(bundle=path)]
    outputs = []
    for engine in engines:
        engine.set_volume(ct)
        seg = engine.segment_volume(["liver"], SLICES, cleanup="none").masks["liver"]
        refined = engine.refine("liver", 13, points=[[60, 50], [10, 10]], point_labels=[1, 0], mask=seg[13])
        again = engine.refine("liver", 13, points=[[62, 52]], point_labels=[1], mask=refined)
        propagated = list(engine.propagate("liver", 13, again, "forward", max_slices=2))[-1].result
        outputs.append((seg, refined, again, propagated.slices, propagated.masks["liver"]))
        engine.close()
    assert outputs[0][0].any() and outputs[0][1].any() and outputs[0][2].any()
    for a, b in zip(*outputs, strict=True):
        assert np.array_equal(a, b)


def test_refine_takes_the_callers_mask(open_engine, ct):
    engine = open_engine()
    engine.set_volume(ct)
    mask = engine.refine("liver", 13, box=[40, 30, 90, 80], mode="manual")
    assert mask.shape == ct.array.shape[1:] and mask.dtype == bool and mask.any()
    continued = engine.refine("liver", 13, box=[40, 30, 90, 80], mode="manual", mask=mask)
    # the caller's slice differs from what the engine returned (the user erased it): a new interaction,
    # so the same box gives the first result again, not one built on the previous logits
    fresh = engine.refine("liver", 13, box=[40, 30, 90, 80], mode="manual", mask=np.zeros_like(mask))
    assert np.array_equal(fresh, mask) and not np.array_equal(continued, mask)
    with pytest.raises(InvalidInputError, match="not a slice of the volume"):
        engine.refine("liver", 13, box=[40, 30, 90, 80], mask=np.zeros((3, 4), bool))
    with pytest.raises(InvalidInputError, match="out of range"):
        engine.refine("liver", 999, box=[40, 30, 90, 80])


def test_propagate_events(open_engine, ct):
    engine = open_engine()
    engine.set_volume(ct)
    seed = engine.refine("liver", 13, box=[40, 30, 90, 80], mode="manual")
    events = list(engine.propagate("liver", 13, seed, "forward", max_slices=2))
    assert all(isinstance(e, ProgressEvent) for e in events) and events[-1].stage == "done"
    result = events[-1].result
    assert isinstance(result, SegmentationResult) and result.slices == events[-1].partial["slices"]
    assert set(result.slices) <= {14, 15}
    assert all(result.masks["liver"][k].any() for k in result.slices)
    assert not result.masks["liver"][[k for k in range(ct.num_slices) if k not in result.slices]].any()
    with pytest.raises(InvalidInputError, match="no mask"):
        list(engine.propagate("spleen", 13, np.zeros_like(seed)))
    with pytest.raises(InvalidInputError, match="direction"):
        list(engine.propagate("liver", 13, seed, "sideways"))


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


def test_the_wire_models_and_the_slicer_logic_share_the_contracts_defaults(slicer):
    """The teach default once drifted (30 epochs in the wire model, 40 elsewhere): every request
    field's default is its contract parameter's, and the Slicer Logic and panel defaults are the
    contract's constants."""
    from automedsam.service import protocol as p

    for model, method in ((p.SegmentRequest, "segment"), (p.RefineRequest, "refine"),
                          (p.PropagateRequest, "propagate"), (p.TeachRequest, "teach")):
        parameters = inspect.signature(getattr(SegmentationEngine, method)).parameters
        for name, field in model.model_fields.items():
            default = parameters[name].default
            if default is inspect.Parameter.empty:
                assert field.is_required(), (model.__name__, name)
            else:
                assert field.default == default, (model.__name__, name, field.default, default)
    from AutoMedSAMSlicerLib.parameterNode import AutoMedSAMSlicerParameterNode

    assert AutoMedSAMSlicerParameterNode.teachEpochs == contract.TEACH_EPOCHS
    assert AutoMedSAMSlicerParameterNode.teachPromptNetwork == contract.DEFAULT_PROMPT_NETWORK


def test_every_request_model_field_is_a_parameter_of_its_contract_method():
    """The worker calls the engine with a request's fields as keyword arguments, so adding a
    parameter means the contract, the engine, the client and one request model, nothing else."""
    from automedsam.service import protocol as p

    for model, method in ((p.SegmentRequest, "segment"), (p.RefineRequest, "refine"),
                          (p.PropagateRequest, "propagate"), (p.TeachRequest, "teach")):
        parameters = inspect.signature(getattr(SegmentationEngine, method)).parameters
        assert set(model.model_fields) <= set(parameters), (model.__name__, set(model.model_fields) - set(parameters))
