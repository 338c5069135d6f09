"""Install what AutoMedSAM needs into Slicer's Python: only on first use, only after asking, and
never on Slicer's main thread.

What is needed comes from the ``pyproject.toml`` shipped with the module (the one declaration of the
dependencies: core ``dependencies`` plus the ``models`` and ``service`` extras). What is missing or
too old becomes a list of :class:`InstallStep` (one command each):

- torch and torchvision through light-the-torch, the tool Slicer's PyTorch extension uses, so the
  CUDA build matches the machine's driver (a CPU build where there is none). light-the-torch is put
  in a folder of its own rather than into Slicer's Python: it requires ``pip<26.1`` and Slicer 5.12
  ships pip 26.1.1 (SuperBuild/External_python-pip.cmake), which installing it there would downgrade.
- the other wheels with ``pip install``;
- ``sam2``, which has no wheel, with ``pip install --no-build-isolation`` (so it builds against that
  torch instead of downloading a second one) and ``SAM2_BUILD_CUDA=0``.

:func:`installEvents` runs the steps as child processes and yields progress events, so the panel
runs them as a :class:`~AutoMedSAMSlicerLib.jobs.Job` on a thread of its own with progress (pip's
own download counts) and Cancel, like any other long run (:func:`ensureDependencies`, for the
console, waits instead). ``PyTorchUtils.installTorch`` is not used: it waits on
the calling thread (``slicer.util.logProcessOutput``) and imports torch into Slicer at its end.
Nothing here imports torch: versions are read from package metadata.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import slicer

log = logging.getLogger(__name__)

#: Installed through light-the-torch, never by plain pip (which would pick a CPU or mismatched CUDA build).
TORCH_PACKAGES = ("torch", "torchvision")
EXTRAS = ("models", "service")
#: light-the-torch and the pip it runs, in a folder of their own (see the module docstring).
LIGHT_THE_TORCH = ("light-the-torch>=0.7", "pip>=22.3,<26.1")
#: No wheel on PyPI: built from source against the torch already installed. With build isolation,
#: pip would download a second torch just to build it.
BUILD_WITHOUT_ISOLATION = ("sam2",)
#: pip prints "Progress <bytes> of <total>" lines with ``--progress-bar raw`` (pip 24.1 and later;
#: Slicer 5.10 ships pip 25.1.1).
RAW_PROGRESS_SINCE = "24.1"
_PROGRESS_LINE = re.compile(r"^Progress (\d+) of (\d+)$")
_DOWNLOADING_LINE = re.compile(r"^\s*Downloading (\S+)")
#: Once pip prints this it is writing into site-packages: stopping it then could leave a package
#: half installed, so a Cancel waits for the step to end.
_INSTALLING_LINE = "Installing collected packages"


def pyprojectPath() -> Path:
    """``Resources/AutoMedSAMSlicer/pyproject.toml`` (copied there by CMake), else the checkout's root one."""
    here = Path(__file__).resolve().parents[1]
    for candidate in (here / "Resources" / "AutoMedSAMSlicer" / "pyproject.toml", here.parent / "pyproject.toml"):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"pyproject.toml not found next to {here}")


def _project(path: Path | None = None) -> dict:
    import tomllib  # Python 3.11+: Slicer 5.10 and later ship 3.12 (see README, supported versions)

    with open(path or pyprojectPath(), "rb") as f:
        return tomllib.load(f)["project"]


def requirements(path: Path | None = None) -> list[str]:
    """Requirement strings: core dependencies and the extras Slicer needs, without torch/torchvision."""
    project = _project(path)
    reqs = list(project.get("dependencies", []))
    for extra in EXTRAS:
        reqs += project.get("optional-dependencies", {}).get(extra, [])
    return [r for r in reqs if _name(r) not in TORCH_PACKAGES]


def _name(requirement: str) -> str:
    for sep in "<>=!~[; ":
        requirement = requirement.split(sep)[0]
    return requirement.strip().lower()


