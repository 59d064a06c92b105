"""The module's Logic with real MRML (slicer-core) and the real engine with the shipped model: the demo dialogue
asked on the Red view, segments read back from the segmentation node and scored against the demo's labels.

The other logic tests run a threshold stand-in engine (MediRoundLib.testing.ThresholdEngine); here the whole
chain a Slicer user goes through is real: MRML volume (and a parent transform), the Red view's plane, the voxel
plane, slice extraction, the model, the worker thread, the segment written into the segmentation node.
"""

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "MediRoundSlicer"), str(ROOT)]

slicer = pytest.importorskip("slicer")

import MediRound  # noqa: E402
from demo_variants import FLOORS, demo_variant, dice  # noqa: E402
from MediRoundCore.engine import Engine  # noqa: E402
from MediRoundLib import segments  # noqa: E402
from MediRoundLib.testing import add_linear_transform, add_slice_node, add_volume, rotation, show_plane  # noqa: E402

from conftest import needs_shipped_model  # noqa: E402

pytestmark = needs_shipped_model
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


@pytest.fixture(scope="module")
def shipped():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Engine.load(device="cpu")
    torch.set_num_threads(threads)


@pytest.mark.parametrize("variant, turned", [("original", False), ("permuted_flipped", True)])
def test_demo_dialogue_through_the_logic(tmp_path, shipped, variant, turned):
    volume, labels, index, script = demo_variant(variant)
    scene = slicer.vtkMRMLScene()
    node = add_volume(scene, volume.array, volume.spacing, LPS_TO_RAS @ np.asarray(volume.origin),
                      LPS_TO_RAS @ volume.direction, name=f"demo_{variant}")
    to_world = np.eye(4)
    if turned:  # a parent transform turning the volume about S: the world's axial view is still its axial
        to_world[:3, :3], to_world[:3, 3] = rotation("z", 90), (12.0, -7.0, 30.0)
        node.SetAndObserveTransformNodeID(add_linear_transform(scene, to_world).GetID())
    red = add_slice_node(scene, "Red")
    logic = MediRound.MediRoundLogic(scene=scene, sessions_dir=tmp_path / "sessions",
                                     engine_factory=lambda checkpoint: shipped)
    try:
        logic.set_volume(node)
        # point the Red view at the centre of the demo's slice, in world coordinates
        axis = volume.view_axis("axial")
        centre = (np.array(volume.array.shape[::-1], float) - 1) / 2
        centre[axis] = index
        lps = volume.ijk_to_lps() @ np.r_[centre, 1.0]
        ras = np.r_[LPS_TO_RAS @ lps[:3], 1.0]
        show_plane(red, "axial", (to_world @ ras)[:3])
        for n, step in enumerate(script, start=1):
            ref = None if step.get("refers_to") is None else step["refers_to"] + 1
            r = logic.ask(step["query"], reference=ref)
            assert (r.number, r.view, r.slice_index) == (n, "axial", index)
            voxels = segments.segment_array(logic.segmentation_node, f"MediRound_R{n}", logic.volume,
                                            logic.ijk_to_ras).astype(bool)
            plane = np.zeros_like(voxels)
            plane[tuple(index if a == 2 - axis else slice(None) for a in range(3))] = True
            score = dice(voxels, (labels.array == step["expected_label"]) & plane)
            assert score >= FLOORS[n - 1], f"{variant} round {n}: Dice {score:.3f} < {FLOORS[n - 1]}"
            assert int(voxels.sum()) == int(r.mask.sum())
        assert [r.reference for r in logic.session.rounds] == [None, 1, 2, 1]
    finally:
        logic.shutdown()


def test_demo_dialogue_encoded_ahead_answers_as_without(tmp_path, shipped):
    """The shipped model through the logic, each round after a prepare of the shown slice (as when the user typed
    first): every round equals the round of a logic that never prepared, and no Ask re-runs an encoder."""
    volume, labels, index, script = demo_variant("original")
    logics = []
    for name in ("ahead", "plain"):
        scene = slicer.vtkMRMLScene()
        node = add_volume(scene, volume.array, volume.spacing, LPS_TO_RAS @ np.asarray(volume.origin),
                          LPS_TO_RAS @ volume.direction, name="demo")
        centre = volume.ijk_to_lps() @ np.array([127.5, 127.5, index, 1.0])
        show_plane(add_slice_node(scene, "Red"), "axial", LPS_TO_RAS @ centre[:3])
        engine = Engine(shipped.model, shipped.tokenizer, reference_scorer=shipped.reference_scorer)
        logic = MediRound.MediRoundLogic(scene=scene, sessions_dir=tmp_path / name,
                                         engine_factory=lambda checkpoint, e=engine: e)
        logic.set_volume(node)
        logics.append(logic)
    ahead, plain = logics
    try:
        for n, step in enumerate(script, start=1):
            ref = None if step.get("refers_to") is None else step["refers_to"] + 1
            assert ahead.submit_prepare() is not None
            prepared = []
            while ahead.pending:
                prepared += [e for e in ahead.poll(wait=0.05) if e.kind == "prepared"]
            assert len(prepared) == 1 and prepared[0].error is None
            assert ("segmenter_encoder_ms" in prepared[0].timings) == (n == 1)
            a, b = ahead.ask(step["query"], reference=ref), plain.ask(step["query"], reference=ref)
            assert not {"segmenter_encoder_ms", "vision_tower_ms", "prefix_ms"} & set(a.timings)
            assert (a.answer, a.entity, a.reference) == (b.answer, b.entity, b.reference)
            assert np.array_equal(a.mask, b.mask)
        assert [r.reference for r in ahead.session.rounds] == [None, 1, 2, 1]
    finally:
        for logic in logics:
            logic.shutdown()
