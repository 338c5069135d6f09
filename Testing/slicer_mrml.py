"""3D Slicer's own MRML libraries (the ``slicer-core`` wheel: the real ``vtkMRMLScene``, segmentation,
volume, markups and transform nodes, their module logics and Slicer's ``slicer/util.py``) set up the
way Slicer's application does at startup, plus stand-ins for the parts the wheel lacks (Qt, the
application object, ``ScriptedLoadableModule``, the parameter-node wrapper): see slicer_fake.py.

Startup, as Slicer runs it (Base/QTCore/qSlicerModuleFactoryManager.cxx ``loadModule``): each
module's logic is created, told the application logic (``SetMRMLApplicationLogic``) and registered
with it (``SetModuleLogic``), dependencies first (Terminologies before Colors and Segmentations,
Colors before Volumes); then ``SetMRMLScene`` runs ``RegisterNodes``, which for the Segmentations
logic registers the four representation converter rules
(Modules/Loadable/Segmentations/Logic/vtkSlicerSegmentationsModuleLogic.cxx). The rules live in a
process-wide factory that appends without checking, so they are cleared before each new scene.

What the wheel does not ship: the terminology JSON files and the colour tables read from Slicer's
share folder. The terminology logic then holds no terminology (it logs that), and segments get the
colours and terminology strings the module gives them, which is what the tests check.

``slicer.util`` reads ``slicer.mrmlScene`` and ``slicer.modules.<name>.logic()`` at call time; its file
readers and writers need ``slicer.app.coreIOManager()``, which is stood in for by the same logics'
own readers and storage nodes (``loadVolume``, ``saveNode``).
"""

from __future__ import annotations

import types

import numpy as np

#: Module logics in Slicer's load order (dependencies first).
LOGICS = (
    ("Terminologies", "vtkSlicerTerminologiesModuleLogic"),
    ("Colors", "vtkSlicerColorLogic"),
    ("Units", "vtkSlicerUnitsLogic"),
    ("Volumes", "vtkSlicerVolumesLogic"),
    ("SubjectHierarchy", "vtkSlicerSubjectHierarchyModuleLogic"),
    ("Segmentations", "vtkSlicerSegmentationsModuleLogic"),
    ("Markups", "vtkSlicerMarkupsLogic"),
    ("Transforms", "vtkSlicerTransformLogic"),
)


def available() -> bool:
    """Whether slicer-core is installed (``make test`` installs it; see pyproject.toml's dev extra)."""
    import importlib.util

    return importlib.util.find_spec("slicer_core") is not None


def new_scene():
    """A fresh real scene with the logics set up as at Slicer's startup; ``slicer.mrmlScene`` and
    ``slicer.modules`` point at them. Returns the ``slicer`` module."""
    import slicer

    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    for rule in list(factory.GetConverterRules()):
        factory.UnregisterConverterRule(rule)
    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)  # adds the selection and interaction singletons
    logics = {}
    for name, class_name in LOGICS:
        logic = getattr(slicer, class_name)()
        logic.SetMRMLApplicationLogic(app_logic)
        app_logic.SetModuleLogic(name, logic)
        logics[name] = logic
    app_logic.SetColorLogic(logics["Colors"])
    for logic in logics.values():
        logic.SetMRMLScene(scene)
    slicer.mrmlScene = scene
    slicer.modules = types.SimpleNamespace(
        **{name.lower(): types.SimpleNamespace(logic=(lambda logic=logic: logic)) for name, logic in logics.items()})
    slicer.modules.applicationLogic = app_logic  # kept alive with the scene
    return slicer


# ------------------------------------------------------------------------------ test helpers
def volume_node(array, ijk_to_ras, name="volume", parent_to_world=None):
    """A scalar volume node holding ``array`` (KJI) with the 4x4 IJK->RAS matrix, optionally under a
    linear parent transform ``parent_to_world`` (local RAS -> world RAS)."""
    import slicer
    import vtk

    node = slicer.util.addVolumeFromArray(np.ascontiguousarray(array), np.asarray(ijk_to_ras, float), name)
    if parent_to_world is not None:
        transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", f"{name} transform")
        transform.SetMatrixTransformToParent(_vtk_matrix(parent_to_world, vtk))
        node.SetAndObserveTransformNodeID(transform.GetID())
    return node


def ijk_to_ras(node) -> np.ndarray:
    import slicer
    import vtk

    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def world_of_voxel(node, ijk) -> np.ndarray:
    """World RAS of voxel index ``(i, j, k)`` (through the node's parent transform, if any)."""
    import slicer
    import vtk

    local = (ijk_to_ras(node) @ np.append(np.asarray(ijk, float), 1.0))[:3]
    to_world = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(node.GetParentTransformNode(), None, to_world)
    return np.array(to_world.TransformPoint(*local))


def segmentation_node(name="segmentation"):
    import slicer

    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    node.CreateDefaultDisplayNodes()
    return node


