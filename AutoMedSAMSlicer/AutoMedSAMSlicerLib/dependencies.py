"""Install what AutoMedSAM needs into Slicer's Python: only on first use, only after asking.

- torch (+ torchvision) through the PyTorch extension's ``PyTorchUtils`` (it picks the CUDA build
  that matches the machine's driver);
- everything else from the ``pyproject.toml`` shipped with the module (the one declaration of the
  dependencies: core ``dependencies`` plus the ``models`` and ``service`` extras, torch excluded),
  through ``slicer.packaging.pip_ensure`` on Slicer 5.12+ or ``slicer.util.pip_install`` before;
- ``sam2``, which has no wheel, with ``pip --no-build-isolation`` so it builds against that torch.
"""

from __future__ import annotations

import logging
from pathlib import Path

import slicer

#: Installed by PyTorchUtils, never by pip here (pip would pull a CPU or mismatched CUDA build).
TORCH_PACKAGES = ("torch", "torchvision")
EXTRAS = ("models", "service")


def pyprojectPath() -> Path:
    """``Resources/AutoMedSAMSlicer/pyproject.toml`` (copied there by CMake), else the checkout's root one."""
    here = Path(__file__).resolve().parents[1]
    for candidate in (here / "Resources" / "AutoMedSAMSlicer" / "pyproject.toml", here.parent / "pyproject.toml"):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"pyproject.toml not found next to {here}")


def requirements(path: Path | None = None) -> list[str]:
    """Requirement strings: core dependencies and the extras Slicer needs, without torch/torchvision."""
    import tomllib  # Python 3.11+: Slicer 5.10 and later ship 3.12

    with open(path or pyprojectPath(), "rb") as f:
        project = tomllib.load(f)["project"]
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
    import tomllib  # Python 3.11+: Slicer 5.10 and later ship 3.12 (see README, supported versions)

    with open(path or pyprojectPath(), "rb") as f:
        extra = tomllib.load(f)["project"]["optional-dependencies"]["models"]
    for requirement in extra:
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


def ensureTorch(askConfirmation: bool = True) -> bool:
    """torch (and torchvision) of at least the versions the ``models`` extra asks for, through the
    PyTorch extension; False when the user declined or the extension is missing. Versions are read
    from package metadata, so torch is not imported into Slicer's process just to check."""
    torchSpec, visionSpec = modelRequirement("torch"), modelRequirement("torchvision")
    if satisfies(installedVersion("torch"), torchSpec) and satisfies(installedVersion("torchvision"), visionSpec):
        return True
    try:
        import PyTorchUtils
    except ImportError:
        slicer.util.errorDisplay(
            "AutoMedSAM needs the PyTorch extension: install 'PyTorch' from the Extensions Manager and restart Slicer.")
        return False
    # installTorch(askConfirmation, forceComputationBackend, torchVersionRequirement,
    # torchvisionVersionRequirement): fepegar/SlicerPyTorch, PyTorchUtils/PyTorchUtils.py.
    torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
        askConfirmation=askConfirmation, torchVersionRequirement=torchSpec, torchvisionVersionRequirement=visionSpec)
    return torch is not None


#: No wheel on PyPI: built from source against the torch already installed. With build isolation,
#: pip would download a second torch just to build it.
BUILD_WITHOUT_ISOLATION = ("sam2",)


def slicerPackaging():
    """``slicer.packaging`` (Slicer 5.12+), imported explicitly: ``slicer/__init__.py`` does not
    import it, so ``hasattr(slicer, "packaging")`` is False until something else has."""
    try:
        import slicer.packaging as packaging
    except ImportError:
        return None
    return packaging if hasattr(packaging, "pip_ensure") else None


def ensureDependencies(askConfirmation: bool = True) -> bool:
    """Everything AutoMedSAM needs; returns False when the user declined. A restart-needed case
    (an already imported package was upgraded) is told to the user."""
    if not ensureTorch(askConfirmation):
        return False
    reqs = requirements()
    fromSource = [r for r in reqs if _name(r) in BUILD_WITHOUT_ISOLATION]
    wheels = [r for r in reqs if r not in fromSource]
    packaging = slicerPackaging()
    missing = _missing(reqs)
    if packaging is not None:
        try:
            packaging.pip_ensure(wheels, skip_packages=list(TORCH_PACKAGES), prompt_install=askConfirmation,
                                 requester="AutoMedSAM")
        except RuntimeError:  # the user declined
            return False
        missingFromSource = _missing(fromSource)
        if missingFromSource and askConfirmation and not _confirm(missingFromSource):
            return False
    else:
        if not missing:
            return True
        if askConfirmation and not _confirm(missing):
            return False
        wheelsMissing = [r for r in missing if r not in fromSource]
        if wheelsMissing:
            slicer.util.pip_install(wheelsMissing)
        missingFromSource = [r for r in missing if r in fromSource]
    for requirement in missingFromSource:
        pipInstallWithoutBuildIsolation(requirement)
    logging.info("AutoMedSAM: dependencies ready (%s installed)", ", ".join(missing) or "nothing")
    if _alreadyImported(missing):
        slicer.util.infoDisplay("Some packages were upgraded while an older version was in use. Restart Slicer "
                                "before using AutoMedSAM.", "AutoMedSAM: restart needed")
    return True


def _confirm(missing: list[str]) -> bool:
    return slicer.util.confirmOkCancelDisplay(
        "AutoMedSAM will download and install these Python packages:\n\n" + "\n".join(missing)
        + "\n\nThis may take several minutes.", "AutoMedSAM: install dependencies")


def pipInstallWithoutBuildIsolation(requirement: str) -> None:
    """``pip install --no-build-isolation`` with Slicer's Python (its CPU-only build: SAM2_BUILD_CUDA=0
    skips sam2's optional CUDA extension, which needs a compiler and CUDA toolkit). Raises on failure."""
    import shutil
    import sys

    python = shutil.which("PythonSlicer") or sys.executable  # Slicer's launcher, as sys.executable is
    proc = slicer.util.launchConsoleProcess([python, "-m", "pip", "install", "--no-build-isolation", requirement],
                                            updateEnvironment={"SAM2_BUILD_CUDA": "0"})
    slicer.util.logProcessOutput(proc)  # raises CalledProcessError when pip fails


def missingModelDependencies() -> list[str]:
    """Names of what running the models needs but is not installed (torch included), from package
    metadata, so nothing heavy is imported to find out."""
    return sorted({_name(r) for r in [*requirements(), *TORCH_PACKAGES] if installedVersion(_name(r)) is None})


def _missing(reqs: list[str]) -> list[str]:
    return [r for r in reqs if installedVersion(_name(r)) is None]


def _alreadyImported(reqs: list[str]) -> bool:
    import sys

    return any(_name(r).replace("-", "_") in sys.modules for r in reqs)
