"""Inside the PythonQt host, with the Qt event loop running and the main thread holding the GIL (as in Slicer):
a multi-round session through the module's widget, panel and logic with the bundled model, on the bundled
volume. A driver QTimer clicks the panel's buttons like a user (Ask ×3, Undo, Save, New session, Ask) and
waits between steps; then it scrolls the Red view to another slice and asks at once (no encoding ahead), and
to a third slice where it waits until the panel has encoded the slice ahead before it asks. After the loop,
the script checks the outcome and prints PQRESULT {json}.

Run by tests/test_slicer_pythonqt.py:  $PQHOST host_panel_session.py --exec 120000
"""
import os, sys; sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))  # noqa: E401,E702
import slicer_shim  # noqa: E402

slicer = slicer_shim.install()

import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import qt  # noqa: E402

import MediRound  # noqa: E402
from MediRoundCore.checkpoint_info import DEFAULT_CHECKPOINT  # noqa: E402
from MediRoundLib import segments  # noqa: E402
from MediRoundLib.testing import show_plane  # noqa: E402

OUT = Path(os.environ["MEDIROUND_OUT"])
os.environ["MEDIROUND_SESSIONS_DIR"] = str(OUT / "sessions")
DATA = Path(DEFAULT_CHECKPOINT).parents[1] / "data" / "bundled"
QUERIES = [d["query"] for d in json.loads((DATA / "demo_dialogue.json").read_text())][:3]
SLICE = 12

# The bundled volume, read by MRML's own storage node; the Red view shows its axial slice 12.
volume = slicer.vtkMRMLScalarVolumeNode()
volume.SetName("demo_abdomen")
slicer.mrmlScene.AddNode(volume)
storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
slicer.mrmlScene.AddNode(storage)
storage.SetFileName(str(DATA / "demo_abdomen.nrrd"))
assert storage.ReadData(volume), "could not read the bundled volume"
ijk_to_ras = MediRound.geometry.ijk_to_ras_matrix(volume)
red = MediRound.geometry.find_slice_node(slicer.mrmlScene, "Red")  # the layout's Red view
show_plane(red, "axial", (ijk_to_ras @ np.array([128, 128, SLICE, 1.0]))[:3])

# The module as Slicer builds it: a parent widget with a vertical layout, then setup().
parent = qt.QWidget()
parent.setLayout(qt.QVBoxLayout())
widget = MediRound.MediRoundWidget(parent)
widget.setup()
parent.resize(420, 760)
parent.show()
chat, logic, ui = widget.chat, widget.logic, widget.chat.ui
widget.volumeSelector.setCurrentNode(volume)
saved_path = OUT / "saved" / "demo.seg.nrrd"


class FileDialogAnswers(MediRound.SlicerDialogs):
    """The user's answer to the save dialog (a modal QFileDialog would wait for a person)."""

    def save_path(self, title, suggestion):
        return str(saved_path)

    def folder(self, title):
        return str(OUT / "checkpoint")


chat.dialogs = FileDialogAnswers()
log = {"asks": [], "slice_asks": [], "scrolls": [], "steps": [], "errors": [], "statuses": [], "poll_ms": []}
ENCODERS = ("segmenter_encoder_ms", "vision_tower_ms", "prefix_ms")
current = {}  # the Ask in flight


def ask(text, into="asks"):
    def step():
        ui.queryEdit.setText(text)
        current["ask"] = {"query": text, "start": time.perf_counter()}
        log[into].append(current["ask"])
        ui.askButton.click()
    return step


def check_round(n):
    def step():
        rounds = logic.session.rounds
        assert len(rounds) == n, (n, len(rounds), ui.statusLabel.text)
        entry = current["ask"]
        entry["seconds"] = entry.pop("done") - entry.pop("start")
        entry["entity"] = rounds[-1].entity
        entry["slice"] = [rounds[-1].view, rounds[-1].slice_index]
        entry["encoders"] = [k for k in ENCODERS if k in rounds[-1].timings]  # what the Ask itself encoded
        log["statuses"].append(ui.statusLabel.text)
    return step


def scroll(k, ahead):
    """The user shows axial slice k in the Red view; with `ahead` the panel encodes it ahead (after its debounce),
    else encoding ahead is off for this step."""
    def step():
        chat.encode_ahead = ahead
        log["scrolls"].append({"slice": k, "ahead": ahead, "start": time.perf_counter()})
        show_plane(red, "axial", (ijk_to_ras @ np.array([128, 128, k, 1.0]))[:3])
    return step


