"""Rounds as segments: segment "R<n>: <entity>" of the session's segmentation node, in that slice only.

Every segment gets its own binary-labelmap layer (its own vtkOrientedImageData), so overlapping segments
(an organ and a lesion inside it) survive in the scene and in the saved `.seg.nrrd`. Labelmaps are in the
volume's local RAS and the segmentation node sits under the volume's parent transform, so both move together.
Colours: Slicer's recommended colour where the entity is a standard structure or finding (with its
terminology entry, MediRoundLib.terminology), else a palette colour; never the colour of a segment already in
the node.
"""

from __future__ import annotations

import colorsys

import numpy as np

from MediRoundCore.errors import VolumeError
from MediRoundCore.imaging import SliceImage, Volume
from MediRoundLib import terminology

SEGMENT_ID_PREFIX = "MediRound_R"
ROUND_TAG = "MediRound.Round"

def segment_id(number: int) -> str:
    return f"{SEGMENT_ID_PREFIX}{number}"


def segment_name(number: int, entity: str | None) -> str:
    return f"R{number}: {entity}" if entity else f"R{number}"


def terminology_entry(entity: str | None) -> str | None:
    """Slicer's TerminologyEntry tag string for a standard structure or finding (MediRoundLib.terminology)."""
    return terminology.terminology_entry(entity)


def palette_color(i: int) -> tuple[float, float, float]:
    """The i-th colour of an endless palette of well-separated hues (golden-ratio steps)."""
    hue = (0.08 + i * 0.61803398875) % 1.0
    sat = 0.65 if i % 2 == 0 else 0.5
    return colorsys.hsv_to_rgb(hue, sat, 0.95)


def choose_color(entity: str | None, used: list[tuple[float, float, float]]) -> tuple[float, float, float]:
    """The standard colour of the entity when known and not yet used, else the first unused palette colour."""
    def taken(c):
        return any(max(abs(a - b) for a, b in zip(c, u)) < 0.06 for u in used)

    rgb = terminology.standard_color(entity)
    if rgb is not None and not taken(rgb):
        return rgb
    i = 0
    while taken(palette_color(i)) and i < 1000:
        i += 1
    return palette_color(i)


# -- MRML ----------------------------------------------------------------------------------------------------
def create_segmentation_node(scene, volume_node, name: str):
    """A segmentation node for the volume's session: reference geometry from the volume, same parent transform,
    binary labelmap as source representation, shown in the slice views with every segment visible."""
    import slicer

    node = slicer.vtkMRMLSegmentationNode()
    node.SetName(name)
    scene.AddNode(node)
    node.CreateDefaultDisplayNodes()
    # Under the volume's parent transform FIRST: the reference geometry is computed in the segmentation's own
    # frame, so set afterwards it is the volume's local grid (set before, the transform would be baked in and
    # then applied again).
    node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    node.SetNodeReferenceID(node.GetReferenceImageGeometryReferenceRole(), volume_node.GetID())
    segmentation = node.GetSegmentation()
    labelmap = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    if hasattr(segmentation, "SetSourceRepresentationName"):
        segmentation.SetSourceRepresentationName(labelmap)
    else:  # Slicer < 5.4
        segmentation.SetMasterRepresentationName(labelmap)
    display = node.GetDisplayNode()
    if display is not None:
        display.SetVisibility(True)
        display.SetVisibility2DFill(True)
        display.SetVisibility2DOutline(True)
        display.SetOpacity2DFill(0.45)
    return node


def _oriented_slice_labelmap(volume: Volume, ijk_to_ras: np.ndarray, image: SliceImage, mask: np.ndarray):
    """A vtkOrientedImageData holding `mask` on the slice's voxel plane only (extent one voxel thick)."""
    import slicer
    import vtk
    from vtk.util import numpy_support

    mask = np.asarray(mask).astype(bool)
    if mask.shape != image.pixels.shape:
        raise VolumeError(f"mask of shape {mask.shape} does not match the slice ({image.pixels.shape})")
    plane = image.to_plane(mask).astype(np.uint8)  # remaining array axes, in (k, j, i) order
    block = np.expand_dims(plane, axis=2 - image.axis)  # (k, j, i) with one voxel along the slice axis
    dims = volume.array.shape[::-1]  # (i, j, k)
    extent = [0, dims[0] - 1, 0, dims[1] - 1, 0, dims[2] - 1]
    extent[2 * image.axis] = extent[2 * image.axis + 1] = image.index
    if block.shape[::-1] != tuple(extent[2 * a + 1] - extent[2 * a] + 1 for a in range(3)):
        raise VolumeError(f"mask plane {plane.shape} does not fit the volume {volume.array.shape}")
    labelmap = slicer.vtkOrientedImageData()
    labelmap.SetExtent(extent)
    labelmap.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(block).ravel(), deep=True,
                                         array_type=vtk.VTK_UNSIGNED_CHAR)
    labelmap.GetPointData().SetScalars(scalars)
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(ijk_to_ras[r, c]))
    labelmap.SetImageToWorldMatrix(matrix)
    return labelmap


