"""Catalogue II, messages and validation (issue 24): every case that used to end in "internal error: <Type>" is a
message a user can act on, through the core (exception type, words) and the CLI (one "error:" line or argparse's
usage error, exit 2, no traceback, the session byte-identical). Also what must be accepted: ordinary Persian,
Hindi and emoji text in queries.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from MediRoundCore import cli
from MediRoundCore.errors import (CheckpointError, DeviceError, MediRoundError, OptionError, QueryError,
                                  SessionError)
from MediRoundCore.session import Session
from test_reliability_catalogue import (Evil, World, base_checkpoint, check_message, checkpoint_variant,  # noqa: F401
                                        make_volume, one_round_session, run_cli, snapshot, write_nrrd)

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def world(tmp_path):
    from MediRoundCore.imaging import load_volume

    path = write_nrrd(make_volume(), tmp_path / "good.nrrd")
    volume = load_volume(path)
    return World(tmp_path, volume, path, one_round_session(tmp_path / "session", volume))


def ask_args(world, *extra, query="Segment the liver."):
    return ["ask", str(world.volume_path), "--slice", "2", "--query", query, "--session", str(world.session_dir),
            *extra]


def one_error(code, out, err, words):
    assert code == 2 and "Traceback" not in out + err, err
    lines = [line for line in err.splitlines() if line.startswith("error:") or ": error:" in line]
    assert len(lines) == 1, err
    check_message(Exception(lines[0]), words)


# -- devices ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device, words", [
    ("cuda", ("--device cuda", "no CUDA GPU", "--device cpu")),
    ("cuda:7", ("--device cuda:7",)),
    ("gpu", ("'gpu'", "not a device name", "cpu or cuda")),
    ("mps", ("'mps'", "only cpu and cuda")),
])
def test_device_the_machine_cannot_run(device, words, world, capsys):
    if device.startswith("cuda") and torch.cuda.is_available() and device == "cuda":
        pytest.skip("this machine has a GPU")
    before = snapshot(world.session_dir)
    with pytest.raises(DeviceError) as info:
        cli.check_device(device)
    check_message(info.value, words)
    code, out, err = run_cli(ask_args(world, "--device", device), capsys)
    one_error(code, out, err, words)
    assert snapshot(world.session_dir) == before


# -- checkpoints -----------------------------------------------------------------------------------------------
def _config_edit(edit):
    def make(world, base):
        config = json.loads((base / "config.json").read_text())
        edit(config)
        return checkpoint_variant(world, base, {"config.json": json.dumps(config).encode()})
    return make


def _nan_weights(world, base):
    from safetensors.torch import load_file, save_file

    state = load_file(str(base / "model.safetensors"))
    state["jcm.score_mlp.0.weight" if "jcm.score_mlp.0.weight" in state else sorted(state)[-1]].fill_(float("nan"))
    path = world.root / "nan.safetensors"
    save_file(state, str(path))
    return checkpoint_variant(world, base, {"model.safetensors": path.read_bytes()})


def _all_nan(world, base):
    from safetensors.torch import load_file, save_file

    state = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
             for k, v in load_file(str(base / "model.safetensors")).items()}
    path = world.root / "nan.safetensors"
    save_file(state, str(path))
    return checkpoint_variant(world, base, {"model.safetensors": path.read_bytes()})


CHECKPOINT_CASES = {
    "zero-heads": (_config_edit(lambda c: c["text"].update(num_attention_heads=0)),
                   ("config.json", "text.num_attention_heads", "positive whole number", "0")),
    "negative-size": (_config_edit(lambda c: c["segmenter"].update(image_size=-256)),
                      ("config.json", "segmenter.image_size", "positive", "-256")),
    "indivisible-width": (_config_edit(lambda c: c["text"].update(num_attention_heads=5)),
                          ("config.json", "text.hidden_size", "multiple of text.num_attention_heads")),
    "size-as-text": (_config_edit(lambda c: c["vision"].update(patch_size="16")),
                     ("config.json", "vision.patch_size", "whole number", "'16'")),
    "beta-out-of-range": (_config_edit(lambda c: c["jcm"].update(beta=7)), ("jcm.beta", "[0, 1]")),
    "nan-weights": (_all_nan, ("model.safetensors", "NaN or infinite", "damaged")),
}


@pytest.mark.parametrize("name", list(CHECKPOINT_CASES))
def test_checkpoint_that_cannot_work(name, world, base_checkpoint, capsys):
    from MediRoundCore.engine import Engine

    make, words = CHECKPOINT_CASES[name]
    folder = make(world, base_checkpoint)
    before = snapshot(world.session_dir)
    with pytest.raises(CheckpointError) as info:
        Engine.load(folder)
    check_message(info.value, words)
    code, out, err = run_cli(ask_args(world, "--checkpoint", str(folder)), capsys)
    one_error(code, out, err, words)
    assert snapshot(world.session_dir) == before


def test_one_nan_tensor_is_named(world, base_checkpoint):
    from MediRoundCore.engine import Engine
    from safetensors.torch import load_file, save_file

    state = load_file(str(base_checkpoint / "model.safetensors"))
    name = sorted(k for k, v in state.items() if v.is_floating_point())[7]
    state[name].view(-1)[3] = float("inf")
    path = world.root / "inf.safetensors"
    save_file(state, str(path))
    folder = checkpoint_variant(world, base_checkpoint, {"model.safetensors": path.read_bytes()})
    with pytest.raises(CheckpointError, match=f"tensor '{name}' holds 1 NaN or infinite"):
        Engine.load(folder)


# -- training options and resume -----------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, words", [
    (["--correction-context"], ("--correction-context", "--residual-correction")),
    (["--stage", "1", "--residual-correction"], ("--residual-correction", "stage 2")),
    (["--correction-attention"], ("--correction-attention", "--correction-context")),
    (["--steps", "0"], ("--steps", "'0'", "above 0")),
    (["--lr", "nan"], ("--lr", "'nan'", "above 0")),
    (["--batch-size", "-3"], ("--batch-size", "'-3'", "above 0")),
    (["--reference-noise", "1.5"], ("--reference-noise", "from 0 to 1")),
    (["--dice-weight", "inf"], ("--dice-weight", "0 or more")),
])
def test_training_options(argv, words, tmp_path, capsys):
    code, out, err = run_cli(["train", "--out", str(tmp_path / "run"), "--steps", "1", "--workers", "0"] + argv,
                             capsys)
    one_error(code, out, err, words)
    assert not (tmp_path / "run").exists()


def test_conflicting_training_options_in_code():
    from MediRoundCore.train.run import run_training

    with pytest.raises(OptionError, match="--correction-refiner comes with --residual-correction"):
        run_training("unused", stage=2, correction_refiner=True)


def test_resume_refuses_pickled_trainer_state(tmp_path, base_checkpoint, capsys):
    """A run folder whose trainer_state.pt carries code: `train` refuses it (weights-only load), the code never
    runs, and the message says what to do (not "pass weights_only=False")."""
    import shutil

    ckpt = tmp_path / "run" / "stage1" / "checkpoint"
    shutil.copytree(base_checkpoint, ckpt)
    marker = tmp_path / "MARKER"
    torch.save({"optimizer": {}, "scheduler": {}, "step": 3, "payload": Evil(marker)}, ckpt / "trainer_state.pt")
    code, out, err = run_cli(["train", "--out", str(tmp_path / "run"), "--steps", "4", "--workers", "0"], capsys)
    one_error(code, out, err, ("trainer_state.pt", "cannot resume", "refused", "remove trainer_state.pt"))
    assert "weights_only" not in err
    assert not marker.exists()
    (ckpt / "trainer_state.pt").write_bytes(b"PK\x03\x04 torn")
    from MediRoundCore.train.trainer import load_trainer_state

    with pytest.raises(CheckpointError, match="cannot resume.*unreadable"):
        load_trainer_state(ckpt / "trainer_state.pt")


# -- beta and queries -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("beta", ["nan", "-5", "1.5", "inf", "high"])
def test_beta_must_be_a_number_in_the_unit_interval(beta, world, capsys):
    before = snapshot(world.session_dir)
    code, out, err = run_cli(ask_args(world, "--beta", beta), capsys)
    one_error(code, out, err, ("--beta", f"'{beta}'"))
    assert snapshot(world.session_dir) == before


def test_beta_in_the_engine(world, tiny_engine):
    before = snapshot(world.session_dir)
    for beta in (float("nan"), -5.0, 2.0, "0.5"):
        with pytest.raises(MediRoundError, match="beta must be a number from 0 to 1"):
            tiny_engine.ask(world.session(), "Segment the liver.", world.image(), beta=beta)
    assert snapshot(world.session_dir) == before


ORDINARY_TEXT = {
    "persian-zwnj": "کبد را بخش\u200cبندی کن.",  # ZWNJ inside a Persian word
    "hindi-zwj": "यकृत का क्\u200dषेत्र दिखाओ।",  # ZWJ in a conjunct
    "emoji": "Segment the liver 🫁 please 👍🏽.",
    "rtl-mark": "Segment \u200fthe liver.",
    "family-emoji": "Segment it 👨\u200d👩\u200d👧.",
}


@pytest.mark.parametrize("name", list(ORDINARY_TEXT))
def test_ordinary_text_is_a_query(name, world, tiny_engine, capsys, monkeypatch):
    monkeypatch.setattr(cli, "load_engine", lambda *a, **k: tiny_engine)
    code, out, err = run_cli(ask_args(world, query=ORDINARY_TEXT[name]), capsys)
    assert code == 0, err
    assert Session.load(world.session_dir).rounds[-1].query == " ".join(ORDINARY_TEXT[name].split())


@pytest.mark.parametrize("char", ["\x00", "\x1b", "\x7f", "\x85", "\ud800"])
def test_control_characters_are_refused(char, world, tiny_engine):
    before = snapshot(world.session_dir)
    with pytest.raises(QueryError) as info:
        tiny_engine.ask(world.session(), f"Segment {char}the liver.", world.image())
    check_message(info.value, ("unprintable control character", f"U+{ord(char):04X}"))
    assert snapshot(world.session_dir) == before


# -- session files that lie -------------------------------------------------------------------------------------
def _edit_rounds(world, edit):
    path = world.session_dir / "session.json"
    data = json.loads(path.read_text())
    second = dict(data["rounds"][0])
    data["rounds"].append(second)
    edit(data["rounds"])
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("edit, words", [
    (lambda rounds: None, ("round 2 is numbered 1", "repeated or missing")),  # duplicate number
    (lambda rounds: rounds[1].update(number="2"), ("'number' is '2'", "not a whole number")),
    (lambda rounds: rounds[1].update(number=2.0), ("'number' is 2.0", "not a whole number")),
    (lambda rounds: rounds[1].update(number=True), ("'number' is true", "not a whole number")),
    (lambda rounds: rounds[1].update(number=3), ("round 2 is numbered 3",)),
    (lambda rounds: rounds[1].update(number=2, reference=2), ("round 2", "refers to round 2", "not an earlier")),
    (lambda rounds: rounds[1].update(number=2, slice_index="2"), ("round 2", "'slice_index'")),
    (lambda rounds: rounds[1].update(number=2, mask_shape=[40, -48]), ("mask_shape", "positive whole numbers")),
], ids=["duplicate", "string", "float", "bool", "gap", "self-reference", "slice-as-text", "negative-shape"])
def test_session_file_with_bad_rounds(edit, words, world, capsys, tiny_engine, monkeypatch):
    _edit_rounds(world, edit)
    before = snapshot(world.session_dir)
    with pytest.raises(SessionError) as info:
        Session.load(world.session_dir)
    check_message(info.value, ("session.json", "corrupt round entry") + words)
    monkeypatch.setattr(cli, "load_engine", lambda *a, **k: tiny_engine)
    code, out, err = run_cli(ask_args(world), capsys)
    one_error(code, out, err, ("session.json",) + words)
    assert snapshot(world.session_dir) == before


# -- chat --------------------------------------------------------------------------------------------------------
def test_chat_commands(world):
    """`chat` as a user types it (a real process on a pipe): --no-jcm is honoured, a refused :slice keeps the
    slice, :save without a folder and an unknown command are messages, and the session gets only the rounds."""
    lines = ["Segment the liver.", ":slice 99", ":slice two", "Segment the spleen.", ":save", ":frobnicate",
             ":undo", ":quit"]
    done = subprocess.run([sys.executable, "-m", "MediRoundCore.cli", "chat", str(world.volume_path), "--slice", "1",
                           "--session", str(world.session_dir), "--random", "--no-jcm"],
                          input="\n".join(lines) + "\n", capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"))
    assert done.returncode == 0 and "Traceback" not in done.stdout + done.stderr, done.stderr
    out = done.stdout
    assert out.count("JCM off") == 2
    assert "error: slice index 99 is out of range" in out and "on slice 99" not in out
    assert "error: usage: :slice N" in out
    assert "error: usage: :save DIR" in out
    assert "error: unknown command ':frobnicate'" in out
    assert "undid round 3" in out
    session = Session.load(world.session_dir)
    assert [(r.query, r.slice_index, r.jcm_score) for r in session.rounds] == [
        ("Segment the liver.", 2, 0.8), ("Segment the liver.", 1, None)]
