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


def readSegmentSlices(segmentationNode, segmentIdValue: str, volumeNode, ks) -> np.ndarray:
    """The segment on the volume's k-slices ``ks``: ``(len(ks), J, I)`` bool, read from the segment's
    own labelmap without exporting the whole volume when that labelmap lies on the volume's voxel grid
    (the same axes and spacing, whole-voxel offsets: what this module and the Segment Editor make on
    this volume); otherwise through Slicer's full resampling."""
    ks = [int(k) for k in ks]
    shape = volumeShape(volumeNode)
    out = np.zeros((len(ks), *shape[1:]), bool)
    image = segmentationNode.GetBinaryLabelmapInternalRepresentation(segmentIdValue)
    if image is None:
        return out
    toImage = _volumeToSegmentImage(segmentationNode, volumeNode, image)
    if toImage is None:  # another grid: Slicer resamples the whole segment onto the volume
        return readSegmentMask(segmentationNode, segmentIdValue, volumeNode)[ks]
    extent = image.GetExtent()
    if extent[0] > extent[1] or extent[2] > extent[3] or extent[4] > extent[5]:
        return out  # empty
    array = slicer.util.arrayFromSegmentInternalBinaryLabelmap(segmentationNode, segmentIdValue)
    label = segmentationNode.GetSegmentation().GetSegment(segmentIdValue).GetLabelValue()
    di, dj, dk = toImage
    # Volume voxel (i, j, k) is labelmap voxel (i + di, j + dj, k + dk); its array index subtracts the extent's start.
    i0, i1 = max(0, extent[0] - di), min(shape[2], extent[1] - di + 1)
    j0, j1 = max(0, extent[2] - dj), min(shape[1], extent[3] - dj + 1)
    if i0 >= i1 or j0 >= j1:
        return out
    for n, k in enumerate(ks):
        kk = k + dk - extent[4]
        if 0 <= kk < array.shape[0]:
            out[n, j0:j1, i0:i1] = array[kk, j0 + dj - extent[2]:j1 + dj - extent[2],
                                         i0 + di - extent[0]:i1 + di - extent[0]] == label
    return out


def _volumeToSegmentImage(segmentationNode, volumeNode, image) -> tuple[int, int, int] | None:
    """The whole-voxel offset ``(di, dj, dk)`` from the volume's voxel indices to those of the
    segment's labelmap ``image``, or None when the two grids differ (axes, spacing, a fraction of a voxel)."""
    imageToSegmentation = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(imageToSegmentation)
    volumeToImage = np.linalg.inv(np.array(slicer.util.arrayFromVTKMatrix(imageToSegmentation))) @ \
        volumeToSegmentation(segmentationNode, volumeNode)
    offset = np.round(volumeToImage[:3, 3])
    if not (np.allclose(volumeToImage[:3, :3], np.eye(3), atol=1e-4) and np.allclose(volumeToImage[:3, 3], offset,
                                                                                        atol=1e-3)):
        return None
    return int(offset[0]), int(offset[1]), int(offset[2])


def volumeToSegmentation(segmentationNode, volumeNode) -> np.ndarray:
    """4x4: the volume's voxel indices ``(i, j, k, 1)`` -> the segmentation's own (local) RAS."""
    return np.linalg.inv(localToWorld(segmentationNode)) @ localToWorld(volumeNode) @ ijkToRasFromNode(volumeNode)


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


