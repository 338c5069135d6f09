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
                 "AutoMedSAMSlicer.s4ext", "README.md", "pyproject.toml", ".ci/run"):
        assert (REPO / path).exists(), path


def test_extensions_index_entry_and_cmake_follow_slicers_current_format():
    """The index reads ``<Name>.json`` (schema slicer-extension-catalog-entry v1.0.1: required
    ``$schema``, ``category``, ``scm_url``; no other keys); the category lives there (and in the
    .s4ext description), not in CMake, as in Slicer's extension template."""
    entry = json.loads((REPO / "AutoMedSAMSlicer.json").read_text())
    allowed = {"$schema", "build_dependencies", "build_subdirectory", "category", "enabled", "scm_revision",
               "scm_type", "scm_url", "tier"}
    assert {"$schema", "category", "scm_url"} <= set(entry) <= allowed
    assert "slicer-extension-catalog-entry-schema" in entry["$schema"] and entry["build_dependencies"] == ["PyTorch"]
    top = (REPO / "CMakeLists.txt").read_text()
    # The floor of Slicer 5.10's extension template, the oldest Slicer supported.
    assert "cmake_minimum_required(VERSION 3.20.6...3.22.6 FATAL_ERROR)" in top and "EXTENSION_CATEGORY" not in top
    assert 'VERSION_LESS "5.10"' in top


def _s4ext(path) -> dict[str, str]:
    """Slicer's description format: one ``key value`` per line, ``#`` comments (the keys of
    CMake/SlicerFunctionGenerateExtensionDescription.cmake)."""
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition(" ")
            assert key not in out, f"{key} given twice"
            out[key] = value.strip()
    return out


def test_the_s4ext_the_index_entry_and_cmake_describe_the_same_extension():
    import re
    from urllib.parse import urlparse

    s4ext = _s4ext(REPO / "AutoMedSAMSlicer.s4ext")
    entry = json.loads((REPO / "AutoMedSAMSlicer.json").read_text())
    cmake = dict(re.findall(r'set\((EXTENSION_\w+) "([^"]*)"\)', (REPO / "CMakeLists.txt").read_text()))
    assert {"scm", "scmurl", "scmrevision", "depends", "build_subdirectory", "homepage", "contributors", "category",
            "iconurl", "status", "description", "screenshoturls", "enabled"} == set(s4ext)
    assert s4ext["category"] == entry["category"]
    assert s4ext["scmurl"] == entry["scm_url"] and s4ext["scmrevision"] == entry["scm_revision"]
    assert s4ext["build_subdirectory"] == entry["build_subdirectory"]
    assert s4ext["depends"].split() == entry["build_dependencies"] == cmake["EXTENSION_DEPENDS"].split(";")
    for key in ("homepage", "contributors", "description", "iconurl", "screenshoturls"):
        assert s4ext[key] == cmake[f"EXTENSION_{key.upper()}"], key
    assert re.search(r"project\((\w+)\)", (REPO / "CMakeLists.txt").read_text()).group(1) == "AutoMedSAMSlicer"
    # The pictures the index shows are files of this repository, at the URL's path.
    for url in (s4ext["iconurl"], *s4ext["screenshoturls"].split()):
        path = urlparse(url).path.split("/main/", 1)[1]
        assert (REPO / path).is_file() and (REPO / path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", url