def add_round_segment(segmentation_node, volume: Volume, ijk_to_ras: np.ndarray, image: SliceImage,
                      mask: np.ndarray, number: int, entity: str | None) -> str:
    """Add (or replace) the segment of round `number`, in its own layer; returns the segment id."""
    import slicer

    segmentation = segmentation_node.GetSegmentation()
    seg_id = segment_id(number)
    if segmentation.GetSegment(seg_id) is not None:
        segmentation.RemoveSegment(seg_id)
    used = []
    for other in segment_ids(segmentation_node):
        used.append(tuple(segmentation.GetSegment(other).GetColor()))
    labelmap = _oriented_slice_labelmap(volume, ijk_to_ras, image, mask)
    segment = slicer.vtkSegment()
    segment.SetName(segment_name(number, entity))
    segment.SetColor(*choose_color(entity, used))
    segment.SetLabelValue(1)
    segment.AddRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName(), labelmap)
    entry = terminology_entry(entity)
    if entry:
        segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), entry)
    segment.SetTag(ROUND_TAG, str(number))
    if not segmentation.AddSegment(segment, seg_id):
        raise RuntimeError(f"could not add segment {seg_id}")
    display = segmentation_node.GetDisplayNode()
    if display is not None:
        display.SetSegmentVisibility(seg_id, True)
    return seg_id


def remove_round_segment(segmentation_node, number: int) -> bool:
    segmentation = segmentation_node.GetSegmentation()
    if segmentation.GetSegment(segment_id(number)) is None:
        return False
    segmentation.RemoveSegment(segment_id(number))
    return True


def segment_ids(segmentation_node) -> list[str]:
    segmentation = segmentation_node.GetSegmentation()
    return [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]


def segment_array(segmentation_node, seg_id: str, volume: Volume, ijk_to_ras: np.ndarray) -> np.ndarray:
    """The segment's voxels as a (k, j, i) uint8 array on the volume's grid (for checks and tests)."""
    import slicer
    import vtk
    from vtk.util import numpy_support

    segment = segmentation_node.GetSegmentation().GetSegment(seg_id)
    labelmap = segment.GetRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())
    out = np.zeros(volume.array.shape, np.uint8)
    if labelmap is None:
        return out
    # The labelmap must be on the volume's grid (it is, as we write it); check and copy its extent.
    m = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(m)
    got = np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])
    if not np.allclose(got, ijk_to_ras, atol=1e-4):
        raise VolumeError("segment labelmap is not on the volume's voxel grid")
    e = labelmap.GetExtent()
    if e[0] > e[1] or e[2] > e[3] or e[4] > e[5]:
        return out
    data = numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars()).reshape(
        e[5] - e[4] + 1, e[3] - e[2] + 1, e[1] - e[0] + 1)
    value = segment.GetLabelValue()
    out[e[4]:e[5] + 1, e[2]:e[3] + 1, e[0]:e[1] + 1] = (data == value)
    return out


def save_seg_nrrd(segmentation_node, path: str) -> None:
    """Write the segmentation to `path` (.seg.nrrd) through a segmentation storage node, keeping every layer
    and the reference volume's full geometry."""
    import slicer

    scene = segmentation_node.GetScene()
    storage = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(storage)
    try:
        storage.SetFileName(str(path))
        if hasattr(storage, "SetCropToMinimumExtent"):
            storage.SetCropToMinimumExtent(False)
        storage.SetUseCompression(True)
        if not storage.WriteData(segmentation_node):
            raise OSError(f"could not write {path}: {storage.GetLastErrorMessage() if hasattr(storage, 'GetLastErrorMessage') else ''}")
    finally:
        scene.RemoveNode(storage)
