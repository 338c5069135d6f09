"""``automedsam batch`` and the folders it writes to: it never removes or replaces a file it did not
write, one run per output folder, SIGTERM and dying workers, inputs that are not regular files,
unsafe case names, hand-edited records and an output folder that stops being writable. Each case
runs the real command (in this process, or as a subprocess where signals are the point) on crops
of the shared CT."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from automedsam.cli.main import run

PACKAGE = str(Path(__file__).resolve().parents[1] / "AutoMedSAMSlicer")


@pytest.fixture(scope="module")
def crop(ct_dir, tmp_path_factory) -> Path:
    """Eight axial slices of the shared CT through the liver and spleen (a case takes seconds)."""
    import SimpleITK as sitk

    path = tmp_path_factory.mktemp("crop") / "crop.nrrd"
    image = sitk.ReadImage(str(ct_dir / "ct_lowres.nii.gz"))
    sitk.WriteImage(image[:, :, 12:20], str(path), True)
    return path


def cases(folder: Path, crop: Path, names=("a", "b", "c")) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(crop, folder / f"{name}.nrrd")
    return folder


def batch(bundle, source, out, *extra) -> int:
    return run(["batch", "--model", str(bundle), "--classes", "liver,spleen", "--input", str(source), "--output",
                str(out), "--device", "cpu", *extra])


def digests(folder: Path) -> dict[str, str]:
    """Every file's sha256, but the run's (empty, hidden) lock file, which stays so that the lock
    is always taken on the same file."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".automedsam-batch.lock"}


def status(out: Path, case: str) -> dict:
    try:
        return json.loads((out / f"{case}.json").read_text())
    except (OSError, ValueError):
        return {}


def command(bundle, source, out, *extra) -> list[str]:
    return [sys.executable, "-m", "automedsam", "batch", "--model", str(bundle), "--classes", "liver,spleen",
            "--input", str(source), "--output", str(out), "--device", "cpu", "--no-preview", *extra]


def subprocess_env() -> dict:
    return dict(os.environ, PYTHONPATH=PACKAGE)


