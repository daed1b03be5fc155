"""MedTranslate: synthetic contrast and cross-modality synthesis in 3D Slicer.

Where this module finds the library and its resources:

- Built or installed extension (CMake build tree, Extensions Manager): ``MedTranslate.py``,
  ``MedTranslateLib/`` and ``Resources/`` lie side by side in the extension's ``qt-scripted-modules``
  folder, which Slicer puts on ``sys.path`` (see MedTranslate/CMakeLists.txt).
- Source checkout ("Add module path" pointing at ``<repository>/MedTranslate``): ``MedTranslateLib/``
  and ``Resources/`` are one level up, at the repository root. The module then puts the repository
  root first on ``sys.path`` so that the library of the same checkout is imported, and looks up each
  resource next to this file first, then at the repository root.

Heavy dependencies (torch, monai, ...) are never imported when this file is loaded.
"""

import os
import sys

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import parameterNodeWrapper
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
plausible and still be wrong. Use them for research, annotation and education only.</p>
<p>See the <a href="https://github.com/medtranslate/SlicerMedTranslate">documentation</a>.</p>
""")
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

    def resourcePath(self, filename):
        """Return the absolute path of ``filename`` in the module's ``Resources`` folder."""
        return moduleResourcePath(filename)


#
# MedTranslateParameterNode
#


@parameterNodeWrapper
class MedTranslateParameterNode:
    """
    The parameters needed by the module.

    sourceVolume - The scan to translate.
    """

    sourceVolume: vtkMRMLScalarVolumeNode


#
# MedTranslateWidget
#


class MedTranslateWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Uses ScriptedLoadableModuleWidget base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, parent=None) -> None:
        """Called when the user opens the module the first time and the widget is initialized."""
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)  # needed for parameter node observation
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None

    def resourcePath(self, filename):
        """Return the absolute path of ``filename`` in the module's ``Resources`` folder."""
        return moduleResourcePath(filename)

    def setup(self) -> None:
        """Called when the user opens the module the first time and the widget is initialized."""
        ScriptedLoadableModuleWidget.setup(self)

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

        # Buttons
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)

        # Make sure parameter node is initialized (needed for module reload)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        self.removeObservers()

    def enter(self) -> None:
        """Called each time the user opens this module."""
        self.initializeParameterNode()

    def exit(self) -> None:
        """Called each time the user opens a different module."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event) -> None:
        """Called just before the scene is closed."""
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
            if firstVolumeNode:
                self._parameterNode.sourceVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode: MedTranslateParameterNode | None) -> None:
        """Set and observe parameter node (GUI widgets are bound through their SlicerParameterName)."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._checkCanApply()

    def _checkCanApply(self, caller=None, event=None) -> None:
        if self._parameterNode and self._parameterNode.sourceVolume:
            self.ui.applyButton.toolTip = _("Compute the synthetic volume")
            self.ui.applyButton.enabled = True
        else:
            self.ui.applyButton.toolTip = _("Select a source volume")
            self.ui.applyButton.enabled = False

    def onApplyButton(self) -> None:
        """Run processing when user clicks "Apply" button."""
        with slicer.util.tryWithErrorDisplay(_("Failed to compute results."), waitCursor=True):
            self.logic.process(self._parameterNode.sourceVolume)


#
# MedTranslateLogic
#


class MedTranslateLogic(ScriptedLoadableModuleLogic):
    """Computation of the module, usable without the GUI (e.g. from the Python console).

    Uses ScriptedLoadableModuleLogic base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return MedTranslateParameterNode(super().getParameterNode())

    @staticmethod
    def libraryVersion() -> str:
        """Version of the MedTranslateLib package this module uses."""
        import MedTranslateLib

        return MedTranslateLib.__version__

    def process(self, sourceVolume: vtkMRMLScalarVolumeNode) -> None:
        """Translate ``sourceVolume`` into a synthetic volume.

        The translation engine is not wired into the module yet: this validates the input and stops.
        """
        if not sourceVolume:
            raise ValueError(_("Source volume is invalid"))
        raise NotImplementedError(_("This version of MedTranslate cannot translate volumes yet."))


#
# MedTranslateTest
#


class MedTranslateTest(ScriptedLoadableModuleTest):
    """
    This is the test case for the scripted module.
    Uses ScriptedLoadableModuleTest base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def setUp(self):
        """Do whatever is needed to reset the state - typically a scene clear will be enough."""
        slicer.mrmlScene.Clear()

    def runTest(self):
        """Run as few or as many tests as needed here."""
        self.setUp()
        self.test_MedTranslateLibraryImports()
        self.setUp()
        self.test_MedTranslateResources()
        self.setUp()
        self.test_MedTranslateLogic()

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
        for name in ("inputsCollapsibleButton", "sourceVolumeSelector", "applyButton"):
            self.assertTrue(hasattr(ui, name), name)
        uiWidget.deleteLater()
        self.delayDisplay("Test passed")

    def test_MedTranslateLogic(self):
        """The logic creates its parameter node and rejects a missing source volume."""
        self.delayDisplay("Testing the logic")
        logic = MedTranslateLogic()
        parameterNode = logic.getParameterNode()
        self.assertIsNone(parameterNode.sourceVolume)
        with self.assertRaises(ValueError):
            logic.process(None)
        self.delayDisplay("Test passed")
