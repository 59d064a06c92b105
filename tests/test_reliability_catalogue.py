"""A catalogue of bad inputs (issue 14), each a distinct cause, through the core and the CLI.

Every case asserts: one of our exception types (a MediRoundError subclass) whose message names the input and
the problem; the session folder byte-identical before and after (a session with one saved round is set up
first); for the CLI, a non-zero exit code and no traceback. The Slicer logic's cases are in
test_reliability_slicer.py.

Decided: a constant image is not an error. It normalises to zeros (CT window or MR percentiles) and the round
runs and is saved like any other (`test_constant_image_gives_a_result`).
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from MediRoundCore import cli
from MediRoundCore.errors import (CheckpointError, FileFormatError, MediRoundError, QueryError, RoundReferenceError,
                                  SessionError, VolumeError)
from MediRoundCore.imaging import Volume, extract_slice, load_volume, to_sitk
from MediRoundCore.session import Round, Session

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (6, 40, 48)  # (k, j, i)
SLICE = 2


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- the world: a volume file, a session with one saved round, a checkpoint ------------------------------------
def make_volume(array=None, name="good.nrrd") -> Volume:
    if array is None:
        rng = np.random.default_rng(1)
        array = rng.normal(100, 20, size=SHAPE).astype(np.float32)
        array[:, 10:30, 12:36] += 200
    return Volume(array, (0.9, 0.9, 3.0), (-20.0, 15.0, 40.0), np.eye(3), name=name)


def write_nrrd(volume: Volume, path: Path) -> Path:
    import SimpleITK as sitk

    sitk.WriteImage(to_sitk(volume), str(path), useCompression=False)
    return path


def one_round_session(folder: Path, volume: Volume) -> Path:
    s = Session(volume.fingerprint(), folder, volume.name)
    mask = np.zeros(SHAPE[1:], bool)
    mask[10:30, 12:36] = True
    s.add_round(Round(1, "axial", SLICE, "Segment the liver.", "liver: the big organ.", "liver", None, mask,
                      jcm_score=0.8, timings={"total_ms": 3.0}))
    return folder


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (temporary files included), by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@dataclass
class World:
    root: Path
    volume: Volume
    volume_path: Path
    session_dir: Path
    checkpoint: Path | None = None
    files: dict = field(default_factory=dict)

    def session(self) -> Session:
        s = Session.load(self.session_dir, self.volume.fingerprint())
        s.volume = self.volume
        return s

    def image(self, index=SLICE, view="axial", volume=None):
        return extract_slice(volume or self.volume, view, index)


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory):
    """A saved random tiny checkpoint (our format), shared read-only: cases link to its files."""
    from MediRoundCore.checkpoints.ours import save_pretrained
    from MediRoundCore.engine import Engine

    engine = Engine.random_tiny(seed=3)
    folder = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_pretrained(engine.model, folder, engine.tokenizer)
    return folder


@pytest.fixture
def world(tmp_path):
    volume = make_volume()
    path = write_nrrd(volume, tmp_path / "good.nrrd")
    volume = load_volume(path)  # the fingerprint of what the CLI will read
    return World(tmp_path, volume, path, one_round_session(tmp_path / "session", volume))


def checkpoint_variant(world: World, base: Path, replace: dict[str, bytes | None]) -> Path:
    """A checkpoint folder like `base` with some files replaced (bytes) or removed (None)."""
    folder = world.root / "ckpt"
    folder.mkdir()
    for f in base.iterdir():
        if f.name not in replace:
            os.symlink(f, folder / f.name)
    for name, payload in replace.items():
        if payload is not None:
            (folder / name).write_bytes(payload)
    return folder


class Evil:
    """Unpickling this creates a marker file: a pickle carrying code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def evil_bytes(marker: Path, torch_format: bool) -> bytes:
    import io

    import torch

    buffer = io.BytesIO()
    if torch_format:
        torch.save({"weight": torch.zeros(2), "payload": Evil(marker)}, buffer)
    else:
        pickle.dump({"payload": Evil(marker)}, buffer)
    return buffer.getvalue()


