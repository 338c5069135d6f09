"""AutoMedSAMSlicerLogic: MRML nodes in, core engine calls, MRML nodes out. No GUI code here, so the
same calls work from the panel, the Python console and ``Slicer --no-main-window`` batch runs.

Geometry: volumes go to the core through their IJK->RAS matrix (see :mod:`.nodes`); masks come back
as KJI arrays on the volume's grid and are written with the volume as reference geometry. Points
and boxes are world RAS millimetres (markups positions) and are mapped to voxel (i, j) on one
k-slice of the volume.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic

from . import nodes
from .history import UndoHistory, UndoStep
from .jobs import Job
from .parameterNode import AutoMedSAMSlicerParameterNode

#: What to do when a segment AutoMedSAM would write holds voxels the user drew or edited:
#: "keep" writes the model result into a new segment next to it, "overwrite" replaces it (undoable),
#: "cancel" writes nothing. A callable gets the segment names and returns one of these.
EDITED_SEGMENT_CHOICES = ("keep", "overwrite", "cancel")


class AutoMedSAMSlicerLogic(ScriptedLoadableModuleLogic):
    """Segment, refine, propagate, undo and teach on MRML nodes.

    Console example::

        logic = slicer.util.getModuleLogic("AutoMedSAMSlicer")
        seg = logic.segment(volumeNode, ["liver", "spleen"], model="/path/bundle.zip")
        logic.refine(volumeNode, seg, "liver", points=[[12.0, -40.5, 88.0]], pointLabels=[1])
        logic.undo(seg)
    """

    def __init__(self, backend=None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.backend = backend  # created on first use (see configureBackend); see .backends
        self.backendName = "worker"
        self.serverUrl = ""
        self.serverToken = ""
        self.defaultModel: str | None = None
        self.defaultBackbone: str | None = None
        self.defaultDevice = "auto"
        self.history = UndoHistory()
        self._volumeKeys: dict[int, tuple] = {}

    def getParameterNode(self):
        return AutoMedSAMSlicerParameterNode(super().getParameterNode())

    # ------------------------------------------------------------------------ configuration
    def configureBackend(self, backend: str = "worker", serverUrl: str = "", token: str = "",
                         device: str | None = None) -> None:
        """Where inference runs: ``worker`` (a local process; keeps Slicer responsive), ``remote``
        (``automedsam serve`` on another machine) or ``inprocess`` (console and batch runs)."""
        from .backends import makeBackend

        if self.backend is not None:
            self.backend.shutdown()
        self.backendName, self.serverUrl, self.serverToken = backend, serverUrl, token
        self.defaultDevice = device or self.defaultDevice
        self.backend = makeBackend(backend, serverUrl, token, self.defaultDevice)
        self._volumeKeys.clear()

    def shutdown(self) -> None:
        """Stop the worker (called when Slicer exits or the module is unloaded)."""
        if self.backend is not None:
            self.backend.shutdown()
            self.backend = None

    def engine(self, model: str | None = None, device: str | None = None):
        if self.backend is None:
            self.configureBackend(self.backendName, self.serverUrl, self.serverToken)
        model = str(model) if model else self.defaultModel
        device = device or self.defaultDevice
        from automedsam.models import DEFAULT_BACKBONE

        # No bundle: manual mode (box / points) on the chosen backbone, LiteMedSAM by default.
        engine = self.backend.engine(model, device, None if model else (self.defaultBackbone or DEFAULT_BACKBONE))
        if model:
            self.defaultModel = model
        return engine

    def deviceInfo(self) -> dict:
        """``{"device": ..., "gpu": {"name", "free_mb", "total_mb"} or None}`` of the inference machine."""
        if self.backend is None:
            self.configureBackend(self.backendName, self.serverUrl, self.serverToken)
        return self.backend.info()

    def modelClasses(self, model: str | None = None, device: str | None = None) -> list:
        """The model bundle's classes (:class:`automedsam.classes.ClassInfo`: name, display name, colour)."""
        engine = self.engine(model, device)
        return list(self._call(engine, lambda e: e.class_catalog).classes)

    def loadModel(self, model: str | None = None, device: str | None = None, waitForCompletion: bool = True):
        """Start the engine (the worker, if that is the backend), load ``model`` and describe the
        machine: ``(classes, deviceInfo)``, or a :class:`.jobs.Job` giving them, so the panel stays
        responsive while a worker starts and a model loads (minutes the first time)."""

        def events():
            yield {"stage": "prepare", "done": 0, "total": 2, "message": "starting AutoMedSAM"}
            classes = self.modelClasses(model, device)
            yield {"stage": "prepare", "done": 1, "total": 2, "message": "model loaded"}
            yield {"stage": "done", "done": 2, "total": 2, "message": "ready", "result": (classes, self.deviceInfo())}

        job = Job("model loading", events(), lambda last: last["result"])
        return job.wait() if waitForCompletion else job

    # -------------------------------------------------------------------------------- segment
    def segment(self, volumeNode, classes, segmentationNode=None, model: str | None = None, device: str | None = None,
                waitForCompletion: bool = True, progressCallback: Callable | None = None,
                slices: Sequence[int] | None = None, onEditedSegment="keep"):
        """Segment ``classes`` (names or a comma-separated string) on ``volumeNode``.

        Fills ``segmentationNode`` (created when None) with one named, coloured, terminology-coded
        segment per class. Returns the segmentation node, or with ``waitForCompletion=False`` a
        :class:`.jobs.Job` to step/cancel (its ``result`` is the node). Undo with :meth:`undo`.
        """
        names = self._classNames(classes)
        key, volume = self._volumeSnapshot(volumeNode)  # MRML is read here, on the calling thread
        cancel = threading.Event()
        ready = {}

        def events():
            # Starting the worker, loading the model and sending the volume can take minutes: they are
            # part of the job, so the panel (which steps jobs on a thread) shows progress and Cancel.
            yield {"stage": "prepare", "done": 0, "total": 1, "message": "starting AutoMedSAM, sending the volume"}
            engine = self.engine(model, device)
            ready["infos"] = self._classInfos(engine, names)
            self._sendVolume(engine, key, volume)
            if cancel.is_set():
                yield {"stage": "cancelled", "done": 0, "total": 1, "message": "cancelled; nothing was changed"}
                return
            yield from self._call(engine, lambda e: e.segment([i.name for i in ready["infos"]], slices,
                                                              cancel=cancel))

        def finish(last):
            infos = ready["infos"]
            masks = last.result.masks
            return self._writeResults(volumeNode, segmentationNode, infos, masks, onEditedSegment,
                                      f"segment {', '.join(i.display_name for i in infos)}", last.result.slices)

        job = Job("segmentation", events(), finish, progressCallback, cancel)
        return job.wait() if waitForCompletion else job

    def _writeResults(self, volumeNode, segmentationNode, infos, masks: dict, onEditedSegment, label: str,
                      slices: Sequence[int] | None = None):
        """Write ``masks`` (class name -> ``(K, J, I)``) into the classes' segments; with ``slices``
        only those k-slices change (a segment keeps what it has on the others). Nothing is written
        (None) when the volume or the segmentation left the scene while the job ran."""
        if not self._stillThere(volumeNode, segmentationNode, label):
            return None
        segmentationNode = nodes.prepareSegmentationNode(volumeNode, segmentationNode)
        targets, edited = [], []
        for info in infos:
            sid = nodes.segmentId(segmentationNode, info.name, info.display_name)
            current = nodes.readSegmentMask(segmentationNode, sid, volumeNode) if sid else None
            theirs = nodes.userSlices(segmentationNode, sid, current) if sid else []
            if theirs and (slices is None or set(theirs) & {int(k) for k in slices}):
                edited.append(info.display_name)  # the user's work on slices this run would replace
            targets.append((info, sid, current))
        decision = "overwrite"
        if edited:
            decision = onEditedSegment(edited) if callable(onEditedSegment) else onEditedSegment
            if decision not in EDITED_SEGMENT_CHOICES:
                raise ValueError(f"onEditedSegment must be one of {EDITED_SEGMENT_CHOICES}, got {decision!r}")
            if decision == "cancel":
                logging.info("AutoMedSAM: kept the edited segments %s; nothing written", edited)
                return segmentationNode
        step = UndoStep(label, segmentationNode, volumeNode)
        for info, sid, current in targets:
            mask = np.asarray(masks[info.name], bool)
            keepUsers = sid and decision == "keep" and info.display_name in edited
            if sid is None or keepUsers:
                name = f"{info.display_name}{OWN_SEGMENT_SUFFIX}" if keepUsers else None
                sid = nodes.addClassSegment(segmentationNode, info, name)
                step.recordCreated(sid)
                current = None
            if current is not None and slices is not None:  # only these slices change
                ks = sorted({int(k) for k in slices})
                step.recordMask(sid, current[ks], ks)
                planes = {k: mask[k] for k in ks}
                nodes.writeSegmentSlices(segmentationNode, sid, planes, volumeNode)
            else:
                if current is not None:
                    step.recordMask(sid, current)
                planes = dict(enumerate(mask))
                nodes.writeSegmentMask(segmentationNode, sid, mask, volumeNode)
            step.recordWritten(sid, planes)
        self.history.push(step)
        return segmentationNode

    # --------------------------------------------------------------------------------- refine
    def refine(self, volumeNode, segmentationNode, className: str, points=None, pointLabels=None, box=None,
               sliceIndex: int | None = None, mode: str | None = None, model: str | None = None,
               device: str | None = None, waitForCompletion: bool = True):
        """Correct one k-slice of a class with points and/or a box; returns the slice index k (or,
        with ``waitForCompletion=False``, a :class:`.jobs.Job` whose ``result`` is k: the panel's
        first refine may have to start the worker, which must not freeze Slicer).

        Args:
            points: world RAS mm ``(N, 3)``, or a markups fiducial node (all its points).
            pointLabels: ``(N,)`` 1 = include, 0 = exclude (default all 1).
            box: a markups ROI node, RAS bounds ``(xmin, xmax, ymin, ymax, zmin, zmax)`` or two RAS corners.
            sliceIndex: k; default: the slice the points/box lie on.
            mode: ``"semi"`` (learned prompts + yours) or ``"manual"`` (yours only).

        Only slice k of the segment changes (undoable); other slices keep any edits.
        """
        ijkPoints, labels, ijkBox = self._promptsToIjk(volumeNode, points, pointLabels, box)
        if ijkPoints is None and ijkBox is None:
            raise ValueError("refine needs at least one point or a box")
        k = self._sliceOf(volumeNode, ijkPoints, ijkBox, sliceIndex)
        pts = None if ijkPoints is None else ijkPoints[:, :2]
        bx = None
        if ijkBox is not None:
            bx = [ijkBox[:, 0].min(), ijkBox[:, 1].min(), ijkBox[:, 0].max(), ijkBox[:, 1].max()]
        mode = {"semi-automatic": "semi", "automatic": "semi"}.get(mode, mode)
        # On the calling thread, from MRML: the volume and the slice as the user sees it now (their
        # own edits included): the engine refines from that, never from a copy of its own.
        key, volume = self._volumeSnapshot(volumeNode)
        shown = self._currentSlice(volumeNode, segmentationNode, className, k)
        ready = {}
        cancel = threading.Event()

        def events():
            cancelled = {"stage": "cancelled", "done": 0, "total": 1, "message": "cancelled; nothing was changed"}
            engine = self.engine(model, device)  # may start the worker: Cancel is honoured after it
            if cancel.is_set():
                yield cancelled
                return
            info = ready["info"] = self._classInfos(engine, [className])[0]
            self._sendVolume(engine, key, volume)
            if cancel.is_set():
                yield cancelled
                return
            ready["mask"] = self._call(engine, lambda e: e.refine(info.name, k, points=pts, point_labels=labels,
                                                                  box=bx, mode=mode, mask=shown))
            if cancel.is_set():  # the answer came, but the user no longer wants it
                yield cancelled
                return
            yield {"stage": "done", "done": 1, "total": 1, "message": f"refined slice {k}"}

        def finish(last):
            info = ready["info"]
            self._writeSlices(volumeNode, segmentationNode, info, {k: ready["mask"]},
                              f"refine {info.display_name} on slice {k}")
            return k

        job = Job("refine", events(), finish, cancelEvent=cancel)
        return job.wait() if waitForCompletion else job

    def _writeSlices(self, volumeNode, segmentationNode, info, sliceMasks: dict, label: str) -> None:
        """Write the class's masks on the k-slices of ``sliceMasks`` (k -> ``(J, I)``) and nothing else:
        a click reads and writes its own slice, never the whole volume. The user's work on other
        slices stays theirs (a later Segment asks before replacing it)."""
        if not self._stillThere(volumeNode, segmentationNode, label):
            return
        segmentationNode = nodes.prepareSegmentationNode(volumeNode, segmentationNode)
        step = UndoStep(label, segmentationNode, volumeNode)
        ks = sorted(int(k) for k in sliceMasks)
        planes = {k: np.asarray(sliceMasks[k], bool) for k in ks}
        sid = nodes.segmentId(segmentationNode, info.name, info.display_name)
        if sid is None:
            sid = nodes.addClassSegment(segmentationNode, info)
            step.recordCreated(sid)
        else:
            step.recordMask(sid, nodes.readSegmentSlices(segmentationNode, sid, volumeNode, ks), ks)
        nodes.writeSegmentSlices(segmentationNode, sid, planes, volumeNode)
        step.recordWritten(sid, planes)
        self.history.push(step)

    # ------------------------------------------------------------------------------ propagate
    def propagate(self, volumeNode, segmentationNode, className: str, sliceIndex: int, direction: str = "both",
                  maxSlices: int | None = None, waitForCompletion: bool = True,
                  progressCallback: Callable | None = None, model: str | None = None, device: str | None = None):
        """Carry the class's mask on slice ``sliceIndex`` (as it is in the segment now, user edits
        included) to neighbouring slices until the object ends. One undo step."""
        # On the calling thread: everything read from MRML (the seed slice as the user left it).
        seed = self._currentSlice(volumeNode, segmentationNode, className, int(sliceIndex))
        if seed is None:
            raise ValueError(f"no {className!r} segment to propagate: segment or refine it first")
        key, volume = self._volumeSnapshot(volumeNode)
        cancel = threading.Event()
        ready = {}

        def events():
            yield {"stage": "prepare", "done": 0, "total": 1, "message": "starting AutoMedSAM, sending the volume"}
            engine = ready["engine"] = self.engine(model, device)
            info = ready["info"] = self._classInfos(engine, [className])[0]
            self._sendVolume(engine, key, volume)
            yield from self._call(engine, lambda e: e.propagate(info.name, int(sliceIndex), seed, direction, maxSlices,
                                                                cancel=cancel))

        def finish(last):
            info, masks = ready["info"], last.result.masks[ready["info"].name]
            written = last.result.slices
            if written:
                self._writeSlices(volumeNode, segmentationNode, info, {k: masks[k] for k in written},
                                  f"propagate {info.display_name} from slice {sliceIndex}")
            return written

        job = Job("propagation", events(), finish, progressCallback, cancel)
        return job.wait() if waitForCompletion else job

    # ----------------------------------------------------------------------------------- undo
    def undo(self, segmentationNode=None, onEditedSince="refuse") -> str | None:
        """Undo the last AutoMedSAM change (on ``segmentationNode`` if given); returns what was undone.

        Segments changed since that change (painted, erased, or changed again) are never silently
        reset: ``onEditedSince="refuse"`` raises :class:`.history.EditedSinceError` naming them (the
        console's default), ``"overwrite"`` undoes anyway, a callable (the panel's question) gets
        their names and returns either."""
        return self.history.undo(segmentationNode, onEditedSince)

    def canUndo(self, segmentationNode=None) -> bool:
        return self.history.canUndo(segmentationNode)

    # ---------------------------------------------------------------------------------- teach
    def teach(self, volumeNode, segmentationNode, segments=None, promptNetwork: str | None = None,
              epochs: int | None = None,
              outputPath: str | None = None, waitForCompletion: bool = True, progressCallback: Callable | None = None,
              model: str | None = None, device: str | None = None, decoderLearningRate: float | None = None,
              overwrite: bool = False):
        """Train a prompt network from segments drawn or corrected on a few slices of ``volumeNode``.

        ``segments``: segment names (or ``{segment name: class name}``); default all segments. Only
        slices with any of them are used. The new bundle is saved to ``outputPath`` (default: a new
        file in the AutoMedSAM home's ``bundles`` folder, so every teach keeps its own and a saved
        scene keeps pointing at the weights it used; an existing ``outputPath`` is replaced only with
        ``overwrite``) and used at once. Returns the bundle path (or a Job).
        ``promptNetwork``, ``epochs`` and ``decoderLearningRate`` default to the engine's
        (:data:`automedsam.contract.DEFAULT_PROMPT_NETWORK`, ``TEACH_EPOCHS``, ``TEACH_DECODER_LR``).
        """
        from automedsam import contract

        promptNetwork = promptNetwork or contract.DEFAULT_PROMPT_NETWORK
        epochs = epochs or contract.TEACH_EPOCHS
        decoderLearningRate = decoderLearningRate or contract.TEACH_DECODER_LR
        key, volume = self._volumeSnapshot(volumeNode)  # MRML is read here, on the calling thread
        labels, classes, drawn = self._labelMap(volumeNode, segmentationNode, segments)
        trainSlices = ",".join(str(k) for k in drawn)
        from automedsam.models import automedsam_home

        target = Path(outputPath) if outputPath else _newBundlePath(automedsam_home() / "bundles")
        if target.exists() and not overwrite:
            raise ValueError(f"{target} exists: a model taught earlier may be in use there (a saved scene may point "
                             "at it). Choose another file, or pass overwrite=True")
        cancel = threading.Event()
        ready = {}

        def events():
            # Reaching the engine (perhaps starting the worker) and sending the volume are part of the job.
            yield {"stage": "prepare", "done": 0, "total": 1, "message": "starting AutoMedSAM, sending the volume"}
            engine = ready["engine"] = self.engine(model, device)
            self._sendVolume(engine, key, volume)
            yield from self._call(engine, lambda e: e.teach(labels, classes, target, prompt_network=promptNetwork,
                                                            epochs=epochs, train_slices=trainSlices,
                                                            decoder_lr=decoderLearningRate, name="taught-in-slicer",
                                                            cancel=cancel))

        def finish(last):
            # The engine now runs the new bundle (it switched when teaching ended): file it under its path.
            self.backend.adopt(last.bundle_path, device or self.defaultDevice, ready["engine"])
            self.defaultModel = last.bundle_path
            return last.bundle_path

        job = Job("teaching", events(), finish, progressCallback, cancel)
        return job.wait() if waitForCompletion else job

    def _labelMap(self, volumeNode, segmentationNode, segments):
        """The label map teaching learns from, its classes and the k-slices it holds: each segment's
        voxels on the slices the user drew, corrected or erased (:func:`.nodes.userSlices`), never the
        model's own results on the others."""
        if segmentationNode is None:
            raise ValueError("teaching needs a segmentation with the segments you drew")
        segmentation = segmentationNode.GetSegmentation()
        if segments is None:
            ids = [segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())]
            mapping = {segmentation.GetSegment(i).GetName(): None for i in ids}
        else:
            mapping = dict(segments) if isinstance(segments, dict) else {s: None for s in self._classNames(segments)}
        shape = nodes.volumeShape(volumeNode)
        labels = np.zeros(shape, np.uint16)
        classes: dict[str, int] = {}
        drawn: set[int] = set()
        for value, (segmentName, className) in enumerate(mapping.items(), start=1):
            sid = segmentation.GetSegmentIdBySegmentName(segmentName)
            if not sid:
                raise ValueError(f"no segment named {segmentName!r} in {segmentationNode.GetName()!r}")
            mask = nodes.readSegmentMask(segmentationNode, sid, volumeNode)
            if not mask.any():
                raise ValueError(f"segment {segmentName!r} is empty: draw it on a few slices first")
            theirs = nodes.userSlices(segmentationNode, sid, mask)
            if not any(mask[k].any() for k in theirs):
                raise ValueError(f"segment {segmentName!r} holds only AutoMedSAM's own results: draw or correct it on "
                                 "a few slices first (the model does not learn from itself)")
            for k in theirs:
                labels[k][mask[k]] = value
            drawn.update(theirs)
            classes[className or _className(segmentName)] = value
        return labels, classes, sorted(drawn)

    # -------------------------------------------------------------------------------- helpers
    @staticmethod
    def _stillThere(volumeNode, segmentationNode, label: str) -> bool:
        """False (and a log line) when the scene was closed, or the nodes removed, while a job ran:
        its result belongs to nothing the user still has."""
        if nodes.inScene(volumeNode) and (segmentationNode is None or nodes.inScene(segmentationNode)):
            return True
        logging.info("AutoMedSAM: %s finished after its volume or segmentation left the scene; nothing written",
                     label)
        return False

    @staticmethod
    def _currentSlice(volumeNode, segmentationNode, className: str, k: int):
        """The class's segment on slice k as the user has it now, ``(J, I)`` bool on the volume's
        grid, or None when the segmentation has no segment for the class (or k is off the volume: the
        engine names the range). Read on the thread that owns MRML, one slice only."""
        from automedsam.classes import resolve_class

        if segmentationNode is None or not 0 <= k < nodes.volumeShape(volumeNode)[0]:
            return None
        guess = resolve_class(_className(className))
        sid = nodes.segmentId(segmentationNode, guess.name, guess.display_name)
        return nodes.readSegmentSlices(segmentationNode, sid, volumeNode, [k])[0] if sid else None

    def _call(self, engine, fn):
        return self.backend.call(engine, fn)

    @staticmethod
    def _volumeKey(volumeNode) -> tuple:
        """What identifies the volume's content and geometry (node, image data version, IJK->RAS)."""
        if volumeNode is None:
            raise ValueError("no input volume: select a volume node (load a CT or MR first)")
        imageData = volumeNode.GetImageData()
        return (volumeNode.GetID(), imageData.GetMTime() if imageData is not None else None,
                tuple(nodes.ijkToRasFromNode(volumeNode).ravel()))

    def _volumeSnapshot(self, volumeNode) -> tuple:
        """The volume's key and a core copy of it, taken on the thread that owns MRML, for
        :meth:`_sendVolume` to send from any thread."""
        return self._volumeKey(volumeNode), nodes.volumeFromNode(volumeNode)

    def _sendVolume(self, engine, key: tuple, volume) -> None:
        self.backend.verify(engine)  # a worker that died since the last call is restarted here
        if self._volumeKeys.get(id(engine)) != key:
            self._call(engine, lambda e: e.set_volume(volume))
            self._volumeKeys[id(engine)] = key

    def _classInfos(self, engine, names: Sequence[str]) -> list:
        return [self._call(engine, lambda e, n=n: e.class_info(n)) for n in names]

    @staticmethod
    def _classNames(classes) -> list[str]:
        names = [c.strip() for c in classes.split(",")] if isinstance(classes, str) else [str(c) for c in classes]
        names = [n for n in names if n]
        if not names:
            raise ValueError("no classes given: tick at least one class (or pass e.g. 'liver,spleen')")
        return names

    def _promptsToIjk(self, volumeNode, points, pointLabels, box):
        ijkPoints = labels = ijkBox = None
        if points is not None and hasattr(points, "GetNumberOfControlPoints"):
            points = nodes.definedControlPoints(points)
        if points is not None and len(points):
            ijkPoints = nodes.worldToIjk(volumeNode, points)
            labels = np.ones(len(ijkPoints), int) if pointLabels is None else np.asarray(pointLabels, int).reshape(-1)
            if labels.shape != (len(ijkPoints),):
                raise ValueError(f"pointLabels must have one value per point ({len(ijkPoints)}), got {labels.shape}")
        if box is not None:
            if hasattr(box, "GetRASBounds"):
                bounds = [0.0] * 6
                box.GetRASBounds(bounds)
                box = bounds
            b = np.asarray(box, float)
            if b.shape == (6,):  # RAS bounds -> the 8 corners
                corners = np.array([[x, y, z] for x in b[0:2] for y in b[2:4] for z in b[4:6]])
            elif b.shape == (2, 3):
                corners = b
            else:
                raise ValueError(f"box must be an ROI node, 6 RAS bounds or two RAS corners, got {box!r}")
            ijkBox = nodes.worldToIjk(volumeNode, corners)
        return ijkPoints, labels, ijkBox

    @staticmethod
    def _sliceOf(volumeNode, ijkPoints, ijkBox, sliceIndex: int | None) -> int:
        """The k-slice the prompts were placed on: the points' (they sit on the slice plane), else
        the box centre's (an ROI drawn on a slice view has some thickness along k). A box drawn in a
        view that is not a k-slice of the volume (a coronal view of an axial CT: thin along j, tall
        along k) is refused: no k-slice holds the rectangle the user drew."""
        if ijkBox is not None:
            extent = np.ptp(ijkBox, axis=0)  # voxels along i, j, k
            if extent[2] > 1.5 and extent[2] > min(extent[0], extent[1]):
                raise ValueError(
                    f"the box spans {extent[2]:.0f} slices of {volumeNode.GetName()!r} but only "
                    f"{min(extent[0], extent[1]):.0f} voxels across one of its in-slice axes: it was drawn in a "
                    "view that is not the volume's own slice orientation. Draw the box in the view that shows "
                    "the volume's k-slices (the axial view for an axial scan)")
        if sliceIndex is not None:
            return int(sliceIndex)
        ks = ijkPoints[:, 2] if ijkPoints is not None else np.array([ijkBox[:, 2].mean()])
        if np.ptp(ks) > 1.0:
            raise ValueError(
                f"the points lie on several slices (k from {ks.min():.1f} to {ks.max():.1f}) of "
                f"{volumeNode.GetName()!r}:"
                " place them on one slice of the volume's own slice orientation, or pass sliceIndex")
        return int(np.round(np.median(ks)))


def _newBundlePath(folder: Path) -> Path:
    """A file name in ``folder`` no earlier teach used: ``taught-in-slicer-<date>-<time>[-n].zip``."""
    import datetime

    stem = f"taught-in-slicer-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    path, n = folder / f"{stem}.zip", 2
    while path.exists():
        path, n = folder / f"{stem}-{n}.zip", n + 1
    return path


#: What this module appends to a segment it writes beside one the user edited ("Liver (AutoMedSAM)").
OWN_SEGMENT_SUFFIX = " (AutoMedSAM)"


def _className(segmentName: str) -> str:
    """Segment name -> class name: ``"Left kidney"`` -> ``left_kidney``; the suffix of a segment this
    module wrote beside the user's goes (``"Liver (AutoMedSAM)"`` -> ``liver``); any other character a
    class name cannot hold becomes ``_`` (``"Lesion #2"`` -> ``lesion_2``)."""
    import re

    name = segmentName.strip()
    if name.endswith(OWN_SEGMENT_SUFFIX):
        name = name[:-len(OWN_SEGMENT_SUFFIX)]
    spelled = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    if not spelled:
        raise ValueError(f"segment name {segmentName!r} has no letters or digits to name a class after; rename it")
    return spelled
