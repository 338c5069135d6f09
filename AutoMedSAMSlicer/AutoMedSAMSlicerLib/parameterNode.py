"""The module's state, kept in a scripted module node so it is saved with the scene."""

from typing import Annotated

from slicer import vtkMRMLMarkupsFiducialNode, vtkMRMLMarkupsROINode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper


@parameterNodeWrapper
class AutoMedSAMSlicerParameterNode:
    """
    inputVolume - the CT/MR to segment.
    outputSegmentation - where the masks go (created on first Segment when empty).
    modelPath - model bundle (.zip or folder) on this machine (uploaded to a worker or server), or
        the name of a bundle in a remote server's bundle folders.
    backbone - backbone id for manual mode without a bundle (e.g. sam2.1_hiera_t).
    device - auto (CUDA when available), cuda or cpu.
    mode - automatic (learned prompts), semi-automatic (learned + your points/box), manual (your prompts only).
    selectedClasses - comma-separated class names ticked in the list.
    activeClass - the class that Refine, Propagate and Teach work on.
    positivePoints / negativePoints / promptBox - the refine prompts, placed on slice views (world RAS).
    backend - worker (local process, default), remote (server URL + token) or inprocess.
    serverUrl - the remote server's URL (its token is never stored in the scene).
    teachPromptNetwork / teachEpochs - how Teach trains.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    modelPath: str = ""
    backbone: str = ""
    device: Annotated[str, Choice(["auto", "cuda", "cpu"])] = "auto"
    mode: Annotated[str, Choice(["automatic", "semi-automatic", "manual"])] = "automatic"
    selectedClasses: str = ""
    activeClass: str = ""
    positivePoints: vtkMRMLMarkupsFiducialNode
    negativePoints: vtkMRMLMarkupsFiducialNode
    promptBox: vtkMRMLMarkupsROINode
    backend: Annotated[str, Choice(["worker", "remote", "inprocess"])] = "worker"
    serverUrl: str = ""
    teachPromptNetwork: Annotated[str, Choice(["classmap", "ppn", "diffusion"])] = "classmap"
    teachEpochs: Annotated[int, WithinRange(1, 1000)] = 40