# -- bad files (prepared in the world's root) -------------------------------------------------------------------
def bad_file(world: World, kind: str) -> Path:
    root = world.root
    if kind == "missing":
        return root / "no_such_volume.nrrd"
    if kind == "empty":
        p = root / "empty.nrrd"
        p.write_bytes(b"")
        return p
    if kind == "corrupt":
        p = root / "corrupt.nrrd"
        p.write_bytes(b"NRRD0004\ntype: gibberish\ndimension: three\nsizes: a b c\n\n" + bytes(64))
        return p
    if kind == "truncated":
        data = world.volume_path.read_bytes()
        p = root / "truncated.nrrd"
        p.write_bytes(data[: len(data) - 3000])
        return p
    if kind == "text":
        p = root / "notes.nrrd"
        p.write_text("patient 12: liver lesion follow-up, see report\n")
        return p
    if kind == "png":
        from PIL import Image

        p = root / "photo.nrrd"
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(p, format="PNG")
        return p
    if kind == "4d":
        import nrrd

        p = root / "timeseries.nrrd"
        nrrd.write(str(p), np.zeros((3, 8, 8, 4), np.int16))
        return p
    if kind == "rgb":
        import SimpleITK as sitk

        p = root / "colour.nrrd"
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 8, 8, 3), np.uint8), isVector=True), str(p))
        return p
    if kind == "nan":
        array = world.volume.array.astype(np.float32).copy()
        array[SLICE, 5, 5] = np.nan
        return write_nrrd(make_volume(array), root / "with_nan.nrrd")
    if kind == "inf":
        array = world.volume.array.astype(np.float32).copy()
        array[SLICE, 7, 3] = np.inf
        return write_nrrd(make_volume(array), root / "with_inf.nrrd")
    if kind == "other":
        array = world.volume.array.copy()
        array[0, 0, 0] += 1
        return write_nrrd(make_volume(array), root / "other_volume.nrrd")
    raise AssertionError(kind)


# -- the catalogue ------------------------------------------------------------------------------------------------
@dataclass
class Case:
    id: str
    exc: type
    words: tuple[str, ...]  # each must appear in the message (case-insensitive): the input, the problem
    core: Callable | None = None  # core(world, engine) -> raises
    argv: Callable | None = None  # argv(world) -> CLI arguments after `ask`, or None
    setup: Callable | None = None  # setup(world): prepare (e.g. damage the session) before the snapshot
    checkpoint: dict | None = None  # file replacements of the base checkpoint (None: the engine as usual)


def ask(world, engine, query="Segment the liver.", image=None, reference=None):
    return engine.ask(world.session(), query, image if image is not None else world.image(), reference=reference)


def ask_argv(world, path=None, slice_=SLICE, view="axial", query="Segment the liver.", reference=None, session=None):
    argv = [str(path or world.volume_path), "--slice", str(slice_), "--view", view, "--query", query,
            "--session", str(session or world.session_dir)]
    return argv + (["--reference", str(reference)] if reference is not None else [])


def _use_volume(kind):
    """Setup: the world's volume becomes a bad file's, with its own one-round session."""
    def setup(world):
        path = bad_file(world, kind)
        world.volume, world.volume_path = load_volume(path), path
        world.session_dir = one_round_session(world.root / f"{kind}_session", world.volume)
    return setup


def _damage(name, payload):
    def setup(world):
        if payload is None:
            (world.session_dir / name).unlink()
        else:
            (world.session_dir / name).write_bytes(payload)
    return setup


def _drop_round_field(world):
    path = world.session_dir / "session.json"
    data = json.loads(path.read_text())
    del data["rounds"][0]["mask_shape"]
    path.write_text(json.dumps(data))


def _huge_image(world):
    return extract_slice(Volume(np.zeros((1, 4097, 4097), np.uint8), (1, 1, 1), (0, 0, 0), name="huge.nrrd"),
                         "axial", 0)


def _load_session(world, engine):
    return Session.load(world.session_dir, world.volume.fingerprint())


def _load_checkpoint(world, engine):
    from MediRoundCore.engine import Engine

    return Engine.load(world.checkpoint)