def modelRequirement(name: str, path: Path | None = None) -> str:
    """The version specifier the ``models`` extra gives ``name`` (e.g. ``">=2.5.1"`` for torch)."""
    for requirement in _project(path)["optional-dependencies"]["models"]:
        if _name(requirement) == name:
            return requirement[len(_name(requirement)):].strip()
    return ""


def installedVersion(name: str) -> str | None:
    """The installed version of a distribution from its metadata (nothing is imported)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def satisfies(installed: str | None, specifier: str) -> bool:
    """Whether ``installed`` meets ``specifier`` (``>=`` / ``==`` lists, e.g. ``">=2.5.1"``)."""
    if installed is None:
        return False
    if not specifier:
        return True
    try:
        from packaging.specifiers import SpecifierSet

        return SpecifierSet(specifier).contains(installed, prereleases=True)
    except ImportError:  # no 'packaging' (it ships with pip, so rarely): compare release numbers
        def release(text):
            return tuple(int(p) for p in text.split("+")[0].split(".")[:3] if p.isdigit())

        wanted = specifier.lstrip(">=").strip()
        return release(installed) >= release(wanted)


def unmet(reqs: list[str]) -> list[str]:
    """The requirements that are not installed, or installed in a version the specifier excludes
    (requirements whose environment marker does not apply here are left out)."""
    result = []
    for requirement in reqs:
        try:
            from packaging.requirements import Requirement

            parsed = Requirement(requirement)
            if parsed.marker is not None and not parsed.marker.evaluate():
                continue
            specifier = str(parsed.specifier)
        except ImportError:
            specifier = requirement[len(_name(requirement)):].split(";")[0].strip()
        if not satisfies(installedVersion(_name(requirement)), specifier):
            result.append(requirement)
    return result


@dataclass(frozen=True)
class InstallStep:
    """One installer command. ``packages`` are the requirements it installs into Slicer's Python
    (shown to the user before anything runs); ``env`` adds variables to Slicer's startup environment."""

    title: str
    argv: tuple[str, ...]
    packages: tuple[str, ...]
    env: dict = field(default_factory=dict)
    #: A folder only this run needs: removed when the run ends, however it ends.
    removeAfter: str = ""
    #: Keep the torch and torchvision builds light-the-torch installed: pip gets them as constraints
    #: (a dependency asking for another torch then fails instead of swapping in a PyPI build).
    keepTorch: bool = False


def installSteps(python: str | None = None, lightTheTorchFolder: str | None = None) -> list[InstallStep]:
    """What must run for every dependency to be met, in order (torch first: the others build on
    it); empty when all are. Reads package metadata only. ``python``: Slicer's ``PythonSlicer``
    by default; ``lightTheTorchFolder``: where light-the-torch goes (a new temporary folder by default)."""
    if python is None:
        from AutoMedSAMSlicerLib.backends import slicerPythonExecutable

        python = slicerPythonExecutable()
    pip = [python, "-m", "pip", "install", *progressArguments()]
    steps = []
    torch = unmet([f"{name}{modelRequirement(name)}" for name in TORCH_PACKAGES])
    if torch:
        # Both, even if only one is missing: light-the-torch picks builds that belong together.
        both = tuple(f"{name}{modelRequirement(name)}" for name in TORCH_PACKAGES)
        # Named, not made: pip --target makes it, and installEvents removes it whatever happens.
        folder = lightTheTorchFolder or str(Path(tempfile.gettempdir()) / f"automedsam-ltt-{uuid.uuid4().hex}")
        steps.append(InstallStep("light-the-torch (PyTorch's installer)",
                                 (*pip, "--target", folder, "--no-warn-script-location", *LIGHT_THE_TORCH), ()))
        # light-the-torch's folder goes first on sys.path (PYTHONPATH would come after the paths
        # PythonSlicer's launcher puts there, Slicer's own pip among them); runpy runs it as -m would.
        bootstrap = ("import runpy, sys; sys.path.insert(0, sys.argv.pop(1)); "
                     "runpy.run_module('light_the_torch', run_name='__main__', alter_sys=True)")
        steps.append(InstallStep("PyTorch", (python, "-c", bootstrap, folder, "install", *both, *progressArguments()),
                                 both, removeAfter=folder))
    reqs = unmet(requirements())
    wheels = [r for r in reqs if _name(r) not in BUILD_WITHOUT_ISOLATION]
    if wheels:
        steps.append(InstallStep("Python packages", (*pip, *wheels), tuple(wheels), keepTorch=True))
    for requirement in reqs:
        if _name(requirement) in BUILD_WITHOUT_ISOLATION:
            steps.append(InstallStep(f"{_name(requirement)} (built from source)",
                                     (*pip, "--no-build-isolation", requirement), (requirement,),
                                     {"SAM2_BUILD_CUDA": "0"},  # its CUDA extension needs a compiler and toolkit
                                     keepTorch=True))
    return steps


