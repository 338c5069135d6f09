"""A minimal fake of exactly the Slicer calls the AutoMedSAMSlicer Logic makes (Slicer cannot be
installed on CI machines). Every fake MRML class names the real class it stands for
(``MRML_CLASS``) and test_slicer_api checks each of its public methods against
``../shared/slicer_api/slicer_api.json``.

Masks are stored the way Slicer stores them: a labelmap with its own IJK->RAS geometry. Reading a
segment on a reference volume resamples through RAS (nearest neighbour), so a mask written with the
wrong geometry lands on the wrong voxels here just as it would in Slicer.
"""

from __future__ import annotations

import itertools
import sys
import types

import numpy as np

_ids = itertools.count(1)


class vtkMatrix4x4:  # noqa: N801 (VTK's name)
    def __init__(self):
        self.m = np.eye(4)


class FakeImageData:
    def __init__(self):
        self.mtime = next(_ids)

    def GetMTime(self):
        return self.mtime


class FakeNode:
    MRML_CLASS = "vtkMRMLNode"

    def __init__(self, name: str = ""):
        self.name = name
        self.id = f"{type(self).__name__}{next(_ids)}"
        self.attributes: dict[str, str] = {}

    def GetName(self):
        return self.name

    def GetID(self):
        return self.id

    def SetAttribute(self, key, value):
        self.attributes[key] = value

    def GetAttribute(self, key):
        return self.attributes.get(key)


class FakeVolumeNode(FakeNode):
    """``array``: KJI voxels; ``ijkToRas``: the 4x4 IJK->RAS matrix; ``parentToWorld``: an optional
    4x4 parent transform (local RAS -> world RAS)."""

    MRML_CLASS = "vtkMRMLScalarVolumeNode"

    def __init__(self, array, ijkToRas, name="volume", parentToWorld=None):
        super().__init__(name)
        self.array = np.asarray(array)
        self.ijkToRas = np.asarray(ijkToRas, float)
        self.parentToWorld = None if parentToWorld is None else np.asarray(parentToWorld, float)
        self.imageData = FakeImageData()

    def GetIJKToRASMatrix(self, matrix):
        matrix.m = self.ijkToRas.copy()

    def GetImageData(self):
        return self.imageData

    def GetTransformNodeID(self):
        return None if self.parentToWorld is None else "vtkMRMLLinearTransformNode1"

    def TransformPointFromWorld(self, inWorld, outLocal):
        p = np.append(np.asarray(inWorld, float), 1.0)
        if self.parentToWorld is not None:
            p = np.linalg.inv(self.parentToWorld) @ p
        outLocal[:] = list(p[:3])


class FakeLabelMapVolumeNode(FakeVolumeNode):
    """An empty label map until ExportVisibleSegmentsToLabelmapNode fills it."""

    MRML_CLASS = "vtkMRMLLabelMapVolumeNode"

    def __init__(self, name="labels"):
        super().__init__(np.zeros((0, 0, 0), np.uint8), np.eye(4), name)


class FakeSegmentationsLogic:
    """``slicer.modules.segmentations.logic()``."""

    MRML_CLASS = "vtkSlicerSegmentationsModuleLogic"

    @staticmethod
    def ExportVisibleSegmentsToLabelmapNode(segmentationNode, labelmapNode, referenceVolumeNode=None):
        """As vtkSlicerSegmentationsModuleLogic does without a color table: segment n (in the
        segmentation's order) gets label value n + 1, on the reference volume's geometry."""
        shape = referenceVolumeNode.array.shape[:3]
        labels = np.zeros(shape, np.uint8)
        segmentation = segmentationNode.GetSegmentation()
        for n in range(segmentation.GetNumberOfSegments()):
            mask = _Util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentation.GetNthSegmentID(n),
                                                        referenceVolumeNode)
            labels[mask > 0] = n + 1
        labelmapNode.array, labelmapNode.ijkToRas = labels, referenceVolumeNode.ijkToRas.copy()
        return True


class FakeSegment:
    MRML_CLASS = "vtkSegment"

    def __init__(self, name, color):
        self.name, self.color, self.terminology = name, tuple(color), ""
        self.labelmap = None  # (KJI uint8 array, 4x4 IJK->RAS)

    def GetName(self):
        return self.name

    def GetColor(self):
        return self.color

    def SetTerminology(self, entry):
        self.terminology = entry

    def GetTerminology(self):
        return self.terminology


