"""Architecture rules that keep the project shippable: a Slicer-free core with no import-time
side effects, the two-command Quick start, and CI calling the README's test command."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORE = REPO / "AutoMedSAMSlicer" / "automedsam"


def test_core_never_imports_slicer_qt_ctk_or_vtk():
    forbidden = {"slicer", "qt", "ctk", "vtk", "__main__"}
    offenders = []
    for path in CORE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(REPO)}: {n}" for n in names if n.split(".")[0] in forbidden]
    assert not offenders


def test_importing_the_core_loads_no_heavy_library():
    code = ("import sys, automedsam, automedsam.volume, automedsam.io, automedsam.preprocess, automedsam.models, "
            "automedsam.backbones, automedsam.download, automedsam.classes, automedsam.cli.main;"
            "heavy = [m for m in ('torch', 'SimpleITK', 'segment_anything', 'sam2', 'requests', 'slicerio') "
            "if m in sys.modules]; print(heavy)")
    env = dict(os.environ, PYTHONPATH=str(REPO / "AutoMedSAMSlicer"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.strip() == "[]"


def test_no_print_outside_the_cli():
    offenders = [str(p) for p in CORE.rglob("*.py")
                 if "cli" not in p.parts and re.search(r"^\s*print\(", p.read_text(), re.M)]
    assert not offenders


def test_readme_quick_start_has_exactly_two_commands_and_ci_runs_the_second():
    text = (REPO / "README.md").read_text()
    section = re.search(r"^## Quick start\n(.*?)(?=^## )", text, re.M | re.S).group(1)
    blocks = re.findall(r"```(?:\w+)?\n(.*?)```", section, re.S)
    commands = [line for b in blocks for line in b.strip().splitlines() if line.strip()]
    assert len(commands) == 2, commands
    ci = (REPO / ".ci" / "run").read_text()
    assert commands[1].strip() in ci or commands[1].strip().replace("make ", "make ") in ci
    assert "make test" in commands[1]


def test_layout_is_the_extension_wizard_layout():
    for path in ("AutoMedSAMSlicer", "Resources", "Testing", "CMakeLists.txt", "AutoMedSAMSlicer.json",
                 "README.md", "pyproject.toml", ".ci/run"):
        assert (REPO / path).exists(), path


def test_extensions_index_entry_and_cmake_follow_slicers_current_format():
    """The index reads ``<Name>.json`` (schema slicer-extension-catalog-entry v1.0.1: required
    ``$schema``, ``category``, ``scm_url``; no other keys), not ``.s4ext``; the category lives there,
    not in CMake, as in Slicer's current extension template."""
    entry = json.loads((REPO / "AutoMedSAMSlicer.json").read_text())
    allowed = {"$schema", "build_dependencies", "build_subdirectory", "category", "enabled", "scm_revision",
               "scm_type", "scm_url", "tier"}
    assert {"$schema", "category", "scm_url"} <= set(entry) <= allowed
    assert "slicer-extension-catalog-entry-schema" in entry["$schema"] and entry["build_dependencies"] == ["PyTorch"]
    assert not list(REPO.glob("*.s4ext"))
    top = (REPO / "CMakeLists.txt").read_text()
    assert "cmake_minimum_required(VERSION 3.28.0...3.28.0 FATAL_ERROR)" in top and "EXTENSION_CATEGORY" not in top
    assert 'VERSION_LESS "5.10"' in top
