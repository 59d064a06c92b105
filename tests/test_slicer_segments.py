"""Segments on real MRML (slicer-core): a volume under a parent transform saves its segments on its own voxel
grid, and standard anatomy gets Slicer's terminology entry."""

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "MediRoundSlicer"), str(ROOT)]

slicer = pytest.importorskip("slicer")
slicerio = pytest.importorskip("slicerio")

import MediRound  # noqa: E402
from MediRoundLib import geometry, segments  # noqa: E402
from MediRoundLib.testing import ThresholdEngine, add_linear_transform, add_slice_node, add_volume, rotation, show_plane  # noqa: E402,E501

SHAPE = (56, 20, 12)  # (k, j, i)


def test_transformed_volume_saves_its_segment_on_its_own_grid(tmp_path):
    """A 90° rotation + translation above the volume: the saved .seg.nrrd has the volume's local geometry
    and exactly the round's voxels (the transform must not be baked into the reference geometry too)."""
    scene = slicer.vtkMRMLScene()
    array = np.full(SHAPE, -1000, np.int16)
    array[10:40, 4:15, 3:10] = 100
    node = add_volume(scene, array, (0.8, 1.1, 2.5), (10.0, -20.0, 33.0), np.eye(3), name="turned")
    transform = np.eye(4)
    transform[:3, :3] = rotation("z", 90)
    transform[:3, 3] = (5, 6, 7)
    node.SetAndObserveTransformNodeID(add_linear_transform(scene, transform).GetID())
    red = add_slice_node(scene, "Red")
    logic = MediRound.MediRoundLogic(scene=scene, sessions_dir=tmp_path / "sessions",
                                     engine_factory=lambda checkpoint: ThresholdEngine(0))
    try:
        logic.set_volume(node)
        ijk_to_ras = geometry.ijk_to_ras_matrix(node)
        show_plane(red, "axial", (transform @ ijk_to_ras @ np.array([6, 10, 20, 1.0]))[:3])
        r1 = logic.ask("Segment the liver.")
        assert (r1.view, r1.slice_index) == ("axial", 20)
        path, _ = logic.save_segments(tmp_path / "turned.seg.nrrd")
    finally:
        logic.shutdown()
    data = slicerio.read_segmentation(str(path))
    np.testing.assert_allclose(data["ijkToLPS"], np.diag([-1, -1, 1, 1.0]) @ ijk_to_ras, atol=1e-5)
    voxels = data["voxels"]
    assert voxels.shape[-3:] == SHAPE[::-1]
    want = np.zeros(SHAPE, bool)
    want[20] = array[20] > 0
    (info,) = data["segments"]
    layer = voxels[info["layer"]] if voxels.ndim == 4 else voxels
    got = np.transpose(layer == info["labelValue"], (2, 1, 0))
    assert got.sum() == want.sum() == 77
    np.testing.assert_array_equal(got, want)


def test_install_makes_a_new_package_importable_at_once(tmp_path, monkeypatch):
    """After pip writes a package into a folder whose listing the import system has cached (same mtime tick),
    `install` invalidates the caches, so the next Ask finds it without a restart."""
    import os

    from MediRoundLib import dependencies

    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    assert not dependencies.installed("mediround_probe_pkg")  # caches the folder's listing
    stat = site.stat()

    def pip_install(requirement):
        (site / "mediround_probe_pkg.py").write_text("VALUE = 1\n")
        os.utime(site, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the folder looks unchanged to the cache

    dependencies.install(dependencies.InstallPlan(pip=["mediround-probe-pkg"]), pip_install=pip_install)
    assert dependencies.installed("mediround_probe_pkg")


def _tag(segment):
    import vtk

    value = vtk.reference("")
    assert segment.GetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), value)
    return str(value)


def test_standard_anatomy_gets_slicer_terminology_and_colour(tmp_path):
    """Each round's segment carries Slicer's TerminologyEntry (General Anatomy codes; laterality as a type
    modifier; a finding's organ as its anatomic region) and Slicer's recommended colour; they survive a save."""
    from MediRoundCore.imaging import Volume, extract_slice

    scene = slicer.vtkMRMLScene()
    array = np.zeros((4, 10, 12), np.int16)
    node = add_volume(scene, array, (1.0, 1.0, 1.0), (0, 0, 0), np.eye(3), name="v")
    seg = segments.create_segmentation_node(scene, node, "terms")
    volume = Volume(array, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3))
    image = extract_slice(volume, "axial", 2)
    mask = np.zeros(image.pixels.shape, bool)
    mask[2:5, 3:6] = True
    entities = ["left kidney", "lesion in the left kidney", "ribs", "liver", "vertebra", "mysterious blob"]
    for n, entity in enumerate(entities, 1):
        segments.add_round_segment(seg, volume, geometry.ijk_to_ras_matrix(node), image, mask, n, entity)
    s = seg.GetSegmentation()
    tags = {e: _tag(s.GetSegment(segments.segment_id(n))) if e != "mysterious blob" else None
            for n, e in enumerate(entities, 1)}
    ga = "Segmentation category and type - 3D Slicer General Anatomy list"
    assert tags["left kidney"] == (f"{ga}~SCT^123037004^Anatomical Structure~SCT^64033007^Kidney~SCT^7771000^Left"
                                   "~Anatomic codes - DICOM master list~^^~^^")
    assert tags["lesion in the left kidney"] == (
        f"{ga}~SCT^49755003^Morphologically Altered Structure~SCT^4147007^Mass~^^"
        "~Anatomic codes - DICOM master list~SCT^64033007^Kidney~SCT^7771000^Left")
    assert "~SCT^113197003^Rib~" in tags["ribs"] and "~SCT^10200004^Liver~" in tags["liver"]
    assert tags["vertebra"].startswith("Segmentation category and type - DICOM master list~") and \
        "SCT^51282000^Vertebra" in tags["vertebra"]
    assert _tag(s.GetSegment(segments.segment_id(6))) == _tag(slicer.vtkSegment())  # vtkSegment's default kept
    for tag in filter(None, tags.values()):  # 7 fields, each code a scheme^value^meaning triple
        fields = tag.split("~")
        assert len(fields) == 7 and all(f.count("^") == 2 for i, f in enumerate(fields) if i not in (0, 4))
    colour = [round(255 * c) for c in s.GetSegment(segments.segment_id(4)).GetColor()]
    assert colour == [221, 130, 101]  # Slicer's recommended liver colour
    path = tmp_path / "terms.seg.nrrd"
    segments.save_seg_nrrd(seg, path)
    saved = {info["name"]: info for info in slicerio.read_segmentation(str(path), skip_voxels=True)["segments"]}
    kidney = saved["R1: left kidney"]["terminology"]
    assert kidney["type"] == ["SCT", "64033007", "Kidney"] and kidney["typeModifier"] == ["SCT", "7771000", "Left"]
    lesion = saved["R2: lesion in the left kidney"]["terminology"]
    assert lesion["anatomicRegion"] == ["SCT", "64033007", "Kidney"]
    assert lesion["anatomicRegionModifier"] == ["SCT", "7771000", "Left"]