def writeSegmentMask(segmentationNode, segmentIdValue: str, mask: np.ndarray, volumeNode) -> None:
    """Replace the segment's voxels with ``mask`` (``(K, J, I)`` bool on the volume's grid); every
    slice's record becomes AutoMedSAM's (see :func:`userSlices`).

    The mask is imported through a label map placed where the volume is *in the segmentation's own
    frame* (volume local RAS -> world -> segmentation local RAS) and under the segmentation's parent
    transform, so the import applies no transform. slicer.util.updateSegmentBinaryLabelmapFromArray
    puts the label map at the volume's local coordinates without its transform, which lands the mask
    off by the volume's parent transform (or twice the difference) whenever the segmentation sits
    under another transform than the volume (measured on Slicer's libraries, slicer-core 5.13).
    """
    # Only the mask's bounding box goes in (a one-voxel empty box for an empty mask): the segment then
    # holds that box, not a full-extent labelmap per class (five organs of a 512 x 512 x 200 CT).
    mask = np.asarray(mask, bool)
    box = [np.nonzero(mask.any(axis=axes))[0] for axes in ((1, 2), (0, 2), (0, 1))]
    start = [int(b[0]) if len(b) else 0 for b in box]
    stop = [int(b[-1]) + 1 if len(b) else 1 for b in box]
    cropped = np.zeros((1, 1, 1), np.uint8) if not mask.any() else mask[
        start[0]:stop[0], start[1]:stop[1], start[2]:stop[2]].astype(np.uint8)
    shift = np.eye(4)
    shift[:3, 3] = [start[2], start[1], start[0]]  # (i, j, k) of the box's first voxel
    labelmap = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__AutoMedSAM mask__")
    try:
        labelmap.SetIJKToRASMatrix(_vtkMatrix(volumeToSegmentation(segmentationNode, volumeNode) @ shift))
        labelmap.SetAndObserveTransformNodeID(segmentationNode.GetTransformNodeID())
        slicer.util.updateVolumeFromArray(labelmap, np.ascontiguousarray(cropped))
        segmentIds = vtk.vtkStringArray()
        segmentIds.InsertNextValue(segmentIdValue)
        if not slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(labelmap, segmentationNode,
                                                                                      segmentIds):
            raise RuntimeError(f"Slicer could not write segment {segmentIdValue!r} of {segmentationNode.GetName()!r}")
    finally:
        slicer.mrmlScene.RemoveNode(labelmap)
    _record(segmentationNode, segmentIdValue, {k: mask[k] for k in range(len(mask))}, len(mask))


def writeSegmentSlices(segmentationNode, segmentIdValue: str, planes: dict, volumeNode) -> None:
    """Replace the segment on the volume's k-slices ``planes`` (k -> ``(J, I)`` bool) and nothing
    else: a click costs one slice, not an export and import of the whole volume. Each slice goes in
    as a one-slice labelmap on the volume's grid, in the segmentation's own frame, through Slicer's
    SetBinaryLabelmapToSegment: MODE_MERGE_MIN (keeps only the new voxels within the slice) then
    MODE_MERGE_MAX (adds them). Its MODE_REPLACE replaces the whole segment, whatever the extent
    (measured on slicer-core 5.13: the other slices were lost)."""
    from vtk.util.numpy_support import vtk_to_numpy  # a submodule: imported where a slice is written

    shape = volumeShape(volumeNode)
    geometry = _vtkMatrix(volumeToSegmentation(segmentationNode, volumeNode))
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    for k, plane in planes.items():
        if _writeSliceInPlace(segmentationNode, segmentIdValue, int(k), plane, volumeNode):
            continue
        image = slicer.vtkOrientedImageData()
        image.SetExtent(0, shape[2] - 1, 0, shape[1] - 1, int(k), int(k))
        image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
        image.SetImageToWorldMatrix(geometry)
        values = vtk_to_numpy(image.GetPointData().GetScalars())
        values[:] = np.ascontiguousarray(plane, dtype=np.uint8).reshape(-1)
        for mode in (logic.MODE_MERGE_MIN, logic.MODE_MERGE_MAX):
            if not logic.SetBinaryLabelmapToSegment(image, segmentationNode, segmentIdValue, mode, image.GetExtent()):
                raise RuntimeError(f"Slicer could not write slice {k} of segment {segmentIdValue!r}")
    _record(segmentationNode, segmentIdValue, planes, shape[0])


