"""Which voxel plane a slice view shows: RAS → IJK through the volume's matrices and its parent transforms.

A slice view (vtkMRMLSliceNode) shows a plane in world RAS: SliceToRAS's third column is the plane normal and
its fourth column a point on it. The volume's voxels live in its local RAS (the coordinates before its parent
transforms; a hardened transform is already in the IJK→RAS matrix). We carry the plane into local RAS
(through the inverse of the parent transforms, linear or not), then into IJK, and pick the voxel axis whose
physical direction is nearest the plane normal: for an oblique volume or view that is the voxel plane nearest
the view. The result is a view name and an index for `MediRoundCore.imaging.extract_slice`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from MediRoundCore.errors import VolumeError
from MediRoundCore.imaging import _VIEW_NORMAL, VIEWS, Volume

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class VoxelPlane:
    view: str  # 'axial' | 'coronal' | 'sagittal': the name extract_slice needs
    index: int  # voxel index along `axis`
    axis: int  # voxel axis 0=i, 1=j, 2=k
    offset: float  # continuous IJK coordinate of the plane along `axis` (index is its rounding)
    tilt_degrees: float  # angle between the view normal and the chosen voxel axis


def nearest_voxel_plane(volume: Volume, ijk_to_ras: np.ndarray, point_ras, normal_ras,
                        tolerance: float = 0.5) -> VoxelPlane:
    """The voxel plane of `volume` nearest the plane through `point_ras` with normal `normal_ras`.

    All in the volume's local RAS (parent transforms already undone). `ijk_to_ras` is the volume's 4×4
    IJK→RAS matrix. The plane is measured at `point_ras` (the view's centre) when that is inside the volume,
    else where the plane passes nearest the volume's centre. Raises VolumeError when the plane misses the
    volume."""
    m = np.asarray(ijk_to_ras, dtype=float).reshape(4, 4)
    point = np.asarray(point_ras, dtype=float).reshape(3)
    normal = np.asarray(normal_ras, dtype=float).reshape(3)
    norm = np.linalg.norm(normal)
    if not np.all(np.isfinite(point)) or not np.isfinite(norm) or norm < 1e-12:
        raise VolumeError("the slice view has no valid plane (zero or non-finite normal)")
    normal = normal / norm
    axes = m[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    if np.any(spacing <= 0) or abs(np.linalg.det(axes)) < 1e-12:
        raise VolumeError("the volume's IJK→RAS matrix is singular")
    unit_axes = axes / spacing
    cosines = np.abs(unit_axes.T @ normal)  # |cos| between the normal and each voxel axis
    best_axis = int(np.argmax(cosines))
    # A view name that extract_slice maps to that axis, preferring the patient plane nearest the normal.
    normal_lps = _RAS_TO_LPS @ normal
    by_alignment = sorted(VIEWS, key=lambda v: -abs(normal_lps[_VIEW_NORMAL[v]]))
    view = next((v for v in by_alignment if volume.view_axis(v) == best_axis), None)
    if view is None:  # extreme obliquity: no view name reaches that axis; take the nearest view's own axis
        view = by_alignment[0]
        best_axis = volume.view_axis(view)
    # Where to measure the plane: at the view's centre when that lies in the volume (an oblique plane crosses
    # several voxel planes; the one under the view's centre is the one the user looks at), else where the plane
    # passes nearest the volume's centre (a view panned off the volume).
    dims_ijk = np.array(volume.array.shape[::-1], dtype=float)
    ras_to_ijk = np.linalg.inv(m)
    point_ijk = ras_to_ijk[:3, :3] @ point + ras_to_ijk[:3, 3]
    if np.all(point_ijk >= -0.5) and np.all(point_ijk <= dims_ijk - 0.5):
        offset = float(point_ijk[best_axis])
    else:
        centre_ras = m[:3, :3] @ ((dims_ijk - 1) / 2) + m[:3, 3]
        foot = centre_ras - np.dot(centre_ras - point, normal) * normal
        offset = float((ras_to_ijk[:3, :3] @ foot + ras_to_ijk[:3, 3])[best_axis])
    index = int(np.floor(offset + 0.5 + 1e-6))
    n = int(dims_ijk[best_axis])
    if not -tolerance <= offset <= n - 1 + tolerance:
        raise VolumeError(f"the slice view is outside the volume ({'ijk'[best_axis]} = {offset:.1f}, the volume has "
                          f"{n} slices along that axis); move the view onto the volume")
    index = min(max(index, 0), n - 1)
    tilt = float(np.degrees(np.arccos(np.clip(cosines[best_axis], -1.0, 1.0))))
    return VoxelPlane(view, index, best_axis, offset, tilt)


# -- MRML ----------------------------------------------------------------------------------------------------
def volume_from_node(volume_node, array=None) -> Volume:
    """The core Volume of a scalar volume node, in its local RAS (parent transforms excluded)."""
    import slicer

    if volume_node is None or volume_node.GetImageData() is None:
        raise VolumeError("no volume is selected (or the volume has no voxels)")
    if volume_node.GetImageData().GetNumberOfScalarComponents() != 1:
        raise VolumeError(f"{volume_node.GetName()}: has several components per voxel (RGB or vector volume); "
                          "a scalar volume is needed")
    if array is None:
        array = np.array(slicer.util.arrayFromVolume(volume_node), copy=True)
    return Volume.from_ijk_to_ras(array, ijk_to_ras_matrix(volume_node), name=volume_node.GetName() or "volume")


def ijk_to_ras_matrix(volume_node) -> np.ndarray:
    import vtk

    mat = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(mat)
    return np.array([[mat.GetElement(r, c) for c in range(4)] for r in range(4)])


def slice_to_ras_matrix(slice_node) -> np.ndarray:
    mat = slice_node.GetSliceToRAS()
    return np.array([[mat.GetElement(r, c) for c in range(4)] for r in range(4)])


def world_to_local(node):
    """A function mapping world RAS points (n, 3) to `node`'s local RAS (through its parent transforms)."""
    import slicer
    import vtk

    parent = node.GetParentTransformNode()
    if parent is None:
        return lambda points: np.asarray(points, dtype=float).reshape(-1, 3)
    transform = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(None, parent, transform)

    def apply(points):
        points = np.asarray(points, dtype=float).reshape(-1, 3)
        return np.array([transform.TransformPoint(*p) for p in points])

    return apply


def plane_in_local(slice_node, volume_node):
    """Point and unit normal of the slice node's plane in the volume's local RAS.

    The normal is carried through the transform as the difference of two nearby points, so a non-linear
    transform bends it correctly at the plane's position."""
    s2r = slice_to_ras_matrix(slice_node)
    point, normal = s2r[:3, 3], s2r[:3, 2]
    normal = normal / np.linalg.norm(normal)
    to_local = world_to_local(volume_node)
    step = 1.0  # mm
    p0, p1 = to_local([point, point + step * normal])
    return p0, (p1 - p0) / np.linalg.norm(p1 - p0)


def voxel_plane_for_view(volume_node, slice_node, volume: Volume | None = None) -> VoxelPlane:
    """The voxel plane of `volume_node` nearest the plane that `slice_node` shows (transforms respected)."""
    if slice_node is None:
        raise VolumeError("no slice view to read the slice from")
    volume = volume if volume is not None else volume_from_node(volume_node)
    point, normal = plane_in_local(slice_node, volume_node)
    return nearest_voxel_plane(volume, ijk_to_ras_matrix(volume_node), point, normal)


def find_slice_node(scene, view_name: str = "Red"):
    """The slice node of the view named `view_name` ('Red', 'Yellow', 'Green', …) in `scene`."""
    nodes = scene.GetNodesByClass("vtkMRMLSliceNode")
    for i in range(nodes.GetNumberOfItems()):
        node = nodes.GetItemAsObject(i)
        if node.GetLayoutName() == view_name or node.GetName() == view_name:
            return node
    return None
