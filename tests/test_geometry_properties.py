"""Geometry properties (hypothesis) on real SimpleITK volumes of random shape (non-square, thin), spacing
(anisotropic), origin and direction (axis permutations, flips, oblique rotations).

Every voxel holds its own flat index, so a displayed pixel names the voxel it shows. Expected answers come from
SimpleITK's own geometry (TransformIndexToPhysicalPoint), never from the helpers under test:
- a mask drawn on the displayed slice goes back to exactly the voxels its pixels show, in every view;
- the display convention holds in patient coordinates: axial and coronal show the patient's left on image right,
  sagittal the patient's back on image right; axial has anterior up, coronal and sagittal superior up; the slice
  is the voxel plane nearest the view's normal;
- the Slicer module's plane finder, given a physical point of a voxel and a view's normal, picks that voxel's
  plane.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from MediRoundCore.imaging import VIEWS, Volume, extract_slice, mask_into_volume

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "MediRoundSlicer"))

PROPS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# LPS unit vectors: +x is the patient's left, +y posterior, +z superior
LEFT, POSTERIOR, SUPERIOR = np.eye(3)
VIEW_NORMAL = {"axial": SUPERIOR, "coronal": POSTERIOR, "sagittal": LEFT}
# (patient direction along which display columns increase, along which display rows increase)
DISPLAY = {"axial": (LEFT, POSTERIOR), "coronal": (LEFT, -SUPERIOR), "sagittal": (POSTERIOR, -SUPERIOR)}


def _rotation(axis, degrees):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    a = np.radians(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


@st.composite
def directions(draw):
    """A signed permutation of the patient axes (how scanners store volumes), optionally tilted up to 30°
    about a random axis (oblique acquisitions): every voxel axis stays nearest one patient axis."""
    perm = draw(st.permutations([0, 1, 2]))
    signs = draw(st.tuples(*[st.sampled_from([-1.0, 1.0])] * 3))
    direction = np.zeros((3, 3))
    for column, (row, sign) in enumerate(zip(perm, signs)):
        direction[row, column] = sign
    if draw(st.booleans()):
        axis = draw(st.tuples(*[st.floats(-1, 1)] * 3).filter(lambda v: np.linalg.norm(v) > 0.1))
        direction = _rotation(axis, draw(st.floats(-30, 30))) @ direction
    return direction


@st.composite
def sitk_volumes(draw):
    import SimpleITK as sitk

    size = draw(st.tuples(st.integers(2, 13), st.integers(2, 13), st.integers(2, 9)))  # (i, j, k); thin ones too
    spacing = draw(st.tuples(*[st.floats(0.2, 6.0)] * 3))
    origin = draw(st.tuples(*[st.floats(-300, 300)] * 3))
    direction = draw(directions())
    array = np.arange(size[0] * size[1] * size[2], dtype=np.int32).reshape(size[::-1])  # voxel = its flat index
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(tuple(direction.ravel()))
    volume = Volume(sitk.GetArrayFromImage(image), image.GetSpacing(), image.GetOrigin(),
                    np.asarray(image.GetDirection()).reshape(3, 3), modality="MR")
    return image, volume


def _voxel_index(image, value):
    """(i, j, k) of the voxel holding `value` (its flat index in the (k, j, i) array)."""
    k, j, i = np.unravel_index(int(value), image.GetSize()[::-1])
    return int(i), int(j), int(k)


def _physical(image, value):
    return np.array(image.TransformIndexToPhysicalPoint(_voxel_index(image, value)))


@PROPS
@given(sitk_volumes(), st.sampled_from(VIEWS), st.data())
def test_mask_drawn_on_the_display_goes_back_to_exactly_its_voxels(case, view, data):
    image, volume = case
    index = data.draw(st.integers(0, volume.num_slices(view) - 1))
    shown = extract_slice(volume, view, index)
    mask = data.draw(st.lists(st.booleans(), min_size=shown.pixels.size, max_size=shown.pixels.size))
    mask = np.array(mask, bool).reshape(shown.pixels.shape)
    labels = mask_into_volume(volume, shown, mask)
    assert labels.shape == volume.array.shape and labels.dtype == np.uint8
    # the voxels the label volume marks are exactly the voxels the masked pixels show
    marked = np.sort(volume.array[labels.astype(bool)])
    drawn = np.sort(shown.pixels[mask].astype(np.int64))
    assert np.array_equal(marked, drawn)
    # and they all lie on one plane of the axis nearest the view's normal, at the asked index
    axis = shown.axis
    assert all(_voxel_index(image, v)[axis] == index for v in drawn)


@PROPS
@given(sitk_volumes(), st.sampled_from(VIEWS), st.data())
def test_display_convention_in_patient_coordinates(case, view, data):
    image, volume = case
    index = data.draw(st.integers(0, volume.num_slices(view) - 1))
    pixels = extract_slice(volume, view, index).pixels.astype(np.int64)
    rows, cols = pixels.shape
    r = data.draw(st.integers(0, rows - 2)) if rows > 1 else 0
    c = data.draw(st.integers(0, cols - 2)) if cols > 1 else 0
    here = _physical(image, pixels[r, c])
    column_patient, row_patient = DISPLAY[view]
    # the slice's voxel axis is the one nearest the view normal (from SimpleITK's direction, by physical steps)
    unit_steps = [np.array(image.TransformIndexToPhysicalPoint(tuple(int(a == n) for a in range(3))))
                  - np.array(image.GetOrigin()) for n in range(3)]
    cosines = [abs(np.dot(s, VIEW_NORMAL[view])) / np.linalg.norm(s) for s in unit_steps]
    assert all(_voxel_index(image, v)[int(np.argmax(cosines))] == index for v in pixels.ravel())
    if cols > 1:
        step = _physical(image, pixels[r, c + 1]) - here
        assert np.dot(step, column_patient) > 0.5 * np.linalg.norm(step)  # one column right: that patient way
    if rows > 1:
        step = _physical(image, pixels[r + 1, c]) - here
        assert np.dot(step, row_patient) > 0.5 * np.linalg.norm(step)  # one row down: that patient way


def test_display_convention_of_a_plain_axial_slice():
    """The convention spelled out once on a scanner-ordered volume: patient right at image column 0 (x most
    negative in LPS), anterior at row 0 (y most negative)."""
    import SimpleITK as sitk

    array = np.arange(3 * 4 * 5, dtype=np.int32).reshape(3, 4, 5)
    image = sitk.GetImageFromArray(array)
    image.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))  # RAS-stored (e.g. NIfTI from many converters)
    volume = Volume(array, image.GetSpacing(), image.GetOrigin(), np.asarray(image.GetDirection()).reshape(3, 3))
    shown = extract_slice(volume, "axial", 1).pixels.astype(np.int64)
    xs = np.array([[_physical(image, v)[0] for v in row] for row in shown])
    ys = np.array([[_physical(image, v)[1] for v in row] for row in shown])
    assert np.all(np.diff(xs, axis=1) > 0) and np.all(np.diff(ys, axis=0) > 0)


@PROPS
@given(sitk_volumes(), st.sampled_from(VIEWS), st.data())
def test_slicer_plane_finder_picks_the_plane_of_a_physical_point(case, view, data):
    from MediRoundLib.geometry import nearest_voxel_plane

    image, volume = case
    ijk = tuple(data.draw(st.integers(0, n - 1)) for n in image.GetSize())
    point_lps = np.array(image.TransformIndexToPhysicalPoint(ijk))
    ras = np.diag([-1.0, -1.0, 1.0])
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = ras @ volume.direction * np.asarray(volume.spacing)
    ijk_to_ras[:3, 3] = ras @ np.asarray(volume.origin)
    plane = nearest_voxel_plane(volume, ijk_to_ras, ras @ point_lps, ras @ VIEW_NORMAL[view])
    assert plane.index == ijk[plane.axis]
    shown = extract_slice(volume, plane.view, plane.index)
    flat = np.ravel_multi_index(ijk[::-1], volume.array.shape)
    assert flat in shown.pixels.astype(np.int64)