def undo():
    ui.undoButton.click()
    log["after_undo"] = [len(logic.session.rounds), segments.segment_ids(logic.segmentation_node)]


def save():
    ui.saveButton.click()
    log["saved_status"] = ui.statusLabel.text
    log["saved_file"] = saved_path.is_file()
    loaded = slicer.vtkMRMLSegmentationNode()  # read back by MRML's own segmentation reader
    slicer.mrmlScene.AddNode(loaded)
    reader = slicer.vtkMRMLSegmentationStorageNode()
    slicer.mrmlScene.AddNode(reader)
    reader.SetFileName(str(saved_path))
    reader.ReadData(loaded)
    seg = loaded.GetSegmentation()
    log["saved_segments"] = [seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments())]
    slicer.mrmlScene.RemoveNode(loaded)
    slicer.mrmlScene.RemoveNode(reader)


def new_session():
    old = logic.segmentation_node
    ui.newSessionButton.click()
    log["after_new"] = [len(logic.session.rounds), old.GetName(), logic.segmentation_node is not old]


def model_and_jcm_controls():
    """The model combo (an overloaded Qt signal, currentIndexChanged(int|QString)) and the JCM checkbox."""
    ui.modelCombo.setCurrentIndex(1)
    chosen = logic.checkpoint
    ui.modelCombo.setCurrentIndex(0)
    ui.jcmCheckBox.setChecked(False)
    beta_off = ui.betaSpinBox.enabled
    ui.jcmCheckBox.setChecked(True)
    log["controls"] = [chosen, logic.checkpoint, beta_off, ui.betaSpinBox.enabled, ui.modelCombo.itemText(0)]


STEPS = [ask(QUERIES[0]), check_round(1), ask(QUERIES[1]), check_round(2), ask(QUERIES[2]), check_round(3),
         undo, save, new_session, ask(QUERIES[0]), check_round(1),
         scroll(14, ahead=False), ask(QUERIES[2], "slice_asks"), check_round(2),
         scroll(10, ahead=True), ask(QUERIES[2], "slice_asks"), check_round(3), model_and_jcm_controls]


def stamped_poll(poll=logic.poll):
    """The logic's poll, stamping when an Ask's answer (or error) reaches the main thread, and how long each
    call keeps the main thread (the event loop waits meanwhile: the interface's stall) (measurement only)."""
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        events = poll(*args, **kwargs)
        log["poll_ms"].append(1000 * (time.perf_counter() - t0))
        if any(e.kind in ("round", "error") for e in events) and current:
            current["ask"].setdefault("done", time.perf_counter())
        if any(e.kind == "prepared" and e.error is None and e.timings for e in events) and log["scrolls"]:
            log["scrolls"][-1].setdefault("prepared", time.perf_counter())
        return events
    return wrapper


logic.poll = stamped_poll()


def drive():
    """Runs the next step once the panel is idle. Slow on purpose: every Python call on the main thread lends
    the GIL to the worker now and then, and this driver must not be what feeds it."""
    if logic.busy or chat.timer.isActive() or chat.ahead_timer.isActive():
        return
    try:
        STEPS.pop(0)()
        log["steps"].append("ok")
    except Exception as exc:  # reported after the loop
        log["errors"].append(f"step {len(log['steps'])}: {type(exc).__name__}: {exc}")
        STEPS.clear()
    if not STEPS:
        driver.stop()
        qt.QApplication.instance().quit()


driver = qt.QTimer()
driver.setInterval(int(os.environ.get("DRIVER_MS", "250")))
driver.timeout.connect(drive)
driver.start()
T0 = time.perf_counter()


def after_exec():
    log["wall_seconds"] = time.perf_counter() - T0
    log["left_steps"] = len(STEPS)
    for entry in log["scrolls"]:  # seconds from the scroll until the slice was encoded ahead
        entry["prepare_seconds"] = entry.pop("prepared") - entry["start"] if "prepared" in entry else None
        entry.pop("start")
    log["torch_threads"] = __import__("torch").get_num_threads()
    stalls = sorted(log.pop("poll_ms"))
    log["poll_calls"] = len(stalls)
    log["poll_ms_median"] = stalls[len(stalls) // 2] if stalls else None
    log["poll_ms_p99"] = stalls[int(0.99 * (len(stalls) - 1))] if stalls else None
    log["poll_ms_max"] = stalls[-1] if stalls else None
    print("PQRESULT " + json.dumps(log))
    widget.cleanup()
