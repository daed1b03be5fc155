"""The Slicer application around MedTranslate.py, for tests without Slicer.

slicer-core gives real MRML; what only the Slicer application has is stood in for here, each double
as strict as the real thing where the module depends on it:

- ``qt``, ``slicer.i18n``, ``slicer.ScriptedLoadableModule``: trivial (the module only subclasses
  or calls them);
- ``slicer.parameterNodeWrapper``: ``parameter_node_rules``, which enforces Slicer's serializer
  rules (a stand-in that accepts anything once hid a module that opens in no Slicer release);
- the widget's Qt widgets: ``FakeWidget`` / ``FakeComboBox`` with the attributes and signals the
  module uses, and a parameter node that calls the widget back on every change, as the wrapper's
  ModifiedEvent does.

``panel_flow`` drives the panel (open, sample data, Add model, model and device lists, Apply
through a translation process, results) and reports what it saw; ``Testing/test_mrml.py`` runs it in a fresh
interpreter to prove that the panel's thread never imports torch.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import parameter_node_rules
import slicer

MODULE_PY = Path(__file__).resolve().parents[1] / "MedTranslate" / "MedTranslate.py"


def load_module(setitem, scene, name: str = "MedTranslateModuleUnderTest"):
    """MedTranslate.py loaded with real MRML as ``slicer`` and ``scene`` as ``slicer.mrmlScene``.
    ``setitem(mapping, key, value)`` installs the stand-ins (``monkeypatch.setitem`` in tests)."""

    def stub(module_name, **attrs):
        module = types.ModuleType(module_name)
        module.__dict__.update(attrs)
        setitem(sys.modules, module_name, module)

    class Base:
        def __init__(self, parent=None):
            self.parent = parent

    stub("qt", QIcon=lambda path: path)
    stub("slicer.i18n", tr=lambda text: text, translate=lambda context, text: text)
    stub("slicer.parameterNodeWrapper", parameterNodeWrapper=parameter_node_rules.parameterNodeWrapper,
         WithinRange=parameter_node_rules.WithinRange)
    stub("slicer.ScriptedLoadableModule", **{n: type(n, (Base,), {}) for n in (
        "ScriptedLoadableModule", "ScriptedLoadableModuleLogic", "ScriptedLoadableModuleTest",
        "ScriptedLoadableModuleWidget")})
    setitem(slicer.__dict__, "mrmlScene", scene)
    spec = importlib.util.spec_from_file_location(name, MODULE_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FakeWidget:
    """Just enough of a Qt widget for MedTranslateWidget's own code (no Qt here)."""

    def __init__(self, **attrs):
        self.enabled, self.text, self.toolTip, self.visible, self.collapsed, self.format = True, "", "", True, False, ""
        self.slots = {}
        self.__dict__.update(attrs)

    def connect(self, signal, slot):
        self.slots[signal] = slot

    def setVisible(self, visible):  # noqa: N802 (Qt API)
        self.visible = visible

    def setRange(self, lo, hi):  # noqa: N802
        self.range = (lo, hi)

    def setValue(self, value):  # noqa: N802
        self.value = value


class FakeTimer(FakeWidget):
    def __init__(self):
        super().__init__(active=False)

    def start(self):
        self.active = True

    def stop(self):
        self.active = False


class FakeComboBox(FakeWidget):
    def __init__(self):
        super().__init__()
        self.items, self.currentIndex, self.blocked = [], -1, False

    def blockSignals(self, blocked):  # noqa: N802
        old, self.blocked = self.blocked, blocked
        return old

    def clear(self):
        self.items, self.currentIndex = [], -1

    def addItem(self, text, data=None):  # noqa: N802
        self.items.append((text, data))

    def setCurrentIndex(self, index):  # noqa: N802
        self.currentIndex = index
        if not self.blocked and "currentIndexChanged(int)" in self.slots:
            self.slots["currentIndexChanged(int)"](index)

    def itemData(self, index):  # noqa: N802
        return self.items[index][1] if 0 <= index < len(self.items) else None


class FakeParameterNode:
    """Attributes of MedTranslateParameterNode; a change calls the widget back, as the
    parameter node wrapper's ModifiedEvent does."""

    def __init__(self, defaults, on_modified):
        self.__dict__.update(defaults)
        self.__dict__["_on_modified"] = on_modified

    def __setattr__(self, name, value):
        if getattr(self, name, object()) != value:
            self.__dict__[name] = value
            self._on_modified()

    def connectGui(self, gui):  # noqa: N802 (the wrapper's API): the bindings are the .ui's, checked elsewhere
        return object()

    def disconnectGui(self, tag):  # noqa: N802
        pass

    def AddObserver(self, event, method, priority=0.0):  # noqa: N802 (the wrapper forwards it to its node)
        self.__dict__["_on_modified"] = lambda: method(self, event)
        return 1

    def RemoveObserver(self, tag):  # noqa: N802
        self.__dict__["_on_modified"] = lambda: None