CASES = [
    # volumes
    Case("volume-4d-array", VolumeError, ("timeseries", "3D", "(3, 4, 8, 8)"),
         core=lambda w, e: Volume(np.zeros((3, 4, 8, 8), np.int16), (1, 1, 1), (0, 0, 0), name="timeseries")),
    Case("volume-4d-file", VolumeError, ("timeseries.nrrd", "4D"),
         core=lambda w, e: load_volume(bad_file(w, "4d")), argv=lambda w: ask_argv(w, bad_file(w, "4d"))),
    Case("volume-rgb-file", VolumeError, ("colour.nrrd", "components", "scalar"),
         core=lambda w, e: load_volume(bad_file(w, "rgb")), argv=lambda w: ask_argv(w, bad_file(w, "rgb"))),
    Case("volume-empty-array", VolumeError, ("hollow", "empty"),
         core=lambda w, e: Volume(np.zeros((0, 8, 8), np.int16), (1, 1, 1), (0, 0, 0), name="hollow")),
    Case("volume-complex-voxels", VolumeError, ("phase", "voxel type", "complex"),
         core=lambda w, e: Volume(np.zeros((2, 8, 8), np.complex64), (1, 1, 1), (0, 0, 0), name="phase")),
    Case("volume-nan-voxels", VolumeError, ("axial slice 2", "NaN"), setup=_use_volume("nan"),
         core=lambda w, e: ask(w, e), argv=lambda w: ask_argv(w)),
    Case("volume-inf-voxels", VolumeError, ("axial slice 2", "infinite"), setup=_use_volume("inf"),
         core=lambda w, e: ask(w, e), argv=lambda w: ask_argv(w)),
    Case("slice-huge", VolumeError, ("axial slice 0", "4097", "larger than"),
         core=lambda w, e: ask(w, e, image=_huge_image(w))),
    Case("slice-index-too-large", VolumeError, ("slice index 99", "axial", "out of range", "0..5"),
         core=lambda w, e: w.image(99), argv=lambda w: ask_argv(w, slice_=99)),
    Case("slice-index-negative", VolumeError, ("slice index -1", "out of range"),
         core=lambda w, e: w.image(-1), argv=lambda w: ask_argv(w, slice_=-1)),
    Case("slice-index-not-whole", VolumeError, ("slice index", "2.5", "whole number"),
         core=lambda w, e: w.image(2.5)),
    Case("view-unknown", VolumeError, ("axail", "unknown view", "axial, coronal, sagittal"),
         core=lambda w, e: w.image(view="axail")),
    # files
    Case("file-missing", FileFormatError, ("no_such_volume.nrrd", "not found"),
         core=lambda w, e: load_volume(bad_file(w, "missing")), argv=lambda w: ask_argv(w, bad_file(w, "missing"))),
    Case("file-empty", FileFormatError, ("empty.nrrd", "empty", "0 bytes"),
         core=lambda w, e: load_volume(bad_file(w, "empty")), argv=lambda w: ask_argv(w, bad_file(w, "empty"))),
    Case("file-corrupt-nrrd", FileFormatError, ("corrupt.nrrd", "cannot read", "corrupt"),
         core=lambda w, e: load_volume(bad_file(w, "corrupt")), argv=lambda w: ask_argv(w, bad_file(w, "corrupt"))),
    Case("file-truncated-nrrd", FileFormatError, ("truncated.nrrd", "truncated"),
         core=lambda w, e: load_volume(bad_file(w, "truncated")),
         argv=lambda w: ask_argv(w, bad_file(w, "truncated"))),
    Case("file-text-named-nrrd", FileFormatError, ("notes.nrrd", "not a recognised image format"),
         core=lambda w, e: load_volume(bad_file(w, "text")), argv=lambda w: ask_argv(w, bad_file(w, "text"))),
    Case("file-png-named-nrrd", VolumeError, ("photo.nrrd", "components"),
         core=lambda w, e: load_volume(bad_file(w, "png")), argv=lambda w: ask_argv(w, bad_file(w, "png"))),
    Case("session-of-another-volume", SessionError, ("session", "another volume"),
         core=lambda w, e: Session.load(w.session_dir, load_volume(bad_file(w, "other")).fingerprint()),
         argv=lambda w: ask_argv(w, bad_file(w, "other"))),
    Case("session-json-corrupt", SessionError, ("session.json", "corrupt"),
         setup=_damage("session.json", b'{"format": 1, "volume_fingerprint": "abc", "rounds": [{"numb'),
         core=_load_session, argv=lambda w: ask_argv(w)),
    Case("session-json-round-field-missing", SessionError, ("session.json", "corrupt round", "mask_shape"),
         setup=_drop_round_field, core=_load_session, argv=lambda w: ask_argv(w)),
    Case("session-json-rounds-not-a-list", SessionError, ("session.json", "corrupt", "not a list"),
         setup=lambda w: (w.session_dir / "session.json").write_text(
             json.dumps({"format": 1, "volume_fingerprint": w.volume.fingerprint(), "rounds": 7})),
         core=_load_session),
    Case("session-masks-missing", SessionError, ("masks.npz", "missing"),
         setup=_damage("masks.npz", None), core=_load_session, argv=lambda w: ask_argv(w)),
    Case("session-masks-corrupt", SessionError, ("masks.npz", "corrupt"),
         setup=_damage("masks.npz", b"PK\x03\x04 not really a zip"), core=_load_session),
    # rounds
    Case("reference-missing-round", RoundReferenceError, ("round -1", "rounds 1..1"),
         core=lambda w, e: ask(w, e, reference=-1), argv=lambda w: ask_argv(w, reference=-1)),
    Case("reference-future-round", RoundReferenceError, ("round 2", "earlier round"),
         core=lambda w, e: ask(w, e, reference=2), argv=lambda w: ask_argv(w, reference=2)),
    Case("reference-round-zero", RoundReferenceError, ("round 0", "rounds 1..1"),
         core=lambda w, e: ask(w, e, reference=0), argv=lambda w: ask_argv(w, reference=0)),
    Case("reference-not-a-number", RoundReferenceError, ("reference", "round number", "'2'"),
         core=lambda w, e: ask(w, e, reference="2")),
    Case("query-empty", QueryError, ("query", "empty"),
         core=lambda w, e: ask(w, e, query="  \n "), argv=lambda w: ask_argv(w, query="")),
    Case("query-10kB", QueryError, ("query", "10000 characters", "at most"),
         core=lambda w, e: ask(w, e, query="liver " * 1666 + "abcd"), argv=lambda w: ask_argv(w, query="x" * 10000)),
    Case("query-unprintable", QueryError, ("query", "unprintable", "U+0007"),
         core=lambda w, e: ask(w, e, query="segment the \x07liver"),
         argv=lambda w: ask_argv(w, query="segment the \x07liver")),
    Case("query-not-text", QueryError, ("query", "text", "bytes"),
         core=lambda w, e: ask(w, e, query=b"segment the liver")),
    # checkpoints (our format: config.json + model.safetensors + tokenizer)
    Case("checkpoint-folder-missing", CheckpointError, ("no_checkpoint_here", "not found"),
         core=lambda w, e: _load_checkpoint(World(w.root, w.volume, w.volume_path, w.session_dir,
                                                  w.root / "no_checkpoint_here"), e),
         argv=lambda w: ask_argv(w) + ["--checkpoint", str(w.root / "no_checkpoint_here")]),
    Case("checkpoint-wrong-size", CheckpointError, ("model.safetensors", "shape mismatch", "'box_encoder.weight'"),
         checkpoint={"model.safetensors": "wrong-size"}, core=_load_checkpoint,
         argv=lambda w: ask_argv(w) + ["--checkpoint", str(w.checkpoint)]),
    Case("checkpoint-config-missing-fields", CheckpointError, ("config.json", "missing field", "segmenter"),
         checkpoint={"config.json": "missing-fields"}, core=_load_checkpoint,
         argv=lambda w: ask_argv(w) + ["--checkpoint", str(w.checkpoint)]),
    Case("checkpoint-config-not-json", CheckpointError, ("config.json", "not valid JSON"),
         checkpoint={"config.json": b"size: tiny\ntext: {hidden: 64}\n"}, core=_load_checkpoint,
         argv=lambda w: ask_argv(w) + ["--checkpoint", str(w.checkpoint)]),
    Case("checkpoint-weights-missing", CheckpointError, ("model.safetensors", "not found"),
         checkpoint={"model.safetensors": None}, core=_load_checkpoint,
         argv=lambda w: ask_argv(w) + ["--checkpoint", str(w.checkpoint)]),
    Case("checkpoint-weights-truncated", CheckpointError, ("model.safetensors", "not a readable safetensors"),
         checkpoint={"model.safetensors": "truncated"}, core=_load_checkpoint),
    Case("checkpoint-pickle-with-code", CheckpointError, ("model.safetensors", "not a readable safetensors"),
         checkpoint={"model.safetensors": "evil"}, core=_load_checkpoint,
         argv=lambda w: ask_argv(w) + ["--checkpoint", str(w.checkpoint)]),
]
assert len({c.id for c in CASES}) == len(CASES) >= 25