class FakeSegmentation:
    MRML_CLASS = "vtkSegmentation"

    def __init__(self):
        self.segments: dict[str, FakeSegment] = {}

    def AddEmptySegment(self, segmentId="", name="", color=None):
        segmentId = segmentId or f"Segment_{next(_ids)}"
        self.segments[segmentId] = FakeSegment(name, color or (0.5, 0.5, 0.5))
        return segmentId

    def GetSegment(self, segmentId):
        return self.segments.get(segmentId)

    def GetSegmentIdBySegmentName(self, name):
        return next((i for i, s in self.segments.items() if s.name.lower() == name.lower()), "")

    def RemoveSegment(self, segmentId):
        self.segments.pop(segmentId, None)

    def GetNumberOfSegments(self):
        return len(self.segments)

    def GetNthSegmentID(self, n):
        return list(self.segments)[n]


class FakeSegmentationNode(FakeNode):
    MRML_CLASS = "vtkMRMLSegmentationNode"

    def __init__(self, name="segmentation"):
        super().__init__(name)
        self.segmentation = FakeSegmentation()
        self.referenceGeometry = None
        self.transformNodeId = None
        self.displayNodes = False

    def GetSegmentation(self):
        return self.segmentation

    def CreateDefaultDisplayNodes(self):
        self.displayNodes = True

    def SetReferenceImageGeometryParameterFromVolumeNode(self, volumeNode):
        self.referenceGeometry = (volumeNode.ijkToRas.copy(), volumeNode.array.shape[:3])

    def SetAndObserveTransformNodeID(self, nodeId):
        self.transformNodeId = nodeId


class FakeMarkupsFiducialNode(FakeNode):
    MRML_CLASS = "vtkMRMLMarkupsFiducialNode"

    def __init__(self, pointsRas):
        super().__init__("points")
        self.points = np.asarray(pointsRas, float).reshape(-1, 3)

    def GetNumberOfControlPoints(self):
        return len(self.points)


class FakeROINode(FakeNode):
    """A box ROI. ``clicks``: how many placement clicks it had; like vtkMRMLMarkupsROINode.cxx, it
    requires 2 control points while being placed and, once both are defined, keeps 1 (the centre)."""

    MRML_CLASS = "vtkMRMLMarkupsROINode"

    def __init__(self, bounds, clicks: int = 2):
        super().__init__("box")
        self.bounds = list(bounds)
        self.clicks = clicks

    def GetNumberOfDefinedControlPoints(self, includePreview=False):
        return 1 if self.clicks >= 1 else 0

    def GetRequiredNumberOfControlPoints(self):
        return 1 if self.clicks >= 2 else 2

    def GetRASBounds(self, bounds):
        bounds[:] = self.bounds


class FakeScene:
    MRML_CLASS = "vtkMRMLScene"

    def __init__(self):
        self.nodes = []

    def Clear(self, removeSingletons=False):
        self.nodes.clear()

    def AddNewNodeByClass(self, className, name=""):
        node = {"vtkMRMLSegmentationNode": FakeSegmentationNode,
                "vtkMRMLLabelMapVolumeNode": FakeLabelMapVolumeNode}[className](name)
        self.nodes.append(node)
        return node


def _resampleNearest(array, fromIjkToRas, toIjkToRas, toShape):
    """Values of ``array`` (on ``fromIjkToRas``) at the voxel centres of the target grid."""
    k, j, i = np.meshgrid(*[np.arange(n) for n in toShape], indexing="ij")
    ijk = np.stack([i.ravel(), j.ravel(), k.ravel(), np.ones(i.size)])
    src = np.linalg.inv(fromIjkToRas) @ toIjkToRas @ ijk
    si, sj, sk = (np.rint(src[n]).astype(int) for n in range(3))
    inside = (si >= 0) & (sj >= 0) & (sk >= 0) & (si < array.shape[2]) & (sj < array.shape[1]) & (sk < array.shape[0])
    out = np.zeros(i.size, array.dtype)
    out[inside] = array[sk[inside], sj[inside], si[inside]]
    return out.reshape(toShape)