def make_widget(module):
    """A MedTranslateWidget built by its own ``__init__``, with the stand-in widgets and timers
    ``setup()`` would create from the .ui file, and a parameter node with the class defaults."""
    widget = module.MedTranslateWidget(None)
    widget.logic = module.MedTranslateLogic()
    widget._pollTimer, widget._queryTimer = FakeTimer(), FakeTimer()
    combos = ("liverRegionComboBox", "tumorRegionComboBox", "modelComboBox", "deviceComboBox", "selectComboBox")
    ui = {name: (FakeComboBox() if name in combos else FakeWidget()) for name in module.MedTranslateTest.UI_NAMES}
    ui.update({n: FakeWidget() for n in ("stepsLabel", "numSamplesLabel", "selectLabel", "modelInfoLabel",
                                         "modelCollapsibleButton", "optionsCollapsibleButton",
                                         "resultsCollapsibleButton")})
    widget.ui = SimpleNamespace(**ui)
    widget.ui.modelComboBox.connect("currentIndexChanged(int)", widget.onModelSelected)
    widget.ui.selectComboBox.connect("currentIndexChanged(int)", widget.onSelectSelected)
    defaults = {k: v for k, v in vars(module.MedTranslateParameterNode).items() if not k.startswith("_")}
    defaults.update(sourceVolume=None, referenceVolume=None, liverMask=None, tumorMask=None)
    widget._parameterNode = FakeParameterNode(defaults, widget._onParameterNodeModified)
    return widget


def quiet_application(setattr_):
    """The slicer.util calls of the application (dialogs, views) as recorders; returns the list
    the error dialogs are recorded in."""
    errors = []
    setattr_(slicer.util, "errorDisplay", lambda text, **kw: errors.append(text), raising=False)
    setattr_(slicer.util, "infoDisplay", lambda text, **kw: None, raising=False)
    setattr_(slicer.util, "mainWindow", lambda: None, raising=False)
    setattr_(slicer.util, "resetSliceViews", lambda: None, raising=False)
    setattr_(slicer.util, "setSliceViewerLayers", lambda **kw: None, raising=False)
    setattr_(slicer.util, "WaitCursor", contextlib.nullcontext, raising=False)
    return errors


def panel_flow(bundle: str) -> dict:
    """Open the panel, add the model ``bundle`` (Add model: checked in a process), load the sample,
    list the devices through their process, Apply through a translation process (this interpreter
    as ``PythonSlicer``), add the results. Returns what it saw, with whether torch was imported here."""
    import time

    def setattr_(obj, name, value, raising=True):
        setattr(obj, name, value)

    def setitem(mapping, key, value):
        mapping[key] = value

    scene = slicer.vtkMRMLScene()
    module = load_module(setitem, scene)
    module.MedTranslateLogic.translationPython = staticmethod(lambda: sys.executable)
    module.qt.QFileDialog = SimpleNamespace(getOpenFileName=lambda *args: bundle)
    errors = quiet_application(setattr_)
    widget = make_widget(module)
    deadline = time.monotonic() + 300

    def until(done):
        while not done() and time.monotonic() < deadline:
            widget._onQueryPoll()
            widget._onPoll()
            time.sleep(0.05)

    widget._startDeviceQuery()
    widget._onParameterNodeModified()
    widget.onAddModelButton()
    until(lambda: widget._importQuery is None)
    pn = widget._parameterNode
    added = pn.model
    widget.onSampleDataButton()  # a case the selected model fits (CT for a CT -> CTA model)
    pn.device = "cpu"
    until(lambda: widget._deviceChoices is not None)
    ready = widget.ui.applyButton.enabled
    widget.onApplyButton()
    job = widget._job
    until(lambda: widget._job is None)
    nodes = widget._lastResults[0] if widget._lastResults else None
    return {"torch_imported": "torch" in sys.modules, "errors": errors, "ready": ready, "added": added,
            "job": type(job).__name__, "devices": widget.ui.deviceComboBox.items,
            "synthetic": nodes.synthetic.GetName() if nodes else None,
            "status": widget.ui.statusLabel.text, "results": widget.ui.resultsLabel.text}