def prepare_checkpoint(world: World, base: Path, spec: dict) -> None:
    from safetensors.torch import load_file, save_file

    replace = {}
    for name, what in spec.items():
        if what is None or isinstance(what, bytes):
            replace[name] = what
        elif what == "wrong-size":  # one tensor of another width, as from a differently sized model
            state = load_file(str(base / name))
            state["box_encoder.weight"] = state["box_encoder.weight"][:-1].clone()
            path = world.root / "wrong.safetensors"
            save_file(state, str(path))
            replace[name] = path.read_bytes()
        elif what == "missing-fields":
            config = json.loads((base / name).read_text())
            del config["segmenter"]
            replace[name] = json.dumps(config).encode()
        elif what == "truncated":
            replace[name] = (base / name).read_bytes()[:100_000]
        elif what == "evil":
            replace[name] = evil_bytes(world.root / "MARKER", torch_format=True)
    world.checkpoint = checkpoint_variant(world, base, replace)


def check_message(exc: BaseException, words) -> None:
    text = str(exc).lower()
    missing = [w for w in words if w.lower() not in text]
    assert not missing, f"message {str(exc)!r} lacks {missing}"


@pytest.fixture
def case_world(request, world, base_checkpoint):
    case: Case = request.param
    if case.checkpoint is not None:
        prepare_checkpoint(world, base_checkpoint, case.checkpoint)
    if case.setup is not None:
        case.setup(world)
    return case, world