def _writeSliceInPlace(segmentationNode, segmentIdValue: str, k: int, plane: np.ndarray, volumeNode) -> bool:
    """Write slice k straight into the segment's own labelmap where that is exact and cheap (the
    common click): the labelmap lies on the volume's grid, holds this segment alone, and already
    covers every voxel of the new plane. False (nothing changed) otherwise."""
    image = segmentationNode.GetBinaryLabelmapInternalRepresentation(segmentIdValue)
    segmentation = segmentationNode.GetSegmentation()
    if image is None:
        return False
    for n in range(segmentation.GetNumberOfSegments()):  # a shared layer: other segments' voxels too
        other = segmentation.GetNthSegmentID(n)
        if other != segmentIdValue and segmentationNode.GetBinaryLabelmapInternalRepresentation(other) is image:
            return False
    offset = _volumeToSegmentImage(segmentationNode, volumeNode, image)
    extent = image.GetExtent()
    if offset is None or extent[0] > extent[1] or extent[2] > extent[3] or not extent[4] <= k + offset[2] <= extent[5]:
        return False
    di, dj, _ = offset
    rows, cols = np.nonzero(plane)
    if len(rows) and (rows.min() + dj < extent[2] or rows.max() + dj > extent[3]
                      or cols.min() + di < extent[0] or cols.max() + di > extent[1]):
        return False  # the labelmap would have to grow: Slicer's merge does that
    shape = plane.shape
    i0, i1 = max(0, extent[0] - di), min(shape[1], extent[1] - di + 1)
    j0, j1 = max(0, extent[2] - dj), min(shape[0], extent[3] - dj + 1)
    array = slicer.util.arrayFromSegmentInternalBinaryLabelmap(segmentationNode, segmentIdValue)
    label = segmentation.GetSegment(segmentIdValue).GetLabelValue()
    region = array[k + offset[2] - extent[4], j0 + dj - extent[2]:j1 + dj - extent[2],
                   i0 + di - extent[0]:i1 + di - extent[0]]
    region[region == label] = 0
    region[np.asarray(plane, bool)[j0:j1, i0:i1]] = label
    image.Modified()  # the segmentation observes its source labelmap: views and other representations update
    segmentation.GetSegment(segmentIdValue).Modified()
    return True


def _vtkMatrix(array: np.ndarray):
    matrix = vtk.vtkMatrix4x4()
    for row in range(4):
        for col in range(4):
            matrix.SetElement(row, col, float(array[row, col]))
    return matrix


def _record(segmentationNode, segmentIdValue: str, planes: dict, count: int) -> None:
    """Note the slices AutoMedSAM just wrote (k -> plane) in the segment's per-slice record."""
    record = _writtenSlices(segmentationNode, segmentIdValue, count)
    for k, plane in planes.items():
        record[int(k)] = sliceFingerprint(plane)
    segmentationNode.SetAttribute(WRITTEN_SLICES_ATTRIBUTE + segmentIdValue, ",".join(record))


#: Stands for "the user's" in a per-slice record (never equal to a fingerprint).
_USERS = "user"
#: Stands for "never written, empty until the user draws there" (the fingerprint of no voxels is shape-dependent).
_NOBODY = "none"


def _writtenSlices(segmentationNode, segmentIdValue: str, count: int) -> list[str]:
    """The per-slice record of ``count`` slices (see :func:`userSlices`); a segment without one has
    none of AutoMedSAM's slices."""
    written = segmentationNode.GetAttribute(WRITTEN_SLICES_ATTRIBUTE + segmentIdValue)
    record = written.split(",") if written else []
    return record if len(record) == count else [_USERS] * count


def sliceFingerprint(plane: np.ndarray) -> str:
    """Short content hash of a ``(J, I)`` slice mask (an empty one is always ``"none"``)."""
    plane = np.ascontiguousarray(plane, dtype=bool)
    if not plane.any():
        return _NOBODY
    return hashlib.sha1(np.packbits(plane).tobytes() + str(plane.shape).encode()).hexdigest()[:10]


def userSlices(segmentationNode, segmentIdValue: str, mask: np.ndarray) -> list[int]:
    """The k-slices of the segment (``mask``: its ``(K, J, I)`` voxels now) that hold the user's work:
    where they differ from what AutoMedSAM last wrote there (drawn, corrected or erased), or, for
    slices AutoMedSAM never wrote, where they have voxels. The model's own results are not the user's."""
    record = _writtenSlices(segmentationNode, segmentIdValue, len(mask))
    out = []
    for k, plane in enumerate(mask):
        now = sliceFingerprint(plane)
        if (record[k] == _USERS and now != _NOBODY) or (record[k] != _USERS and now != record[k]):
            out.append(k)
    return out


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
