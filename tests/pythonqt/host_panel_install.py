"""Inside the PythonQt host, on a Slicer without torch and transformers (hidden by slicer_shim's import
blocker): the module's panel builds without them and says what it needs; Ask offers the install (PyTorch
extension for torch, pip for the rest), and after it the same Ask answers, without a restart. The answer comes
with the Qt event loop running and the main thread holding the GIL. Prints PQRESULT {json}.

Run by tests/test_slicer_pythonqt.py:  MEDIROUND_BLOCK=torch,transformers $PQHOST host_panel_install.py --exec 90000
"""
import os, sys; sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))  # noqa: E401,E702
import slicer_shim  # noqa: E402

slicer = slicer_shim.install()

import json  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import qt  # noqa: E402

import MediRound  # noqa: E402
from MediRoundCore.checkpoint_info import checkpoint_beta  # noqa: E402
from MediRoundLib.testing import add_volume, show_plane  # noqa: E402

OUT = Path(os.environ["MEDIROUND_OUT"])
os.environ["MEDIROUND_SESSIONS_DIR"] = str(OUT / "sessions")
log = {"installed": [], "errors": []}


class PyTorchUtilsLogic:
    """The PyTorch extension's logic (fepegar/SlicerPyTorch, PyTorchUtils/PyTorchUtils.py): installTorch(
    askConfirmation, forceComputationBackend, torchVersionRequirement) installs torch and returns the module.
    Here "installing" makes the torch already on disk importable (the blocker lets it through)."""

    def installTorch(self, askConfirmation=False, forceComputationBackend=None, torchVersionRequirement=None):
        log["installed"].append("torch" + (torchVersionRequirement or ""))
        slicer_shim.BLOCKER.unblock("torch")
        import torch
        return torch


def pip_install(requirements, **kwargs):
    """slicer.packaging.pip_install (Base/Python/slicer/packaging/pip.py, behind slicer.util.pip_install):
    installs the requirement; here it makes the already-present package importable."""
    log["installed"].append(requirements)
    name = requirements.split(">")[0].split("=")[0].split("<")[0].strip().replace("-", "_")
    slicer_shim.BLOCKER.unblock(name)


sys.modules["PyTorchUtils"] = types.SimpleNamespace(PyTorchUtilsLogic=PyTorchUtilsLogic)
slicer.packaging = types.SimpleNamespace(pip_install=pip_install)
sys.modules["slicer.packaging"] = slicer.packaging

array = np.full((8, 40, 36), -900, np.int16)
array[:, 10:30, 8:28] = 80
# 9 mm pixels: a body-sized field of view (324 x 360 mm) from a small array, so the model sees it at its scale
volume = add_volume(slicer.mrmlScene, array, (9.0, 9.0, 2.0), (0, 0, 0), np.eye(3), name="phantom")
show_plane(MediRound.geometry.find_slice_node(slicer.mrmlScene, "Red"), "axial", [15.0, 15.0, 2.0 * 4])

parent = qt.QWidget()
parent.setLayout(qt.QVBoxLayout())
widget = MediRound.MediRoundWidget(parent)
widget.setup()
parent.show()
chat, ui = widget.chat, widget.chat.ui
log["setup"] = {"torch_imported": "torch" in sys.modules, "transformers_imported": "transformers" in sys.modules,
                "status": ui.statusLabel.text, "beta": ui.betaSpinBox.value, "shipped_beta": checkpoint_beta(None),
                "has_selector": hasattr(widget, "volumeSelector")}
widget.volumeSelector.setCurrentNode(volume)
log["ask_enabled"] = ui.askButton.enabled
ui.queryEdit.setText("Segment the liver.")
slicer.app._testing = False  # dialogs show: the user answers the install offer with OK
offers = []
answers = slicer_shim.answer_message_boxes(qt.QMessageBox.Ok, offers)
timing = {}


def click_ask():
    """Inside the running event loop, as a user's click is (a modal dialog needs a running loop)."""
    timing["t0"] = time.perf_counter()
    ui.askButton.click()  # offers the install, installs, then asks
    log["after_click"] = {"busy": widget.logic.busy, "status": ui.statusLabel.text}
    timing["timer"] = slicer_shim.quit_when(lambda: not widget.logic.busy, finished, interval_ms=250)


def finished():
    log["seconds"] = time.perf_counter() - timing["t0"]


qt.QTimer.singleShot(0, click_ask)


def after_exec():
    session = widget.logic.session
    log["rounds"] = [[r.query, r.entity] for r in session.rounds] if session else None
    log["status"] = ui.statusLabel.text
    log["offers"] = offers
    print("PQRESULT " + json.dumps(log))
    widget.cleanup()
