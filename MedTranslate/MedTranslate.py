"""MedTranslate: synthetic contrast and cross-modality synthesis in 3D Slicer.

Where this module finds the library and its resources:

- Built or installed extension (CMake build tree, Extensions Manager): ``MedTranslate.py``,
  ``MedTranslateLib/`` and ``Resources/`` lie side by side in the extension's ``qt-scripted-modules``
  folder, which Slicer puts on ``sys.path`` (see MedTranslate/CMakeLists.txt).
- Source checkout ("Add module path" pointing at ``<repository>/MedTranslate``): ``MedTranslateLib/``
  and ``Resources/`` are one level up, at the repository root. The module then puts the repository
  root first on ``sys.path`` so that the library of the same checkout is imported, and looks up each
  resource next to this file first, then at the repository root.

Heavy dependencies (torch, monai, ...) are never imported when this file is loaded: they are checked
(and, with the user's consent, installed) on the first Apply. The widget is thin: everything that
touches MRML lives in ``MedTranslateLib.mrml`` (tested without Slicer through slicer-core), the
background job in ``MedTranslateLib.worker``.
"""

import logging
import os
import sys
from typing import Annotated, Union

import qt
import slicer
import vtk
from slicer import vtkMRMLLabelMapVolumeNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

_MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
# Built/installed layout first, then the source checkout layout.
_SEARCH_DIRS = (_MODULE_DIR, os.path.dirname(_MODULE_DIR))

#: The bundled demo model the self-test and the README walk-through use.
DEMO_MODEL = "pix2pix_ct_cta_demo"

#: The oldest Slicer MedTranslate runs in. Slicer 5.6 and 5.8 embed Python 3.9; the library needs
#: Python >= 3.11 (5.10 embeds 3.12). This file itself is kept loadable by Python 3.9 so that an
#: older Slicer shows one clear message instead of failing later (Testing/test_extension_layout.py).
MINIMUM_SLICER_VERSION = (5, 10)
MINIMUM_PYTHON_VERSION = (3, 11)


def _dotted(version) -> str:
    return ".".join(str(part) for part in version)


def slicerVersion():
    """(major, minor) of the running Slicer application, None without one (e.g. PythonSlicer)."""
    app = getattr(slicer, "app", None)
    if app is None:
        return None
    return int(app.majorVersion), int(app.minorVersion)


def unsupportedReason(version=None, pythonVersion=None) -> str:
    """One line saying why MedTranslate cannot run here ("" when it can): a Slicer older than
    ``MINIMUM_SLICER_VERSION`` or a Python older than ``MINIMUM_PYTHON_VERSION``."""
    version = slicerVersion() if version is None else tuple(version)
    pythonVersion = tuple(sys.version_info[:2]) if pythonVersion is None else tuple(pythonVersion)[:2]
    if version is not None and tuple(version) < MINIMUM_SLICER_VERSION:
        return _("MedTranslate needs 3D Slicer {needed} or newer; this is Slicer {found}. Please install a newer "
                 "Slicer (and the MedTranslate extension for it).").format(
            needed=_dotted(MINIMUM_SLICER_VERSION), found=_dotted(version))
    if pythonVersion < MINIMUM_PYTHON_VERSION:
        return _("MedTranslate needs Python {needed} or newer (3D Slicer {slicer} or newer); this Slicer embeds "
                 "Python {found}.").format(needed=_dotted(MINIMUM_PYTHON_VERSION),
                                           slicer=_dotted(MINIMUM_SLICER_VERSION), found=_dotted(pythonVersion))
    return ""


def _useSourceTreeLibrary() -> None:
    """Running from a source checkout: make ``import MedTranslateLib`` find the checkout's library."""
    if os.path.isfile(os.path.join(_MODULE_DIR, "MedTranslateLib", "__init__.py")):
        return  # built or installed extension: qt-scripted-modules is already on sys.path
    repositoryRoot = os.path.dirname(_MODULE_DIR)
    if os.path.isfile(os.path.join(repositoryRoot, "MedTranslateLib", "__init__.py")) and repositoryRoot not in sys.path:
        sys.path.insert(0, repositoryRoot)


_useSourceTreeLibrary()


def moduleResourcePath(filename: str) -> str:
    """Absolute path of ``Resources/<filename>`` for this copy of the module.

    ``<module folder>/Resources`` (built or installed extension) is tried first, then
    ``<repository root>/Resources`` (source checkout). If neither has the file, the first is returned.
    """
    candidates = [os.path.join(base, "Resources", filename) for base in _SEARCH_DIRS]
    for candidate in candidates:
        if os.path.exists(candidate):
            return candidate
    return candidates[0]


def _mrml():
    """``MedTranslateLib.mrml`` (numpy, SimpleITK, VTK and MRML only: no torch)."""
    from MedTranslateLib import mrml

    return mrml


#
# MedTranslate
#


class MedTranslate(ScriptedLoadableModule):
    """Uses ScriptedLoadableModule base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MedTranslate")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Image Synthesis")]
        self.parent.dependencies = []
        self.parent.contributors = ["MedTranslate contributors (MedTranslate project)"]
        self.parent.helpText = _("""
Translate a scan into another contrast or modality: synthetic contrast (CT to CTA, pre- to
post-contrast MRI) and cross-modality synthesis (MR to CT, CT to MR, CT to PET, T1 to T2), with
difference and uncertainty maps that show where not to trust the result.
<p><b>Synthetic images are NOT for diagnosis.</b> A neural network generates them: they can look
plausible and still be wrong. Use them for research, annotation and education only. Result volumes
are named "synthetic" and tagged (node attribute <code>MedTranslate.Synthetic</code>).</p>
<p>Pick a source volume and a model, optionally liver/tumor masks and a reference scan, then Apply.
The first Apply installs PyTorch and the other Python packages it needs (with your consent).
"Load sample data" generates a phantom case, so a demo needs nothing downloaded.</p>
<p>Requires 3D Slicer 5.10 or newer (Python 3.12) and the PyTorch extension. Works offline once
the packages are installed.</p>
<p>See the <a href="https://github.com/medtranslate/SlicerMedTranslate">documentation</a>.</p>
""")
        reason = unsupportedReason()
        if reason:
            self.parent.helpText = "<p><b>" + reason + "</b></p>" + self.parent.helpText
        self.parent.acknowledgementText = _("""
