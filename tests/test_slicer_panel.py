"""The chat panel offscreen under PySide6: the real .ui, a real logic and MRML scene, a stand-in engine."""

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
from MediRoundLib import qt, segments  # noqa: E402
from MediRoundLib.panel import ChatPanel  # noqa: E402
from MediRoundLib.testing import ThresholdEngine, add_slice_node, add_volume, show_plane  # noqa: E402
from PySide6.QtCore import Qt  # noqa: E402
from PySide6.QtTest import QTest  # noqa: E402

UI = ROOT / "MediRoundSlicer" / "Resources" / "UI" / "MediRound.ui"


class ScriptedDialogs:
    def __init__(self):
        self.answers, self.asked, self.paths, self.errors = [], [], [], []

    def question(self, title, text):
        self.asked.append(text)
        return self.answers.pop(0) if self.answers else False

    def error(self, title, text):
        self.errors.append(text)

    def save_path(self, title, suggestion):
        return self.paths.pop(0) if self.paths else ""

    def folder(self, title):
        return self.paths.pop(0) if self.paths else ""


@pytest.fixture
def panel(tmp_path, request):
    scorer = getattr(request, "param", None)  # the stand-in engine's reference scorer (default: none)
    app = qt.app_instance()
    scene = slicer.vtkMRMLScene()
    array = np.full((10, 24, 20), -1000, np.int16)
    array[2:8, 5:18, 4:15] = 100
    array[4:6, 9:13, 8:11] = 400
    node = add_volume(scene, array, (0.9, 0.9, 2.0), (0, 0, 0), np.eye(3), name="phantom")
    red = add_slice_node(scene)
    show_plane(red, "axial", [5.0, 5.0, 2.0 * 4])
    logic = MediRound.MediRoundLogic(scene=scene, sessions_dir=tmp_path / "sessions",
                                     engine_factory=lambda checkpoint: ThresholdEngine(0, scorer))
    root = qt.load_ui(UI)
    dialogs = ScriptedDialogs()
    chat = ChatPanel(root, logic, dialogs=dialogs)
    root.resize(420, 720)
    root.show()
    yield chat, logic, node, dialogs, app, tmp_path
    chat.shutdown()
    logic.shutdown()
    root.close()


def _ask(chat, text, enter=False):
    chat.ui.queryEdit.setText(text)
    if enter:
        QTest.keyClick(chat.ui.queryEdit, Qt.Key_Return)
    else:
        QTest.mouseClick(chat.ui.askButton, Qt.LeftButton)
    assert chat.wait(30)


class LatestFirst:
    """Stands in for the learned reference scorer (reference_scorer.ReferenceScorer): the latest round likeliest,
    the one before it close behind."""

    def scores(self, query, entities):
        return np.arange(len(entities), dtype=np.float32) * 0.4

    def choose(self, query, entities, referable=None):
        return len(entities)


@pytest.mark.parametrize("panel", [LatestFirst()], indirect=True)
def test_a_guessed_reference_shows_the_rounds_that_fit_about_as_well(panel):
    chat, logic, node, dialogs, app, tmp = panel
    chat.set_volume(node)
    for text in ("Segment the right kidney", "Segment the left spleen", "Now the lesion inside it"):
        _ask(chat, text)
    last = logic.session.rounds[-1]
    assert (last.reference, last.reference_guessed, last.reference_alternatives) == (2, True, [1])
    text = chat.ui.historyBrowser.toPlainText()
    assert "refers to R2 (a guess)" in text
    assert "R1 (kidney) fits about as well: to use one, Undo, pick it under Refers to and Ask again" in text
    # picked under Refers to: no guess, no note; the earlier note stays, without the how-to (Undo would now
    # remove the later round, not that one)
    chat.ui.referenceCombo.setCurrentIndex(1)
    _ask(chat, "and the cyst")
    assert not logic.session.rounds[-1].reference_guessed
    text = chat.ui.historyBrowser.toPlainText()
    assert text.count("fits about as well") == 1 and "Undo, pick it" not in text


