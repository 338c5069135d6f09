"""MRML nodes <-> automedsam core objects: the only place where the Slicer layer touches voxels.

Frames and axes, as everywhere in AutoMedSAMSlicer:

- Arrays are KJI (``array[k, j, i]``), the order of ``slicer.util.arrayFromVolume`` and of the core
  :class:`automedsam.volume.Volume`.
- Slicer's world frame is RAS (millimetres); the core stores LPS. The conversion goes through the
  volume node's own IJK->RAS matrix (``GetIJKToRASMatrix``), so flipped, oblique and LPS-ordered
  volumes keep their exact geometry.
- Markups positions are *world* RAS; a volume under a parent transform is in its own local RAS,
  so points are mapped with ``TransformPointFromWorld`` before RAS->IJK.
- Masks are read and written on the volume's grid, so a mask voxel ``[k, j, i]`` is the image voxel
  ``[k, j, i]`` wherever the segmentation node sits (its own parent transform or reference geometry,
  which stay the user's).
"""

from __future__ import annotations

import hashlib

import numpy as np
import slicer
import vtk

#: Node attribute holding the fingerprint of the mask AutoMedSAM last wrote to a segment (the
#: segment id is appended). A segment whose mask no longer matches it was edited by the user.
WRITTEN_MASK_ATTRIBUTE = "AutoMedSAM.writtenMask."
#: Node attribute holding, per k-slice, a short fingerprint of what AutoMedSAM last wrote there
#: (comma-separated; the segment id is appended): the slices whose content differs are the user's.
WRITTEN_SLICES_ATTRIBUTE = "AutoMedSAM.writtenSlices."


def ijkToRasFromNode(volumeNode) -> np.ndarray:
    """The node's 4x4 voxel index ``(i, j, k, 1)`` -> local RAS millimetres matrix."""
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return np.array(slicer.util.arrayFromVTKMatrix(matrix), dtype=float)


def volumeFromNode(volumeNode):
    """A core :class:`~automedsam.volume.Volume` (KJI array, LPS geometry) of a scalar volume node.

    Raises:
        ValueError: no node, no image data, or not a 3-D scalar (or RGB) volume.
    """
    from automedsam.errors import InvalidInputError
    from automedsam.volume import Volume

    if volumeNode is None:
        raise InvalidInputError("no input volume: select a volume node (load a CT or MR first)")
    if volumeNode.GetImageData() is None:
        raise InvalidInputError(f"volume {volumeNode.GetName()!r} has no image data (is it still loading?)")
    array = slicer.util.arrayFromVolume(volumeNode)
    if array.ndim == 2:  # a single slice comes as (J, I) from some readers
        array = array[None]
    return Volume.from_ijk_to_ras(np.asarray(array), ijkToRasFromNode(volumeNode), name=volumeNode.GetName())


def worldToIjk(volumeNode, pointsRas) -> np.ndarray:
    """World RAS points ``(N, 3)`` (markups positions) -> continuous voxel indices ``(N, 3)`` as (i, j, k)."""
    points = np.asarray(pointsRas, dtype=float).reshape(-1, 3)
    local = np.empty_like(points)
    for n, p in enumerate(points):
        out = [0.0, 0.0, 0.0]
        volumeNode.TransformPointFromWorld(list(p), out)  # identity without a parent transform
        local[n] = out
    rasToIjk = np.linalg.inv(ijkToRasFromNode(volumeNode))
    return local @ rasToIjk[:3, :3].T + rasToIjk[:3, 3]


def maskFingerprint(mask: np.ndarray) -> str:
    """Short content hash of a ``(K, J, I)`` mask (bit-packed, so it is cheap)."""
    packed = np.packbits(np.ascontiguousarray(mask, dtype=bool))
    return hashlib.sha256(packed.tobytes() + str(mask.shape).encode()).hexdigest()[:20]


def segmentId(segmentationNode, className: str, displayName: str) -> str | None:
    """Id of the segment for a class: the one AutoMedSAM tagged, else one named ``displayName``."""
    segmentation = segmentationNode.GetSegmentation()
    tagged = segmentationNode.GetAttribute(f"AutoMedSAM.class.{className}")
    if tagged and segmentation.GetSegment(tagged) is not None:
        return tagged
    found = segmentation.GetSegmentIdBySegmentName(displayName)
    return found or None