MedTranslate implements the methods of:
<ul>
<li>H. Tian, T. Lv, J. Fan, D. Pan, L. Li, X. Pan. <i>Coarse-to-Fine Medical Image Translation by
Incorporating Deterministic Guidance and Probabilistic Refinement</i>. MICCAI.</li>
<li>T. Lv, H. Tian, J. Fan, Y. Liu, L. Li, X. Pan. <i>RLBCD: Residual-guided Latent Brownian-bridge
Co-Diffusion for Anatomical-to-Metabolic Image Synthesis</i>.</li>
<li>J. Xu, D. Zhou, L. Hu, Z. Liu, N. Wang, X. Gao. <i>Structure-Accurate Medical Image Translation
Based on Dynamic Frequency Balance and Knowledge Guidance</i>.</li>
<li>C. Zhang, L. Lin, Y.-W. Chen. <i>Deterministic Guided Progressive Medical Image Cross-Modal
Generation Based on Deep Learning</i>.</li>
</ul>
Built on 3D Slicer, PyTorch and MONAI.
""")
        # The base class only looks for the icon next to this file (built/installed layout).
        iconPath = moduleResourcePath(f"Icons/{self.moduleName}.png")
        if os.path.isfile(iconPath):
            self.parent.icon = qt.QIcon(iconPath)

        # The phantom in the Sample Data module, once the application has started (template).
        app = getattr(slicer, "app", None)
        if app is not None and not unsupportedReason():
            app.connect("startupCompleted()", registerSampleData)

    def resourcePath(self, filename):
        """Return the absolute path of ``filename`` in the module's ``Resources`` folder."""
        return moduleResourcePath(filename)


#
# Sample data
#

#: The phantom's entry in the Sample Data module (category, name).
SAMPLE_CATEGORY = "MedTranslate"
SAMPLE_NAME = "MedTranslatePhantom"
SAMPLE_PREFIX = "Phantom 0"


def registerSampleData():
    """Offer the phantom case in the Sample Data module. Nothing is downloaded: the custom
    downloader generates it (``MedTranslateLogic.loadSampleData``)."""
    import SampleData

    names = _mrml().sample_node_names(SAMPLE_PREFIX)
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category=SAMPLE_CATEGORY, sampleName=SAMPLE_NAME,
        # one entry per node it adds; the URIs are names only (the custom downloader generates the case)
        uris=[f"medtranslate:phantom/{index}" for index in range(len(names))], fileNames=names, nodeNames=names,
        thumbnailFileName=moduleResourcePath("Icons/MedTranslate.png"),
        customDownloader=loadPhantomSample)


def loadPhantomSample(source=None):
    """The Sample Data button: generate the phantom case (CT, arterial CTA, liver/tumor
    segmentation) into the scene and show it; returns the nodes (None when cancelled)."""
    logic = MedTranslateLogic()
    if not logic.ensureSampleDependencies():
        return None
    sample = logic.loadSampleData(seed=0)  # named SAMPLE_PREFIX
    slicer.util.setSliceViewerLayers(background=sample.source, fit=True)
    return [sample.source, sample.reference, sample.segmentation]


#
# MedTranslateParameterNode
#


@parameterNodeWrapper
class MedTranslateParameterNode:
    """
    The parameters needed by the module (those bound to the .ui through SlicerParameterName, and the
    ones the widget fills itself because their choices are dynamic: model, device, regions).

    sourceVolume - The scan to translate (never modified).
    referenceVolume - Optional real target: difference vs. reference and the metrics table.
    liverMask, tumorMask - Optional segmentation or labelmap; liverRegion/tumorRegion say which
        segment (segment ID) or label ("nonzero", "label:N").
    model - Model name (bundled or user folder). device - "auto", "cpu" or "cuda:N".
    steps - Sampling steps of diffusion methods (0 = the model's default). numSamples - Samples per slice.
    select - Which sample a model that scores every sample keeps (``runtime.SELECT_MODES``): "per_slice"
        (the best-scored sample of each slice) or "per_volume" (one sample index for the whole volume).
    roiOnly, roiMargin - Translate only the slices holding the masks, +- roiMargin slices.
    seed - Random seed (-1 = random).
    """

    sourceVolume: vtkMRMLScalarVolumeNode
    referenceVolume: vtkMRMLScalarVolumeNode
    # A Union must hold None (Slicer's UnionSerializer writes the default None through one of its
    # members) and be a typing.Union (PEP 604 unions only from Slicer 5.10).
    liverMask: Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode, None]  # noqa: UP007
    liverRegion: str = ""
    tumorMask: Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode, None]  # noqa: UP007
    tumorRegion: str = ""
    model: str = ""
    device: str = "auto"
    steps: Annotated[int, WithinRange(0, 1000)] = 0
    numSamples: Annotated[int, WithinRange(1, 32)] = 1
    select: str = "per_slice"
    roiOnly: bool = False
    roiMargin: Annotated[int, WithinRange(0, 100)] = 4
    seed: Annotated[int, WithinRange(-1, 2147483647)] = -1


#
# MedTranslateWidget
#


class MedTranslateWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Wires the GUI to the parameter node and the logic; shows progress and results.

    Uses ScriptedLoadableModuleWidget base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, parent=None) -> None:
        """Called when the user opens the module the first time and the widget is initialized."""
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)  # needed for parameter node observation
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._missing = []  # pip requirements not installed yet
        self._modelChoices = []
        self._filledFor = {}  # what each dynamic combo box was last filled for
        self._updating = False
        self._run = None
        self._job = None
        self._lastResults = None
        self._sampleSeed = 0
        self._deviceChoices = None  # from the device query (a process: no torch on this thread)
        self._deviceQuery = None
        self._importQuery = None  # Add model: the bundle is checked in a process too
        self._unsupported = unsupportedReason()

    def resourcePath(self, filename):
        """Return the absolute path of ``filename`` in the module's ``Resources`` folder."""
        return moduleResourcePath(filename)

    def setup(self) -> None:
        """Called when the user opens the module the first time and the widget is initialized."""
        ScriptedLoadableModuleWidget.setup(self)
        if self._unsupported:  # an older Slicer: one clear message instead of a panel that fails later
            label = qt.QLabel(self._unsupported)
            label.wordWrap = True
            self.layout.addWidget(label)
            self.layout.addStretch(1)
            return

        # Load widget from .ui file (created by Qt Designer).
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MedTranslate.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)

        # Set scene in MRML widgets (the .ui connects mrmlSceneChanged to each MRML widget).
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = MedTranslateLogic()

        # These connections ensure that we update parameter node when scene is closed
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.sampleDataButton.connect("clicked(bool)", self.onSampleDataButton)
        self.ui.addModelButton.connect("clicked(bool)", self.onAddModelButton)
        self.ui.showResultsButton.connect("clicked(bool)", self.onShowResultsButton)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelSelected)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceSelected)
        self.ui.selectComboBox.connect("currentIndexChanged(int)", self.onSelectSelected)
        self.ui.liverRegionComboBox.connect("currentIndexChanged(int)", lambda index: self.onRegionSelected("liver"))
        self.ui.tumorRegionComboBox.connect("currentIndexChanged(int)", lambda index: self.onRegionSelected("tumor"))
        self.ui.progressBar.setVisible(False)

        # The background job is polled from the GUI thread; nodes are only touched here.
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(200)
        self._pollTimer.connect("timeout()", self._onPoll)
        # The GPU list and Add model's check run in processes (torch is never imported on this thread).
        self._queryTimer = qt.QTimer()
        self._queryTimer.setInterval(250)
        self._queryTimer.connect("timeout()", self._onQueryPoll)

        self._missing = _mrml().missing_dependencies()
        self._startDeviceQuery()

        # Make sure parameter node is initialized (needed for module reload)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        if self._unsupported:
            return
        if self._job is not None:
            self._job.cancel()
        for timer in ("_pollTimer", "_queryTimer"):
            if hasattr(self, timer):
                getattr(self, timer).stop()
        self.removeObservers()

    def enter(self) -> None:
        """Called each time the user opens this module."""
        if self._unsupported:
            return
        self._filledFor = {}  # segments or models may have changed meanwhile
        self.initializeParameterNode()

    def exit(self) -> None:
        """Called each time the user opens a different module."""
        if not self._unsupported and self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        """Called just before the scene is closed."""
        if self._job is not None:
            self._job.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        """Called just after the scene is closed."""
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        """Ensure parameter node exists and observed."""
        self.setParameterNode(self.logic.getParameterNode())

        # Select a default source volume to save the user a click
        if not self._parameterNode.sourceVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode and not firstVolumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.sourceVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode) -> None:
        """Set and observe parameter node (GUI widgets are bound through their SlicerParameterName)."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        self._filledFor = {}
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._onParameterNodeModified()

    # -- GUI <- parameter node ------------------------------------------------------------------

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        if self._updating or not self._parameterNode:
            return
        self._updating = True
        try:
            from MedTranslateLib.regions import DEFAULT_ROIS

            for role in DEFAULT_ROIS:  # the panel's two ROI selectors (<role>Mask, <role>Region)
                self._fillRegionComboBox(role)
            self._fillModelComboBox()
            self._fillDeviceComboBox()
            self._fillSelectComboBox()
            self._updateStatus()
        finally:
            self._updating = False

    @staticmethod
    def _setItems(comboBox, items, currentData, fallbackToFirst=True) -> int:
        """Replace the items ``[(text, data)]`` without emitting signals; select ``currentData``
        (else the first item, or nothing when ``fallbackToFirst`` is False)."""
        wasBlocked = comboBox.blockSignals(True)
        comboBox.clear()
        for text, data in items:
            comboBox.addItem(text, data)
        datas = [data for _, data in items]
        index = datas.index(currentData) if currentData in datas else (0 if items and fallbackToFirst else -1)
        comboBox.setCurrentIndex(index)
        comboBox.blockSignals(wasBlocked)
        return index

    def _fillRegionComboBox(self, role) -> None:
        mrml = _mrml()
        pn = self._parameterNode
        node = getattr(pn, f"{role}Mask")
        comboBox = getattr(self.ui, f"{role}RegionComboBox")
        key = node.GetID() if node else None
        current = getattr(pn, f"{role}Region")
        if self._filledFor.get(role) == (key, current):
            return
        choices = mrml.mask_choices(node) if node else []
        keys = [k for _, k in choices]
        if current not in keys:
            current = mrml.default_mask_choice(node, role) if node else ""
            current = current or ""
        index = self._setItems(comboBox, choices, current, fallbackToFirst=False)
        comboBox.enabled = bool(choices)
        selected = keys[index] if index >= 0 else ""
        if getattr(pn, f"{role}Region") != selected:
            setattr(pn, f"{role}Region", selected)
        self._filledFor[role] = (key, selected)

    def _fillModelComboBox(self) -> None:
        mrml = _mrml()
        pn = self._parameterNode
        source = pn.sourceVolume
        modality = mrml.source_modality(source) if source else None
        key = (bool(self._missing), modality, pn.model, self._filledFor.get("modelsVersion", 0))
        if self._filledFor.get("models") == key:
            return
        self._modelChoices = []
        if not self._missing:
            try:
                self._modelChoices = self.logic.modelChoices(source)
            except Exception as error:  # broken install: say so instead of failing the whole panel
                logging.exception("MedTranslate: cannot list models")
                self.ui.modelInfoLabel.text = _("Cannot list the models: {message}").format(
                    message=mrml.readable_error(error))
        items = [(choice.label, choice.name) for choice in self._modelChoices]
        names = [choice.name for choice in self._modelChoices]
        current = pn.model if pn.model in names else next(
            (c.name for c in self._modelChoices if not c.error), names[0] if names else "")
        self._setItems(self.ui.modelComboBox, items, current)
        self.ui.modelComboBox.enabled = bool(items)
        if pn.model != current:
            pn.model = current
        choice = self._currentModel()
        # the two mask selectors take the model's ROI names (liver and tumor by default)
        # zip without strict=: Python 3.9 (Slicer 5.6/5.8) must load this file to refuse it clearly
        for label, roi in zip((self.ui.liverMaskLabel, self.ui.tumorMaskLabel), mrml.roi_roles(choice)):  # noqa: B905
            label.text = _("{roi} mask:").format(roi=roi.replace("_", " ").capitalize())
        if choice is not None:
            where = _("your model folder") if choice.origin == "user" else _("bundled with MedTranslate")
            self.ui.modelInfoLabel.text = choice.error or f"{choice.method}: {mrml.modality_label(choice.source)} → " \
                f"{mrml.modality_label(choice.target)}, {where}" + "".join(f"\n⚠ {w}" for w in choice.warnings)
        elif self._missing:
            self.ui.modelInfoLabel.text = _("Models are listed once the Python packages are installed (Apply).")
        elif not items:
            self.ui.modelInfoLabel.text = _("No model fits this source volume.")
        sampling = choice is not None and choice.steps
        for widget in (self.ui.stepsSpinBox, self.ui.numSamplesSpinBox, self.ui.stepsLabel, self.ui.numSamplesLabel):
            widget.enabled = sampling
        scored = choice is not None and choice.scores_samples  # per slice / per volume applies
        for widget in (self.ui.selectComboBox, self.ui.selectLabel):
            widget.enabled = scored
        self._filledFor["models"] = (bool(self._missing), modality, pn.model, self._filledFor.get("modelsVersion", 0))

    def _startDeviceQuery(self) -> None:
        """Ask a process for the GPUs (once the packages are installed); the combo box shows Auto
        and CPU until it answers."""
        python = self.logic.translationPython()
        if self._missing or python is None or self._deviceQuery is not None:
            return
        self._deviceQuery = _mrml().DeviceQuery(python).start()
        self._queryTimer.start()

    def _onQueryPoll(self) -> None:
        """The processes' answers: the GPU list, a model added."""
        device, added = self._deviceQuery, self._importQuery
        if device is not None and self._deviceChoices is None and device.poll() is not None:
            if device.error:
                logging.warning(f"MedTranslate: {device.error}")
            self._deviceChoices = device.poll()
            self._filledFor.pop("devices", None)
            if self._parameterNode:
                self._onParameterNodeModified()
        if added is not None and (added.poll() is not None or added.done):
            self._importQuery = None
            self.ui.addModelButton.enabled = True
            if added.error:
                self._showError(ValueError(added.error))
            else:
                self._modelAdded(added.poll())
        if (device is None or self._deviceChoices is not None) and self._importQuery is None:
            self._queryTimer.stop()

    def _fillDeviceComboBox(self) -> None:
        pn = self._parameterNode
        key = (self._deviceChoices is not None, pn.device)
        if self._filledFor.get("devices") == key:
            return
        choices = list(self._deviceChoices or _mrml().DEFAULT_DEVICE_CHOICES)
        if pn.device not in [device for _, device in choices]:
            choices.append((pn.device, pn.device))  # keep a saved choice (e.g. cuda:1) until the list is known
        index = self._setItems(self.ui.deviceComboBox, choices, pn.device)
        selected = choices[index][1] if index >= 0 else "auto"
        if pn.device != selected:
            pn.device = selected
        self._filledFor["devices"] = (self._deviceChoices is not None, pn.device)

    def _fillSelectComboBox(self) -> None:
        """The sample choice: ``SELECT_MODES`` ("per_slice" shown as "per slice", ...)."""
        pn = self._parameterNode
        if self._filledFor.get("select") == pn.select:
            return
        choices = [(mode.replace("_", " "), mode) for mode in _mrml().SELECT_MODES]
        index = self._setItems(self.ui.selectComboBox, choices, pn.select)
        selected = choices[index][1]
        if pn.select != selected:  # e.g. a value from a newer version: the first mode
            pn.select = selected
        self._filledFor["select"] = pn.select

    def _currentModel(self):
        name = self._parameterNode.model if self._parameterNode else ""
        return next((c for c in self._modelChoices if c.name == name), None)

    def _maskChoice(self, role):
        node = getattr(self._parameterNode, f"{role}Mask")
        return (node, getattr(self._parameterNode, f"{role}Region") or None) if node else None

    def _updateStatus(self) -> None:
        pn = self._parameterNode
        if self._job is not None or pn is None:
            return  # while running, Apply is Cancel and the status shows the progress; no scene: nothing to say
        ok, message = _mrml().check_inputs(
            pn.sourceVolume, model=self._currentModel(), dependencies_missing=self._missing,
            liver=self._maskChoice("liver"), tumor=self._maskChoice("tumor"), reference_node=pn.referenceVolume,
            roi_only=pn.roiOnly)
        self.ui.applyButton.enabled = ok
        self.ui.applyButton.toolTip = message
        self.ui.statusLabel.text = message
        self.ui.roiMarginSpinBox.enabled = pn.roiOnly

    # -- GUI -> parameter node ------------------------------------------------------------------

    def onModelSelected(self, index) -> None:
        if self._parameterNode and 0 <= index < len(self._modelChoices):
            self._parameterNode.model = self._modelChoices[index].name

    def onDeviceSelected(self, index) -> None:
        if self._parameterNode and index >= 0:
            self._parameterNode.device = self.ui.deviceComboBox.itemData(index) or "auto"

    def onSelectSelected(self, index) -> None:
        if self._parameterNode and index >= 0:
            self._parameterNode.select = self.ui.selectComboBox.itemData(index) or "per_slice"

    def onRegionSelected(self, role) -> None:
        if not self._parameterNode:
            return
        comboBox = getattr(self.ui, f"{role}RegionComboBox")
        setattr(self._parameterNode, f"{role}Region", comboBox.itemData(comboBox.currentIndex) or "")

    # -- actions --------------------------------------------------------------------------------

    def _ensureDependencies(self) -> bool:
        """Install the missing Python packages with the user's consent; True when all are there."""
        if not self._missing:
            return True
        try:
            if not self.logic.installDependencies(self._missing, askConfirmation=True):
                self.ui.statusLabel.text = _("The Python packages were not installed: Apply needs them.")
        except Exception as error:
            self._showError(error)
        self._missing = _mrml().missing_dependencies()
        self._filledFor = {}
        self._onParameterNodeModified()
        self._startDeviceQuery()
        return not self._missing

    def onApplyButton(self) -> None:
        """Apply: start the translation in the background. While running, the button cancels it."""
        if self._job is not None:
            self._job.cancel()
            self.ui.applyButton.enabled = False
            self.ui.statusLabel.text = _("Cancelling (after the current batch of slices)…")
            return
        if not self._ensureDependencies():
            return
        self._updateStatus()
        if not self.ui.applyButton.enabled:
            return  # e.g. a model has to be chosen now that the list is filled
        try:
            with slicer.util.WaitCursor():
                self._run = self.logic.createRun(self._parameterNode)  # reads the inputs on this thread
            python = self.logic.translationPython()
            # its own PythonSlicer process when there is one: PythonQt keeps the GIL while the Qt
            # loop idles, so a thread would starve; Cancel then ends the process at once
            self._job = self._run.job(process=python is not None, python=python)
            self._job.start()
        except Exception as error:
            self._run = self._job = None
            self._showError(error)
            return
        self._setRunning(True)
        self._pollTimer.start()

    def _setRunning(self, running) -> None:
        self.ui.applyButton.text = _("Cancel") if running else _("Apply")
        self.ui.applyButton.enabled = True
        for widget in (self.ui.inputsCollapsibleButton, self.ui.modelCollapsibleButton, self.ui.optionsCollapsibleButton):
            widget.enabled = not running
        self.ui.progressBar.setVisible(running)
        if running:
            self.ui.progressBar.setRange(0, 0)  # busy until the first slice count arrives
            self.ui.statusLabel.text = _("Starting…")
        else:
            self._updateStatus()

    def _onPoll(self) -> None:
        job = self._job
        if job is None:
            self._pollTimer.stop()
            return
        progress = job.progress
        if progress.total > 0:
            self.ui.progressBar.setRange(0, progress.total)
            self.ui.progressBar.setValue(progress.done)
        text = progress.text()
        self.ui.progressBar.format = text.replace("%", "%%")
        if not job.cancel_requested:
            self.ui.statusLabel.text = text
        state = job.poll()
        if not state.finished:
            return
        self._pollTimer.stop()
        run, self._run, self._job = self._run, None, None
        self._setRunning(False)
        if state.value == "done" and run.source_node.GetScene() is None:
            self.ui.statusLabel.text = _("The scene was closed during the translation: its result was discarded.")
        elif state.value == "done":
            try:
                self._showResults(run, run.finish(job.result), job.elapsed)
            except Exception as error:
                self._showError(error)
        elif state.value == "cancelled":
            self.ui.statusLabel.text = _("Cancelled: nothing was added to the scene.")
        else:
            self._showError(job.error, job.error_details)

    def _showResults(self, run, nodes, seconds) -> None:
        mrml = _mrml()
        self._lastResults = (nodes, run.source_node, run.reference_node)
        self.logic.showResults(nodes, run.source_node, run.reference_node)
        added = len(nodes.nodes())
        lines = [_("Added '{name}' and {count} more node(s) in {seconds:.1f} s on {device}.").format(
            name=nodes.synthetic.GetName(), count=added - 1, seconds=seconds, device=nodes.info.get("device", "?"))]
        summary = mrml.metrics_summary(nodes.metrics, nodes.units, confidence=nodes.confidence)
        if summary:
            lines.append(summary)
        lines.append(_("Synthetic images are not for diagnosis."))
        self.ui.resultsLabel.text = "\n".join(lines)
        self.ui.showResultsButton.enabled = True
        self.ui.resultsCollapsibleButton.collapsed = False

    def _showError(self, error, details="") -> None:
        message = _mrml().readable_error(error)
        if not details:
            import traceback

            details = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        logging.error(f"MedTranslate: {message}\n{details}")
        self.ui.statusLabel.text = message
        slicer.util.errorDisplay(message, windowTitle=_("MedTranslate"), detailedText=details)

    def onShowResultsButton(self) -> None:
        if self._lastResults is not None:
            nodes, source, reference = self._lastResults
            if nodes.synthetic.GetScene() is None:
                self.ui.showResultsButton.enabled = False
                return
            self.logic.showResults(nodes, source, reference)

    def onSampleDataButton(self) -> None:
        """Generate a phantom case into the scene and select it as the inputs."""
        try:
            if not self.logic.ensureSampleDependencies():
                return
        except Exception as error:
            self._showError(error)
            return
        self._missing = _mrml().missing_dependencies()
        choice = self._currentModel()
        try:
            with slicer.util.WaitCursor():
                sample = self.logic.loadSampleData(
                    seed=self._sampleSeed, source=choice.source if choice else "ct",
                    reference=choice.target if choice else "cta_arterial")
        except Exception as error:
            self._showError(error)
            return
        self._sampleSeed += 1
        pn = self._parameterNode
        pn.sourceVolume, pn.referenceVolume = sample.source, sample.reference
        pn.liverMask = pn.tumorMask = sample.segmentation
        from MedTranslateLib.regions import DEFAULT_ROIS

        pn.liverRegion, pn.tumorRegion = DEFAULT_ROIS  # the phantom's segments
        slicer.util.setSliceViewerLayers(background=sample.source, fit=True)

    def onAddModelButton(self) -> None:
        """Copy a model bundle (.zip, or a bundle folder's medtranslate.yaml) into the user model folder."""
        if not self._ensureDependencies():
            return
        path = qt.QFileDialog.getOpenFileName(
            slicer.util.mainWindow(), _("Add a MedTranslate model bundle"), "",
            _("Model bundles (*.zip medtranslate.yaml model.safetensors);;All files (*)"))
        if not path:
            return
        python = self.logic.translationPython()
        if python is not None:  # checked by loading it, in a process: no torch on this thread
            self._importQuery = _mrml().ImportQuery(path, python).start()
            self.ui.addModelButton.enabled = False
            self.ui.modelInfoLabel.text = _("Checking the model…")
            self._queryTimer.start()
            return
        try:
            with slicer.util.WaitCursor():
                info = self.logic.importModel(path)
        except Exception as error:
            self._showError(error)
            return
        self._modelAdded({"name": info.name, "path": str(info.path)})

    def _modelAdded(self, model) -> None:
        self._filledFor["modelsVersion"] = self._filledFor.get("modelsVersion", 0) + 1
        if self._parameterNode:
            self._parameterNode.model = model["name"]
            self._onParameterNodeModified()
        slicer.util.infoDisplay(_("Model '{name}' was added to {folder}.").format(
            name=model["name"], folder=os.path.dirname(model["path"])), windowTitle=_("MedTranslate"))


