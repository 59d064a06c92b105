"""CLI: the demo writes a .seg.nrrd Slicer can read (geometry of the volume), overlays and a session; ask appends."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import slicerio

from MediRoundCore.cli import BUNDLED, main
from MediRoundCore.imaging import load_volume
from MediRoundCore.session import Session


def test_demo_outputs(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--random"]) == 0
    text = capsys.readouterr().out
    assert "UNTRAINED" in text and "Dice" in text
    seg = slicerio.read_segmentation(str(out / "mediround_demo.seg.nrrd"))
    volume = load_volume(BUNDLED / "demo_abdomen.nrrd")
    names = [s["name"] for s in seg["segments"]]
    assert names[0].startswith("R1: ") and len(names) == 4
    np.testing.assert_allclose(seg["ijkToLPS"], volume.ijk_to_lps(), atol=1e-6)
    session = Session.load(out / "session", expected_fingerprint=volume.fingerprint())
    assert [r.reference for r in session.rounds] == [None, 1, 2, 1]
    for r in session.rounds:
        assert (out / f"round_{r.number:02d}.png").stat().st_size > 5000
        voxels = slicerio.extract_segments(seg, [(f"R{r.number}: {r.entity or 'segment'}", 1)])["voxels"]
        assert voxels.shape == volume.array.shape[::-1]
        # every voxel of the segment lies in the round's slice (k index in IJK order)
        ks = np.nonzero(voxels)[2]
        assert set(ks.tolist()) <= {r.slice_index}
        assert int(voxels.sum()) == int(r.mask.sum())


def test_ask_appends_to_session_and_errors_are_one_line(tmp_path):
    volume = str(BUNDLED / "demo_abdomen.nrrd")
    session = tmp_path / "s"
    cmd = [sys.executable, "-m", "MediRoundCore.cli", "ask", volume, "--slice", "12", "--session", str(session),
           "--query", "Segment the liver.", "--random"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "round 1:" in done.stdout
    bad = subprocess.run(cmd[:6] + ["99"] + cmd[7:], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr + bad.stdout
    assert "slice index 99 is out of range" in bad.stderr
    assert len(Session.load(session).rounds) == 1


def test_overlay_captions_wrap_inside_the_figure():
    from MediRoundCore.segio import wrap_caption

    query = "Now segment the organ that removes old red blood cells on the same side as it."
    caption = wrap_caption(f"Round 4 (axial slice 12): {query}\nspleen: the spleen filters blood.")
    lines = caption.split("\n")
    assert len(lines) == 3 and max(map(len, lines)) <= 60
    assert " ".join(lines[:2]) == f"Round 4 (axial slice 12): {query}" and lines[2] == "spleen: the spleen filters blood."


def test_slice_range_boundary_on_the_24_slice_demo(tmp_path, capsys):
    """The last slice (23) is asked; one past it (24) gets the range message, not an internal error; every view
    checks its own number of slices at both ends."""
    from MediRoundCore.errors import VolumeError
    from MediRoundCore.imaging import extract_slice

    volume = str(BUNDLED / "demo_abdomen.nrrd")
    ask = ["ask", volume, "--session", str(tmp_path / "s"), "--query", "Segment the liver.", "--random"]
    assert main(ask + ["--slice", "24"]) == 2
    err = capsys.readouterr().err
    assert "slice index 24 is out of range for the axial view (0..23)" in err and "internal error" not in err
    assert main(ask + ["--slice", "23"]) == 0
    assert "round 1:" in capsys.readouterr().out
    demo = load_volume(BUNDLED / "demo_abdomen.nrrd")
    for view, n in (("axial", 24), ("coronal", 256), ("sagittal", 256)):
        assert demo.num_slices(view) == n
        assert extract_slice(demo, view, n - 1).index == n - 1 and extract_slice(demo, view, 0).index == 0
        for bad in (n, -1):
            with pytest.raises(VolumeError, match=f"slice index {bad} is out of range for the {view} view \\(0..{n - 1}\\)"):
                extract_slice(demo, view, bad)
