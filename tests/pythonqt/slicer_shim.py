"""The `slicer` of a Slicer process, inside the PythonQt host (../shared/pythonqt): for the real-host tests.

What is real: the `qt` module (commontk/PythonQt db525aff, the PythonQt of Slicer 5.8, initialised as CTK does,
without thread support), MRML (`slicer-core`: vtkMRMLScene, nodes, segmentations, storage) and Slicer's own
`slicer.util` (Base/Python/slicer/util.py as slicer-core ships it: a newer Slicer's than 5.8's, same calls). What this file adds are the few pieces of
the Slicer application that the MediRound module calls; each follows the Slicer source named in its docstring.

Use, first lines of a host script:
    import os, sys; sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
    import slicer_shim; slicer = slicer_shim.install()
Environment (set by tests/test_slicer_pythonqt.py): PQ_PYLIB (CTK's `qt` package), MEDIROUND_SITE (a venv's
site-packages), MEDIROUND_ROOT (the repository), MEDIROUND_BLOCK (comma-separated top-level modules to hide,
as on a Slicer where they are not installed).
"""

from __future__ import annotations

import importlib.abc
import os
import site
import sys
import types

HERE = os.path.dirname(os.path.abspath(__file__))


class BlockedImports(importlib.abc.MetaPathFinder):
    """Hides installed packages (e.g. torch) as on a Slicer without them: `import torch` raises
    ModuleNotFoundError; `importlib.util.find_spec` returns None. `unblock()` models installing them."""

    def __init__(self, names):
        self.names = set(names)

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named '{fullname}'", name=fullname)
        return None

    def unblock(self, *names):
        self.names.difference_update(names or set(self.names))


BLOCKER = BlockedImports(n for n in os.environ.get("MEDIROUND_BLOCK", "").split(",") if n)


def _paths():
    sys.path.insert(0, os.environ["PQ_PYLIB"])
    if os.environ.get("MEDIROUND_SITE"):
        site.addsitedir(os.environ["MEDIROUND_SITE"])
    root = os.environ.get("MEDIROUND_ROOT", os.path.dirname(os.path.dirname(HERE)))
    for p in (root, os.path.join(root, "MediRoundSlicer")):
        if p not in sys.path:
            sys.path.insert(0, p)
    if BLOCKER.names:
        sys.meta_path.insert(0, BLOCKER)
    return root


class SlicerApp:
    """`slicer.app`, following Base/QTCore/qSlicerCoreApplication.h and Base/QTGUI/qSlicerApplication.h: in Slicer
    it IS the QApplication; here the QApplication's methods are reached through it, plus the few qSlicer
    additions the module and slicer.util use (applicationName, majorVersion, minorVersion, testingEnabled,
    layoutManager, slicerUserSettingsFilePath, moduleManager, the override cursor)."""

    applicationName = "3D Slicer"
    majorVersion, minorVersion = 5, 8  # the Slicer whose PythonQt the host embeds

    def __init__(self, qt, settings_dir):
        self._qt = qt
        self._app = qt.QApplication.instance()
        self.slicerUserSettingsFilePath = os.path.join(settings_dir, "Slicer.ini")
        self._module_manager = qt.QObject()  # qSlicerModuleManager: only its signals are connected to
        self._testing = True  # `--testing`: slicer.util's dialogs log instead of waiting for a click

    def testingEnabled(self):
        return self._testing

    def layoutManager(self):  # no view layout in the host; the module reads the Red slice node from the scene
        return None

    def moduleManager(self):
        return self._module_manager

    def mainWindow(self):
        return None

    def setOverrideCursor(self, cursor):
        self._qt.QApplication.setOverrideCursor(self._qt.QCursor(cursor))

    def restoreOverrideCursor(self):
        self._qt.QApplication.restoreOverrideCursor()

    def __getattr__(self, name):
        return getattr(self._app, name)


def _scripted_loadable_module(slicer, qt):
    """`slicer.ScriptedLoadableModule`, following Base/Python/slicer/ScriptedLoadableModule.py (Slicer 5.8): the
    parts the module uses (no developer section, no parameter nodes)."""
    mod = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent
            self.moduleName = self.__class__.__name__

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.moduleName = self.__class__.__name__[:-len("Widget")]
            if not parent:
                self.parent = qt.QWidget()  # Slicer: slicer.qMRMLWidget() with a QVBoxLayout
                self.parent.setLayout(qt.QVBoxLayout())
            else:
                self.parent = parent
            self.layout = self.parent.layout()
            if not parent:
                self.setup()
                self.parent.show()

        def resourcePath(self, filename):
            return os.path.join(os.path.dirname(slicer.util.modulePath(self.moduleName)), "Resources", filename)

        def setup(self):
            pass

        def cleanup(self):
            pass

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            self.moduleName = self.__class__.__name__[:-len("Logic")]

    import unittest

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, msec=100):
            print(message)

    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
                ScriptedLoadableModuleTest):
        setattr(mod, cls.__name__, cls)
    return mod


