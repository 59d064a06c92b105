"""Catalogue II, a failed command changes nothing (issue 24). Each case sets up a session with one saved round,
makes one thing fail (an output that cannot be written, a read-only or full session folder, a closed stdout, an
interrupt, a session path that is a file…), and asserts: one "error:" line naming the cause, a non-zero exit,
no traceback, the session folder byte-identical (and no output left half-written); then the same command with
the cause removed adds exactly one round (a retry never duplicates). Process-level causes run the real command
in a subprocess (read-only folders without root's override via setpriv, a full disk via RLIMIT_FSIZE, a closed
pipe, SIGINT).
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from MediRoundCore import cli
from MediRoundCore.session import Session
from test_reliability_catalogue import World, check_message, make_volume, one_round_session, run_cli, snapshot, \
    write_nrrd

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def unprivileged() -> list[str]:
    """A command prefix without root's permission override (so a read-only folder is read-only)."""
    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: read-only folders cannot be tested")
    return ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--"]


@pytest.fixture
def world(tmp_path):
    from MediRoundCore.imaging import load_volume

    path = write_nrrd(make_volume(), tmp_path / "good.nrrd")
    volume = load_volume(path)
    return World(tmp_path, volume, path, one_round_session(tmp_path / "session", volume))


def ask_args(world, *extra, session=None):
    return ["ask", str(world.volume_path), "--slice", "2", "--query", "Segment the liver.",
            "--session", str(session or world.session_dir), *extra]