#
# MedTranslateLogic
#


class MedTranslateLogic(ScriptedLoadableModuleLogic):
    """Computation of the module, usable without the GUI (e.g. from the Python console).

    A thin adapter over ``MedTranslateLib.mrml``; for example::

        logic = slicer.util.getModuleLogic("MedTranslate")
        sample = logic.loadSampleData()
        nodes = logic.process(sample.source, "pix2pix_ct_cta_demo", referenceVolume=sample.reference,
                              liverMask=sample.segmentation, liverRegion="liver",
                              tumorMask=sample.segmentation, tumorRegion="tumor", showResults=True)

    Uses ScriptedLoadableModuleLogic base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self) -> None:
        reason = unsupportedReason()
        if reason:
            raise RuntimeError(reason)
        ScriptedLoadableModuleLogic.__init__(self)
        self._translators = None

    def getParameterNode(self):
        return MedTranslateParameterNode(super().getParameterNode())

    @staticmethod
    def libraryVersion() -> str:
        """Version of the MedTranslateLib package this module uses."""
        import MedTranslateLib

        return MedTranslateLib.__version__

    # -- dependencies -----------------------------------------------------------------------------

    @staticmethod
    def missingDependencies():
        """pip requirements of the packages that are not installed (nothing is imported)."""
        return _mrml().missing_dependencies()

    def installDependencies(self, missing=None, askConfirmation=True) -> bool:
        """Install the missing packages after one consent dialog (``askConfirmation``): PyTorch
        first, through PyTorchUtils when the PyTorch extension is there (it picks the build for
        this GPU and driver), then MONAI with ``--no-deps`` (its own torch requirement cannot
        replace that build), then the rest. Returns False when the user declines; a failed
        installation (e.g. offline) raises one line."""
        mrml = _mrml()
        missing = list(missing) if missing is not None else mrml.missing_dependencies()
        if not missing:
            return True
        if askConfirmation and not slicer.util.confirmOkCancelDisplay(
            _("MedTranslate needs these Python packages, which are not installed yet:\n\n{packages}\n\n"
              "Install them now? PyTorch is a large download (up to a few GB) and this can take several "
              "minutes.").format(packages="\n".join(missing)),
            windowTitle=_("MedTranslate: install Python packages")):
            logging.info("MedTranslate: installation of the dependencies declined")
            return False
        plan = mrml.install_plan(missing)
        try:
            with slicer.util.WaitCursor():
                if plan.torch:
                    self._installTorch(plan.torch)
                if plan.no_deps:
                    # a list is passed to pip as its arguments (slicer.util.pip_install, 5.10 and 5.12)
                    slicer.util.pip_install(["--no-deps", *plan.no_deps])
                if plan.others:
                    self._pipInstall(list(plan.others))
        except Exception as error:
            logging.exception("MedTranslate: installing the Python packages failed")
            raise ValueError(_("The Python packages could not be installed ({error}); is this computer offline? "
                               "See the Python console.").format(error=mrml.readable_error(error))) from error
        import importlib

        importlib.invalidate_caches()
        still = mrml.missing_dependencies()
        if still:
            raise ValueError(_("These packages could not be installed: {packages} (see the Python console)").format(
                packages=", ".join(still)))
        return True

    def ensureSampleDependencies(self) -> bool:
        """Install (with consent) what the phantom sample needs; True when it can be generated."""
        mrml = _mrml()
        missing = mrml.sample_dependencies_missing(mrml.missing_dependencies())
        return not missing or self.installDependencies(missing, askConfirmation=True)

    @staticmethod
    def _installTorch(requirement) -> None:
        version = requirement[len("torch"):] or None
        try:
            import PyTorchUtils
        except ModuleNotFoundError:
            PyTorchUtils = None
        if PyTorchUtils is not None:
            torchLogic = PyTorchUtils.PyTorchUtilsLogic()
            if not torchLogic.torchInstalled() and torchLogic.installTorch(
                    askConfirmation=False, torchVersionRequirement=version) is None:
                raise ValueError(_("PyTorch was not installed (see the PyTorch Utils module)."))
        else:
            logging.info("MedTranslate: the PyTorch extension is not installed; installing torch with pip")
            MedTranslateLogic._pipInstall([requirement])

    @staticmethod
    def _pipInstall(requirements) -> None:
        """``slicer.packaging.pip_ensure`` where it exists (Slicer >= 5.12; our own dialog has asked
        already, and the self-test installs on purpose), else ``slicer.util.pip_install``."""
        import importlib

        try:
            packaging = importlib.import_module("slicer.packaging")
        except ImportError:
            packaging = None
        if packaging is not None and hasattr(packaging, "pip_ensure"):
            packaging.pip_ensure(list(requirements), prompt_install=False, prompt_restart=False,
                                 requester="MedTranslate", skip_in_testing=False)
        else:
            slicer.util.pip_install(list(requirements))

    # -- models, devices, masks ------------------------------------------------------------------------

    @staticmethod
    def modelChoices(sourceVolume=None):
        """Models (bundled + user folder) that fit the source volume's modality (all when unknown)."""
        mrml = _mrml()
        return mrml.model_choices(mrml.source_modality(sourceVolume) if sourceVolume else None)

    @staticmethod
    def deviceChoices():
        """``[(label, device)]``: auto, CPU, each CUDA GPU by name and memory."""
        return _mrml().device_choices()

    @staticmethod
    def importModel(path):
        """Validate a model bundle and copy it to the user model folder; returns its ``ModelInfo``."""
        from MedTranslateLib import model_store

        return model_store.import_model(path)

    # -- sample data ------------------------------------------------------------------------------------

    def loadSampleData(self, seed=0, source="ct", reference="cta_arterial", shape=None, spacing=None):
        """Generate a phantom case into the scene: source, reference and a liver/tumor segmentation."""
        from MedTranslateLib import phantom

        if source not in phantom.MODALITIES:
            source = "ct"
        if reference not in phantom.MODALITIES:
            reference = "cta_arterial" if source == "ct" else None
        kwargs = {"tumor_count": (1, 3)}
        if shape is not None:
            kwargs["shape"] = tuple(shape)
        if spacing is not None:
            kwargs["spacing"] = tuple(spacing)
        case = phantom.generate_case(phantom.case_seed(0, int(seed)), phantom.PhantomConfig(**kwargs))
        return _mrml().add_phantom_case(slicer.mrmlScene, case, source=source, reference=reference,
                                        prefix=f"Phantom {seed}")

    # -- translation ------------------------------------------------------------------------------------

    @property
    def translators(self):
        if self._translators is None:
            from MedTranslateLib import app

            self._translators = app.ModelCache()
        return self._translators

    @staticmethod
    def options(model, device="auto", steps=None, numSamples=1, seed=None, roiOnly=False, roiMargin=4,
                select="per_slice"):
        from MedTranslateLib import app

        return app.TranslationOptions(model=model, device=device or "auto", steps=steps or None,
                                      num_samples=int(numSamples), seed=None if seed is None or seed < 0 else int(seed),
                                      slices=app.ALL_ROIS if roiOnly else None, extent_margin=int(roiMargin),
                                      select=select or "per_slice")

    @staticmethod
    def translationPython():
        """The interpreter the translation process runs in: Slicer's ``PythonSlicer`` (None when
        it cannot be found: the translation then runs on a thread)."""
        import shutil

        found = shutil.which("PythonSlicer")
        if found:
            return found
        candidate = os.path.join(os.path.dirname(sys.executable), "PythonSlicer" + (".exe" if os.name == "nt" else ""))
        return candidate if os.path.isfile(candidate) else None

    def modelChoice(self, model, sourceVolume=None):
        """The ``app.ModelChoice`` named ``model`` (its ROI names, capabilities), or None."""
        return next((c for c in self.modelChoices(sourceVolume) if c.name == model), None)

    def createRun(self, parameterNode):
        """A ``mrml.TranslationRun`` for the parameter node's inputs (reads the nodes now)."""
        pn = parameterNode

        def maskChoice(role):
            node = getattr(pn, f"{role}Mask")
            return (node, getattr(pn, f"{role}Region")) if node else None

        mrml = _mrml()
        model = self.modelChoice(pn.model)
        # the sample choice counts only for a model that scores every sample (else it is disabled)
        options = self.options(pn.model, pn.device, pn.steps, pn.numSamples, pn.seed, pn.roiOnly, pn.roiMargin,
                               mrml.panel_select(model, pn.select))
        return mrml.TranslationRun(slicer.mrmlScene, pn.sourceVolume, options, liver=maskChoice("liver"),
                                   tumor=maskChoice("tumor"), reference_node=pn.referenceVolume,
                                   translators=self.translators, model=model)

    def process(self, sourceVolume, model=DEMO_MODEL, *, referenceVolume=None, liverMask=None, liverRegion=None,
                tumorMask=None, tumorRegion=None, device="auto", steps=None, numSamples=1, seed=None, roiOnly=False,
                roiMargin=4, select="per_slice", showResults=False, progress=None, cancel=None):
        """Translate ``sourceVolume`` on this thread (blocks); returns the ``mrml.ResultNodes``.

        ``select``: "per_slice" or "per_volume" (one sample index for the whole volume; models
        that score every sample, e.g. rlbcd with its LCS, and ``numSamples`` > 1).

        Masks are a segmentation (``*Region`` = segment ID) or a labelmap (``*Region`` = "nonzero"
        or "label:N"; default: as the GUI preselects). ``progress(done, total, eta_seconds)``;
        ``cancel()`` returning True stops before the next batch (nothing is added then).
        """
        mrml = _mrml()
        if not sourceVolume:
            raise ValueError(_("Source volume is invalid"))

        def maskChoice(node, region, role):
            if not node:
                return None
            return node, region or mrml.default_mask_choice(node, role)

        run = mrml.TranslationRun(
            slicer.mrmlScene, sourceVolume,
            self.options(model, device, steps, numSamples, seed, roiOnly, roiMargin, select),
            liver=maskChoice(liverMask, liverRegion, "liver"), tumor=maskChoice(tumorMask, tumorRegion, "tumor"),
            reference_node=referenceVolume, translators=self.translators, model=self.modelChoice(model))
        nodes = run.finish(run.work(progress, cancel))
        if showResults:
            self.showResults(nodes, sourceVolume, referenceVolume)
        return nodes

    @staticmethod
    def showResults(nodes, sourceVolume, referenceVolume=None) -> None:
        """Source | synthetic | reference over the heatmaps, in linked slice views."""
        mrml = _mrml()
        filled = mrml.show_results(slicer.mrmlScene, nodes, sourceVolume, referenceVolume)
        expected = sum(len(row) for row in mrml.result_view_assignments(nodes, sourceVolume, referenceVolume))
        if len(filled) < expected and getattr(slicer, "app", None) is not None:
            slicer.app.processEvents()  # let the layout manager create the views, then fill them
            mrml.show_results(slicer.mrmlScene, nodes, sourceVolume, referenceVolume)
        slicer.util.resetSliceViews()


