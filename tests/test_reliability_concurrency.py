"""Two writers on one session (issue 24): real processes append to one session folder at the same time and no
round they report is lost; a second writer waits, or (when it may not wait) gets "session in use by …" naming
the holder; a killed holder never blocks the next writer; the Slicer logic and the CLI on one folder never
lose a round either (the Slicer's save refuses a session changed under it).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from MediRoundCore.errors import SessionBusyError, SessionError
from MediRoundCore.session import Round, Session

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")

# A writer as the CLI's `ask` is one: lock, load, "think" (the model), add, commit; it prints a round's number
# only after commit() returned.
WRITER = textwrap.dedent(r'''
    import os, sys, time
    import numpy as np
    from MediRoundCore.session import Round, Session

    folder, tag, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    for k in range(count):
        with Session.writing(folder, "fp", wait=120, command=f"writer {tag}") as s:
            n = len(s.rounds) + 1
            time.sleep(0.01)  # the model's turn: another writer that did not wait would now lose a round
            mask = np.zeros((8, 8), bool)
            mask[n % 8] = True
            s.add_round(Round(n, "axial", 0, f"{tag}-{k}", "answer", "entity", None, mask))
            s.commit()
        print(n, f"{tag}-{k}", flush=True)
''')

HOLDER = textwrap.dedent(r'''
    import sys, time
    from MediRoundCore.session import Session

    with Session.writing(sys.argv[1], "fp", command="the holder") as s:
        print("holding", flush=True)
        time.sleep(float(sys.argv[2]))
''')


def _start(script: Path, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(script), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, encoding="utf-8", errors="replace", env=ENV)


def test_concurrent_writers_lose_no_round(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    folder = tmp_path / "session"
    procs = [_start(script, folder, f"w{i}", 6) for i in range(4)]
    reported = {}
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        for line in out.splitlines():
            number, tag = line.split()
            assert number not in reported, (number, tag, reported[number])  # no round number given twice
            reported[number] = tag
    session = Session.load(folder, "fp")
    assert len(reported) == 24
    assert [r.number for r in session.rounds] == list(range(1, 25))
    assert {str(r.number): r.query for r in session.rounds} == reported
    assert sorted(p.name for p in folder.iterdir()) == ["masks.npz", "session.json"]


def test_second_writer_is_told_who_holds_the_session(tmp_path):
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    folder = tmp_path / "session"
    Session("fp", folder).save()
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    holder = _start(script, folder, 30)
    try:
        assert holder.stdout.readline().strip() == "holding"
        t = time.monotonic()
        with pytest.raises(SessionBusyError) as info:
            with Session.writing(folder, "fp", wait=0.5):
                pass
        assert 0.5 <= time.monotonic() - t < 5
        message = str(info.value)
        assert "session in use by process" in message and str(holder.pid) in message and "the holder" in message
        assert "wait for it to finish" in message
    finally:
        holder.kill()  # kill -9: the kernel drops its lock
        holder.communicate(timeout=30)
    # the killed holder blocks nobody, and its holder note is gone after the next open
    with Session.writing(folder, "fp", wait=0) as s:
        assert s.rounds == []
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_killed_writers_never_block_or_lose_rounds(tmp_path):
    """kill -9 at random moments among four concurrent writers: every round a writer reported is on disk, the
    next writer proceeds at once, and the next open leaves no stray file."""
    import random

    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    folder = tmp_path / "session"
    rng = random.Random(24)
    reported = set()
    for trial in range(3):
        procs = [_start(script, folder, f"t{trial}w{i}", 50) for i in range(3)]
        time.sleep(1.0 + rng.uniform(0, 1.0))
        for proc in procs:
            proc.send_signal(signal.SIGKILL)
            time.sleep(rng.uniform(0, 0.05))
        for proc in procs:
            out, _ = proc.communicate(timeout=30)
            reported |= {line.split()[1] for line in out.splitlines() if line.strip()}
        session = Session.load(folder, "fp")
        on_disk = {r.query for r in session.rounds}
        assert reported <= on_disk, reported - on_disk
        assert len(on_disk) <= len(reported) + 3  # at most one round in flight per killed writer
        assert [r.number for r in session.rounds] == list(range(1, len(session.rounds) + 1))
        assert sorted(p.name for p in folder.iterdir()) == ["masks.npz", "session.json"]
    assert len(reported) > 3


def test_stale_session_object_refuses_to_overwrite(tmp_path):
    """A long-lived session (the Slicer module, `chat`) whose folder another program wrote meanwhile refuses
    to save over it; both rounds the other program committed stay."""
    folder = tmp_path / "session"
    mask = np.ones((4, 4), bool)
    mine = Session("fp", folder)
    mine.add_round(Round(1, "axial", 0, "mine 1", "a", "e", None, mask))
    with Session.writing(folder, "fp") as other:
        other.add_round(Round(2, "axial", 0, "other 2", "a", "e", None, mask))
        other.commit()
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(SessionError, match="changed by another program.*open the session again"):
        mine.add_round(Round(2, "axial", 0, "mine 2", "a", "e", None, mask))
    assert [r.query for r in mine.rounds] == ["mine 1"]
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert [r.query for r in Session.load(folder).rounds] == ["mine 1", "other 2"]


def _cli_command():
    script = ROOT / ".venv" / "bin" / "mediround"
    return [str(script)] if script.exists() else [sys.executable, "-m", "MediRoundCore.cli"]


def test_concurrent_cli_asks_lose_no_round(tmp_path):
    """`mediround ask` × 4 at once on one session (the installed command, real model code): every process that
    reports its round finds it in the session, with distinct numbers."""
    import SimpleITK as sitk

    array = np.random.default_rng(0).normal(100, 20, (4, 24, 24)).astype(np.float32)
    sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / "v.nrrd"))
    folder = tmp_path / "session"
    procs = [subprocess.Popen(_cli_command() + ["ask", str(tmp_path / "v.nrrd"), "--slice", "1", "--random",
                                                "--query", f"Segment organ {i}.", "--session", str(folder),
                                                "--wait", "300"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8", errors="replace", env=ENV, cwd=tmp_path)
             for i in range(4)]
    numbers = {}
    for i, proc in enumerate(procs):
        out, err = proc.communicate(timeout=400)
        assert proc.returncode == 0, err
        line = next(line for line in out.splitlines() if line.startswith("round "))
        numbers[int(line.split()[1].rstrip(":"))] = f"Segment organ {i}."
    session = Session.load(folder)
    assert sorted(numbers) == [1, 2, 3, 4]
    assert {r.number: r.query for r in session.rounds} == numbers


def _slicer_session_with_one_round(tmp_path):
    """The Slicer logic (real MRML, threshold stand-in engine) on a phantom volume, after one autosaved round."""
    slicer = pytest.importorskip("slicer")
    sys.path[:0] = [str(ROOT / "MediRoundSlicer")]
    import MediRound
    from MediRoundLib import geometry
    from MediRoundLib.testing import ThresholdEngine, add_slice_node, add_volume, show_plane

    array = np.full((6, 20, 16), -1000.0, np.float32)
    array[1:5, 4:15, 3:12] = 100
    scene = slicer.vtkMRMLScene()
    node = add_volume(scene, array, (0.8, 1.1, 2.5), (10.0, -20.0, 33.0), np.eye(3), name="phantom")
    red = add_slice_node(scene, "Red")
    logic = MediRound.MediRoundLogic(scene=scene, sessions_dir=tmp_path / "sessions",
                                     engine_factory=lambda checkpoint: ThresholdEngine(0))
    logic.set_volume(node)
    show_plane(red, "axial", (geometry.ijk_to_ras_matrix(node) @ np.r_[7, 9, 2, 1.0])[:3])
    logic.engine = ThresholdEngine(0)
    logic.ask("Segment the liver.")
    return logic, node


def test_slicer_and_cli_on_one_session(tmp_path, tiny_engine):
    """The Slicer logic autosaves a round; a CLI process then adds one to the same folder; the Slicer's next
    Ask is refused with a clear message (nothing overwritten), and reopening the volume restores both."""
    logic, node = _slicer_session_with_one_round(tmp_path)
    folder = logic.session.folder
    # the CLI needs the volume as a file with the same voxels and geometry (fingerprint)
    from MediRoundCore.imaging import to_sitk
    import SimpleITK as sitk

    path = tmp_path / "phantom.nrrd"
    sitk.WriteImage(to_sitk(logic.volume), str(path))
    proc = subprocess.run(_cli_command() + ["ask", str(path), "--slice", "2", "--random", "--query",
                                            "Segment the spleen.", "--session", str(folder)],
                          capture_output=True, text=True, encoding="utf-8", errors="replace", env=ENV, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(SessionError, match="changed by another program"):
        logic.ask("Segment the kidney.")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    logic.set_volume(node, restore=True)
    assert [r.query for r in logic.session.rounds] == ["Segment the liver.", "Segment the spleen."]
    assert json.loads((folder / "session.json").read_text())["rounds"][1]["query"] == "Segment the spleen."


def test_slicer_new_session_waits_for_no_writer(tmp_path):
    """The Slicer's "New session" renames the saved session aside; while another program (a real process) holds
    that session, it is refused naming the holder, and the folder stays where and as it was."""
    logic, node = _slicer_session_with_one_round(tmp_path)
    folder = logic.session.folder
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    script = tmp_path / "holder.py"
    script.write_text(HOLDER.replace('"fp"', repr(logic.session.volume_fingerprint)))
    holder = _start(script, folder, 30)
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(SessionBusyError, match=f"session in use by process {holder.pid}"):
            logic.new_session()
        assert logic.segmentation_node.GetName() == "MediRound: phantom"  # the scene is left as it was too
        assert folder.is_dir() and [p.name for p in folder.parent.iterdir()] == [folder.name]
        assert {p.name: p.read_bytes() for p in folder.iterdir() if p.name != ".mediround-writer"} == before
    finally:
        holder.kill()
        holder.communicate(timeout=30)
    logic.new_session()  # the writer is gone: the saved session is renamed aside, a new one starts
    archived = [p for p in folder.parent.iterdir() if p.name.startswith(folder.name + "-")]
    assert logic.session.rounds == [] and len(archived) == 1
    assert {p.name: p.read_bytes() for p in archived[0].iterdir() if p.name != ".mediround-writer"} == before
