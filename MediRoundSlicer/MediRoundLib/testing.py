"""Scene builders and a deterministic stand-in engine, for the module's tests (inside and outside Slicer)."""

from __future__ import annotations

import numpy as np

from MediRoundCore.answers import ABSENT_TEXT, format_answer, parse_entity
from MediRoundCore.session import Round


def rotation(axis: str, degrees: float) -> np.ndarray:
    a = np.radians(degrees)
    c, s = np.cos(a), np.sin(a)
    i, j = {"x": (1, 2), "y": (2, 0), "z": (0, 1)}[axis]
    m = np.eye(3)
    m[i, i] = m[j, j] = c
    m[i, j], m[j, i] = -s, s
    return m


def vtk_matrix(array):
    import vtk

    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(array[r][c]))
    return m


def add_volume(scene, array_kji, spacing, origin, direction_ras, name="volume"):
    """A scalar volume node with the given voxels (k, j, i), spacing (i, j, k), origin and RAS direction columns."""
    import slicer

    node = slicer.vtkMRMLScalarVolumeNode()
    node.SetName(name)
    scene.AddNode(node)
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array_kji))
    node.SetSpacing(*[float(s) for s in spacing])
    node.SetOrigin(*[float(o) for o in origin])
    node.SetIJKToRASDirectionMatrix(vtk_matrix(np.block([[np.asarray(direction_ras), np.zeros((3, 1))],
                                                         [np.zeros((1, 3)), np.ones((1, 1))]])))
    return node


def add_linear_transform(scene, matrix4, parent=None):
    import slicer

    node = slicer.vtkMRMLLinearTransformNode()
    scene.AddNode(node)
    node.SetMatrixTransformToParent(vtk_matrix(matrix4))
    if parent is not None:
        node.SetAndObserveTransformNodeID(parent.GetID())
    return node


def add_slice_node(scene, name="Red"):
    import slicer

    node = slicer.vtkMRMLSliceNode()
    node.SetName(name)
    node.SetLayoutName(name)
    scene.AddNode(node)
    return node


# Slice orientations as Slicer's presets define them (SliceToRAS columns: x, y, normal).
VIEW_PRESETS = {
    "axial": np.array([[-1, 0, 0], [0, 1, 0], [0, 0, 1]], float),
    "coronal": np.array([[-1, 0, 0], [0, 0, 1], [0, 1, 0]], float),
    "sagittal": np.array([[0, 0, 1], [-1, 0, 0], [0, 1, 0]], float),
}


def show_plane(slice_node, view: str, point_ras, rotation3=None):
    """Point the slice node at the `view` orientation (optionally rotated) through `point_ras`."""
    m = np.eye(4)
    m[:3, :3] = VIEW_PRESETS[view] if rotation3 is None else rotation3 @ VIEW_PRESETS[view]
    m[:3, 3] = point_ras
    slice_node.GetSliceToRAS().DeepCopy(vtk_matrix(m))
    slice_node.UpdateMatrices()


class ThresholdEngine:
    """Stands in for MediRoundCore.engine.Engine: the mask is the slice's voxels above `threshold`; the answer
    names the entity the query asks for, or, when no voxel is above it, says the structure is not on this slice
    (an absent round, no mask). Same signature and session behaviour as Engine.ask."""

    device_description = "CPU (test engine)"

    def __init__(self, threshold=0.0, reference_scorer=None):
        self.threshold = threshold
        self.reference_scorer = reference_scorer  # as Engine's: the resolver's guess and its close alternatives
        self.calls = []
        self.prepared = []

    def prepare(self, session, image, progress=None):
        """As Engine.prepare: nothing to encode here; the call is recorded."""
        self.prepared.append((image.view, image.index, len(session.rounds)))
        return {"total_ms": 0.0}

    def ask(self, session, query, image, reference=None, use_jcm=True, beta=None, progress=None):
        say = progress or (lambda message, fraction: None)
        say("encoding the slice", 0.1)
        explicit = reference
        reference = session.resolve_reference(query, reference, self.reference_scorer)
        guessed, alternatives = session.reference_guess(query, explicit, reference, self.reference_scorer)
        words = [w.strip(".,?!").lower() for w in query.split()]
        entity = words[-1] if words else "structure"
        mask = np.asarray(image.pixels) > self.threshold
        absent = not mask.any()
        answer = f"{entity}: {ABSENT_TEXT}." if absent else format_answer(entity, f"the {entity} on this slice")
        number = len(session.rounds) + 1
        round_ = Round(number, image.view, image.index, query, answer, parse_entity(answer), reference, mask,
                       jcm_score=None if absent else 0.5 + 0.1 * number, corrected=number == 2 and not absent,
                       timings={"total_ms": 5.0}, absent=absent, reference_guessed=guessed,
                       reference_alternatives=alternatives)
        session.add_round(round_)
        self.calls.append((query, image.view, image.index))
        say("done", 1.0)

        class Result:
            pass

        result = Result()
        result.round = round_
        return result
