"""The chat panel offscreen under PySide6 with the real engine and the shipped model: a user types the demo
dialogue on the demo volume, picks round 1 as the reference of round 4 in the panel's combo box (the query says
"it", which on its own means the previous round), and the segments in the segmentation node match the demo's
labels."""

import os
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "MediRoundSlicer"), str(ROOT)]

slicer = pytest.importorskip("slicer")
pytest.importorskip("PySide6.QtUiTools")

import MediRound  # noqa: E402
from demo_variants import FLOORS, demo_variant, dice  # noqa: E402
from MediRoundCore.engine import Engine  # noqa: E402
from MediRoundLib import qt, segments  # noqa: E402
from MediRoundLib.panel import ChatPanel  # noqa: E402
from MediRoundLib.testing import add_slice_node, add_volume, show_plane  # noqa: E402
from PySide6.QtCore import Qt  # noqa: E402
from PySide6.QtTest import QTest  # noqa: E402

from conftest import needs_shipped_model  # noqa: E402

pytestmark = needs_shipped_model
UI = ROOT / "MediRoundSlicer" / "Resources" / "UI" / "MediRound.ui"
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


class NoDialogs:
    """Answers every dialog with 'no' / nothing, and keeps the error texts."""

    def __init__(self):
        self.errors = []

    def question(self, title, text):
        return False

    def error(self, title, text):
        self.errors.append(text)

    def save_path(self, title, suggestion):
        return ""

    def folder(self, title):
        return ""


def test_demo_dialogue_typed_in_the_panel(tmp_path):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    engine = Engine.load(device="cpu")
    app = qt.app_instance()
    volume, labels, index, script = demo_variant("original")
    scene = slicer.vtkMRMLScene()
    node = add_volume(scene, volume.array, volume.spacing, LPS_TO_RAS @ np.asarray(volume.origin),
                      LPS_TO_RAS @ volume.direction, name="demo_abdomen")
    red = add_slice_node(scene)
    centre = volume.ijk_to_lps() @ np.array([127.5, 127.5, index, 1.0])
    show_plane(red, "axial", LPS_TO_RAS @ centre[:3])
    logic = MediRound.MediRoundLogic(scene=scene, sessions_dir=tmp_path / "sessions",
                                     engine_factory=lambda checkpoint: engine)
    root = qt.load_ui(UI)
    dialogs = NoDialogs()
    chat = ChatPanel(root, logic, dialogs=dialogs)
    root.show()
    try:
        chat.set_volume(node)
        for n, step in enumerate(script, start=1):
            combo = chat.ui.referenceCombo
            if n == 4:  # the user picks round 1 ("R1: left kidney"); "Auto" would take round 3
                combo.setCurrentIndex(next(i for i in range(combo.count()) if combo.itemText(i).startswith("R1:")))
            else:
                combo.setCurrentIndex(0)
            chat.ui.queryEdit.setText(step["query"])
            QTest.mouseClick(chat.ui.askButton, Qt.LeftButton)
            assert chat.wait(120)
            app.processEvents()
        assert dialogs.errors == []
        assert [r.reference for r in logic.session.rounds] == [None, 1, 2, 1]
        plane = np.zeros(volume.array.shape, bool)
        plane[index] = True
        for n, step in enumerate(script, start=1):
            voxels = segments.segment_array(logic.segmentation_node, f"MediRound_R{n}", logic.volume,
                                            logic.ijk_to_ras).astype(bool)
            score = dice(voxels, (labels.array == step["expected_label"]) & plane)
            assert score >= FLOORS[n - 1], f"round {n}: Dice {score:.3f} < {FLOORS[n - 1]}"
        history = chat.ui.historyBrowser.toPlainText()
        assert "left kidney" in history and "spleen" in history and "refers to R1" in history
    finally:
        chat.shutdown()
        logic.shutdown()
        root.close()
        torch.set_num_threads(threads)