@pytest.mark.parametrize("case_world", [c for c in CASES if c.core], ids=[c.id for c in CASES if c.core],
                         indirect=True)
def test_core_refuses_bad_input(case_world, tiny_engine):
    case, world = case_world
    before = snapshot(world.session_dir)
    with pytest.raises(MediRoundError) as info:
        case.core(world, tiny_engine)
    assert isinstance(info.value, case.exc), f"{type(info.value).__name__}: {info.value}"
    check_message(info.value, case.words)
    assert snapshot(world.session_dir) == before
    assert not (world.root / "MARKER").exists()


def run_cli(argv, capsys) -> tuple[int, str, str]:
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("case_world", [c for c in CASES if c.argv], ids=[c.id for c in CASES if c.argv],
                         indirect=True)
def test_cli_refuses_bad_input(case_world, tiny_engine, capsys, monkeypatch):
    case, world = case_world
    if case.checkpoint is None and "checkpoint" not in case.id:  # no need to build a model per case
        monkeypatch.setattr(cli, "load_engine", lambda *args, **kwargs: tiny_engine)
    argv = ["ask"] + case.argv(world)
    before = snapshot(world.session_dir)
    code, out, err = run_cli(argv, capsys)
    assert code not in (0, None), out + err
    assert "Traceback" not in out + err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    check_message(Exception(lines[0]), case.words)
    assert snapshot(world.session_dir) == before
    assert not (world.root / "MARKER").exists()


def test_cli_wrong_view_name(world, capsys):
    """argparse refuses a view it does not know: usage line, exit 2, no traceback."""
    before = snapshot(world.session_dir)
    code, out, err = run_cli(["ask"] + ask_argv(world, view="axail"), capsys)
    assert code == 2 and "Traceback" not in out + err
    assert "axail" in err and "invalid choice" in err
    assert snapshot(world.session_dir) == before


