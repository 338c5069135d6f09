"""Install what AutoMedSAM needs into Slicer's Python: only on first use, only after asking.

- torch (+ torchvision) through the PyTorch extension's ``PyTorchUtils`` (it picks the CUDA build
  that matches the machine's driver);
- everything else from the ``pyproject.toml`` shipped with the module (the one declaration of the
  dependencies: core ``dependencies`` plus the ``models`` and ``service`` extras, torch excluded),
  through ``slicer.packaging.pip_ensure`` on Slicer 5.12+ or ``slicer.util.pip_install`` before.
"""

from __future__ import annotations

import logging
import os
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
    import tomllib  # Python 3.11+, as in Slicer 5.8 and later

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


def ensureTorch(askConfirmation: bool = True) -> bool:
    """torch via the PyTorch extension; False when the user declined or it is missing."""
    try:
        import PyTorchUtils
    except ImportError:
        slicer.util.errorDisplay(
            "AutoMedSAM needs the PyTorch extension: install 'PyTorch' from the Extensions Manager and restart Slicer.")
        return False
    torchLogic = PyTorchUtils.PyTorchUtilsLogic()
    if torchLogic.torchInstalled():
        return True
    return torchLogic.installTorch(askConfirmation=askConfirmation) is not None


def ensureDependencies(askConfirmation: bool = True) -> bool:
    """Everything AutoMedSAM needs; returns False when the user declined. A restart-needed case
    (an already imported package was upgraded) is told to the user by ``pip_ensure``."""
    if not ensureTorch(askConfirmation):
        return False
    reqs = requirements()
    os.environ.setdefault("SAM2_BUILD_CUDA", "0")  # sam2 builds its optional CUDA op otherwise
    if hasattr(slicer, "packaging") and hasattr(slicer.packaging, "pip_ensure"):  # Slicer >= 5.12
        try:
            slicer.packaging.pip_ensure(reqs, skip_packages=list(TORCH_PACKAGES), prompt_install=askConfirmation,
                                        requester="AutoMedSAM")
        except RuntimeError:  # the user declined
            return False
        return True
    missing = _missing(reqs)
    if not missing:
        return True
    if askConfirmation and not slicer.util.confirmOkCancelDisplay(
            "AutoMedSAM will download and install these Python packages:\n\n" + "\n".join(missing)
            + "\n\nThis may take several minutes.", "AutoMedSAM: install dependencies"):
        return False
    slicer.util.pip_install(missing)
    logging.info("AutoMedSAM: installed %s", ", ".join(missing))
    if _alreadyImported(missing):
        slicer.util.infoDisplay("Some packages were upgraded while an older version was in use. Restart Slicer "
                                "before using AutoMedSAM.", "AutoMedSAM: restart needed")
    return True


def _missing(reqs: list[str]) -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for r in reqs:
        try:
            version(_name(r))
        except PackageNotFoundError:
            out.append(r)
    return out


def _alreadyImported(reqs: list[str]) -> bool:
    import sys

    return any(_name(r).replace("-", "_") in sys.modules for r in reqs)