def addClassSegment(segmentationNode, classInfo, name: str | None = None) -> str:
    """A new empty segment named, coloured and terminology-coded (SNOMED CT) for ``classInfo``."""
    segmentation = segmentationNode.GetSegmentation()
    newId = segmentation.AddEmptySegment("", name or classInfo.display_name, list(classInfo.color_float))
    segment = segmentation.GetSegment(newId)
    segment.SetTerminology(classInfo.terminology_entry())
    segmentationNode.SetAttribute(f"AutoMedSAM.class.{classInfo.name}", newId)
    return newId


def volumeShape(volumeNode) -> tuple[int, int, int]:
    """``(K, J, I)`` voxel counts of a volume node."""
    return tuple(slicer.util.arrayFromVolume(volumeNode).shape[:3])


def readSegmentMask(segmentationNode, segmentIdValue: str, volumeNode) -> np.ndarray:
    """The segment as a ``(K, J, I)`` bool mask on the volume's voxel grid."""
    array = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentIdValue, volumeNode)
    shape = volumeShape(volumeNode)
    if array is None or array.size == 0:
        return np.zeros(shape, bool)
    return np.asarray(array).reshape(shape) > 0


def localToWorld(node) -> np.ndarray:
    """The 4x4 matrix from ``node``'s local RAS to world RAS (its parent transforms; identity without).

    Raises:
        ValueError: a non-linear (warping) transform, which no matrix describes.
    """
    matrix = vtk.vtkMatrix4x4()
    parent = node.GetParentTransformNode()
    if not slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(parent, None, matrix):
        raise ValueError(f"{node.GetName()!r} sits under a non-linear transform; harden it (Data module, right-click "
                         "the transform, Harden transform) before segmenting")
    return np.array(slicer.util.arrayFromVTKMatrix(matrix), dtype=float)


def writeSegmentMask(segmentationNode, segmentIdValue: str, mask: np.ndarray, volumeNode,
                     slices: list[int] | None = None) -> None:
    """Replace the segment's voxels with ``mask`` (``(K, J, I)`` bool on the volume's grid) and
    remember its fingerprint so a later user edit can be recognised; ``slices``: the k-slices the
    model wrote (None: all), whose per-slice record becomes AutoMedSAM's (the others stay as they were:
    the user's where they were the user's).

    The mask is imported through a label map placed where the volume is *in the segmentation's own
    frame* (volume local RAS -> world -> segmentation local RAS) and under the segmentation's parent
    transform, so the import applies no transform. slicer.util.updateSegmentBinaryLabelmapFromArray
    puts the label map at the volume's local coordinates without its transform, which lands the mask
    off by the volume's parent transform (or twice the difference) whenever the segmentation sits
    under another transform than the volume (measured on Slicer's libraries, slicer-core 5.13).
    """
    volumeToSegmentation = (np.linalg.inv(localToWorld(segmentationNode)) @ localToWorld(volumeNode)
                            @ ijkToRasFromNode(volumeNode))
    labelmap = slicer.modules.volumes.logic().CreateAndAddLabelVolume(volumeNode, "__AutoMedSAM mask__")
    try:
        matrix = vtk.vtkMatrix4x4()
        for row in range(4):
            for col in range(4):
                matrix.SetElement(row, col, volumeToSegmentation[row, col])
        labelmap.SetIJKToRASMatrix(matrix)
        labelmap.SetAndObserveTransformNodeID(segmentationNode.GetTransformNodeID())
        slicer.util.updateVolumeFromArray(labelmap, np.ascontiguousarray(mask, dtype=np.uint8))
        segmentIds = vtk.vtkStringArray()
        segmentIds.InsertNextValue(segmentIdValue)
        if not slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(labelmap, segmentationNode,
                                                                                      segmentIds):
            raise RuntimeError(f"Slicer could not write segment {segmentIdValue!r} of {segmentationNode.GetName()!r}")
    finally:
        slicer.mrmlScene.RemoveNode(labelmap)
    segmentationNode.SetAttribute(WRITTEN_MASK_ATTRIBUTE + segmentIdValue, maskFingerprint(mask))
    record = _writtenSlices(segmentationNode, segmentIdValue, mask)
    for k in range(len(mask)) if slices is None else slices:
        record[k] = _sliceFingerprint(mask[k])
    segmentationNode.SetAttribute(WRITTEN_SLICES_ATTRIBUTE + segmentIdValue, ",".join(record))


#: Stands for "the user's" in a per-slice record (never equal to a fingerprint).
_USERS = "user"


