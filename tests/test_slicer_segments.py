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
