"""Stand-ins for the parts of 3D Slicer that its core libraries (slicer-core; slicer_mrml.py sets up
the real MRML scene) do not have: the scripted-module base classes, the parameter-node wrapper and the
application's file IO. Each one does what the Slicer source it names does, for the calls the module
makes; everything MRML (nodes, segmentations, markups, transforms, ``slicer.util``'s array functions)
is Slicer's own.
"""

from __future__ import annotations

import sys
import types


class ScriptedLoadableModuleLogic:
    """Base/Python/slicer/ScriptedLoadableModule.py: the module name is the class name without
    "Logic"; the parameter node is the scene's singleton ``vtkMRMLScriptedModuleNode`` tagged with
    it, created (with a ``ModuleName`` attribute) on first use."""

    def __init__(self, parent=None):
        name = type(self).__name__
        self.moduleName = name[:-len("Logic")] if name.endswith("Logic") else name

    def getParameterNode(self):
        import slicer

        scene = slicer.mrmlScene
        node = scene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = scene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
            node.UnRegister(None)
            node.SetSingletonTag(self.moduleName)
            node.SetAttribute("ModuleName", self.moduleName)
            node.SetName(scene.GenerateUniqueName(self.moduleName))
            node = scene.AddNode(node)
        return node


def parameterNodeWrapper(cls):
    """Base/Python/slicer/parameterNodeWrapper/wrapper.py keeps typed values in the node's
    parameters; here the wrapper holds the node and the class's defaults (the tests read defaults)."""

    def init(self, node):
        self.parameterNode = node

    cls.__init__ = init
    return cls


class _Validator:
    def __init__(self, *args):
        self.args = args


def loadVolume(filename, properties=None, returnNode=False):
    """slicer.util.loadVolume goes through ``slicer.app.coreIOManager()``, which the libraries lack:
    the volumes logic's own archetype reader stands in (the reader Slicer's volume IO plugin calls,
    Modules/Loadable/Volumes/qSlicerVolumesReader.cxx). Like loadNodeFromFile
    (Base/Python/slicer/util.py), a file that cannot be read raises RuntimeError."""
    import slicer

    properties = properties or {}
    name = properties.get("name") or _node_name(filename)
    node = slicer.modules.volumes.logic().AddArchetypeVolume(str(filename), name,
                                                              1 if properties.get("labelmap") else 0)
    if node is None:
        raise RuntimeError(f"Failed to load node from file: {filename}")
    return node


def saveNode(node, filename, properties=None):
    """slicer.util.saveNode through the node's own default storage node (what the application's IO
    manager does for a single node, Base/QTCore/qSlicerCoreIOManager.cxx); True on success."""
    import slicer

    storage = node.CreateDefaultStorageNode()
    storage.UnRegister(None)
    slicer.mrmlScene.AddNode(storage)
    storage.SetFileName(str(filename))
    try:
        return bool(storage.WriteData(node))
    finally:
        slicer.mrmlScene.RemoveNode(storage)


def _node_name(filename) -> str:
    name = str(filename).replace("\\", "/").rstrip("/").split("/")[-1]
    for suffix in (".nii.gz", ".seg.nrrd", ".nrrd", ".nii", ".mha", ".mhd"):
        if name.endswith(suffix):
            return name[:-len(suffix)]
    return name


_SAVED: dict = {}


def install() -> types.ModuleType:
    """Slicer's real libraries with a fresh scene (slicer_mrml.new_scene), plus these stand-ins as
    ``slicer.ScriptedLoadableModule``, ``slicer.parameterNodeWrapper`` and the file IO of ``slicer.util``."""
    import slicer_mrml

    slicer = slicer_mrml.new_scene()
    slm = types.ModuleType("slicer.ScriptedLoadableModule")
    slm.ScriptedLoadableModuleLogic = ScriptedLoadableModuleLogic
    pnw = types.ModuleType("slicer.parameterNodeWrapper")
    pnw.parameterNodeWrapper = parameterNodeWrapper
    pnw.Choice = pnw.WithinRange = _Validator
    for name, module in (("ScriptedLoadableModule", slm), ("parameterNodeWrapper", pnw)):
        _SAVED.setdefault(("slicer", name), getattr(slicer, name, None))
        setattr(slicer, name, module)
        sys.modules[f"slicer.{name}"] = module
    for name, stand_in in (("loadVolume", loadVolume), ("saveNode", saveNode)):
        _SAVED.setdefault(("util", name), getattr(slicer.util, name))
        setattr(slicer.util, name, stand_in)
    return slicer


def uninstall() -> None:
    import slicer

    slicer.mrmlScene.Clear(1)
    for (where, name), value in _SAVED.items():
        setattr(slicer if where == "slicer" else slicer.util, name, value)
    _SAVED.clear()
    for name in ("slicer.ScriptedLoadableModule", "slicer.parameterNodeWrapper"):
        sys.modules.pop(name, None)
    for name in [m for m in sys.modules if m.startswith("AutoMedSAMSlicerLib")]:
        sys.modules.pop(name)
