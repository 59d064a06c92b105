"""Encoding ahead in the Slicer module: the logic's prepare jobs (one model load, skipping, superseding, quiet
failures, an Ask queued behind) with a real MRML scene (slicer-core) and the real tiny engine, and the panel
(offscreen PySide6, the real .ui) scheduling a prepare when the query is edited or the shown slice changes."""

import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "MediRoundSlicer"), str(ROOT)]

slicer = pytest.importorskip("slicer")

import MediRound  # noqa: E402
from MediRoundCore.engine import Engine  # noqa: E402
from MediRoundCore.errors import MediRoundError  # noqa: E402
from MediRoundLib import geometry  # noqa: E402
from MediRoundLib.testing import ThresholdEngine, add_slice_node, add_volume, show_plane  # noqa: E402

SPACING = (0.9, 0.9, 2.0)


def _phantom():
    array = np.full((10, 24, 20), -1000, np.int16)
    array[2:8, 5:18, 4:15] = 100
    array[4:6, 9:13, 8:11] = 400
    return array


def _show(scene, k):
    show_plane(geometry.find_slice_node(scene, "Red"), "axial", [5.0, 5.0, SPACING[2] * k])


class Counting:
    """An engine factory that counts its loads (the engine it returns is the real one it was given)."""

    def __init__(self, make, delay=0.0):
        self.make, self.loads, self.delay = make, [], delay

    def __call__(self, checkpoint):
        self.loads.append(checkpoint)
        time.sleep(self.delay)  # a model that takes a while to load
        return self.make()


def _logic(tmp_path, factory, k=4):
    scene = slicer.vtkMRMLScene()
    node = add_volume(scene, _phantom(), SPACING, (0, 0, 0), np.eye(3), name="phantom")
    add_slice_node(scene, "Red")
    _show(scene, k)
    logic = MediRound.MediRoundLogic(scene=scene, sessions_dir=tmp_path / "sessions", engine_factory=factory)
    logic.set_volume(node)
    return scene, node, logic


def _drain(logic, timeout=60.0):
    """Poll until no job is left; every event seen."""
    events, end = [], time.monotonic() + timeout
    while logic.pending and time.monotonic() < end:
        events += logic.poll(wait=0.02)
    assert not logic.pending, "jobs still pending"
    return events


@pytest.fixture(scope="module")
def tiny():
    return Engine.random_tiny(seed=0)


def test_ask_queued_behind_a_prepare_hits_its_cache_and_equals_an_ask_alone(tmp_path, tiny):
    factory = Counting(lambda: Engine(tiny.model, tiny.tokenizer))
    scene, node, logic = _logic(tmp_path / "a", factory)
    plain_scene, plain_node, plain = _logic(tmp_path / "b", lambda c: Engine(tiny.model, tiny.tokenizer))
    try:
        job = logic.submit_prepare()
        assert job is not None and logic.pending and not logic.busy  # the Ask button stays usable
        logic.submit_ask("Segment the liver.")  # queued behind the load and the prepare, not refused
        assert logic.busy
        events = _drain(logic)
        kinds = [e.kind for e in events if e.kind != "progress"]
        assert kinds == ["engine", "prepared", "round"], kinds
        assert factory.loads == [None]  # one load job, though the prepare and the Ask both needed the model
        prepared = next(e for e in events if e.kind == "prepared")
        assert prepared.error is None and prepared.message == "axial slice 4"
        assert {"segmenter_encoder_ms", "vision_tower_ms", "prefix_ms"} <= set(prepared.timings)
        ahead = logic.session.rounds[0]
        assert not {"segmenter_encoder_ms", "vision_tower_ms", "prefix_ms"} & set(ahead.timings)
        alone = plain.ask("Segment the liver.")
        assert "segmenter_encoder_ms" in alone.timings
        assert (ahead.answer, ahead.view, ahead.slice_index) == (alone.answer, alone.view, alone.slice_index)
        assert np.array_equal(ahead.mask, alone.mask)
        # after the round the slice is ready for round 2 already: a prepare finds nothing to do
        assert logic.submit_prepare() is not None  # the rounds changed, so it is asked once
        assert [e.timings for e in _drain(logic) if e.kind == "prepared"] == [{}]
        assert logic.submit_prepare() is None  # and then skipped
    finally:
        logic.shutdown()
        plain.shutdown()


