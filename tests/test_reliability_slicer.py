"""Bad inputs through the Slicer module's public Logic API (real MRML from slicer-core, the real random tiny
engine): each raises one of our exception types naming the input and the problem, and leaves the autosaved
session folder byte-identical (a round is asked and autosaved first)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "MediRoundSlicer"), str(ROOT)]

slicer = pytest.importorskip("slicer")

import MediRound  # noqa: E402
from MediRoundCore.errors import (CheckpointError, MediRoundError, QueryError, RoundReferenceError,  # noqa: E402
                                  SessionError, VolumeError)
from MediRoundLib import geometry  # noqa: E402
from MediRoundLib.testing import ThresholdEngine, add_slice_node, add_volume, show_plane  # noqa: E402

SHAPE = (8, 20, 16)  # (k, j, i)
SPACING = (0.8, 1.1, 2.5)
ORIGIN = (10.0, -20.0, 33.0)
GOOD_SLICE, NAN_SLICE = 2, 5


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def phantom(nan=False):
    array = np.full(SHAPE, -1000.0, np.float32)
    array[1:7, 4:15, 3:12] = 100
    if nan:
        array[NAN_SLICE, 6, 6] = np.nan
    return array


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def show_axial(node, red, k):
    m = geometry.ijk_to_ras_matrix(node)
    show_plane(red, "axial", (m @ np.r_[7, 9, k, 1.0])[:3])


class Ctx:
    def __init__(self, tmp_path, engine, nan=False):
        self.root = tmp_path
        self.scene = slicer.vtkMRMLScene()
        self.node = add_volume(self.scene, phantom(nan), SPACING, ORIGIN, np.eye(3), name="phantom")
        self.red = add_slice_node(self.scene, "Red")
        self.logic = MediRound.MediRoundLogic(scene=self.scene, sessions_dir=tmp_path / "sessions",
                                              engine_factory=lambda checkpoint: engine)
        self.logic.set_volume(self.node)
        show_axial(self.node, self.red, GOOD_SLICE)
        self.logic.engine = ThresholdEngine(0)  # a fast first round, autosaved
        self.logic.ask("Segment the liver.")
        self.logic.engine = engine  # the real engine (its input checks) for the bad inputs
        self.folder = self.logic.session.folder


def rgb_node(ctx):
    node = slicer.vtkMRMLVectorVolumeNode()
    node.SetName("colour photo")
    ctx.scene.AddNode(node)
    slicer.util.updateVolumeFromArray(node, np.zeros((3, 8, 8, 3), np.uint8))
    return node


def empty_node(ctx):
    node = slicer.vtkMRMLScalarVolumeNode()
    node.SetName("no voxels")
    ctx.scene.AddNode(node)
    return node


def nan_ask(ctx):
    show_axial(ctx.node, ctx.red, NAN_SLICE)
    ctx.logic.ask("Segment the liver.")


def restore_damaged(name, payload):
    def setup(ctx):
        path = ctx.folder / name
        if payload is None:
            path.unlink()
        else:
            path.write_bytes(payload)
    return setup


def restore(ctx):
    assert ctx.logic.find_saved_session(ctx.node) is None  # not offered
    ctx.logic.set_volume(ctx.node, restore=True)


def missing_checkpoint(ctx):
    ctx.logic.engine_factory = None  # the real loader
    ctx.logic.set_checkpoint(ctx.root / "nowhere")
    ctx.logic.ask("Segment the liver.")


def off_volume(ctx):
    show_plane(ctx.red, "axial", [0, 0, 5000])
    ctx.logic.ask("Segment the liver.")


# (id, exception, words in the message, action, setup, nan volume)
CASES = [
    ("rgb-volume-node", VolumeError, ("colour photo", "components", "scalar"),
     lambda c: c.logic.set_volume(rgb_node(c)), None, False),
    ("volume-node-without-voxels", VolumeError, ("no voxels",),
     lambda c: c.logic.set_volume(empty_node(c)), None, False),
    ("nan-voxels-on-the-slice", VolumeError, ("axial slice 5", "NaN"), nan_ask, None, True),
    ("unknown-slice-view", VolumeError, ("'Purple'", "slice view"),
     lambda c: c.logic.ask("Segment the liver.", view_name="Purple"), None, False),
    ("slice-view-off-the-volume", VolumeError, ("outside the volume",), off_volume, None, False),
    ("empty-query", QueryError, ("query", "empty"), lambda c: c.logic.ask("   "), None, False),
    ("unprintable-query", QueryError, ("unprintable", "U+001B"), lambda c: c.logic.ask("liver\x1b[2J"), None, False),
    ("reference-future-round", RoundReferenceError, ("round 3", "earlier round"),
     lambda c: c.logic.ask("the lesion", reference=3), None, False),
    ("reference-round-zero", RoundReferenceError, ("round 0",),
     lambda c: c.logic.ask("the lesion", reference=0), None, False),
    ("restore-corrupt-session-json", SessionError, ("session.json", "corrupt"), restore,
     restore_damaged("session.json", b"\x00\xff not json"), False),
    ("restore-missing-masks", SessionError, ("masks.npz", "missing"), restore,
     restore_damaged("masks.npz", None), False),
    ("checkpoint-folder-missing", CheckpointError, ("nowhere", "not found"), missing_checkpoint, None, False),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_logic_refuses_bad_input(case, tmp_path, tiny_engine):
    _, exc_type, words, action, setup, nan = case
    ctx = Ctx(tmp_path, tiny_engine, nan=nan)
    try:
        if setup is not None:
            setup(ctx)
        before = snapshot(tmp_path / "sessions")
        assert before  # the autosaved round is there
        with pytest.raises(MediRoundError) as info:
            action(ctx)
        assert isinstance(info.value, exc_type), f"{type(info.value).__name__}: {info.value}"
        missing = [w for w in words if w.lower() not in str(info.value).lower()]
        assert not missing, f"{info.value!s} lacks {missing}"
        assert snapshot(tmp_path / "sessions") == before
        assert not ctx.logic.busy
    finally:
        ctx.logic.shutdown()


def test_logic_recovers_after_a_refused_query(tmp_path, tiny_engine):
    """After a refused input the next good Ask works and becomes round 2 (nothing half-added)."""
    ctx = Ctx(tmp_path, tiny_engine)
    try:
        with pytest.raises(QueryError):
            ctx.logic.ask("")
        assert ctx.logic.ask("Now the lesion.").number == 2
        from MediRoundCore.session import Session

        assert len(Session.load(ctx.folder).rounds) == 2
    finally:
        ctx.logic.shutdown()


def test_refused_volume_keeps_the_current_session(tmp_path):
    """Choosing an unusable volume node is refused; the radiologist's session and segments stay in place."""
    import torch  # noqa: F401  (the engine factory is never called here)

    ctx = Ctx(tmp_path, ThresholdEngine(0))
    session, segmentation = ctx.logic.session, ctx.logic.segmentation_node
    with pytest.raises(VolumeError, match="colour photo"):
        ctx.logic.set_volume(rgb_node(ctx))
    assert ctx.logic.session is session and len(session.rounds) == 1
    assert ctx.logic.segmentation_node is segmentation and ctx.logic.volume_node is ctx.node
    ctx.logic.ask("Now the lesion inside it.")
    assert [r.number for r in ctx.logic.session.rounds] == [1, 2]