#
# MedTranslateTest
#


class MedTranslateTest(ScriptedLoadableModuleTest):
    """
    This is the test case for the scripted module.
    Uses ScriptedLoadableModuleTest base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    #: Widgets MedTranslate.py uses (checked against the .ui here and, without Slicer, by
    #: Testing/test_extension_layout.py).
    UI_NAMES = ("inputsCollapsibleButton", "sourceVolumeSelector", "liverMaskSelector", "liverRegionComboBox",
                "tumorMaskSelector", "tumorRegionComboBox", "referenceVolumeSelector", "sampleDataButton",
                "modelComboBox", "addModelButton", "deviceComboBox", "stepsSpinBox", "numSamplesSpinBox",
                "selectComboBox", "roiOnlyCheckBox", "roiMarginSpinBox", "seedSpinBox", "statusLabel", "applyButton",
                "progressBar", "resultsLabel", "showResultsButton", "liverMaskLabel", "tumorMaskLabel")

    def setUp(self):
        """Do whatever is needed to reset the state - typically a scene clear will be enough."""
        slicer.mrmlScene.Clear()

    def runTest(self):
        """Run as few or as many tests as needed here."""
        for test in (self.test_MedTranslateLibraryImports, self.test_MedTranslateResources,
                     self.test_MedTranslateLogic, self.test_MedTranslate1, self.test_MedTranslateJobCancel,
                     self.test_MedTranslateWidgetApply):
            self.setUp()
            test()

    def _nodeCount(self):
        return slicer.mrmlScene.GetNumberOfNodes()

    def _ensureDependencies(self):
        logic = MedTranslateLogic()
        if logic.missingDependencies():
            self.delayDisplay("Installing the Python packages MedTranslate needs")
            # no dialog in an automated run (CTest registers this test only on request: it needs network)
            logic.installDependencies(askConfirmation=not slicer.app.testingEnabled())
        self.assertEqual(logic.missingDependencies(), [])
        return logic

    def test_MedTranslateLibraryImports(self):
        """The library imports, and it is the copy that ships with this module."""
        self.delayDisplay("Importing MedTranslateLib")
        import MedTranslateLib

        self.assertTrue(MedTranslateLib.__version__)
        self.assertEqual(MedTranslateLogic.libraryVersion(), MedTranslateLib.__version__)

        def canonical(path):
            return os.path.normcase(os.path.realpath(path))

        libraryParent = os.path.dirname(os.path.dirname(canonical(MedTranslateLib.__file__)))
        self.assertIn(libraryParent, [canonical(d) for d in _SEARCH_DIRS])
        self.delayDisplay("Test passed")

    def test_MedTranslateResources(self):
        """Icon and .ui are found; the .ui has the widgets the module uses."""
        self.delayDisplay("Loading resources")
        self.assertTrue(os.path.isfile(moduleResourcePath("Icons/MedTranslate.png")))
        uiPath = moduleResourcePath("UI/MedTranslate.ui")
        self.assertTrue(os.path.isfile(uiPath))
        uiWidget = slicer.util.loadUI(uiPath)
        ui = slicer.util.childWidgetVariables(uiWidget)
        for name in self.UI_NAMES:
            self.assertTrue(hasattr(ui, name), name)
        uiWidget.deleteLater()
        self.delayDisplay("Test passed")

    def test_MedTranslateLogic(self):
        """The logic creates its parameter node and rejects a missing source volume."""
        self.delayDisplay("Testing the logic")
        logic = MedTranslateLogic()
        parameterNode = logic.getParameterNode()
        self.assertIsNone(parameterNode.sourceVolume)
        self.assertEqual(parameterNode.seed, -1)
        with self.assertRaises(ValueError):
            logic.process(None)
        self.delayDisplay("Test passed")

    def test_MedTranslate1(self):
        """The whole flow on a phantom case with the bundled demo model."""
        logic = self._ensureDependencies()
        self.delayDisplay("Loading sample data (phantom)")
        sample = logic.loadSampleData(seed=0, shape=(24, 96, 96), spacing=(3.4, 3.4, 6.0))
        self.assertEqual(sample.source.GetAttribute("MedTranslate.Modality"), "ct")
        names = [choice.name for choice in logic.modelChoices(sample.source)]
        self.assertIn(DEMO_MODEL, names)
        sourceArray = slicer.util.arrayFromVolume(sample.source).copy()

        self.delayDisplay("Translating with the demo model")
        progress = []
        nodes = logic.process(sample.source, DEMO_MODEL, referenceVolume=sample.reference,
                              liverMask=sample.segmentation, liverRegion="liver", tumorMask=sample.segmentation,
                              tumorRegion="tumor", device="cpu", seed=0, showResults=True,
                              progress=lambda done, total, eta: progress.append((done, total)))
        self.assertEqual(progress[-1], (24, 24))
        synthetic = nodes.synthetic
        self.assertEqual(synthetic.GetName(), f"{sample.source.GetName()} – synthetic CTA (arterial) (pix2pix)")
        self.assertEqual(synthetic.GetAttribute("MedTranslate.Synthetic"), "1")
        self.assertEqual(synthetic.GetAttribute("MedTranslate.Model"), DEMO_MODEL)
        self.assertEqual(slicer.util.arrayFromVolume(synthetic).shape, sourceArray.shape)
        import numpy as np

        np.testing.assert_array_equal(slicer.util.arrayFromVolume(sample.source), sourceArray)  # input untouched
        sourceMatrix, syntheticMatrix = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
        sample.source.GetIJKToRASMatrix(sourceMatrix)
        synthetic.GetIJKToRASMatrix(syntheticMatrix)
        for i in range(4):
            for j in range(4):
                self.assertAlmostEqual(sourceMatrix.GetElement(i, j), syntheticMatrix.GetElement(i, j))
        for node in (nodes.difference, nodes.reference_difference):
            self.assertEqual(node.GetAttribute("MedTranslate.Synthetic"), "1")
            self.assertEqual(node.GetDisplayNode().GetColorNodeID(), "vtkMRMLColorTableNodeMedTranslateDifference")
        table = nodes.metrics_table
        self.assertEqual([table.GetCellText(r, 0) for r in range(table.GetNumberOfRows())],
                         ["whole", "body", "liver", "tumor"])
        self.assertEqual([table.GetColumnName(c) for c in range(table.GetNumberOfColumns())],
                         ["Region", "MAE", "PSNR", "SSIM", "RMSE"])
        self.assertGreater(float(table.GetCellText(1, 3)), 0.0)  # body SSIM
        shNode = slicer.mrmlScene.GetSubjectHierarchyNode()
        study = shNode.GetItemParent(shNode.GetItemByDataNode(sample.source))
        self.assertEqual(shNode.GetItemParent(shNode.GetItemByDataNode(synthetic)), study)
        layoutManager = slicer.app.layoutManager()
        if layoutManager is not None:
            self.assertEqual(layoutManager.layout, _mrml().RESULT_LAYOUT_ID)
            composite = layoutManager.sliceWidget("MedTranslateSynthetic").sliceLogic().GetSliceCompositeNode()
            self.assertEqual(composite.GetBackgroundVolumeID(), synthetic.GetID())
        self.delayDisplay("Test passed")

    def test_MedTranslateJobCancel(self):
        """The background job: it completes, and a cancelled one adds nothing to the scene."""
        logic = self._ensureDependencies()
        sample = logic.loadSampleData(seed=1, shape=(16, 64, 64), spacing=(5.0, 5.0, 10.0))
        parameterNode = logic.getParameterNode()
        parameterNode.sourceVolume = sample.source
        parameterNode.model = DEMO_MODEL
        parameterNode.device = "cpu"

        before = self._nodeCount()
        run = logic.createRun(parameterNode)
        job = run.job()
        job.cancel()
        job.start()
        while not job.finished:
            slicer.app.processEvents()
        self.assertEqual(job.poll().value, "cancelled")
        self.assertEqual(self._nodeCount(), before)

        run = logic.createRun(parameterNode)
        job = run.job().start()
        while not job.finished:
            slicer.app.processEvents()
        self.assertEqual(job.poll().value, "done", job.error_details)
        nodes = run.finish(job.result)
        self.assertEqual(nodes.synthetic.GetAttribute("MedTranslate.Synthetic"), "1")
        self.assertIsNone(nodes.metrics_table)  # no reference
        self.delayDisplay("Test passed")

    def test_MedTranslateWidgetApply(self):
        """The panel: Apply turns into Cancel while the job runs, then the results appear."""
        logic = self._ensureDependencies()
        slicer.util.selectModule("MedTranslate")
        widget = slicer.modules.medtranslate.widgetRepresentation().self()
        sample = logic.loadSampleData(seed=2, shape=(16, 64, 64), spacing=(5.0, 5.0, 10.0))
        parameterNode = widget._parameterNode
        parameterNode.sourceVolume = sample.source
        parameterNode.referenceVolume = sample.reference
        parameterNode.tumorMask = sample.segmentation
        parameterNode.model = DEMO_MODEL
        parameterNode.device = "cpu"
        self.assertEqual(parameterNode.tumorRegion, "tumor")  # preselected from the segment name
        self.assertTrue(widget.ui.applyButton.enabled, widget.ui.statusLabel.text)
        widget.ui.applyButton.click()
        self.assertEqual(widget.ui.applyButton.text, "Cancel")
        while widget._job is not None:
            slicer.app.processEvents()
        self.assertEqual(widget.ui.applyButton.text, "Apply")
        self.assertTrue(widget.ui.showResultsButton.enabled)
        synthetic = widget._lastResults[0].synthetic
        self.assertEqual(synthetic.GetAttribute("MedTranslate.Role"), "synthetic")
        self.delayDisplay("Test passed")