class _Util(types.ModuleType):
    """The slicer.util functions the Logic uses."""

    @staticmethod
    def arrayFromVolume(volumeNode):
        return volumeNode.array  # like Slicer: a view the caller must not modify

    @staticmethod
    def arrayFromVTKMatrix(matrix):
        return matrix.m.copy()

    @staticmethod
    def updateSegmentBinaryLabelmapFromArray(narray, segmentationNode, segmentId, referenceVolumeNode=None):
        segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
        if narray.shape != referenceVolumeNode.array.shape[:3]:
            raise RuntimeError("array shape does not match the reference volume")
        segment.labelmap = (np.array(narray, np.uint8), referenceVolumeNode.ijkToRas.copy())

    @staticmethod
    def arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, referenceVolumeNode=None):
        segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
        shape = referenceVolumeNode.array.shape[:3]
        if segment.labelmap is None:
            return np.zeros(shape, np.uint8)
        array, matrix = segment.labelmap
        return _resampleNearest(array, matrix, referenceVolumeNode.ijkToRas, shape)

    @staticmethod
    def arrayFromMarkupsControlPoints(markupsNode, world=False):
        return markupsNode.points.copy()

    @staticmethod
    def addVolumeFromArray(narray, ijkToRAS=None, name=None, nodeClassName=None):
        node = FakeVolumeNode(np.array(narray), np.eye(4) if ijkToRAS is None else ijkToRAS, name or "Volume")
        sys.modules["slicer"].mrmlScene.nodes.append(node)
        return node

    @staticmethod
    def loadVolume(filename, properties=None, returnNode=False):
        """Slicer's readers, stood in for by SimpleITK; like loadNodeFromFile (Base/Python/slicer/util.py)
        a file that cannot be read raises RuntimeError instead of returning None."""
        from automedsam.errors import InvalidInputError
        from automedsam.io import read_image

        try:
            volume = read_image(filename)
        except InvalidInputError:
            raise RuntimeError(f"Failed to load node from file: {filename}") from None
        return _Util.addVolumeFromArray(volume.array, volume.ijk_to_ras(), volume.name)

    @staticmethod
    def saveNode(node, filename, properties=None):
        """Writes label map volumes (the only kind the tests save), with their geometry; True on success."""
        from automedsam.io import write_volume
        from automedsam.volume import Volume

        if not isinstance(node, FakeVolumeNode):
            raise NotImplementedError("the fake saves volume nodes only")
        try:
            write_volume(Volume.from_ijk_to_ras(node.array, node.ijkToRas, node.name), filename)
        except (OSError, ValueError):
            return False
        return True


class ScriptedLoadableModuleLogic:
    def __init__(self):
        self.parameterNode = FakeNode("parameters")

    def getParameterNode(self):
        return self.parameterNode


def parameterNodeWrapper(cls):
    def init(self, node):
        self.parameterNode = node

    cls.__init__ = init
    return cls


class _Validator:
    def __init__(self, *args):
        self.args = args


def install() -> types.ModuleType:
    """Put fake ``slicer``, ``vtk``, ``qt`` and ``ctk`` modules into ``sys.modules``; returns ``slicer``."""
    slicer = types.ModuleType("slicer")
    slicer.util = _Util("slicer.util")
    slicer.mrmlScene = FakeScene()
    slicer.modules = types.SimpleNamespace(segmentations=types.SimpleNamespace(logic=FakeSegmentationsLogic))
    for name in ("vtkMRMLScalarVolumeNode", "vtkMRMLSegmentationNode", "vtkMRMLMarkupsFiducialNode",
                 "vtkMRMLMarkupsROINode"):
        setattr(slicer, name, type(name, (), {}))
    slm = types.ModuleType("slicer.ScriptedLoadableModule")
    slm.ScriptedLoadableModuleLogic = ScriptedLoadableModuleLogic
    pnw = types.ModuleType("slicer.parameterNodeWrapper")
    pnw.parameterNodeWrapper = parameterNodeWrapper
    pnw.Choice = pnw.WithinRange = _Validator
    slicer.ScriptedLoadableModule, slicer.parameterNodeWrapper = slm, pnw
    vtk = types.ModuleType("vtk")
    vtk.vtkMatrix4x4 = vtkMatrix4x4
    sys.modules.update({"slicer": slicer, "slicer.util": slicer.util, "slicer.ScriptedLoadableModule": slm,
                        "slicer.parameterNodeWrapper": pnw, "vtk": vtk})
    return slicer


def uninstall() -> None:
    for name in ("slicer", "slicer.util", "slicer.ScriptedLoadableModule", "slicer.parameterNodeWrapper", "vtk"):
        sys.modules.pop(name, None)
    for name in [m for m in sys.modules if m.startswith("AutoMedSAMSlicerLib")]:
        sys.modules.pop(name)
