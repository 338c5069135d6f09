"""AutoMedSAMSlicer: automatic and interactive SAM-family segmentation driven by learned prompts.

The Widget only wires the UI; the Logic (AutoMedSAMSlicerLib/logic.py) turns MRML nodes into core
objects and back. Nothing here imports torch: it is installed on first use, after asking.
"""

import logging

import qt
import slicer
import vtk
from AutoMedSAMSlicerLib.logic import AutoMedSAMSlicerLogic
from AutoMedSAMSlicerLib.parameterNode import AutoMedSAMSlicerParameterNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

__all__ = ["AutoMedSAMSlicer", "AutoMedSAMSlicerLogic", "AutoMedSAMSlicerParameterNode", "AutoMedSAMSlicerTest",
           "AutoMedSAMSlicerWidget"]

#: Milliseconds between two steps of a running job (each step is a short poll of the worker).
JOB_TICK_MS = 100


class AutoMedSAMSlicer(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("AutoMedSAM")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["AutoMedSAMSlicer developers"]
        self.parent.helpText = _(
            "Tick organ or lesion classes and get labelled segments without drawing. Fix a mask with +/- points "
            "or a box, carry a corrected slice to its neighbours, and teach new classes from a few drawn slices. "
            "SAM, MedSAM and SAM 2.1 backbones driven by learned prompt generators (Sam2Rad PPN, AutoMedSAM "
            "diffusion prompt encoder). See the <a href=\"https://github.com/automedsam/AutoMedSAMSlicer\">"
            "documentation</a>.")
        self.parent.acknowledgementText = _(
            "Builds on Segment Anything (Meta AI), MedSAM, SAM 2.1, and the Sam2Rad and AutoMedSAM papers.")


class AutoMedSAMSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel. All state lives in the parameter node (saved with the scene)."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._jobTimer = None
        self._observedMarkups = []
        self._updatingClassList = False
        self._lastRefinedSlice = None

    # ------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/AutoMedSAMSlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = AutoMedSAMSlicerLogic()

        self._jobTimer = qt.QTimer()
        self._jobTimer.setInterval(JOB_TICK_MS)
        self._jobTimer.connect("timeout()", self.onJobTick)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        slicer.app.connect("aboutToQuit()", self.logic.shutdown)

        self.ui.loadModelButton.connect("clicked(bool)", self.onLoadModel)
        self.ui.classFilterLineEdit.connect("textChanged(QString)", self.onClassFilterChanged)
        self.ui.classListWidget.connect("itemChanged(QListWidgetItem*)", self.onClassItemChanged)
        self.ui.classListWidget.connect("currentTextChanged(QString)", self.onActiveClassChanged)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegment)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.propagateButton.connect("clicked(bool)", self.onPropagate)
        self.ui.undoButton.connect("clicked(bool)", self.onUndo)
        self.ui.teachButton.connect("clicked(bool)", self.onTeach)
        self.ui.applyBackendButton.connect("clicked(bool)", self.onApplyBackend)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.onModelPathChanged)

        self.ui.progressBar.hide()
        self.ui.cancelButton.hide()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Module closed or reloaded: stop timers, observers and the worker."""
        if self._jobTimer:
            self._jobTimer.stop()
        self.removeObservers()
        if self.logic:
            self.logic.shutdown()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)
        self.onCancel()

    def onSceneEndClose(self, caller, event) -> None:
        self.logic.history.clear()
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode
        for role, color in (("positivePoints", (0.1, 0.9, 0.1)), ("negativePoints", (0.9, 0.1, 0.1))):
            if not getattr(self._parameterNode, role):
                node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode",
                                                          slicer.mrmlScene.GetUniqueNameByString(f"AutoMedSAM {role}"))
                node.CreateDefaultDisplayNodes()
                node.GetDisplayNode().SetSelectedColor(color)
                setattr(self._parameterNode, role, node)
        self.observePrompts()

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
            self.ui.modelPathLineEdit.currentPath = self._parameterNode.modelPath
            self.updateButtons()

    def updateButtons(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if p and [n for n in (p.positivePoints, p.negativePoints, p.promptBox) if n] != self._observedMarkups:
            self.observePrompts()
        busy = self._job is not None
        hasVolume = bool(p and p.inputVolume)
        hasClasses = bool(p and p.selectedClasses)
        automatic = bool(p and p.mode != "manual")
        self.ui.segmentButton.enabled = hasVolume and hasClasses and automatic and not busy
        self.ui.segmentButton.toolTip = (_("Segment the ticked classes") if hasVolume and hasClasses
                                         else _("Select an input volume and tick at least one class"))
        self.ui.propagateButton.enabled = hasVolume and bool(p.activeClass) and bool(p.outputSegmentation) and not busy
        self.ui.teachButton.enabled = hasVolume and bool(p.outputSegmentation) and not busy
        self.ui.undoButton.enabled = self.logic.canUndo() and not busy

    # ------------------------------------------------------------------------- model/classes
    def onModelPathChanged(self, path) -> None:
        if self._parameterNode:
            self._parameterNode.modelPath = path

    def onApplyBackend(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not set up the AutoMedSAM worker."), waitCursor=True):
            p = self._parameterNode
            self.logic.configureBackend(p.backend, p.serverUrl, self.ui.serverTokenLineEdit.text, p.device)
            self.showDeviceInfo()

    def ensureReady(self) -> bool:
        """Dependencies (asking first) and the backend, on first use."""
        from AutoMedSAMSlicerLib.dependencies import ensureDependencies

        if self._parameterNode.backend != "remote" and not ensureDependencies(askConfirmation=True):
            return False
        if self.logic.engines is None:
            p = self._parameterNode
            self.logic.configureBackend(p.backend, p.serverUrl, self.ui.serverTokenLineEdit.text, p.device)
        self.logic.defaultDevice = self._parameterNode.device
        self.logic.defaultBackbone = self._parameterNode.backbone or None
        return True

    def onLoadModel(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not load the model."), waitCursor=True):
            if not self.ensureReady():
                return
            classes = self.logic.modelClasses(self._parameterNode.modelPath or None)
            self.fillClassList(classes)
            self.showDeviceInfo()

    def showDeviceInfo(self) -> None:
        info = self.logic.deviceInfo()
        gpu = info.get("gpu")
        self.ui.deviceInfoLabel.text = (_("{name}: {free} of {total} MB free").format(
            name=gpu["name"], free=gpu["free_mb"], total=gpu["total_mb"]) if gpu else _("CPU (no CUDA GPU found)"))

    def fillClassList(self, classes) -> None:
        selected = {c.strip() for c in self._parameterNode.selectedClasses.split(",") if c.strip()}
        self._updatingClassList = True
        try:
            self.ui.classListWidget.clear()
            for info in classes:
                item = qt.QListWidgetItem(info.display_name)
                item.setData(qt.Qt.UserRole, info.name)
                item.setFlags(item.flags() | qt.Qt.ItemIsUserCheckable)
                item.setCheckState(qt.Qt.Checked if info.name in selected else qt.Qt.Unchecked)
                pixmap = qt.QPixmap(12, 12)
                pixmap.fill(qt.QColor(*info.color))
                item.setIcon(qt.QIcon(pixmap))
                self.ui.classListWidget.addItem(item)
        finally:
            self._updatingClassList = False
        self.onClassFilterChanged(self.ui.classFilterLineEdit.text)

    def onClassFilterChanged(self, text) -> None:
        needle = text.strip().lower()
        for row in range(self.ui.classListWidget.count):
            item = self.ui.classListWidget.item(row)
            item.setHidden(bool(needle) and needle not in item.text().lower())

    def onClassItemChanged(self, item) -> None:
        if self._updatingClassList:
            return
        names = []
        for row in range(self.ui.classListWidget.count):
            it = self.ui.classListWidget.item(row)
            if it.checkState() == qt.Qt.Checked:
                names.append(it.data(qt.Qt.UserRole))
        self._parameterNode.selectedClasses = ",".join(names)

    def onActiveClassChanged(self, text) -> None:
        item = self.ui.classListWidget.currentItem()
        if item is not None and self._parameterNode:
            self._parameterNode.activeClass = item.data(qt.Qt.UserRole)

    # ------------------------------------------------------------------------------ jobs
    def startJob(self, job, onResult) -> None:
        self._job = job
        job.progressCallback = self.onJobProgress
        job.doneCallbacks.append(lambda j: self.onJobDone(j, onResult))
        self.ui.progressBar.value = 0
        self.ui.progressBar.show()
        self.ui.cancelButton.show()
        self.updateButtons()
        self._jobTimer.start()

    def onJobTick(self) -> None:
        if self._job is not None:
            self._job.step()

    def onJobProgress(self, fraction, message) -> None:
        self.ui.progressBar.value = round(100 * fraction)
        self.ui.statusLabel.text = message

    def onJobDone(self, job, onResult) -> None:
        self._jobTimer.stop()
        self._job = None
        self.ui.progressBar.hide()
        self.ui.cancelButton.hide()
        if job.error is not None:
            logging.error("AutoMedSAM %s failed: %s", job.name, job.error)
            slicer.util.errorDisplay(_("AutoMedSAM {job} failed: {error}").format(job=job.name, error=job.error))
            self.ui.statusLabel.text = _("Failed; nothing was changed.")
        elif job.cancelled:
            self.ui.statusLabel.text = _("Cancelled; nothing was changed.")
        else:
            onResult(job.result)
        self.updateButtons()

    def onCancel(self) -> None:
        if self._job is not None:
            self._job.cancel()

    # --------------------------------------------------------------------------- actions
    def askAboutEditedSegments(self, names) -> str:
        box = qt.QMessageBox(slicer.util.mainWindow())
        box.setWindowTitle(_("AutoMedSAM: edited segments"))
        box.setText(_("You edited these segments: {names}.").format(names=", ".join(names)))
        box.setInformativeText(_("Keep your segments and add the new result next to them, or overwrite them "
                                 "(Undo brings them back)?"))
        keep = box.addButton(_("Keep mine"), qt.QMessageBox.AcceptRole)
        overwrite = box.addButton(_("Overwrite"), qt.QMessageBox.DestructiveRole)
        box.addButton(qt.QMessageBox.Cancel)
        box.setDefaultButton(keep)
        box.exec_()
        clicked = box.clickedButton()
        return "keep" if clicked == keep else "overwrite" if clicked == overwrite else "cancel"

    def onSegment(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Segmentation failed."), waitCursor=True):
            if not self.ensureReady():
                return
            p = self._parameterNode
            job = self.logic.segment(p.inputVolume, p.selectedClasses, p.outputSegmentation, model=p.modelPath or None,
                                     device=p.device, waitForCompletion=False,
                                     onEditedSegment=self.askAboutEditedSegments)
            self.startJob(job, self.onSegmentDone)

    def onSegmentDone(self, segmentationNode) -> None:
        self._parameterNode.outputSegmentation = segmentationNode
        count = len(self._parameterNode.selectedClasses.split(","))
        self.ui.statusLabel.text = _("Done: {n} class(es).").format(n=count)

    def observePrompts(self) -> None:
        for node in self._observedMarkups:
            self.removeObserver(node, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, self.onPromptsChanged)
            self.removeObserver(node, slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent, self.onPromptsChanged)
        p = self._parameterNode
        self._observedMarkups = [n for n in (p.positivePoints, p.negativePoints, p.promptBox) if n]
        for node in self._observedMarkups:
            self.addObserver(node, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, self.onPromptsChanged)
            self.addObserver(node, slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent, self.onPromptsChanged)
        self.ui.positivePlaceWidget.setCurrentNode(p.positivePoints)
        self.ui.negativePlaceWidget.setCurrentNode(p.negativePoints)

    def onPromptsChanged(self, caller=None, event=None) -> None:
        """A point was placed or moved, or the box changed: refine the active class on that slice."""
        p = self._parameterNode
        if self._job is not None or not (p and p.inputVolume and p.activeClass):
            return
        import numpy as np
        from AutoMedSAMSlicerLib.nodes import worldToIjk

        points, labels = [], []
        for node, label in ((p.positivePoints, 1), (p.negativePoints, 0)):
            if node and node.GetNumberOfControlPoints():
                xyz = slicer.util.arrayFromMarkupsControlPoints(node, world=True)
                points += list(xyz)
                labels += [label] * len(xyz)
        if points:
            # Points left on other slices belong to earlier corrections: use the current slice's only.
            reference = points[-1]
            pointNodes = (p.positivePoints, p.negativePoints)
            if caller is not None and caller in pointNodes and caller.GetNumberOfControlPoints():
                reference = slicer.util.arrayFromMarkupsControlPoints(caller, world=True)[-1]
            ks = worldToIjk(p.inputVolume, np.array([*points, reference]))[:, 2]
            keep = np.abs(ks[:-1] - ks[-1]) < 0.5
            points = [pt for pt, kept in zip(points, keep, strict=True) if kept]
            labels = [lb for lb, kept in zip(labels, keep, strict=True) if kept]
        box = p.promptBox if p.promptBox and p.promptBox.GetNumberOfControlPoints() else None
        if not points and box is None:
            return
        with slicer.util.tryWithErrorDisplay(_("Refine failed."), waitCursor=True):
            if not self.ensureReady():
                return
            mode = "manual" if p.mode == "manual" else "semi"
            k = self.logic.refine(p.inputVolume, p.outputSegmentation, p.activeClass,
                                  points=np.array(points) if points else None, pointLabels=labels or None, box=box,
                                  mode=mode, model=p.modelPath or None, device=p.device)
            if not p.outputSegmentation:
                p.outputSegmentation = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSegmentationNode")
            self.ui.statusLabel.text = _("Refined {name} on slice {k}.").format(name=p.activeClass, k=k)
            self._lastRefinedSlice = k
        self.updateButtons()

    def onPropagate(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Propagation failed."), waitCursor=True):
            if not self.ensureReady():
                return
            p = self._parameterNode
            k = self._lastRefinedSlice
            if k is None:
                raise ValueError(_("Refine a slice first (place a point), then propagate it."))
            job = self.logic.propagate(p.inputVolume, p.outputSegmentation, p.activeClass, k, waitForCompletion=False,
                                       model=p.modelPath or None, device=p.device)
            self.startJob(job, lambda written: setattr(self.ui.statusLabel, "text", _(
                "Propagated to {n} slice(s).").format(n=len(written))))

    def onUndo(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Undo failed."), waitCursor=True):
            what = self.logic.undo()
            self.ui.statusLabel.text = _("Undone: {what}").format(what=what) if what else _("Nothing to undo.")
        self.updateButtons()

    def onTeach(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Teaching failed."), waitCursor=True):
            if not self.ensureReady():
                return
            p = self._parameterNode
            job = self.logic.teach(p.inputVolume, p.outputSegmentation, generator=p.teachGenerator,
                                   epochs=p.teachEpochs, waitForCompletion=False, model=p.modelPath or None,
                                   device=p.device)
            self.startJob(job, self.onTeachDone)

    def onTeachDone(self, bundlePath) -> None:
        self._parameterNode.modelPath = self.logic.defaultModel
        self.ui.modelPathLineEdit.currentPath = self.logic.defaultModel
        self.fillClassList(self.logic.modelClasses())
        self.ui.statusLabel.text = _("New model saved to {path} and in use.").format(path=bundlePath)


class AutoMedSAMSlicerTest(ScriptedLoadableModuleTest):
    """Runs in real Slicer, offline: a tiny random-weight bundle, a generated volume with an LPS
    (DICOM-like) geometry, segment, refine with a point, undo; checks geometry and segments."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SegmentRefineUndo()

    def test_SegmentRefineUndo(self):
        import tempfile

        import numpy as np

        try:
            import torch  # noqa: F401  (installed by the PyTorch extension)

            from automedsam.backbones import build_backbone
        except ImportError as exc:
            self.delayDisplay(f"Skipped: {exc}. Open the module and install its dependencies first.")
            return
        from automedsam.bundle import create_bundle
        from automedsam.classes import default_class_catalog
        from automedsam.generators import build_generator, default_config
        from automedsam.preprocess import IntensityConfig

        self.delayDisplay("Building a tiny random-weight bundle")
        backbone = build_backbone("tiny-sam2", weights="random", device="cpu")
        classes = [default_class_catalog().get(n) for n in ("liver", "spleen")]
        generator = build_generator("ppn", default_config("ppn", backbone, len(classes)))
        bundlePath = create_bundle(backbone, generator, classes, IntensityConfig.ct(), name="selftest").save(
            tempfile.mkdtemp() + "/selftest.zip")

        array = np.full((6, 40, 48), -80, np.int16)
        array[:, 10:30, 12:36] = 150
        ijkToRas = np.array([[-0.8, 0, 0, 20.0], [0, -0.7, 0, 30.0], [0, 0, 3.0, -10.0], [0, 0, 0, 1]])
        volumeNode = slicer.util.addVolumeFromArray(array, ijkToRas, "AutoMedSAM self-test volume")

        logic = AutoMedSAMSlicerLogic()
        logic.configureBackend("inprocess", device="cpu")
        try:
            segmentationNode = logic.segment(volumeNode, ["liver", "spleen"], model=str(bundlePath))
            segmentation = segmentationNode.GetSegmentation()
            self.assertEqual(segmentation.GetNumberOfSegments(), 2)
            liverId = segmentation.GetSegmentIdBySegmentName("Liver")
            self.assertTrue(liverId)
            self.assertIn("10200004", segmentation.GetSegment(liverId).GetTerminology())
            before = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, liverId, volumeNode).copy()
            self.assertEqual(before.shape, array.shape)

            # A + point at voxel (i, j, k) = (20, 18, 3), given in world RAS as a click would be.
            pointRas = (ijkToRas @ [20, 18, 3, 1])[:3]
            k = logic.refine(volumeNode, segmentationNode, "liver", points=[pointRas], pointLabels=[1], mode="manual")
            self.assertEqual(k, 3)
            after = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, liverId, volumeNode)
            others = [n for n in range(array.shape[0]) if n != 3]
            np.testing.assert_array_equal(after[others], before[others])

            self.assertTrue(logic.undo(segmentationNode).startswith("refine"))
            restored = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, liverId, volumeNode)
            np.testing.assert_array_equal(restored, before)
            self.assertTrue(logic.undo(segmentationNode).startswith("segment"))
            self.assertEqual(segmentation.GetNumberOfSegments(), 0)
        finally:
            logic.shutdown()
        self.delayDisplay("Test passed")