def everything(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` (folders as None), to show nothing appeared, vanished or changed."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def rounds(folder: Path) -> list[str]:
    return [r.query for r in Session.load(folder).rounds]


# -- in-process cases: the real CLI code, the random tiny engine ------------------------------------------------
@dataclass
class CommandCase:
    id: str
    setup: Callable  # setup(world) -> extra ask arguments (the failing command)
    words: tuple[str, ...]
    fix: Callable  # fix(world) -> the arguments that succeed afterwards
    session: Callable | None = None  # session(world) -> the session folder the command uses


def _out_file(w):
    (w.root / "out.txt").write_text("my notes")
    return ["--out", str(w.root / "out.txt")]


def _out_blocked(w):
    (w.root / "out" / "segments.seg.nrrd").mkdir(parents=True)
    (w.root / "out" / "segments.seg.nrrd" / "keep.txt").write_text("mine")
    return ["--out", str(w.root / "out")]


def _unblock(w):
    shutil.rmtree(w.root / "out" / "segments.seg.nrrd")
    return ["--out", str(w.root / "out")]


def _session_is_file(w):
    (w.root / "notes.txt").write_text("not a session")
    return []


def _session_json_is_folder(w):
    (w.root / "odd").mkdir()
    (w.root / "odd" / "session.json").mkdir()
    return []


def _reference_in_new_folder(w):
    return ["--reference", "5"]


COMMAND_CASES = [
    CommandCase("out-is-a-file", _out_file, ("out.txt", "is a file", "--out needs a folder"),
                fix=lambda w: ["--out", str(w.root / "out")]),
    CommandCase("out-target-is-a-folder", _out_blocked, ("segments.seg.nrrd", "a folder is in the way"), fix=_unblock),
    CommandCase("session-is-a-file", _session_is_file, ("notes.txt", "is a file, not a session folder"),
                fix=lambda w: [], session=lambda w: w.root / "notes.txt"),
    CommandCase("session-json-is-a-folder", _session_json_is_folder,
                ("odd/session.json", "not a regular file"), fix=lambda w: [], session=lambda w: w.root / "odd"),
    CommandCase("failure-in-a-new-session-folder", _reference_in_new_folder, ("round 5",), fix=lambda w: [],
                session=lambda w: w.root / "new" / "deep" / "session"),
]


@pytest.mark.parametrize("case", COMMAND_CASES, ids=[c.id for c in COMMAND_CASES])
def test_failed_command_changes_nothing(case, world, tiny_engine, capsys, monkeypatch):
    monkeypatch.setattr(cli, "load_engine", lambda *a, **k: tiny_engine)
    extra = case.setup(world)
    folder = case.session(world) if case.session else world.session_dir
    before = everything(world.root)
    code, out, err = run_cli(ask_args(world, *extra, session=folder), capsys)
    assert code == 2 and "Traceback" not in out + err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    check_message(Exception(lines[0]), case.words)
    assert everything(world.root) == before  # session, outputs, new folders: nothing changed
    if case.session is None:  # the same command, its cause removed: exactly one more round
        code, out, err = run_cli(ask_args(world, *case.fix(world)), capsys)
        assert code == 0, err
        assert rounds(world.session_dir) == ["Segment the liver."] * 2


def test_outputs_come_with_the_round(world, tiny_engine, capsys, monkeypatch):
    """With --out the seg.nrrd and overlays appear next to a committed round, and no staging folder is left."""
    monkeypatch.setattr(cli, "load_engine", lambda *a, **k: tiny_engine)
    code, out, err = run_cli(ask_args(world, "--out", str(world.root / "out")), capsys)
    assert code == 0, err
    assert sorted(p.name for p in (world.root / "out").iterdir()) == ["round_01.png", "round_02.png",
                                                                     "segments.seg.nrrd"]
    assert len(rounds(world.session_dir)) == 2


def test_demo_never_deletes_an_existing_session(tmp_path, tiny_engine, capsys, monkeypatch):
    monkeypatch.setattr(cli, "load_engine", lambda *a, **k: tiny_engine)
    volume = make_volume()
    one_round_session(tmp_path / "out" / "session", volume)
    before = everything(tmp_path)
    code, out, err = run_cli(["demo", "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "Traceback" not in err
    check_message(Exception(err), ("out/session", "already exists", "--overwrite"))
    assert everything(tmp_path) == before
    code, out, err = run_cli(["demo", "--out", str(tmp_path / "out"), "--overwrite"], capsys)
    assert code == 0, err
    assert len(Session.load(tmp_path / "out" / "session").rounds) == 4  # the demo's four rounds replaced it
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")) == []


def test_demo_that_fails_leaves_no_output(tmp_path, capsys, monkeypatch):
    """A demo stopped by an error half-way (here the model cannot be built) writes nothing into --out."""
    from MediRoundCore.errors import CheckpointError

    def broken(*args, **kwargs):
        raise CheckpointError("model.safetensors: not found")

    monkeypatch.setattr(cli, "load_engine", broken)
    code, out, err = run_cli(["demo", "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "model.safetensors" in err
    assert not (tmp_path / "out").exists()


def test_session_files_respect_the_umask(world, tiny_engine, capsys, monkeypatch):
    monkeypatch.setattr(cli, "load_engine", lambda *a, **k: tiny_engine)
    old = os.umask(0o027)
    try:
        code, out, err = run_cli(ask_args(world, session=world.root / "fresh"), capsys)
    finally:
        os.umask(old)
    assert code == 0, err
    assert (world.root / "fresh").stat().st_mode & 0o777 == 0o750
    for name in ("session.json", "masks.npz"):
        assert (world.root / "fresh" / name).stat().st_mode & 0o777 == 0o640


# -- process-level causes: the real command in a subprocess ----------------------------------------------------
def run_ask(world, *extra, prefix=(), preexec=None, stdout=subprocess.PIPE, timeout=300, random=True):
    command = list(prefix) + [sys.executable, "-m", "MediRoundCore.cli"] + ask_args(world, *extra) \
        + (["--random"] if random else [])
    proc = subprocess.Popen(command, stdout=stdout, stderr=subprocess.PIPE, text=True, encoding="utf-8", errors="replace", env=ENV, cwd=world.root,
                            preexec_fn=preexec)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out or "", err


def assert_one_error(code, out, err, words):
    assert code == 2 and "Traceback" not in out + err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    check_message(Exception(lines[0]), words)


def test_read_only_session_folder(world):
    before = everything(world.root)
    world.session_dir.chmod(0o555)
    try:
        code, out, err = run_ask(world, prefix=unprivileged())
    finally:
        world.session_dir.chmod(0o755)
    assert_one_error(code, out, err, ("session", "not writable", "Permission denied"))
    assert everything(world.root) == before


def test_read_only_output_folder(world):
    (world.root / "out").mkdir()
    before = everything(world.root)
    (world.root / "out").chmod(0o555)
    try:
        code, out, err = run_ask(world, "--out", str(world.root / "out"), prefix=unprivileged())
    finally:
        (world.root / "out").chmod(0o755)
    assert_one_error(code, out, err, ("out", "not writable", "choose another --out"))
    assert everything(world.root) == before


def test_full_disk_while_saving(world):
    """The file-size limit (RLIMIT_FSIZE, as a full disk: the write fails part-way) stops the session's save: the
    folder keeps its bytes (no masks.npz ahead of session.json), and the retry adds one round."""
    before = everything(world.root)
    limit = (world.session_dir / "session.json").stat().st_size + 200  # the next session.json will not fit

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    code, out, err = run_ask(world, preexec=small_disk)
    assert_one_error(code, out, err, ("session", "no space", "not changed"))
    assert everything(world.root) == before
    code, out, err = run_ask(world)
    assert code == 0, err
    assert rounds(world.session_dir) == ["Segment the liver."] * 2


def test_closed_stdout(world):
    """stdout is a pipe whose reader has gone: the round is computed (the shipped model, which prints nothing
    before its report) but not committed, as its report could not be given; the retry adds one round."""
    before = everything(world.root)
    read, write = os.pipe()
    os.close(read)
    try:
        code, out, err = run_ask(world, stdout=write, random=False)
    finally:
        os.close(write)
    assert_one_error(code, out, err, ("standard output is closed", "nothing was saved"))
    assert everything(world.root) == before
    code, out, err = run_ask(world)
    assert code == 0 and "round 2:" in out, err
    assert rounds(world.session_dir) == ["Segment the liver."] * 2


def _handler_line() -> int:
    """The line of cli.py that installs its early SIGINT handler."""
    lines = (ROOT / "MediRoundCore" / "cli.py").read_text().splitlines()
    return next(i for i, line in enumerate(lines, start=1) if "_signal.signal(_signal.SIGINT, _interrupted_early)" in line)


def _before_our_code(err: str) -> bool:
    """A traceback wholly inside the interpreter's start-up (site, runpy, importlib compiling the module to run),
    or in cli.py's own first lines before its handler is installed (`import _signal`, `import sys`): no program
    code can catch a signal there."""
    if "Fatal Python error: init_import_site" in err:  # the interpreter's `site` import
        return True
    frames = [line for line in err.splitlines() if line.strip().startswith("File ")]
    startup = ('"<frozen ', '"<string>"')  # importlib, runpy, site and the .pth lines site runs
    ours = [line for line in frames if "MediRoundCore" in line]
    if len(ours) == 1 and "cli.py" in ours[0]:
        line_number = int(ours[0].split("line ")[1].split(",")[0])
        return line_number < _handler_line() and "KeyboardInterrupt" in err
    return bool(frames) and all(any(s in line for s in startup) for line in frames) and "KeyboardInterrupt" in err


def test_ctrl_c_at_any_instant(world):
    """SIGINT at instants from the start to the end of an `ask`: one "interrupted" line, exit 130, no traceback;
    the session keeps its round, or also has the new one complete if the commit came first; no stray files
    after the next open. (Modules are precompiled, as a pip install does; a signal that lands while the
    interpreter itself starts, before MediRound's first line, is Python's and is only counted.)"""
    import compileall

    compileall.compile_dir(str(ROOT / "MediRoundCore"), quiet=1)
    env = {k: v for k, v in ENV.items() if k != "PYTHONDONTWRITEBYTECODE"}
    base = everything(world.root)
    delays = [0.02, 0.035, 0.05, 0.07, 0.1, 0.15, 0.2, 0.4, 0.8, 1.2, 1.8, 2.5, 3.5, 5.0]
    outcomes = []
    for delay in delays:
        command = [sys.executable, "-m", "MediRoundCore.cli"] + ask_args(world) + ["--random"]
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8",
                                errors="replace", env=env, cwd=world.root,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=300)
        if proc.returncode == 0:  # finished before the signal
            outcomes.append("done")
        elif _before_our_code(err) or (proc.returncode == -signal.SIGINT and not err):
            assert delay <= 0.2, (delay, err)  # only at the very start
            outcomes.append("interpreter start-up")
        else:
            assert "Traceback" not in out + err, (delay, err)
            assert proc.returncode == 130 and err.strip().splitlines()[-1] == "interrupted", (delay, proc.returncode,
                                                                                              err)
            assert len(err.strip().splitlines()) <= 2, err  # at most the untrained-model note and "interrupted"
            outcomes.append("interrupted")
        queries = rounds(world.session_dir)
        assert queries == ["Segment the liver."] * len(queries) and len(queries) >= 1
        leftovers = sorted(p.name for p in world.session_dir.iterdir())
        assert leftovers == ["masks.npz", "session.json"], leftovers
        if queries == ["Segment the liver."]:
            assert everything(world.root) == base
    assert outcomes.count("interrupted") >= 8, outcomes


def test_killed_command_leaves_no_stray_files(world):
    """kill -9 while `ask --out` runs (its outputs staged, the lock held): the next `ask` proceeds at once,
    removes the killed command's staging folder and temporary files, and adds its round once."""
    out = world.root / "out"
    command = [sys.executable, "-m", "MediRoundCore.cli"] + ask_args(world, "--out", str(out)) + ["--random"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, cwd=world.root)
    deadline = time.monotonic() + 120
    while not list(out.glob(".mediround-out.*")) and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert list(out.glob(".mediround-out.*")), "the kill should have landed while outputs were staged"
    code, stdout, err = run_ask(world, "--out", str(out), "--wait", "0")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["round_01.png", "round_02.png", "segments.seg.nrrd"]
    assert sorted(p.name for p in world.session_dir.iterdir()) == ["masks.npz", "session.json"]
    assert rounds(world.session_dir) == ["Segment the liver."] * 2
