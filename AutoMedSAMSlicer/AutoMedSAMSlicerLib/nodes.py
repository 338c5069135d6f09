"""MRML nodes <-> automedsam core objects: the only place where the Slicer layer touches voxels.

Frames and axes, as everywhere in AutoMedSAMSlicer:

- Arrays are KJI (``array[k, j, i]``), the order of ``slicer.util.arrayFromVolume`` and of the core
  :class:`automedsam.volume.Volume`.
- Slicer's world frame is RAS (millimetres); the core stores LPS. The conversion goes through the
  volume node's own IJK->RAS matrix (``GetIJKToRASMatrix``), so flipped, oblique and LPS-ordered
  volumes keep their exact geometry.
- Markups positions are *world* RAS; a volume under a parent transform is in its own local RAS,
  so points are mapped with ``TransformPointFromWorld`` before RAS->IJK.
- Masks are written with the volume as reference geometry, so a mask voxel ``[k, j, i]`` is the
  image voxel ``[k, j, i]``.
"""

from __future__ import annotations

import hashlib

import numpy as np
import slicer
import vtk

#: Node attribute holding the fingerprint of the mask AutoMedSAM last wrote to a segment (the
#: segment id is appended). A segment whose mask no longer matches it was edited by the user.
WRITTEN_MASK_ATTRIBUTE = "AutoMedSAM.writtenMask."


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


def writeSegmentMask(segmentationNode, segmentIdValue: str, mask: np.ndarray, volumeNode) -> None:
    """Replace the segment's voxels with ``mask`` (``(K, J, I)`` bool on the volume's grid) and
    remember its fingerprint so a later user edit can be recognised."""
    slicer.util.updateSegmentBinaryLabelmapFromArray(np.ascontiguousarray(mask, dtype=np.uint8), segmentationNode,
                                                     segmentIdValue, volumeNode)
    segmentationNode.SetAttribute(WRITTEN_MASK_ATTRIBUTE + segmentIdValue, maskFingerprint(mask))


def wasEditedByUser(segmentationNode, segmentIdValue: str, currentMask: np.ndarray) -> bool:
    """True when the segment holds voxels AutoMedSAM did not write there (drawn or edited by hand)."""
    written = segmentationNode.GetAttribute(WRITTEN_MASK_ATTRIBUTE + segmentIdValue)
    if not written:
        return bool(currentMask.any())  # a segment of the user's, not one of ours
    return written != maskFingerprint(currentMask)


def prepareSegmentationNode(volumeNode, segmentationNode=None, name: str | None = None):
    """The output segmentation node, created if needed, with the volume as reference geometry and
    under the same parent transform as the volume."""
    if segmentationNode is None:
        segmentationNode = slicer.mrmlScene.AddNewNodeByClass(
            "vtkMRMLSegmentationNode", name or f"{volumeNode.GetName()} AutoMedSAM")
        segmentationNode.CreateDefaultDisplayNodes()
    segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
    segmentationNode.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
    return segmentationNode


def roiPlaced(roiNode) -> bool:
    """Whether a box ROI is completely placed. Placing one takes two clicks: after the first the node
    has one defined control point of the two it requires; after the second it replaces them by one
    centre point and requires only that one (Libs/MRML/Core/vtkMRMLMarkupsROINode.cxx,
    UpdateControlPointsFromBoxROI). A refine must wait for the second click."""
    return (roiNode is not None and roiNode.GetNumberOfDefinedControlPoints() >= 1
            and roiNode.GetNumberOfDefinedControlPoints() >= roiNode.GetRequiredNumberOfControlPoints())