def _node_combo_box(slicer, qt):
    class qMRMLNodeComboBox(qt.QComboBox):
        """`slicer.qMRMLNodeComboBox`, following Libs/MRML/Widgets/qMRMLNodeComboBox.{h,cxx}: lists the scene's
        nodes of `nodeTypes`, `setCurrentNode`, and the PythonQt-style `connect("currentNodeChanged(vtkMRMLNode*)",
        slot)` that the module uses. Properties (nodeTypes, noneEnabled, ...) are plain attributes here."""

        def __init__(self, parent=None):
            qt.QComboBox.__init__(self, parent)
            self.nodeTypes, self.noneEnabled = [], False
            self._scene, self._nodes, self._slots = None, [], []

        def setMRMLScene(self, scene):
            self._scene = scene
            self._reload()

        def _reload(self):
            self._nodes = [None] if self.noneEnabled else []
            for cls in self.nodeTypes:
                nodes = self._scene.GetNodesByClass(cls)
                self._nodes += [nodes.GetItemAsObject(i) for i in range(nodes.GetNumberOfItems())]
            self.clear()
            for node in self._nodes:
                self.addItem("None" if node is None else node.GetName())

        def connect(self, signature, slot):
            if signature != "currentNodeChanged(vtkMRMLNode*)":
                return qt.QComboBox.connect(self, signature, slot)
            self._slots.append(slot)
            return True

        def currentNode(self):
            index = self.currentIndex  # a Qt property: PythonQt shadows the getter
            return self._nodes[index] if 0 <= index < len(self._nodes) else None

        def setCurrentNode(self, node):
            self._reload()
            self.setCurrentIndex(next(i for i, n in enumerate(self._nodes) if n is node))
            for slot in self._slots:
                slot(node)

    return qMRMLNodeComboBox


def _ctk(qt):
    """The `ctk` module's ctkMessageBox, following CTK Libs/Widgets/ctkMessageBox.{h,cxx}: a QMessageBox (its
    "don't show again" option is not modelled). slicer.util.messageBox shows the module's dialogs with it."""
    mod = types.ModuleType("ctk")

    class ctkMessageBox(qt.QMessageBox):
        pass

    mod.ctkMessageBox = ctkMessageBox
    return mod


def _modal_answer(qt, button, seen):
    box = qt.QApplication.activeModalWidget()
    if box is not None and isinstance(box, qt.QMessageBox):
        seen.append(box.text)
        box.button(button).click()


def answer_message_boxes(button, seen, interval_ms=100):
    """Clicks `button` (e.g. qt.QMessageBox.Ok) on each modal message box that opens, as a user would;
    their texts go to `seen`. Needs slicer.app's testing mode off (else slicer.util shows no box)."""
    import qt

    timer = qt.QTimer()
    timer.setInterval(interval_ms)
    timer.timeout.connect(lambda: _modal_answer(qt, button, seen))
    timer.start()
    return timer


def install(settings_dir=None):
    """Put the project and the venv on sys.path, then give `slicer` the pieces of the Slicer application the
    module calls; returns the `slicer` module."""
    root = _paths()
    import qt  # CTK's qt package over PythonQt
    import slicer  # slicer-core: MRML + Slicer's slicer.util

    settings_dir = settings_dir or os.environ.get("MEDIROUND_SETTINGS_DIR") or os.path.join(
        os.environ.get("TMPDIR", "/tmp"), f"mediround-pqhost-{os.getpid()}")
    os.makedirs(settings_dir, exist_ok=True)
    slicer.app = SlicerApp(qt, settings_dir)
    slicer.mrmlScene = slicer.vtkMRMLScene()
    for name in ("Red", "Yellow", "Green"):  # as qMRMLLayoutManager adds them (singletons: survive Clear())
        view = slicer.vtkMRMLSliceNode()
        view.SetName(name)
        view.SetLayoutName(name)
        view.SetSingletonTag(name)
        slicer.mrmlScene.AddNode(view)
    module_path = os.path.join(root, "MediRoundSlicer", "MediRound.py")
    # Base/QTScriptedModules/qSlicerScriptedLoadableModule: slicer.modules.<name>.path is the module's file
    slicer.modules = types.SimpleNamespace(mediround=types.SimpleNamespace(path=module_path))
    slicer.ScriptedLoadableModule = _scripted_loadable_module(slicer, qt)
    sys.modules["slicer.ScriptedLoadableModule"] = slicer.ScriptedLoadableModule
    slicer.qMRMLNodeComboBox = _node_combo_box(slicer, qt)
    sys.modules["ctk"] = _ctk(qt)
    return slicer


def quit_when(predicate, then, interval_ms=20):
    """Calls `then()` and quits the event loop as soon as `predicate()` holds (checked from a QTimer)."""
    import qt

    timer = qt.QTimer()
    timer.setInterval(interval_ms)

    def check():
        if predicate():
            timer.stop()
            then()
            qt.QApplication.instance().quit()

    timer.timeout.connect(check)
    timer.start()
    return timer