def progressArguments() -> list[str]:
    """``--progress-bar raw`` where Slicer's pip has it (download counts on separate lines)."""
    return ["--progress-bar", "raw"] if satisfies(installedVersion("pip"), f">={RAW_PROGRESS_SINCE}") else []


def missingModelDependencies() -> list[str]:
    """Names of what running the models needs but is not installed or too old (torch included),
    from package metadata, so nothing heavy is imported to find out."""
    torch = [f"{name}{modelRequirement(name)}" for name in TORCH_PACKAGES]
    return sorted({_name(r) for r in unmet([*requirements(), *torch])})


def confirmInstall(steps: list[InstallStep]) -> bool:
    """Ask once, listing every package that will be installed (main thread)."""
    packages = [p for step in steps for p in step.packages]
    return slicer.util.confirmOkCancelDisplay(
        "AutoMedSAM will download and install these Python packages into Slicer's Python:\n\n"
        + "\n".join(packages) + "\n\nThis may take several minutes (PyTorch alone is a download of up to 2-3 GB). "
        "You can keep working, and Cancel stops it.", "AutoMedSAM: install dependencies")


class PipOutput:
    """What pip's output lines say so far: a short status, the step's fraction done (downloads count
    up to 0.8, writing into site-packages is 0.9) and whether it is writing (not to be stopped)."""

    def __init__(self):
        self.status, self.fraction, self.writing = "starting", 0.0, False

    def take(self, line: str) -> None:
        counted = _PROGRESS_LINE.match(line.strip())
        downloading = _DOWNLOADING_LINE.match(line)
        if counted:  # the bar never moves back: each of a step's downloads counts from 0 again
            done, size = int(counted[1]), int(counted[2])
            self.fraction = max(self.fraction, 0.8 * done / size) if size else self.fraction
            self.status = f"{self.status.split(':')[0]}: {done / 1e6:.0f} of {size / 1e6:.0f} MB"
        elif downloading:
            from urllib.parse import unquote

            self.status = f"downloading {unquote(downloading[1].rsplit('/', 1)[-1])}"
        elif line.strip():
            self.writing = self.writing or line.startswith(_INSTALLING_LINE)
            self.fraction = max(self.fraction, 0.9) if self.writing else self.fraction
            self.status = line.strip()[:120]


#: Set while an install of ours runs (the panel's job or the console's): a second one must wait.
_installing = threading.Event()
#: After a Cancel, how long to wait for pip's next lines before stopping it: the line saying it
#: writes into site-packages may still be on its way.
CANCEL_DRAIN_S = 0.3