def test_what_a_prepare_skips(tmp_path):
    engine = ThresholdEngine(0)
    scene, node, logic = _logic(tmp_path, lambda c: engine)
    try:
        assert logic.submit_prepare() is not None
        assert logic.submit_prepare() is None  # same slice, rounds and model: prepared last
        _drain(logic)
        assert logic.submit_prepare() is None
        _show(scene, 5)  # scrolled
        assert logic.submit_prepare() is not None
        _drain(logic)
        assert [p[:2] for p in engine.prepared] == [("axial", 4), ("axial", 5)]
        logic.submit_ask("Segment the liver")  # the ask is queued: no prepare beside it
        _show(scene, 6)
        assert logic.submit_prepare() is None
        _drain(logic)
        assert logic.submit_prepare() is not None  # a new round: the slice is prepared with it
        _drain(logic)
        assert engine.prepared[-1] == ("axial", 6, 1)
        show_plane(geometry.find_slice_node(scene, "Red"), "axial", [0, 0, 9999])  # outside the volume
        assert logic.submit_prepare() is None
        logic.set_checkpoint("/another/model")  # another model: prepared again once loaded
        _show(scene, 6)
        assert logic.engine is None and logic.submit_prepare() is not None
        _drain(logic)
        logic.set_volume(None)
        assert logic.submit_prepare() is None
    finally:
        logic.shutdown()


def test_a_failed_prepare_is_quiet_and_the_next_ask_works(tmp_path):
    class BrokenAhead(ThresholdEngine):
        def prepare(self, session, image, progress=None):
            raise RuntimeError("encoder exploded")

    scene, node, logic = _logic(tmp_path, lambda c: BrokenAhead(0))
    try:
        logic.submit_prepare()
        events = _drain(logic)
        assert [e.kind for e in events] == ["engine", "prepared"]
        assert isinstance(events[-1].error, RuntimeError)
        assert logic.ask("Segment the liver").number == 1
        assert logic.submit_prepare() is not None  # a failed prepare is not "prepared last"
    finally:
        logic.shutdown()


def test_a_model_that_fails_to_load_ahead_is_quiet_until_an_ask_needs_it(tmp_path):
    attempts = []

    def flaky(checkpoint):
        attempts.append(checkpoint)
        if len(attempts) == 1:
            raise FileNotFoundError("weights not there yet")
        return ThresholdEngine(0)

    scene, node, logic = _logic(tmp_path, flaky)
    try:
        logic.submit_prepare()
        events = _drain(logic)
        assert [e.kind for e in events] == ["prepared", "prepared"]  # the load, then its prepare: both quiet
        assert all(e.error is not None for e in events) and logic.engine is None
        assert logic.ask("Segment the liver").number == 1 and len(attempts) == 2  # the Ask loads again
        # a load started ahead that fails while an Ask waits behind it: the Ask reports it, once
        attempts.clear()
        logic.engine = None
        _show(scene, 5)
        logic.submit_prepare()
        logic.submit_ask("Segment the liver")
        events = _drain(logic)
        errors = [e for e in events if e.kind == "error"]
        assert len(errors) == 1 and "weights not there yet" in errors[0].message
        assert len(attempts) == 1 and len(logic.session.rounds) == 1
    finally:
        logic.shutdown()


def test_a_model_changed_while_it_loads_ahead_is_not_used(tmp_path):
    gate = threading.Event()
    made = []

    def slow(checkpoint):
        if checkpoint is None:
            gate.wait(10)
        engine = ThresholdEngine(0)
        made.append((checkpoint, engine))
        return engine

    scene, node, logic = _logic(tmp_path, slow)
    try:
        logic.submit_prepare()  # loads the default model ahead
        logic.set_checkpoint("/chosen/meanwhile")  # allowed: no Ask is running
        gate.set()
        _drain(logic)
        assert logic.engine is None  # the default model loaded ahead is not the chosen one
        logic.ask("Segment the liver")
        assert [c for c, _ in made] == [None, "/chosen/meanwhile"] and logic.engine is made[1][1]
    finally:
        gate.set()
        logic.shutdown()


def test_a_queued_prepare_of_a_slice_left_behind_is_skipped(tmp_path):
    gate, started = threading.Event(), threading.Event()

    class Held(ThresholdEngine):
        def prepare(self, session, image, progress=None):
            if not self.prepared:
                started.set()
                gate.wait(10)
            return super().prepare(session, image, progress)

    engine = Held(0)
    scene, node, logic = _logic(tmp_path, lambda c: engine)
    try:
        logic.submit_prepare()  # slice 4: running, held
        assert started.wait(10)
        for k in (5, 6):  # the user scrolls on while it runs
            _show(scene, k)
            assert logic.submit_prepare() is not None
        _show(scene, 7)
        logic.submit_ask("Segment the liver")  # asks on slice 7: the queued prepare of slice 6 gives way
        gate.set()
        events = _drain(logic)
        prepared = [(e.message, e.timings) for e in events if e.kind == "prepared"]
        assert prepared == [("axial slice 4", {"total_ms": 0.0}), ("axial slice 5", None), ("axial slice 6", None)]
        assert [p[:2] for p in engine.prepared] == [("axial", 4)]
        assert logic.session.rounds[0].slice_index == 7
    finally:
        gate.set()
        logic.shutdown()