# Only the last one imports torch (the slow part of a run); the rest fail before a model is needed.
SUBPROCESS_CASES = ["file-missing", "file-truncated-nrrd", "volume-4d-file", "session-of-another-volume",
                    "session-json-corrupt", "checkpoint-pickle-with-code"]


def test_cli_subprocess(tmp_path, base_checkpoint):
    """The installed `mediround` script, as a user runs it: one line, non-zero exit, no traceback. The runs go
    in parallel (most never import torch)."""
    script = ROOT / ".venv" / "bin" / "mediround"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "MediRoundCore.cli"]
    by_id = {c.id: c for c in CASES}
    runs = []
    for i, case_id in enumerate(SUBPROCESS_CASES):
        case = by_id[case_id]
        root = tmp_path / f"case{i}"
        root.mkdir()
        volume = make_volume()
        path = write_nrrd(volume, root / "good.nrrd")
        volume = load_volume(path)
        world = World(root, volume, path, one_round_session(root / "session", volume))
        if case.checkpoint is not None:
            prepare_checkpoint(world, base_checkpoint, case.checkpoint)
        if case.setup is not None:
            case.setup(world)
        argv = case.argv(world) + (["--random"] if case.checkpoint is None else [])
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        proc = subprocess.Popen(command + ["ask"] + argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env, cwd=root)
        runs.append((case, world, snapshot(world.session_dir), proc))
    for case, world, before, proc in runs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode not in (0, None), (case.id, out, err)
        assert "Traceback" not in out + err, (case.id, err)
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1, (case.id, err)
        check_message(Exception(lines[0]), case.words)
        assert snapshot(world.session_dir) == before, case.id
        assert not (world.root / "MARKER").exists()


# -- the decided case: a constant image works -------------------------------------------------------------------
def test_constant_image_gives_a_result(world, tiny_engine, capsys, monkeypatch):
    """A constant slice (a blank scan, a padding slice) is not an error: it normalises to zeros, the round
    runs, and is saved like any other."""
    from MediRoundCore.imaging import normalize_intensity

    for modality in ("CT", "MR", "normalized"):
        out = normalize_intensity(np.full((5, 7), 1234, np.int16), modality)
        assert out.shape == (5, 7) and np.all(np.isfinite(out)) and out.min() >= 0 and out.max() <= 1
    constant = make_volume(np.full(SHAPE, 50, np.int16), name="blank.nrrd")
    session = world.session()
    result = tiny_engine.ask(session, "Segment the liver.", extract_slice(constant, "axial", 1))
    assert result.mask.shape == SHAPE[1:] and result.mask.dtype == bool
    assert len(Session.load(world.session_dir).rounds) == 2
    # and through the CLI, on a new session
    path = write_nrrd(constant, world.root / "blank.nrrd")
    monkeypatch.setattr(cli, "load_engine", lambda *args, **kwargs: tiny_engine)
    code, out, err = run_cli(["ask"] + ask_argv(world, path, session=world.root / "blank_session"), capsys)
    assert code == 0, err
    assert len(Session.load(world.root / "blank_session").rounds) == 1


def test_pickle_with_code_is_refused_everywhere(tmp_path):
    """Both pickle flavours (a plain pickle and torch.save's zip), through every .pth loader: refused with
    CheckpointError, and the code never runs."""
    from MediRoundCore.checkpoints.medsam import load_medsam
    from MediRoundCore.checkpoints.safety import load_tensors

    marker = tmp_path / "MARKER"
    for torch_format in (False, True):
        path = tmp_path / f"evil_{int(torch_format)}.pth"
        path.write_bytes(evil_bytes(marker, torch_format))
        with pytest.raises(CheckpointError, match="refused") as info:
            load_tensors(path)
        assert path.name in str(info.value) and "weights_only" not in str(info.value)
        with pytest.raises(CheckpointError, match="refused"):
            load_medsam(path, model=None)
        assert not marker.exists()
    # the marker mechanism itself works (so its absence above means something)
    pickle.loads(evil_bytes(marker, False))
    assert marker.exists()