def installEvents(steps: list[InstallStep], environment: dict | None, cancelEvent: threading.Event,
                  report: dict | None = None, readTimeout: float = 0.2) -> Iterator[dict]:
    """Run ``steps`` one after another, yielding progress events (``stage``, ``done``/``total`` in
    thousandths, ``message``) at least every ``readTimeout`` seconds. Meant for a job's thread.

    ``environment``: the environment to start from, ``slicer.util.startupEnvironment()`` (read on the
    main thread); None uses this process's. Cancel (``cancelEvent``) stops the running command at
    once, except while pip writes into site-packages: that step is let finish, then nothing more
    runs, and the run still ends "cancelled". However the run ends, ``report["inUse"]`` gets the
    installed packages that were imported already in this process (Slicer must restart for them),
    worked out here, off the main thread (it reads every distribution's metadata).

    Raises:
        ProcessFailedError: a step failed; the message names it and ends with its last output lines.
        RuntimeError: another install of AutoMedSAM's runs.
    """
    if _installing.is_set():
        raise RuntimeError("AutoMedSAM is already installing its dependencies; wait for that to finish")
    _installing.set()
    installed: list[str] = []
    total = 1000 * len(steps)
    try:
        for index, step in enumerate(steps):
            stopped = yield from _runStep(step, environment, cancelEvent, readTimeout, index, len(steps))
            if not stopped:
                installed.extend(step.packages)
            if stopped or cancelEvent.is_set():
                finished = index + (not stopped)
                yield {"stage": "cancelled", "done": 1000 * finished, "total": total,
                       "message": f"Cancelled: {finished} of {len(steps)} install steps done, the rest not started"}
                return
        yield {"stage": "done", "done": total, "total": total, "message": "Dependencies installed"}
    finally:
        if report is not None:
            report["inUse"] = alreadyImported(installed)
        _installing.clear()
        for step in steps:
            if step.removeAfter:
                shutil.rmtree(step.removeAfter, ignore_errors=True)


def _runStep(step: InstallStep, environment: dict | None, cancelEvent: threading.Event, readTimeout: float,
             index: int, count: int):
    """Run one step, yielding its progress; returns True when Cancel stopped it before its end."""
    import os

    from automedsam.processes import ProcessFailedError, StreamedProcess

    env = dict(environment) if environment is not None else None
    if step.env:
        env = {**(env if env is not None else os.environ), **step.env}
    argv, constraints = list(step.argv), None
    if step.keepTorch:
        constraints = _torchConstraints()
        argv += ["-c", constraints] if constraints else []
    log.info("AutoMedSAM: %s: %s", step.title, " ".join(argv))
    process, output, started = StreamedProcess(argv, env=env), PipOutput(), time.monotonic()

    def take(lines) -> None:
        for line in lines:
            log.debug("pip: %s", line)  # the application log (thread-safe), not the console
            output.take(line)

    try:
        while not process.finished:
            take(process.read(readTimeout))
            if cancelEvent.is_set() and not output.writing:
                take(process.read(CANCEL_DRAIN_S))  # "Installing collected packages" may be on its way
                if not output.writing:
                    process.stop(timeout=0)  # downloading or building: nothing written yet
                    return True
            waiting = " (finishing the install under way, then stopping)" if cancelEvent.is_set() else ""
            yield {"stage": "install", "done": round(1000 * (index + output.fraction)), "total": 1000 * count,
                   "message": f"Installing {step.title} ({index + 1} of {count}, {time.monotonic() - started:.0f} s): "
                              f"{output.status}{waiting}"}
        if not process.output_closed:  # something the step started still holds its output: end it
            process.stop(timeout=0)
        try:
            process.check(f"Installing {step.title}")
        except ProcessFailedError as error:
            raise ProcessFailedError(
                f"{error}\n\nNothing after this step was installed. The whole output is in the application "
                "log (Help > Report a bug shows it).", error.returncode, error.tail) from None
    finally:
        if not process.finished:  # the job was abandoned (its generator closed) mid-step
            if output.writing:
                process.wait()  # never leave a package half written
            else:
                process.stop(timeout=0)
        if constraints:
            Path(constraints).unlink(missing_ok=True)
    return False