def test_prepare_refuses_nothing_else(tmp_path):
    """While a prepare runs, Undo, New session and another volume work, and an Ask is not refused."""
    gate = threading.Event()

    class Held(ThresholdEngine):
        def prepare(self, session, image, progress=None):
            gate.wait(10)
            return super().prepare(session, image, progress)

    scene, node, logic = _logic(tmp_path, lambda c: Held(0))
    try:
        logic.ask("Segment the liver")
        _show(scene, 5)
        logic.submit_prepare()
        assert logic.undo().number == 1
        logic.new_session()
        job = logic.submit_ask("Segment the liver")
        assert job is not None and logic.busy
        with pytest.raises(MediRoundError, match="already running"):
            logic.submit_ask("again")
        gate.set()
        _drain(logic)
        assert [r.slice_index for r in logic.session.rounds] == [5]
    finally:
        gate.set()
        logic.shutdown()


# -- the panel --------------------------------------------------------------------------------------------------
pytest.importorskip("PySide6.QtUiTools")

from MediRoundLib import qt  # noqa: E402
from MediRoundLib.panel import AHEAD_MS, ChatPanel  # noqa: E402
from PySide6.QtCore import Qt  # noqa: E402
from PySide6.QtTest import QTest  # noqa: E402

UI = ROOT / "MediRoundSlicer" / "Resources" / "UI" / "MediRound.ui"


@pytest.fixture
def panel(tmp_path, tiny):
    app = qt.app_instance()
    factory = Counting(lambda: Engine(tiny.model, tiny.tokenizer))
    scene, node, logic = _logic(tmp_path, factory)
    root = qt.load_ui(UI)
    chat = ChatPanel(root, logic, dialogs=None)
    root.show()
    chat.set_volume(node)
    yield chat, logic, scene, factory, app
    chat.shutdown()
    logic.shutdown()
    root.close()


def _process(app, seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        app.processEvents()
        time.sleep(0.005)


def _until_idle(chat, app, timeout=60.0):
    end = time.monotonic() + timeout
    while (chat.ahead_timer.isActive() or chat.logic.pending or chat.timer.isActive()) and time.monotonic() < end:
        app.processEvents()
        time.sleep(0.005)
    assert not chat.logic.pending


def test_typing_encodes_the_slice_ahead_and_the_ask_starts_at_its_query(panel):
    chat, logic, scene, factory, app = panel
    history = chat.ui.historyBrowser.toPlainText()
    QTest.keyClicks(chat.ui.queryEdit, "Segment the liver.")
    assert chat.ahead_timer.isActive() and not logic.pending  # debounced: nothing while the user types
    _process(app, AHEAD_MS / 1000 / 2)
    assert not logic.pending
    _until_idle(chat, app)
    assert factory.loads == [None]  # the model was loaded ahead, too
    assert "axial slice 4 is ready" in chat.ui.sliceLabel.text()
    assert chat.ui.historyBrowser.toPlainText() == history and "Error" not in chat.ui.statusLabel.text()
    engine = logic.engine
    encoded = len(engine.forward_log)
    QTest.mouseClick(chat.ui.askButton, Qt.LeftButton)
    assert chat.wait(60)
    r = logic.session.rounds[0]
    assert not {"segmenter_encoder_ms", "prefix_ms"} & set(r.timings)
    assert engine.forward_log[encoded] < len(engine.builder.prefix())  # the Ask's first forward: its query
    assert "R1 done" in chat.ui.statusLabel.text() and factory.loads == [None]


def test_an_ask_clicked_while_the_prepare_is_queued_succeeds(panel):
    chat, logic, scene, factory, app = panel
    factory.delay = 2.0
    _show(scene, 6)  # the user scrolls: the view's slice node changes
    assert chat.ahead_timer.isActive()
    _process(app, AHEAD_MS / 1000 + 0.2)  # the debounce fires: the model's load and the prepare are queued
    assert logic.pending and not logic.busy and chat.ui.askButton.isEnabled()
    assert logic.engine is None  # still loading: the prepare waits behind the load, the Ask will wait behind both
    chat.ui.queryEdit.setText("Segment the liver.")
    QTest.mouseClick(chat.ui.askButton, Qt.LeftButton)
    assert chat.wait(60)
    _until_idle(chat, app)
    assert [(r.number, r.slice_index) for r in logic.session.rounds] == [(1, 6)]
    assert "R1 done" in chat.ui.statusLabel.text() and factory.loads == [None]
    # after the volume is cleared nothing is watched any more
    chat.set_volume(None)
    _show(scene, 7)
    assert not chat.ahead_timer.isActive()