def test_ask_with_button_and_enter_then_undo(panel):
    chat, logic, node, dialogs, app, tmp = panel
    assert not chat.ui.askButton.isEnabled()
    chat.set_volume(node)
    assert chat.ui.askButton.isEnabled() and not chat.ui.undoButton.isEnabled()
    _ask(chat, "Segment the liver")
    assert [r.query for r in logic.session.rounds] == ["Segment the liver"]
    assert chat.ui.queryEdit.text() == ""
    assert "R1" in chat.ui.statusLabel.text() and "liver" in chat.ui.statusLabel.text()
    _ask(chat, "Now the lesion", enter=True)
    assert len(logic.session.rounds) == 2
    text = chat.ui.historyBrowser.toPlainText()
    for needle in ("Segment the liver", "Now the lesion", "liver:", "refers to R1", "JCM 0.70", "corrected",
                   "axial slice 4"):
        assert needle in text
    combo = chat.ui.referenceCombo
    assert [combo.itemText(i) for i in range(combo.count())] == ["Auto (the round the query means)", "R1: liver",
                                                                 "R2: lesion"]
    assert "CPU" in chat.ui.deviceLabel.text()
    from MediRoundCore.engine import checkpoint_beta
    assert chat.ui.betaSpinBox.value() == pytest.approx(checkpoint_beta(None))  # the bundled model's β
    # pick a reference explicitly, JCM off
    combo.setCurrentIndex(1)
    chat.ui.jcmCheckBox.setChecked(False)
    assert not chat.ui.betaSpinBox.isEnabled()
    _ask(chat, "and the body")
    assert logic.session.rounds[-1].reference == 1
    # undo
    QTest.mouseClick(chat.ui.undoButton, Qt.LeftButton)
    assert len(logic.session.rounds) == 2
    assert segments.segment_ids(logic.segmentation_node) == ["MediRound_R1", "MediRound_R2"]
    assert "and the body" not in chat.ui.historyBrowser.toPlainText()
    assert combo.count() == 3


def test_save_restore_and_new_session(panel):
    chat, logic, node, dialogs, app, tmp = panel
    chat.set_volume(node)
    _ask(chat, "Segment the liver")
    dialogs.paths.append(str(tmp / "saved" / "phantom.seg.nrrd"))
    QTest.mouseClick(chat.ui.saveButton, Qt.LeftButton)
    assert (tmp / "saved" / "phantom.seg.nrrd").is_file()
    assert (tmp / "saved" / "phantom.mediround" / "session.json").is_file()
    assert "Saved" in chat.ui.statusLabel.text()
    # selecting the volume again offers the autosaved session
    dialogs.answers.append(True)
    chat.set_volume(node)
    assert dialogs.asked and "Continue" in dialogs.asked[-1]
    assert len(logic.session.rounds) == 1 and "Restored 1" in chat.ui.statusLabel.text()
    QTest.mouseClick(chat.ui.newSessionButton, Qt.LeftButton)
    assert logic.session.rounds == [] and "New conversation" in chat.ui.historyBrowser.toPlainText()


def test_empty_query_and_errors_in_status(panel):
    chat, logic, node, dialogs, app, tmp = panel
    chat.set_volume(node)
    _ask(chat, "   ")
    assert "Type a question" in chat.ui.statusLabel.text() and logic.session.rounds == []
    slice_node = logic.scene.GetNodesByClass("vtkMRMLSliceNode").GetItemAsObject(0)
    show_plane(slice_node, "axial", [0, 0, 999])
    _ask(chat, "Segment the liver")
    assert "outside the volume" in chat.ui.statusLabel.text()
    # the bundled model is named as its folder is (weights/mediround-lite: MediRound-Lite); a checkpoint folder
    # is chosen through the model combo
    from MediRoundCore.checkpoint_info import default_model_name

    assert default_model_name() == "MediRound-Lite"  # weights/mediround-lite, the default since issue 23
    assert chat.ui.modelCombo.itemText(0) == f"Bundled {default_model_name()}"
    dialogs.paths.append(str(tmp))
    chat.ui.modelCombo.setCurrentIndex(1)
    assert logic.checkpoint == str(tmp) and chat.ui.checkpointEdit.text() == str(tmp)
    chat.ui.modelCombo.setCurrentIndex(0)
    assert logic.checkpoint is None
    # a stage-1 checkpoint's JCM is untrained: the switch goes off and is disabled, and back on for the default
    stage1 = tmp / "stage1"
    stage1.mkdir()
    (stage1 / "config.json").write_text('{"jcm": {"beta": 0.6, "trained": false}}')
    assert chat.ui.jcmCheckBox.isChecked() and chat.ui.jcmCheckBox.isEnabled()
    dialogs.paths.append(str(stage1))
    chat.ui.modelCombo.setCurrentIndex(1)
    assert not chat.ui.jcmCheckBox.isChecked() and not chat.ui.jcmCheckBox.isEnabled()
    assert "untrained" in chat.ui.jcmCheckBox.toolTip() and not chat.ui.betaSpinBox.isEnabled()
    chat.ui.modelCombo.setCurrentIndex(0)
    assert chat.ui.jcmCheckBox.isChecked() and chat.ui.jcmCheckBox.isEnabled() and chat.ui.betaSpinBox.isEnabled()