def _torchConstraints() -> str | None:
    """A pip constraints file pinning the installed torch and torchvision (None without torch)."""
    pins = [f"{name}=={installedVersion(name)}" for name in TORCH_PACKAGES if installedVersion(name)]
    if not pins:
        return None
    fd, path = tempfile.mkstemp(prefix="automedsam-torch-", suffix=".txt")
    with open(fd, "w") as f:
        f.write("\n".join(pins) + "\n")
    return path


def installJob(steps: list[InstallStep], environment: dict | None = None):
    """A :class:`~AutoMedSAMSlicerLib.jobs.Job` that installs ``steps``. Its result is the list of
    packages that were in use already in this Slicer session (Slicer must restart for them); when
    it fails or is cancelled after some steps, the user is told about those too."""
    from AutoMedSAMSlicerLib.jobs import Job

    cancelEvent = threading.Event()
    report: dict = {}
    job = Job("installing dependencies", installEvents(steps, environment, cancelEvent, report),
              lambda lastEvent: report.get("inUse", []), cancelEvent=cancelEvent)

    def restartNotice(job) -> None:
        if (job.error is not None or job.cancelled) and report.get("inUse"):
            slicer.util.infoDisplay(restartMessage(report["inUse"]), "AutoMedSAM: restart needed")

    job.doneCallbacks.append(restartNotice)
    return job


def startupEnvironment() -> dict | None:
    """The environment Slicer was started with (what ``slicer.util.launchConsoleProcess`` uses, so
    ``PythonSlicer`` sets up its own paths); None outside Slicer. Call on the main thread."""
    try:
        return slicer.util.startupEnvironment()
    except AttributeError:
        return None


def slicerPackaging():
    """``slicer.packaging`` (Slicer 5.12+), imported explicitly: ``slicer/__init__.py`` does not
    import it, so ``hasattr(slicer, "packaging")`` is False until something else has."""
    try:
        import slicer.packaging as packaging
    except ImportError:
        return None
    return packaging


def installRunning() -> bool:
    """Whether an install runs: ours, or another extension's ``slicer.packaging.pip_install(
    blocking=False)`` (5.12+). Two pips writing into one site-packages can corrupt it."""
    if _installing.is_set():
        return True
    packaging = slicerPackaging()
    return bool(packaging is not None and hasattr(packaging, "isPipInstallInProgress")
                and packaging.isPipInstallInProgress())


def ensureDependencies(askConfirmation: bool = True) -> bool:
    """Install what is missing and wait (for the Python console and scripts; the panel runs
    :func:`installJob` instead, so Slicer stays responsive). False when the user declined."""
    steps = installSteps()
    if not steps:
        return True
    if installRunning():
        raise RuntimeError("Python packages are being installed (by AutoMedSAM or another extension); try again "
                           "when that has finished")
    if askConfirmation and not confirmInstall(steps):
        return False
    restartNeeded = installJob(steps, startupEnvironment()).wait()
    if restartNeeded:
        slicer.util.infoDisplay(restartMessage(restartNeeded), "AutoMedSAM: restart needed")
    return True


def restartMessage(packages: list[str]) -> str:
    return ("These packages were upgraded while an older version was in use: " + ", ".join(packages)
            + ". Restart Slicer before using AutoMedSAM.")


def alreadyImported(reqs: list[str]) -> list[str]:
    """The requirements whose package is already imported in this process (a distribution's
    import names come from its metadata: pillow is PIL, opencv-python-headless is cv2)."""
    import sys
    from importlib.metadata import packages_distributions

    modules: dict[str, set[str]] = {}
    for module, distributions in packages_distributions().items():
        for distribution in distributions:
            modules.setdefault(distribution.lower().replace("_", "-"), set()).add(module)
    result = []
    for requirement in reqs:
        name = _name(requirement).replace("_", "-")
        if any(m in sys.modules for m in modules.get(name, {name.replace("-", "_")})):
            result.append(requirement)
    return result