def add_segment(seg_node, name, mask, volume, color=(1.0, 0.0, 0.0)) -> str:
    """A segment of the user's (drawn, say, in the Segment Editor, which paints in world space) holding
    ``mask`` on ``volume``'s grid. For a segmentation without a parent transform the mask goes in
    through a label map at the voxels' world positions (slicer.util's writer would drop the volume's
    own parent transform); otherwise the segmentation must share the volume's transform."""
    import slicer
    import vtk

    sid = seg_node.GetSegmentation().AddEmptySegment("", name, list(color))
    if seg_node.GetTransformNodeID() == volume.GetTransformNodeID():
        slicer.util.updateSegmentBinaryLabelmapFromArray(np.asarray(mask, np.uint8), seg_node, sid, volume)
        return sid
    if seg_node.GetTransformNodeID():
        raise ValueError("add_segment: give the segmentation the volume's transform, or none")
    to_world = vtk.vtkMatrix4x4()
    slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(volume.GetParentTransformNode(), None, to_world)
    world = slicer.util.arrayFromVTKMatrix(to_world) @ ijk_to_ras(volume)
    labelmap = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "drawn")
    labelmap.SetIJKToRASMatrix(_vtk_matrix(world, vtk))
    slicer.util.updateVolumeFromArray(labelmap, np.ascontiguousarray(mask, np.uint8))
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(sid)
    slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(labelmap, seg_node, ids)
    slicer.mrmlScene.RemoveNode(labelmap)
    return sid


def segment_id(seg_node, name) -> str:
    return seg_node.GetSegmentation().GetSegmentIdBySegmentName(name)


def read(seg_node, name, volume) -> np.ndarray | None:
    """The segment named ``name`` as a bool ``(K, J, I)`` mask on ``volume``'s grid (None: no such segment)."""
    import slicer

    sid = segment_id(seg_node, name)
    if not sid:
        return None
    array = slicer.util.arrayFromSegmentBinaryLabelmap(seg_node, sid, volume)
    return np.asarray(array).reshape(slicer.util.arrayFromVolume(volume).shape[:3]) > 0


def write(seg_node, name, mask, volume) -> None:
    """Replace the segment's voxels as the Segment Editor's paint or erase would."""
    import slicer

    slicer.util.updateSegmentBinaryLabelmapFromArray(np.asarray(mask, np.uint8), seg_node, segment_id(seg_node, name),
                                                     volume)


def fiducials(points_world, name="points", defined=True):
    """A point list with ``points_world`` (world RAS); ``defined=False``: the last one is still the
    preview under the mouse while placing (status PositionPreview)."""
    import slicer

    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
    for p in np.asarray(points_world, float).reshape(-1, 3):
        node.AddControlPoint(*p)
    if not defined and node.GetNumberOfControlPoints():
        last = node.GetNumberOfControlPoints() - 1
        node.SetNthControlPointPosition(last, *node.GetNthControlPointPosition(last), node.PositionPreview)
    return node


def roi(bounds_world, name="box", clicks=2):
    """A box ROI with RAS bounds ``(xmin, xmax, ymin, ymax, zmin, zmax)``, placed as a user would:
    ``clicks`` = 2 (done: one centre point left, vtkMRMLMarkupsROINode UpdateControlPointsFromBoxROI),
    1 (the first corner only) or 0 (not started)."""
    import slicer

    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", name)
    b = np.asarray(bounds_world, float)
    if clicks >= 1:
        node.AddControlPoint(b[0], b[2], b[4])
    if clicks >= 2:
        node.AddControlPoint(b[1], b[3], b[5])
    return node


def _vtk_matrix(array, vtk):
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r][c]))
    return matrix


def segment_world_points(seg_node, name) -> np.ndarray:
    """World RAS ``(N, 3)`` of the voxels the segment holds, from its own stored labelmap through the
    segmentation node's parent transform: where Slicer draws it, whatever reference volume is used."""
    import slicer
    import vtk

    sid = segment_id(seg_node, name)
    image = seg_node.GetSegmentation().GetSegment(sid).GetRepresentation("Binary labelmap")
    array = slicer.util.arrayFromSegmentInternalBinaryLabelmap(seg_node, sid)
    extent = image.GetExtent()
    k, j, i = np.nonzero(array > 0)
    ijk = np.stack([i + extent[0], j + extent[2], k + extent[4], np.ones_like(i)]).astype(float)
    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    local = (slicer.util.arrayFromVTKMatrix(matrix) @ ijk)[:3].T
    to_world = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(seg_node.GetParentTransformNode(), None, to_world)
    return np.array([to_world.TransformPoint(*p) for p in local])


def voxel_world_points(node, mask) -> np.ndarray:
    """World RAS ``(N, 3)`` of the voxels of ``mask`` (KJI, on ``node``'s grid)."""
    k, j, i = np.nonzero(mask)
    return np.array([world_of_voxel(node, (a, b, c)) for a, b, c in zip(i, j, k, strict=True)])
