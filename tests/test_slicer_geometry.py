"""Slice geometry of the Slicer module with real MRML (slicer-core): which voxel plane the Red view shows.

Expected answers are built independently of the code under test: a unique marker voxel is placed in the
volume, its world RAS is computed from spacing/origin/direction and the parent transforms by plain matrix
products, the view is pointed through that point, and the extracted slice must contain the marker; the
expected voxel axis is the one whose world direction is nearest the view normal."""

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "MediRoundSlicer"), str(ROOT)]

slicer = pytest.importorskip("slicer")

from MediRoundCore.errors import VolumeError  # noqa: E402
from MediRoundCore.imaging import extract_slice  # noqa: E402
from MediRoundLib import geometry  # noqa: E402
from MediRoundLib.testing import (add_linear_transform, add_slice_node, add_volume, rotation,  # noqa: E402
                                  show_plane)

SHAPE = (9, 14, 11)  # (k, j, i)
SPACING = (0.7, 1.3, 3.0)
ORIGIN = (-40.0, 25.5, 112.0)
MARK = (7, 10, 3)  # (i, j, k)
DIRECTIONS = {
    "identity": np.eye(3),
    "flipped": np.diag([-1.0, 1.0, -1.0]),
    "permuted": np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]], float) @ np.diag([1, -1, 1]),  # stored sagittally
    "oblique": rotation("x", 17) @ rotation("z", -25),
}
TRANSFORMS = {
    "none": None,
    "linear": np.block([[rotation("z", 90) @ rotation("y", 8), np.array([[12.0], [-7.0], [30.0]])],
                        [np.zeros((1, 3)), np.ones((1, 1))]]),
    "hardened": np.block([[rotation("x", -90), np.array([[3.0], [4.0], [-5.0]])],
                          [np.zeros((1, 3)), np.ones((1, 1))]]),
    "shifted": np.block([[rotation("z", 90), np.array([[12.0], [-7.0], [30.0]])],
                         [np.zeros((1, 3)), np.ones((1, 1))]]),
    "nested": np.block([[rotation("y", 30), np.array([[1.0], [2.0], [3.0]])],
                        [np.zeros((1, 3)), np.ones((1, 1))]]),
}
VIEW_NORMALS = {"axial": np.array([0, 0, 1.0]), "coronal": np.array([0, 1.0, 0]), "sagittal": np.array([1.0, 0, 0])}


def _marked_array():
    rng = np.random.default_rng(0)
    array = rng.integers(-500, 500, SHAPE).astype(np.int16)
    i, j, k = MARK
    array[k, j, i] = 3000
    return array


def _build(direction_name, transform_name):
    scene = slicer.vtkMRMLScene()
    direction = DIRECTIONS[direction_name]
    node = add_volume(scene, _marked_array(), SPACING, ORIGIN, direction)
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = direction * np.asarray(SPACING)
    ijk_to_ras[:3, 3] = ORIGIN
    to_world = np.eye(4)
    matrix = TRANSFORMS[transform_name]
    if matrix is not None:
        outer = None
        if transform_name == "nested":
            outer_m = np.block([[rotation("z", -90), np.array([[0.0], [50.0], [0.0]])],
                                [np.zeros((1, 3)), np.ones((1, 1))]])
            outer = add_linear_transform(scene, outer_m)
            to_world = outer_m @ matrix
        else:
            to_world = matrix
        t = add_linear_transform(scene, matrix, parent=outer)
        node.SetAndObserveTransformNodeID(t.GetID())
        if transform_name == "hardened":
            node.HardenTransform()
            assert node.GetParentTransformNode() is None
    return scene, node, to_world @ ijk_to_ras


@pytest.mark.parametrize("view", ["axial", "coronal", "sagittal"])
@pytest.mark.parametrize("transform_name", list(TRANSFORMS))
@pytest.mark.parametrize("direction_name", list(DIRECTIONS))
def test_view_shows_marked_voxel(direction_name, transform_name, view):
    scene, node, ijk_to_world = _build(direction_name, transform_name)
    mark_world = (ijk_to_world @ np.r_[MARK, 1.0])[:3]
    red = add_slice_node(scene)
    show_plane(red, view, mark_world)
    # expected voxel axis: world direction nearest the view normal
    world_axes = ijk_to_world[:3, :3] / np.linalg.norm(ijk_to_world[:3, :3], axis=0)
    expected_axis = int(np.argmax(np.abs(world_axes.T @ VIEW_NORMALS[view])))
    plane = geometry.voxel_plane_for_view(node, geometry.find_slice_node(scene, "Red"))
    assert plane.axis == expected_axis
    assert plane.index == MARK[expected_axis]
    image = extract_slice(geometry.volume_from_node(node), plane.view, plane.index)
    assert image.axis == expected_axis
    assert (image.pixels == 3000).sum() == 1


@pytest.mark.parametrize("direction_name", ["identity", "oblique"])
def test_panned_view_and_between_slices(direction_name):
    """The plane position counts, not where the view is centred; offsets round to the nearest voxel."""
    scene, node, ijk_to_world = _build(direction_name, "shifted")
    red = add_slice_node(scene)
    normal = VIEW_NORMALS["axial"]
    world_axes = ijk_to_world[:3, :3]
    k_axis = int(np.argmax(np.abs((world_axes / np.linalg.norm(world_axes, axis=0)).T @ normal)))
    for target, offset in ((MARK[k_axis], 0.0), (MARK[k_axis], 0.3), (MARK[k_axis] + 1, 0.7)):
        ijk = np.r_[MARK, 1.0].astype(float)
        ijk[k_axis] = MARK[k_axis] + offset
        point = (ijk_to_world @ ijk)[:3]
        # pan far away inside the plane (perpendicular to the normal)
        side = np.cross(normal, [0.3, 1.0, 0.1])
        point_panned = point + 500.0 * side / np.linalg.norm(side)
        # an oblique volume crosses several voxel planes: only an axis-aligned one may be panned off
        show_plane(red, "axial", point_panned if direction_name == "identity" else point)
        plane = geometry.voxel_plane_for_view(node, red)
        assert plane.index == target


def test_view_outside_volume_is_an_error():
    scene, node, ijk_to_world = _build("identity", "none")
    red = add_slice_node(scene)
    show_plane(red, "axial", [0, 0, ORIGIN[2] + 3.0 * SHAPE[0] + 20])
    with pytest.raises(VolumeError, match="outside the volume"):
        geometry.voxel_plane_for_view(node, red)


def test_rotated_view_picks_nearest_voxel_plane():
    """A slightly oblique Red view (reformat) on an axis-aligned volume reads the nearest axial voxel plane."""
    scene, node, ijk_to_world = _build("identity", "none")
    red = add_slice_node(scene)
    mark_world = (ijk_to_world @ np.r_[MARK, 1.0])[:3]
    show_plane(red, "axial", mark_world, rotation3=rotation("x", 20))
    plane = geometry.voxel_plane_for_view(node, red)
    assert (plane.view, plane.axis, plane.index) == ("axial", 2, MARK[2])
    assert 19 < plane.tilt_degrees < 21