def wait_for(condition, process, seconds=300.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the run ended early: {process.stderr.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("the run never got there")
        time.sleep(0.02)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (dead, not yet reaped by its parent) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_inputs_and_files_of_others_are_never_replaced(make_bundle, crop, tmp_path, capsys):
    bundle = make_bundle("tiny-sam2", "ppn", seed=2)
    folder = cases(tmp_path / "in", crop, ("a", "b"))
    shutil.copy(crop, folder / "scan.nii.gz")  # its NIfTI output would be the scan itself
    (folder / "a.json").write_text('{"RepetitionTime": 2.0}')  # a BIDS sidecar beside its scan
    before = digests(folder)
    for extra in (["--format", "nifti"], ["--format", "nifti", "--overwrite"]):
        assert batch(bundle, folder, folder, *extra) == 2
        assert "would replace the input of case scan" in capsys.readouterr().err
    assert batch(bundle, folder, folder) == 2  # seg.nrrd: a.json is the user's
    err = capsys.readouterr().err
    assert "did not write itself" in err and str(folder / "a.json") in err and "nothing was changed" in err
    assert digests(folder) == before

    # An annotation folder: a person's a.seg.nrrd, b.json and index.html are refused by name.
    out = tmp_path / "annotations"
    out.mkdir()
    (out / "a.seg.nrrd").write_bytes(b"a manual segmentation")
    (out / "b.json").write_text('{"note": "mine"}')
    (out / "index.html").write_text("<html>my page</html>")
    mine = digests(out)
    source = cases(tmp_path / "in2", crop, ("a", "b"))
    assert batch(bundle, source, out) == 2
    err = capsys.readouterr().err
    assert all(name in err for name in ("a.seg.nrrd", "b.json", "index.html")), err
    assert digests(out) == mine
    assert batch(bundle, source, out, "--overwrite") == 0  # asked for: replaced
    assert status(out, "a")["status"] == "done" and "automedsam batch" in (out / "index.html").read_text()

    # A segmentation the user corrected after the run is the user's: a rerun refuses to redo it.
    (out / "b.seg.nrrd").write_bytes((out / "b.seg.nrrd").read_bytes() + b"\n")
    corrected = digests(out)["b.seg.nrrd"]
    assert batch(bundle, source, out) == 2
    assert "b.seg.nrrd" in capsys.readouterr().err and digests(out)["b.seg.nrrd"] == corrected


def test_outputs_written_into_the_input_folder_are_not_taken_for_scans(make_bundle, crop, tmp_path, capsys):
    bundle = make_bundle("tiny-sam2", "ppn", seed=2)
    folder = cases(tmp_path / "in", crop, ("a", "b"))
    assert batch(bundle, folder, folder, "--format", "nifti", "--no-preview") == 0
    assert (folder / "a.nii.gz").is_file() and (folder / "a.nrrd").is_file()
    capsys.readouterr()
    assert batch(bundle, folder, folder, "--format", "nifti", "--no-preview", "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["cases"], summary["processed"], summary["skipped"]) == (2, 0, 2)


def test_one_run_per_output_folder(make_bundle, crop, tmp_path, capsys):
    bundle = make_bundle("tiny-sam2", "ppn", seed=2)
    source = cases(tmp_path / "in", crop, ("a",))
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom automedsam.batch.lock import OutputLock\n"
         "with OutputLock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(600)\n", str(out)],
        env=subprocess_env(), stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"held"
        assert batch(bundle, source, out) == 2
        assert f"another batch run (pid {holder.pid} on" in capsys.readouterr().err
        assert not (out / "a.json").exists()
    finally:
        holder.kill()  # SIGKILL: the system releases the lock
        holder.wait()
    assert batch(bundle, source, out, "--no-preview") == 0


def test_sigterm_stops_every_worker_and_reports_what_is_on_disk(make_bundle, crop, tmp_path):
    bundle = make_bundle("tiny-sam2", "ppn", seed=2)
    names = ("a", "b", "c", "d", "e", "f")
    source = cases(tmp_path / "in", crop, names)
    out = tmp_path / "out"
    process = subprocess.Popen(command(bundle, source, out, "--workers", "2"), env=subprocess_env(),
                               stderr=subprocess.PIPE)
    wait_for(lambda: any(status(out, n).get("status") == "done" for n in names), process)
    workers = {status(out, n)["worker"]["pid"] for n in names if status(out, n).get("worker")}
    process.send_signal(signal.SIGTERM)
    assert process.wait(120) == 130
    assert "interrupted" in process.stderr.read().decode()
    time.sleep(1.0)
    assert workers and not [pid for pid in workers if alive(pid)]
    done = {n for n in names if status(out, n).get("status") == "done"}
    report = json.loads((out / "batch_report.json").read_text())
    assert {r["case"] for r in report["cases"]} == done and not report["summary"]["complete"]
    held = [n for n in names if status(out, n).get("status") == "running"]
    assert all(status(out, n)["interrupted"] for n in held)
    # The next run does the rest, counting no interrupted case as one the run died on.
    rerun = subprocess.run(command(bundle, source, out, "--json"), env=subprocess_env(), capture_output=True,
                           text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout)
    assert summary["done"] == len(names) and summary["skipped"] == len(done)


def test_a_killed_worker_fails_only_its_case_and_a_case_that_kills_twice_is_not_retried(make_bundle, crop,
                                                                                        tmp_path):
    bundle = make_bundle("tiny-sam2", "ppn", seed=2)
    names = ("a", "b", "c", "d")
    source = cases(tmp_path / "in", crop, names)
    out = tmp_path / "out"

    def kill_the_worker_on(case: str) -> subprocess.CompletedProcess:
        process = subprocess.Popen(command(bundle, source, out, "--workers", "2", "--json"), env=subprocess_env(),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        wait_for(lambda: status(out, case).get("status") == "running", process)
        os.kill(status(out, case)["worker"]["pid"], signal.SIGKILL)
        stdout, stderr = process.communicate(timeout=600)
        return subprocess.CompletedProcess(process.args, process.returncode, stdout.decode(), stderr.decode())

    first = kill_the_worker_on("b")
    assert first.returncode == 4, first.stderr
    assert json.loads(first.stdout)["done"] == 3  # the other worker and its replacement did the rest
    lost = status(out, "b")
    assert lost["status"] == "failed" and lost["error"]["type"] == "WorkerLost" and lost["error"]["retryable"]
    assert not (out / "b.seg.nrrd").exists()

    second = kill_the_worker_on("b")  # the rerun tries b again (last), and it dies again
    assert second.returncode == 4 and json.loads(second.stdout)["processed"] == 1
    assert status(out, "b")["deaths"] == 2 and not status(out, "b")["error"]["retryable"]
    third = subprocess.run(command(bundle, source, out, "--json"), env=subprocess_env(), capture_output=True,
                           text=True, timeout=600)
    assert third.returncode == 4 and json.loads(third.stdout)["processed"] == 0  # not tried a third time
    retried = subprocess.run(command(bundle, source, out, "--json", "--retry-failed"), env=subprocess_env(),
                             capture_output=True, text=True, timeout=600)
    assert retried.returncode == 0 and json.loads(retried.stdout)["done"] == 4


def test_an_unreachable_ray_cluster_fails_at_once_with_exit_3(make_bundle, crop, tmp_path, capsys):
    pytest.importorskip("ray")
    source = cases(tmp_path / "in", crop, ("a",))
    assert batch(make_bundle("tiny-sam2", "ppn", seed=2), source, tmp_path / "out", "--ray", "127.0.0.1:9") == 3
    assert "no Ray cluster answers at '127.0.0.1:9'" in capsys.readouterr().err
    assert not (tmp_path / "out" / "a.json").exists()


def test_pipes_and_devices_fail_only_their_case_and_names_are_made_safe(make_bundle, crop, ct_dir, tmp_path):
    bundle = make_bundle("tiny-sam2", "ppn", seed=2)
    source = cases(tmp_path / "in", crop, ("a", "Müller scan 2"))
    os.mkfifo(source / "pipe.nii.gz")
    series = source / "series"
    shutil.copytree(ct_dir / "ct_dicom", series)
    os.mkfifo(series / "stray")
    out = tmp_path / "out"
    result = subprocess.run(command(bundle, source, out, "--json"), env=subprocess_env(), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 4, result.stderr
    records = {r["case"]: r for r in json.loads((out / "batch_report.json").read_text())["cases"]}
    assert records["pipe"]["status"] == "failed" and "named pipe (FIFO)" in records["pipe"]["error"]["message"]
    assert records["series"]["status"] == "failed" and "stray" in records["series"]["error"]["message"]
    safe = [c for c in records if c.startswith("Muller_scan_2-")]
    assert len(safe) == 1 and records[safe[0]]["status"] == "done" and records["a"]["status"] == "done"
    assert (out / f"{safe[0]}.seg.nrrd").is_file()
    for args in (["inspect", str(source / "pipe.nii.gz")], ["inspect", "/dev/zero"],
                 ["evaluate", "--pred", str(source / "pipe.nii.gz"), "--ref", str(ct_dir / "ct_lowres_labels.nii.gz"),
                  "--classes", "liver=5"]):
        done = subprocess.run([sys.executable, "-m", "automedsam", *args], env=subprocess_env(), capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 2 and ("named pipe" in done.stderr or "a device" in done.stderr), done.stderr


def test_hand_edited_records_are_done_again_and_never_reach_the_page_unescaped(make_bundle, crop, tmp_path):
    bundle = make_bundle("tiny-sam2", "ppn", seed=2)
    source = cases(tmp_path / "in", crop)
    out = tmp_path / "out"
    assert batch(bundle, source, out) == 0
    a = status(out, "a")
    (out / "a.json").write_text(json.dumps(a | {"preview": "javascript:alert(1)"}))
    (out / "b.json").write_text(json.dumps(status(out, "b") | {"classes": "lots", "error": "x"}))
    c = status(out, "c")
    (out / "c.json").write_text(json.dumps(c | {"warnings": ['<img src=x onerror="alert(1)">']}))
    assert batch(bundle, source, out) == 0
    report = json.loads((out / "batch_report.json").read_text())
    assert report["summary"]["processed"] == 2 and report["summary"]["done"] == 3
    assert status(out, "a")["preview"] == "previews/a.png" and isinstance(status(out, "b")["classes"], dict)
    page = (out / "index.html").read_text()
    assert "javascript:" not in page and "<img src=x" not in page and "&lt;img src=x" in page


def test_an_output_folder_that_becomes_unwritable_stops_the_run_with_exit_2(make_bundle, crop, tmp_path, capsys,
                                                                             monkeypatch):
    import automedsam.batch.case_worker as case_worker

    bundle = make_bundle("tiny-sam2", "ppn", seed=2)
    source = cases(tmp_path / "in", crop)
    out = tmp_path / "out"
    real = case_worker.write_json_atomic
    writes = []

    def read_only_after_first_case(path, data):
        # What a read-only remount or a full disk raises (root, as here, ignores chmod).
        if len(writes) >= 2:
            raise PermissionError(errno.EROFS, "Read-only file system", str(path))
        writes.append(path)
        real(path, data)

    monkeypatch.setattr(case_worker, "write_json_atomic", read_only_after_first_case)
    assert batch(bundle, source, out) == 2
    err = capsys.readouterr().err
    assert f"cannot write into the output folder {out}: Read-only file system" in err and "Traceback" not in err
    assert status(out, "a")["status"] == "done"  # the finished case is kept
    monkeypatch.undo()
    assert batch(bundle, source, out, "--json") == 0
    assert json.loads(capsys.readouterr().out)["skipped"] == 1


def test_a_deleted_preview_is_drawn_again(make_bundle, crop, tmp_path, capsys):
    bundle = make_bundle("tiny-sam2", "ppn", seed=2)
    source = cases(tmp_path / "in", crop, ("a", "b"))
    out = tmp_path / "out"
    assert batch(bundle, source, out) == 0
    (out / "previews" / "a.png").unlink()
    capsys.readouterr()
    assert batch(bundle, source, out, "--json") == 0
    assert json.loads(capsys.readouterr().out)["processed"] == 1 and (out / "previews" / "a.png").is_file()


def test_no_ray_process_outlives_a_killed_ray_local_run(make_bundle, crop, tmp_path):
    """Killed by SIGKILL, a ``--ray local`` run leaves nothing: Ray's dashboard and runtime-env
    agents, which otherwise live on for up to a minute and a half, go within seconds."""
    pytest.importorskip("ray")
    from automedsam.batch.reaper import descendants

    bundle = make_bundle("tiny-sam2", "ppn", seed=2)
    source = cases(tmp_path / "in", crop, ("a", "b", "c", "d"))
    out = tmp_path / "out"
    process = subprocess.Popen(command(bundle, source, out, "--ray", "local", "--workers", "1"), env=subprocess_env(),
                               stderr=subprocess.PIPE)
    wait_for(lambda: any(status(out, n).get("status") in ("running", "done") for n in "abcd"), process)
    ours = {pid for pid, _ in descendants(process.pid)}
    names = {Path(f"/proc/{pid}/comm").read_text().strip() for pid in ours if alive(pid)}
    assert {"raylet", "gcs_server"} <= names and any(n.startswith("ray::Dashboard") for n in names), names
    process.kill()
    process.wait(30)
    deadline = time.monotonic() + 30
    while [pid for pid in ours if alive(pid)] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in ours if alive(pid)]


def test_names_and_temporary_files(tmp_path):
    from automedsam.batch.cases import safe_case_id
    from automedsam.batch.records import OutputLayout
    from automedsam.io import temporary_name

    assert safe_case_id("ct_001") == "ct_001"
    for name in ("NUL", "com1.scan", "Batch_Report", "Müller scan 2", "肝臓", " lead"):
        safe = safe_case_id(name)
        assert safe != name and safe.isascii() and " " not in safe, (name, safe)
    assert safe_case_id("Müller 2") != safe_case_id("Muller 2")  # folded alike, kept apart
    layout = OutputLayout(tmp_path)
    ours = temporary_name(layout.record("a"))
    mine = [tmp_path / ".a.json.old.tmp", tmp_path / ".a.png.json.123-abcdef01.tmp"]  # the user's; case a.png's record
    for p in (ours, *mine):
        p.write_text("x")
    layout.remove_temporary("a")
    assert not ours.exists() and all(p.exists() for p in mine)
