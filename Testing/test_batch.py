"""``automedsam batch`` on the shared real CT: several formats and a broken file, resuming after a
rerun and after a kill, references scored, local workers and a Ray cluster giving the same masks."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from automedsam.cli.main import run
from automedsam.io import read_image, read_label_map, read_segmentation, write_volume


@pytest.fixture()
def dataset(ct_dir, tmp_path) -> Path:
    """A folder of three cases: the shared CT as NIfTI, the DICOM series, and a truncated NIfTI."""
    folder = tmp_path / "cases"
    folder.mkdir()
    shutil.copy(ct_dir / "ct_lowres.nii.gz", folder / "lowres.nii.gz")
    shutil.copytree(ct_dir / "ct_dicom", folder / "patient1" / "dicom")
    data = (ct_dir / "ct_full_lowres.nii.gz").read_bytes()
    (folder / "broken.nii.gz").write_bytes(data[: len(data) // 3])
    return folder


def batch(bundle, source, out, *extra) -> tuple[int, dict]:
    """Run the CLI in this process; returns the exit code and the report on disk."""
    code = run(["batch", "--model", str(bundle), "--classes", "liver,spleen", "--input", str(source),
                "--output", str(out), "--device", "cpu", *extra])
    report = json.loads((out / "batch_report.json").read_text()) if (out / "batch_report.json").exists() else {}
    return code, report


def masks_of(out: Path, case: str) -> dict:
    seg = read_segmentation(out / f"{case}.seg.nrrd")
    return {s.segment_id: seg.mask(s.segment_id) for s in seg.segments}


def test_three_cases_two_outputs_one_failure_then_a_rerun_does_no_work(make_bundle, dataset, tmp_path, monkeypatch,
                                                                         capsys):
    bundle = make_bundle("tiny-sam2", "ppn", seed=2)
    out = tmp_path / "out"
    code, report = batch(bundle, dataset, out)
    assert code == 4  # some case failed; the others are written
    summary = report["summary"]
    assert (summary["cases"], summary["done"], summary["failed"], summary["skipped"], summary["processed"]) == (
        3, 2, 1, 0, 3)
    assert summary["complete"] and summary["backend"].startswith("local: 1 x cpu")
    records = {r["case"]: r for r in report["cases"]}
    assert set(records) == {"lowres", "patient1__dicom", "broken"}
    assert records["broken"]["status"] == "failed" and "truncated" in records["broken"]["error"]["message"]
    assert "failed: broken" in capsys.readouterr().err
    for case, source in (("lowres", dataset / "lowres.nii.gz"), ("patient1__dicom", dataset / "patient1" / "dicom")):
        seg = read_segmentation(out / f"{case}.seg.nrrd")
        assert seg.grid.same_grid(read_image(source))  # on the input's own grid
        assert records[case]["status"] == "done" and (out / "previews" / f"{case}.png").stat().st_size > 1000
        for name in ("liver", "spleen"):
            assert records[case]["classes"][name]["voxels"] == int(seg.mask(name).sum())
    assert not (out / "broken.seg.nrrd").exists()
    rows = list(csv.DictReader((out / "batch_report.csv").read_text().splitlines()))
    assert {(r["case"], r["class"]) for r in rows} >= {("lowres", "liver"), ("patient1__dicom", "spleen"),
                                                       ("broken", "")}
    page = (out / "index.html").read_text()
    assert page.index("broken") < page.index("lowres") and 'src="previews/lowres.png"' in page

    # A rerun does no work: no model is loaded, no file is rewritten.
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.suffix in (".json", ".nrrd", ".png")
              and not p.name.startswith("batch_report")}

    def no_model(*args, **kwargs):
        raise AssertionError("a rerun loaded the model")

    monkeypatch.setattr("automedsam.batch.local.CaseWorker.__init__", no_model)
    code, report = batch(bundle, dataset, out)
    assert code == 4 and report["summary"]["processed"] == 0 and report["summary"]["skipped"] == 3
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    monkeypatch.undo()

    # The broken file replaced by a good one: only that case is done again.
    shutil.copy(dataset / "lowres.nii.gz", dataset / "broken.nii.gz")
    code, report = batch(bundle, dataset, out)
    assert code == 0 and report["summary"]["processed"] == 1 and report["summary"]["done"] == 3
    assert masks_of(out, "broken")["liver"].tolist() == masks_of(out, "lowres")["liver"].tolist()


def test_references_are_scored_in_physical_space_and_the_index_is_worst_first(make_bundle, ct_dir, tmp_path):
    bundle = make_bundle("tiny-sam2", "ppn", seed=2)
    listing = tmp_path / "cases.csv"
    with open(listing, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["case", "scan", "truth"])
        writer.writerow(["ct3mm", ct_dir / "ct_lowres.nii.gz", ct_dir / "ct_lowres_labels.nii.gz"])
        # This label file stores its rows flipped (direction (1,-1,1)): only physical space pairs it.
        writer.writerow(["ct1mm", ct_dir / "ct_dicom", ct_dir / "ct_dicom_labels.nii.gz"])
    out = tmp_path / "out"
    code = run(["batch", "--model", str(bundle), "--classes", "liver=5,spleen=1", "--input", str(listing),
                "--image-column", "scan", "--reference-column", "truth", "--output", str(out), "--device", "cpu",
                "--no-preview"])
    assert code == 0
    report = json.loads((out / "batch_report.json").read_text())
    records = {r["case"]: r for r in report["cases"]}
    for case, image, truth in (("ct3mm", "ct_lowres.nii.gz", "ct_lowres_labels.nii.gz"),
                               ("ct1mm", "ct_dicom", "ct_dicom_labels.nii.gz")):
        predicted = masks_of(out, case)
        assert read_segmentation(out / f"{case}.seg.nrrd").grid.same_grid(read_image(ct_dir / image))
        assert records[case]["preview"] is None
        reference = read_label_map(ct_dir / truth)
        ref = reference.array if case == "ct3mm" else reference.array[:, ::-1, :]  # undo the stored flip
        for name, value in (("liver", 5), ("spleen", 1)):
            p, r = predicted[name], ref == value
            expected = 2 * np.logical_and(p, r).sum() / max(1, p.sum() + r.sum())
            assert records[case]["classes"][name]["dsc"] == pytest.approx(expected, abs=1e-4)
    # As NIfTI label maps: values 1..N in --classes order on the input grid, overlaps reported.
    labels_out = tmp_path / "labels"
    assert run(["batch", "--model", str(bundle), "--classes", "liver=5,spleen=1", "--input", str(listing),
                "--image-column", "scan", "--output", str(labels_out), "--device", "cpu", "--format", "nifti",
                "--no-preview"]) == 0
    for case, image in (("ct3mm", "ct_lowres.nii.gz"), ("ct1mm", "ct_dicom")):
        label_map = read_label_map(labels_out / f"{case}.nii.gz")
        assert label_map.same_grid(read_image(ct_dir / image)) and set(np.unique(label_map.array)) <= {0, 1, 2}
        masks = masks_of(out, case)
        overlap = int(np.count_nonzero(masks["liver"] & masks["spleen"]))
        warned = json.loads((labels_out / f"{case}.json").read_text())["warnings"]
        assert bool(overlap) == any(f"{overlap} voxels belong to more than one class" in w for w in warned)
    page = (out / "index.html").read_text()
    order = sorted(records, key=lambda c: min(x["dsc"] for x in records[c]["classes"].values()))
    assert page.index(f">{order[0]}<") < page.index(f">{order[1]}<")
    assert set(report["classes"]) == {"liver", "spleen"} and report["classes"]["liver"]["cases"] == 2


def test_a_run_killed_mid_way_and_rerun_gives_the_outputs_of_an_uninterrupted_run(make_bundle, ct_dir, tmp_path):
    bundle = make_bundle("tiny-sam2", "ppn", seed=2)
    folder = tmp_path / "cases"
    folder.mkdir()
    for n in range(3):
        shutil.copy(ct_dir / "ct_lowres.nii.gz", folder / f"ct{n}.nii.gz")
    write_volume(read_image(ct_dir / "ct_full_lowres.nii.gz"), folder / "long.nrrd")
    command = [sys.executable, "-m", "automedsam", "batch", "--model", str(bundle), "--classes", "liver,spleen",
               "--input", str(folder), "--device", "cpu"]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "AutoMedSAMSlicer"))
    killed = tmp_path / "killed"
    process = subprocess.Popen([*command, "--output", str(killed)], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240

    def status(case: str) -> str | None:
        try:
            return json.loads((killed / f"{case}.json").read_text())["status"]
        except (OSError, ValueError, KeyError):
            return None

    while status("ct0") != "done" and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait(30)
    done_before = sorted(c for c in ("ct0", "ct1", "ct2", "long") if status(c) == "done")
    assert "ct0" in done_before and len(done_before) < 4, done_before
    # What a kill in the middle of a case leaves: the claim of the case it was on, a half-written
    # output that claim vouches for, a temporary file.
    claimed = [c for c in ("ct0", "ct1", "ct2", "long") if status(c) == "running"]
    assert len(claimed) == 1, claimed
    (killed / f"{claimed[0]}.seg.nrrd").write_bytes(b"NRRD0004\n")
    (killed / f".{claimed[0]}.seg.nrrd.123-abcdef01.tmp.seg.nrrd").write_bytes(b"partial")
    resumed = subprocess.run([*command, "--output", str(killed), "--json"], env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["skipped"] == len(done_before) and summary["done"] == 4
    whole = tmp_path / "whole"
    assert subprocess.run([*command, "--output", str(whole)], env=env, capture_output=True, timeout=600).returncode == 0
    for case in ("ct0", "ct1", "ct2", "long"):
        a, b = masks_of(killed, case), masks_of(whole, case)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), case
        ra, rb = (json.loads((o / f"{case}.json").read_text()) for o in (killed, whole))
        assert ra["classes"] == rb["classes"] and ra["size_ijk"] == rb["size_ijk"]  # (gzip stamps differ)
    assert not [p for p in killed.rglob(".*") if ".tmp" in p.name]


def test_local_workers_and_a_local_ray_cluster_give_identical_masks(make_bundle, ct_dir, tmp_path):
    pytest.importorskip("ray")
    bundle = make_bundle("tiny-sam2", "ppn", seed=2)
    folder = tmp_path / "cases"
    folder.mkdir()
    shutil.copy(ct_dir / "ct_lowres.nii.gz", folder / "a.nii.gz")
    write_volume(read_image(ct_dir / "ct_lowres.nii.gz"), folder / "b.nrrd")
    shutil.copytree(ct_dir / "ct_dicom", folder / "c")
    outputs = {}
    for name, extra in (("one", ["--workers", "1"]), ("pool", ["--workers", "2"]),
                        ("ray", ["--ray", "local", "--workers", "2"])):
        out = tmp_path / name
        code, report = batch(bundle, folder, out, "--no-preview", *extra)
        assert code == 0 and report["summary"]["done"] == 3, report
        outputs[name] = {c: masks_of(out, c) for c in ("a", "b", "c")}
        assert report["summary"]["backend"].startswith("ray" if name == "ray" else "local")
        if name != "one":  # the cases really ran in other processes, one model each
            pids = {r["worker"]["pid"] for r in report["cases"]}
            assert os.getpid() not in pids and 1 <= len(pids) <= 2
    for case, masks in outputs["pool"].items():  # both: two workers of one thread each
        assert all(np.array_equal(masks[k], outputs["ray"][case][k]) for k in masks), case
    for case, masks in outputs["one"].items():
        # One worker of two threads sums in another order: a voxel whose logit is ~0 may flip.
        for k in masks:
            assert np.count_nonzero(masks[k] != outputs["pool"][case][k]) <= 1e-4 * masks[k].sum(), (case, k)
    assert all(m.any() and not m.all() for case in outputs["one"].values() for m in case.values())


def test_another_configuration_is_refused_unless_overwrite(make_bundle, ct_dir, tmp_path, capsys):
    bundle = make_bundle("tiny-sam2", "ppn", seed=2)
    folder = tmp_path / "cases"
    folder.mkdir()
    shutil.copy(ct_dir / "ct_lowres.nii.gz", folder / "a.nii.gz")
    out = tmp_path / "out"
    assert batch(bundle, folder, out, "--no-preview")[0] == 0
    capsys.readouterr()
    code = run(["batch", "--model", str(bundle), "--classes", "liver", "--input", str(folder), "--output", str(out),
                "--device", "cpu"])
    assert code == 2 and "another model, classes or settings (a)" in capsys.readouterr().err
    assert set(masks_of(out, "a")) == {"liver", "spleen"}  # untouched
    code = run(["batch", "--model", str(bundle), "--classes", "liver", "--input", str(folder), "--output", str(out),
                "--device", "cpu", "--overwrite"])
    assert code == 0 and set(masks_of(out, "a")) == {"liver"}


@pytest.mark.parametrize("setup, message", [
    (lambda d: None, "no volume files"),
    (lambda d: (d / "x.csv").write_text("path\nfoo.nii.gz\n"), "no column 'image'"),
    (lambda d: [(d / n).write_bytes(b"x") for n in ("a.nii.gz", "a.nrrd")], "would both be case 'a'"),
])
def test_bad_batch_inputs_are_refused_before_any_work(make_bundle, tmp_path, capsys, setup, message):
    folder = tmp_path / "in"
    folder.mkdir()
    setup(folder)
    source = folder / "x.csv" if (folder / "x.csv").exists() else folder
    code = run(["batch", "--model", str(make_bundle("tiny-sam2", "ppn", seed=2)), "--classes", "liver", "--input",
                str(source), "--output", str(tmp_path / "out"), "--device", "cpu"])
    assert code == 2 and message in capsys.readouterr().err


def test_unknown_class_or_missing_model_fail_before_reading_cases(make_bundle, tmp_path, capsys):
    args = ["batch", "--input", str(tmp_path), "--output", str(tmp_path / "out"), "--device", "cpu"]
    assert run([*args, "--model", str(make_bundle("tiny-sam2", "ppn", seed=2)), "--classes", "heart"]) == 2
    assert "it has: liver, spleen" in capsys.readouterr().err
    assert run([*args, "--model", str(tmp_path / "none.zip"), "--classes", "liver"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_worker_slots_share_the_machine():
    from automedsam.batch.local import plan_slots
    from automedsam.errors import InvalidInputError

    assert [(s.device, s.threads) for s in plan_slots("auto", None, cores=8, gpus=0)] == [("cpu", 8)]
    assert [(s.device, s.threads) for s in plan_slots("cpu", 3, cores=8, gpus=2)] == [("cpu", 2)] * 3
    assert [s.device for s in plan_slots("auto", None, cores=16, gpus=2)] == ["cuda:0", "cuda:1"]
    assert [s.device for s in plan_slots("auto", 4, cores=16, gpus=2)] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    assert [s.device for s in plan_slots("cuda:1", 2, cores=16, gpus=2)] == ["cuda:1", "cuda:1"]
    with pytest.raises(InvalidInputError, match="no CUDA GPU"):
        plan_slots("cuda", None, cores=4, gpus=0)
    with pytest.raises(InvalidInputError, match=">= 1"):
        plan_slots("cpu", 0)


def test_ray_actor_plan_follows_the_cluster():
    from automedsam.batch.ray_cluster import actor_plan

    assert actor_plan({"CPU": 64.0, "GPU": 8.0}, "auto", None) == (8, {"num_gpus": 1.0, "num_cpus": 1}, "cuda", 8)
    assert actor_plan({"CPU": 2.0}, "auto", 2) == (2, {"num_cpus": 1}, "cpu", 1)
    assert actor_plan({"CPU": 32.0}, "cpu", None) == (8, {"num_cpus": 4}, "cpu", 4)


def test_preview_shows_the_same_picture_whatever_the_voxel_order(ct, tmp_path):
    """The same physical image and mask stored with flipped rows and columns (another direction
    and origin) render to the same picture: the preview reorients to LPS."""
    from PIL import Image

    from automedsam.preview import write_preview
    from automedsam.volume import Volume

    mask = np.zeros(ct.array.shape, bool)
    mask[10:20, 20:40, 10:50] = True  # low i = patient's right (this CT's i axis points to R)
    flipped_matrix = ct.ijk_to_lps() @ np.array([[-1, 0, 0, ct.shape_ijk[0] - 1], [0, -1, 0, ct.shape_ijk[1] - 1],
                                                 [0, 0, 1, 0], [0, 0, 0, 1]], float)
    flipped = Volume.from_ijk_to_lps(ct.array[:, ::-1, ::-1], flipped_matrix)
    a = write_preview(tmp_path / "a.png", ct, {"liver": mask}, {"liver": (255, 0, 0)}, title="x")
    b = write_preview(tmp_path / "b.png", flipped, {"liver": mask[:, ::-1, ::-1]}, {"liver": (255, 0, 0)}, title="x")
    pa, pb = np.asarray(Image.open(a)), np.asarray(Image.open(b))
    assert pa.shape == pb.shape and np.array_equal(pa, pb)
    # Radiological: the patient's right (low i here) is on the picture's left in the axial tiles.
    red = np.argwhere((pa[..., 0] == 255) & (pa[..., 1] == 0))
    first_tile = red[red[:, 1] < pa.shape[1] // 3]
    assert first_tile[:, 1].mean() < np.argwhere(pa[50:, :, 0] > 0)[:, 1].max() / 3
    with pytest.raises(Exception, match="PNG"):
        write_preview(tmp_path / "a.jpg", ct, {}, {})


def test_segment_writes_a_preview(make_bundle, ct_dir, tmp_path):
    from PIL import Image

    out = tmp_path / "case.seg.nrrd"
    png = tmp_path / "case.png"
    assert run(["segment", str(ct_dir / "ct_lowres.nii.gz"), "--model", str(make_bundle("tiny-sam2", "ppn", seed=2)),
                "--classes", "liver", "-o", str(out), "--device", "cpu", "--preview", str(png)]) == 0
    picture = Image.open(png)
    assert picture.format == "PNG" and picture.height > 256
    assert run(["segment", str(ct_dir / "ct_lowres.nii.gz"), "--model", str(make_bundle("tiny-sam2", "ppn", seed=2)),
                "--classes", "liver", "-o", str(tmp_path / "b.seg.nrrd"), "--preview", str(png)]) == 2


def test_slicer_batch_script_runs_a_folder_through_the_same_batch_code(slicer, make_bundle, dataset, tmp_path,
                                                                         capsys):
    import runpy

    from conftest import REPO

    main = runpy.run_path(str(REPO / "AutoMedSAMSlicer" / "Resources" / "Scripts" / "AutoMedSAMBatch.py"))["main"]
    bundle = make_bundle("tiny-sam2", "ppn", seed=2)
    out = tmp_path / "from_slicer"
    assert main(["--", "--input", str(dataset), "--classes", "liver,spleen", "--model", str(bundle), "--output",
                 str(out), "--device", "cpu"]) == 4  # the broken file: the other cases are written
    printed = capsys.readouterr().out
    assert "broken failed: could not read" in printed and "2 done, 1 failed" in printed
    assert batch(bundle, dataset, tmp_path / "from_cli")[0] == 4
    for case in ("lowres", "patient1__dicom"):
        a, b = masks_of(out, case), masks_of(tmp_path / "from_cli", case)
        assert all(np.array_equal(a[k], b[k]) for k in a)
    # A rerun from Slicer does nothing more.
    assert main(["--", "--input", str(dataset), "--classes", "liver,spleen", "--model", str(bundle), "--output",
                 str(out), "--device", "cpu"]) == 4
    assert json.loads((out / "batch_report.json").read_text())["summary"]["processed"] == 0