def _writtenSlices(segmentationNode, segmentIdValue: str, mask: np.ndarray) -> list[str]:
    """The per-slice record; for a segment without one (the user's own), its slices with voxels are
    the user's and the empty ones nobody's."""
    written = segmentationNode.GetAttribute(WRITTEN_SLICES_ATTRIBUTE + segmentIdValue)
    record = written.split(",") if written else []
    if len(record) == len(mask):
        return record
    return [_USERS if plane.any() else _sliceFingerprint(plane) for plane in mask]


def _sliceFingerprint(plane: np.ndarray) -> str:
    return hashlib.sha1(np.packbits(np.ascontiguousarray(plane, dtype=bool)).tobytes()).hexdigest()[:8]


def userSlices(segmentationNode, segmentIdValue: str, mask: np.ndarray) -> list[int]:
    """The k-slices of the segment (``mask``: its ``(K, J, I)`` voxels now) that hold the user's work:
    where they differ from what AutoMedSAM last wrote there (drawn, corrected or erased), or, for a
    segment AutoMedSAM never wrote, every slice with voxels. The model's own results are not the user's."""
    record = _writtenSlices(segmentationNode, segmentIdValue, mask)
    return [k for k, plane in enumerate(mask) if _sliceFingerprint(plane) != record[k]]


def wasEditedByUser(segmentationNode, segmentIdValue: str, currentMask: np.ndarray) -> bool:
    """True when the segment holds voxels AutoMedSAM did not write there (drawn or edited by hand)."""
    written = segmentationNode.GetAttribute(WRITTEN_MASK_ATTRIBUTE + segmentIdValue)
    if not written:
        return bool(currentMask.any())  # a segment of the user's, not one of ours
    return written != maskFingerprint(currentMask)


#: Attribute on segmentation nodes this module created (and so may place and re-grid).
CREATED_ATTRIBUTE = "AutoMedSAM.createdBy"


def newSegmentationNode(volumeNode, name: str | None = None):
    """A new segmentation node for ``volumeNode``'s results: the volume as reference geometry, under
    the volume's parent transform, tagged as this module's."""
    segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                                          name or f"{volumeNode.GetName()} AutoMedSAM")
    segmentationNode.CreateDefaultDisplayNodes()
    segmentationNode.SetAttribute(CREATED_ATTRIBUTE, "AutoMedSAMSlicer")
    segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
    segmentationNode.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
    return segmentationNode


def prepareSegmentationNode(volumeNode, segmentationNode=None, name: str | None = None):
    """The output segmentation node: ``segmentationNode`` as it is, or a new one
    (:func:`newSegmentationNode`). The user's own node is never moved or re-gridded: its parent
    transform and reference geometry are theirs (masks are written through the volume's geometry,
    wherever the node sits)."""
    if segmentationNode is None:
        return newSegmentationNode(volumeNode, name)
    if segmentationNode.GetAttribute(CREATED_ATTRIBUTE) and segmentationNode.GetNodeReferenceID(
            "referenceImageGeometryRef") != volumeNode.GetID():
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
    return segmentationNode


def definedControlPoints(markupsNode) -> np.ndarray:
    """World RAS ``(N, 3)`` of the node's placed control points. The point under the mouse while the
    user is placing one (status PositionPreview) and points whose position was cleared
    (PositionMissing) are not prompts."""
    points = slicer.util.arrayFromMarkupsControlPoints(markupsNode, world=True)
    if points is None or not len(points):
        return np.zeros((0, 3))
    defined = [markupsNode.GetNthControlPointPositionStatus(n) == markupsNode.PositionDefined
               for n in range(markupsNode.GetNumberOfControlPoints())]
    return np.asarray(points, float).reshape(-1, 3)[np.array(defined, bool)]


def inScene(node) -> bool:
    """Whether ``node`` is still in its scene (not removed, the scene not closed since)."""
    scene = node.GetScene() if node is not None else None
    return scene is not None and bool(scene.IsNodePresent(node))


def roiPlaced(roiNode) -> bool:
    """Whether a box ROI is completely placed. Placing one takes two clicks: after the first the node
    has one defined control point of the two it requires; after the second it replaces them by one
    centre point and requires only that one (Libs/MRML/Core/vtkMRMLMarkupsROINode.cxx,
    UpdateControlPointsFromBoxROI). A refine must wait for the second click."""
    return (roiNode is not None and roiNode.GetNumberOfDefinedControlPoints() >= 1
            and roiNode.GetNumberOfDefinedControlPoints() >= roiNode.GetRequiredNumberOfControlPoints())
