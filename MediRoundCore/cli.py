"""`mediround` command line: demo | ask | chat | serve | train | eval | bench | data.

Every error a user can cause prints one clear line and exits non-zero; `--debug` shows tracebacks.
"""

from __future__ import annotations

import _signal  # the C module: no enum import, so the window before the handler below is as short as can be
import sys


def _interrupted_early(signum, frame):
    """SIGINT before `main` runs (this module's own imports): the same one line and exit code."""
    try:
        sys.stderr.write("interrupted\n")
        sys.stderr.flush()
    finally:
        import os

        os._exit(130)


# Run as the program (python -m MediRoundCore.cli, or the `mediround` script): Ctrl-C answered from here on.
_EARLY = (__name__ == "__main__" or sys.argv[0].endswith(("mediround", "mediround.exe", "mediround-script.py"))) \
    and _signal.getsignal(_signal.SIGINT) is _signal.default_int_handler
if _EARLY:
    _signal.signal(_signal.SIGINT, _interrupted_early)

import argparse  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
from pathlib import Path  # noqa: E402

from .answers import ABSENT_NOTE  # noqa: E402
from .checkpoint_info import default_model_name  # noqa: E402
from .errors import DeviceError, MediRoundError  # noqa: E402
from .references import alternatives_note  # noqa: E402

BUNDLED = Path(__file__).parent / "data" / "bundled"


# -- shared pieces --------------------------------------------------------------------------------------
def check_device(device: str | None) -> None:
    """Refuse a --device this machine cannot run, before the model is loaded."""
    if device is None:
        return
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise DeviceError(f"--device {device!r}: not a device name; use cpu or cuda (cuda:0, cuda:1, …)") from None
    if parsed.type == "cpu":
        return
    if parsed.type != "cuda":
        raise DeviceError(f"--device {device!r}: only cpu and cuda are supported")
    if not torch.cuda.is_available():
        raise DeviceError(f"--device {device}: no CUDA GPU is usable here (torch finds none); leave out --device "
                          f"or use --device cpu")
    if parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise DeviceError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s) "
                          f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")


def load_engine(checkpoint: str | None, device: str | None, random_model: bool = False, quiet: bool = False):
    from .engine import DEFAULT_CHECKPOINT, Engine

    check_device(device)

    if random_model or (checkpoint is None and not (DEFAULT_CHECKPOINT / "model.safetensors").is_file()):
        if not quiet:
            print("NOTE: using an UNTRAINED random tiny model (no trained weights found); masks are meaningless.")
        return Engine.random_tiny()
    return Engine.load(checkpoint, device=device)


def open_session(folder: Path | None, volume):
    """The session of `folder` for `volume` (a new one when the folder holds none); each change saves."""
    from .session import Session

    session = Session.open(folder, volume.fingerprint(), volume.name) if folder is not None \
        else Session(volume.fingerprint(), None, volume.name)
    session.volume = volume
    return session


def command_line(argv) -> str:
    """How the lock holder is named to a second writer."""
    text = "mediround " + " ".join(argv)
    return text if len(text) <= 120 else text[:117] + "..."


def say(text: str) -> None:
    """Print and flush; a closed standard output is an error (the caller has not committed anything yet)."""
    try:
        print(text)
        sys.stdout.flush()
    except (BrokenPipeError, ValueError, OSError):
        _silence_stdout()
        raise MediRoundError("standard output is closed (the program reading it has exited); nothing was "
                             "saved") from None


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def write_outputs(out: Path, volume, session, stem: str = "segments") -> Path:
    """`.seg.nrrd` of all rounds and one PNG overlay per round into `out`, all or nothing."""
    from .outputs import StagedOutputs

    with StagedOutputs(out) as staged:
        path = render_outputs(staged.folder, volume, session, stem)
        staged.publish()
    return out / path.name


def render_outputs(out: Path, volume, session, stem: str = "segments") -> Path:
    """`.seg.nrrd` of all rounds (geometry of the volume) and one PNG overlay per round, written in `out`."""
    from .outputs import OutputError, describe_output_error

    try:
        return _render_outputs(out, volume, session, stem)
    except OSError as exc:
        raise OutputError(describe_output_error(out.parent, exc)) from None


def _render_outputs(out: Path, volume, session, stem: str) -> Path:
    from .imaging import extract_slice, mask_into_volume
    from .segio import Segment, overlay_png, round_color, segment_name, write_seg_nrrd

    segments = []
    for r in session.rounds:
        image = extract_slice(volume, r.view, r.slice_index)
        segments.append(Segment(segment_name(r.number, r.entity), round_color(r.number),
                                mask_into_volume(volume, image, r.mask).astype(bool)))
        shown = [(r.mask, round_color(r.number), segment_name(r.number, r.entity))]
        if r.reference is not None:
            ref = session.round(r.reference)
            if (ref.view, ref.slice_index) == (r.view, r.slice_index):
                shown.append((ref.mask, (1.0, 1.0, 1.0), f"referenced: {segment_name(ref.number, ref.entity)}"))
        title = f"Round {r.number} ({r.view} slice {r.slice_index}): {r.query}\n{r.answer}"
        overlay_png(out / f"round_{r.number:02d}.png", image.normalized(), shown, title, image.spacing)
    return write_seg_nrrd(out / f"{stem}.seg.nrrd", volume, segments)


def print_table(session, truth: dict[int, float] | None = None) -> None:
    header = f"{'#':>2}  {'ref':>3}  {'slice':>9}  {'JCM':>5}  {'fix':>3}  {'ms':>6}  {'Dice':>5}  query -> entity"
    print(header)
    print("-" * len(header))
    for r in session.rounds:
        dice = f"{truth[r.number]:.3f}" if truth and r.number in truth else "  -  "
        score = f"{r.jcm_score:.2f}" if r.jcm_score is not None else "  -  "
        print(f"{r.number:>2}  {r.reference or '-':>3}  {r.view[:3]} {r.slice_index:>4}  {score:>5}  "
              f"{'yes' if r.corrected else 'no':>3}  {r.timings.get('total_ms', 0):6.0f}  {dice:>5}  "
              f"{r.query} -> {r.entity or '?'}")


# -- commands ---------------------------------------------------------------------------------------------
def cmd_demo(args) -> int:
    """The scripted dialogue on the bundled volume; outputs and the session appear in --out only when it ran
    to the end. An existing --out/session is replaced only with --overwrite."""
    import numpy as np

    from .imaging import extract_slice, load_volume
    from .outputs import OutputError, StagedOutputs
    from .session import Session
    from .session_lock import hold

    out = Path(args.out)
    existing = out / "session"
    if os.path.lexists(existing) and not args.overwrite and not (existing.is_dir() and not any(existing.iterdir())):
        raise OutputError(f"{existing}: already exists (a session from an earlier run?); pass --overwrite to "
                          f"replace it, or choose another --out folder")
    volume = load_volume(BUNDLED / "demo_abdomen.nrrd")
    labels = load_volume(BUNDLED / "demo_abdomen_labels.nrrd").array
    script = json.loads((BUNDLED / "demo_dialogue.json").read_text())
    with StagedOutputs(out, replace_folders=True) as staged:
        engine = load_engine(args.checkpoint, args.device, args.random)
        session = Session(volume.fingerprint(), None, volume.name)
        session.volume = volume
        print(f"MediRound demo on {volume.name} {volume.array.shape[::-1]} ({volume.modality}), "
              f"device {engine.device_description}")
        truth = {}
        for step in script:
            image = extract_slice(volume, "axial", step["slice_index"])
            ref = None if step.get("refers_to") is None else step["refers_to"] + 1
            result = engine.ask(session, step["query"], image, reference=ref, use_jcm=not args.no_jcm)
            if step.get("expected_label") is not None:
                plane = np.take(labels, step["slice_index"], axis=0)
                gt_display = _display_like(image, plane == step["expected_label"])
                truth[result.round.number] = _dice(result.mask, gt_display)
            print(f"  round {result.round.number}: {step['query']}\n    -> {result.round.answer}")
        seg_path = out / render_outputs(staged.folder, volume, session, "mediround_demo").name
        session.save(staged.folder / "session")
        staged.check()
        if existing.is_dir():
            with hold(existing, wait=0, command=command_line(args.argv)):  # nobody is writing the old session
                staged.publish()
        else:
            staged.publish()
    print()
    print_table(session, truth)
    print(f"\nwrote {seg_path}, {len(session.rounds)} overlay PNG(s) and the session in {existing}")
    return 0


def _display_like(image, plane_mask):
    """An array-plane mask oriented like `image` (inverse of SliceImage.to_plane)."""
    import numpy as np

    m = plane_mask.T if image.transpose else plane_mask
    if image.flip_rows:
        m = m[::-1, :]
    if image.flip_cols:
        m = m[:, ::-1]
    return np.ascontiguousarray(m)


def _dice(a, b) -> float:
    import numpy as np

    denom = a.sum() + b.sum()
    return float(2 * np.logical_and(a, b).sum() / denom) if denom else 1.0


def ask_engine(args):
    """The local model, or with --server a client of `mediround serve` that answers the same way."""
    if not getattr(args, "server", None):
        return load_engine(args.checkpoint, args.device, args.random)
    from .remote.client import RemoteEngine, read_token

    engine = RemoteEngine.connect(args.server, token=read_token(args.token_file), user=args.user,
                                  insecure=args.insecure)
    print(f"connected to {engine.device_description}")
    return engine


def cmd_ask(args) -> int:
    """One round, all or nothing: the volume, slice, outputs and model are checked first; the round is committed
    to the session (under its lock) only after its outputs are written and its report printed."""
    from .engine import validate_query
    from .imaging import extract_slice, load_volume
    from .outputs import StagedOutputs
    from .session import Session

    volume = load_volume(args.volume, modality=args.modality, series=args.series)
    image = extract_slice(volume, args.view, args.slice)
    validate_query(args.query)
    staged = StagedOutputs(Path(args.out)) if args.out else None
    try:
        engine = ask_engine(args)
        with Session.writing(Path(args.session), volume.fingerprint(), volume.name, wait=args.wait,
                             command=command_line(args.argv)) as session:
            session.volume = volume
            result = engine.ask(session, args.query, image, reference=args.reference, use_jcm=not args.no_jcm,
                                beta=args.beta)
            r = result.round
            lines = [f"round {r.number}: {r.answer}",
                     f"  entity: {r.entity}  reference: {r.reference}  JCM score: "
                     f"{r.jcm_score if r.jcm_score is None else round(r.jcm_score, 3)}  corrected: {r.corrected}  "
                     f"pixels: {int(r.mask.sum())}  {r.timings.get('total_ms', 0):.0f} ms"
                     + (" (recovered from the server)" if getattr(result, "recovered", False) else "")]
            if getattr(r, "absent", False):
                lines.append(f"  {ABSENT_NOTE}")
            if r.reference_alternatives:
                lines.append(f"  the reference R{r.reference} was a guess; "
                             f"{alternatives_note(r.reference_alternatives, session.entities)}; this round is "
                             f"kept: to replace it, :undo it in `mediround chat --session` on this folder and ask "
                             f"there naming the round (\"… in round N\")")
            if staged is not None:
                path = render_outputs(staged.folder, volume, session)
                staged.check()
                lines.append(f"wrote {staged.out / path.name}")
            say("\n".join(lines))
            session.commit()
            if staged is not None:
                staged.publish()
    finally:
        if staged is not None:
            staged.discard()
    return 0


def cmd_chat(args) -> int:
    from .imaging import extract_slice, load_volume

    volume = load_volume(args.volume, modality=args.modality, series=args.series)
    extract_slice(volume, args.view, args.slice)
    session = open_session(Path(args.session), volume)
    engine = ask_engine(args)
    index = args.slice
    print(f"{volume.name}: {volume.num_slices(args.view)} {args.view} slices; on slice {index}. "
          "Type a query; ':slice N' moves, ':undo', ':save DIR', ':quit'.")
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            if line in (":q", ":quit", ":exit"):
                break
            if line.startswith(":slice"):
                parts = line.split()
                if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                    raise MediRoundError("usage: :slice N (a whole slice number)")
                extract_slice(volume, args.view, int(parts[1]))  # refused: stay where we are
                index = int(parts[1])
                print(f"on slice {index}")
            elif line == ":undo":
                print(f"undid round {(engine.undo(session) if hasattr(engine, 'undo') else session.undo()).number}")
            elif line.startswith(":save"):
                parts = line.split(maxsplit=1)
                if len(parts) != 2:
                    raise MediRoundError("usage: :save DIR (the folder for the .seg.nrrd and overlays)")
                print(f"wrote {write_outputs(Path(parts[1]), volume, session)}")
            elif line.startswith(":"):
                raise MediRoundError(f"unknown command {line.split()[0]!r}; commands: :slice N, :undo, :save DIR, "
                                     f":quit")
            else:
                r = engine.ask(session, line, extract_slice(volume, args.view, index), use_jcm=not args.no_jcm).round
                score = "off" if r.jcm_score is None else f"{r.jcm_score:.2f}"
                print(f"R{r.number} (ref {r.reference or '-'}, JCM {score}{', corrected' if r.corrected else ''}): "
                      f"{r.answer}" + (f"\n  {ABSENT_NOTE}" if getattr(r, "absent", False) else "")
                      + (f"\n  the reference R{r.reference} was a guess; "
                         f"{alternatives_note(r.reference_alternatives, session.entities)}: to use one, :undo and "
                         f"name it (\"... in round N\")" if r.reference_alternatives else ""))
        except MediRoundError as exc:
            print(f"error: {exc}")
        sys.stdout.flush()
    return 0


def cmd_serve(args) -> int:
    from .server.serve import serve

    check_device(args.device)
    return serve(args.host, args.port, args.checkpoint, args.device, args.random, args.sessions, args.token_file,
                 args.max_request_mb, args.cache_slices, args.name, args.threads)


def cmd_train(args) -> int:
    from .train.run import run_training

    folder = run_training(args.out, stage=args.stage, steps=args.steps, batch_size=args.batch_size, init=args.init,
                          lr=args.lr, lora=args.lora, workers=args.workers, seed=args.seed, save_every=args.save_every,
                          data=args.data, reference_noise=args.reference_noise,
                          residual_correction=args.residual_correction, correction_focus=args.correction_focus,
                          correction_context=args.correction_context,
                          correction_attention=args.correction_attention,
                          correction_refiner=args.correction_refiner, features=args.features, fov_crop=args.fov_crop,
                          fov_min_side=args.fov_min_side,
                          paraphrase=args.paraphrase, absent=args.absent, repeat=args.repeat,
                          product_references=args.product_references, precision=args.precision,
                          loss_weights={"ce": args.ce_weight, "bce": args.bce_weight, "dice": args.dice_weight})
    print(f"checkpoint: {folder}")
    return 0


def cmd_eval(args) -> int:
    from .evaluate.run import main as eval_main

    return eval_main(args.rest)


def cmd_bench(args) -> int:
    import runpy

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_cpu.py"
    if not script.is_file():
        raise MediRoundError(f"{script}: benchmark script not found (run from a source checkout)")
    sys.argv = [str(script)] + args.rest
    runpy.run_path(str(script), run_name="__main__")
    return 0


def cmd_data(args) -> int:
    from .data.splits import main as data_main

    data_main(args.rest)
    return 0


def training_data(text: str) -> str:
    """An argparse type: training splits joined by '+' (checked before any model is built)."""
    from .data.splits import TRAINING_SPLITS

    unknown = [name for name in text.split("+") if name not in TRAINING_SPLITS]
    if unknown:
        raise argparse.ArgumentTypeError(f"{unknown[0]!r} is not a training split; use {', '.join(TRAINING_SPLITS)} "
                                         f"or both joined by '+'")
    return text


def folder_path(text: str) -> str:
    """An argparse type: a non-empty path."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path; give a folder")
    return text


def side_share(text: str) -> float:
    """An argparse type: a share of a side, a number in (0, 1]."""
    value = unit_interval(text)
    if value == 0.0:
        raise argparse.ArgumentTypeError(f"{text!r} must be above 0 (a crop keeps part of each side)")
    return value


def unit_interval(text: str) -> float:
    """An argparse type: a finite number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise argparse.ArgumentTypeError(f"{text!r} must be a number from 0 to 1")
    return value


def _number(kind, accept, needs: str, label: str):
    """An argparse type: a finite number of `kind` (int or float) for which `accept(value)` holds."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {'whole ' if kind is int else ''}number") from None
        if not (math.isfinite(value) and accept(value)):
            raise argparse.ArgumentTypeError(f"{text!r} must be {needs}")
        return value
    parse.__name__ = f"{label} {kind.__name__}"
    return parse


def positive(kind):
    """An argparse type: a finite number (int or float) above 0."""
    return _number(kind, lambda v: v > 0, "above 0", "positive")


def non_negative(kind):
    """An argparse type: a finite number (int or float) of at least 0."""
    return _number(kind, lambda v: v >= 0, "0 or more", "non-negative")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mediround", description="MediRound: multi-round reasoning segmentation")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    def model_args(sp):
        sp.add_argument("--checkpoint",
                        help=f"MediRound checkpoint folder (default: the bundled {default_model_name()})")
        sp.add_argument("--device", help="cpu or cuda (default: cuda when present)")
        sp.add_argument("--random", action="store_true", help="use an untrained tiny model")
        sp.add_argument("--no-jcm", action="store_true", help="switch off the Judgment & Correction Mechanism")

    sp = sub.add_parser("demo", help="scripted multi-round session on the bundled volume")
    sp.add_argument("--out", default="demo_output")
    sp.add_argument("--overwrite", action="store_true", help="replace an existing OUT/session")
    model_args(sp)
    sp.set_defaults(func=cmd_demo)

    for name, func in (("ask", cmd_ask), ("chat", cmd_chat)):
        sp = sub.add_parser(name, help="one round on a volume" if name == "ask" else "interactive session")
        sp.add_argument("volume", help="NRRD / NIfTI / MHA file or DICOM folder")
        sp.add_argument("--slice", type=int, required=True)
        sp.add_argument("--view", default="axial", choices=["axial", "coronal", "sagittal"])
        sp.add_argument("--session", required=True, type=folder_path, help="session folder (created if missing)")
        sp.add_argument("--modality", choices=["CT", "MR"])
        sp.add_argument("--series", help="DICOM folder with several series: the series to use (its number in the "
                                         "listing, or its SeriesInstanceUID)")
        if name == "ask":
            sp.add_argument("--query", required=True)
            sp.add_argument("--reference", type=int, help="round number this query refers to (default: auto)")
            sp.add_argument("--beta", type=unit_interval, help="JCM threshold, 0 to 1 (default: the checkpoint's)")
            sp.add_argument("--out", help="also write .seg.nrrd and overlays here")
            sp.add_argument("--wait", type=non_negative(float), default=None,
                            help="seconds to wait while another program writes the session (default 30)")
        model_args(sp)
        sp.add_argument("--server", metavar="URL", help="ask a `mediround serve` server instead of a local model "
                        "(the session folder keeps the client's copy of every round)")
        sp.add_argument("--token-file", help="with --server: file holding the token (default: $MEDIROUND_TOKEN)")
        sp.add_argument("--user", help="with --server on a server without tokens: your user name (default local)")
        sp.add_argument("--insecure", action="store_true",
                        help="with --server: allow sending the token over plain http:// to another machine")
        sp.set_defaults(func=func)

    sp = sub.add_parser("serve", help="HTTP inference server for Slicer panels and `ask/chat --server` (docs/server.md)")
    sp.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                    "only; any other needs tokens)")
    sp.add_argument("--port", type=int, default=8765)
    sp.add_argument("--checkpoint",
                    help=f"MediRound checkpoint folder (default: the bundled {default_model_name()})")
    sp.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when present); one server per device")
    sp.add_argument("--random", action="store_true", help="serve an untrained tiny model")
    sp.add_argument("--sessions", help="folder of the server's sessions (default ~/.cache/mediround/server-sessions)")
    sp.add_argument("--token-file", help="file of `user:token` lines (default: $MEDIROUND_TOKENS); required unless "
                    "the server listens on loopback only")
    sp.add_argument("--max-request-mb", type=positive(float), default=80, help="largest request body accepted (default 80 MiB)")
    sp.add_argument("--cache-slices", type=positive(int),
                    help="slices whose encodings and KV caches stay in memory, least recently used evicted (default "
                         "32 for the tiny and lite models, 8 for the full one)")
    sp.add_argument("--name", help="replica name in responses (default HOST:PORT)")
    sp.add_argument("--threads", type=positive(int), help="CPU threads for torch (default: cores, at most 8)")
    sp.set_defaults(func=cmd_serve)

    sp = sub.add_parser("train", help="train stage 1 or 2")
    sp.add_argument("--out", default="runs/tiny")
    sp.add_argument("--stage", type=int, choices=[1, 2], default=1)
    sp.add_argument("--steps", type=positive(int), default=1000)
    sp.add_argument("--batch-size", type=positive(int), default=8)
    sp.add_argument("--init", help="start from this checkpoint folder (stage 2: the stage-1 model)")
    sp.add_argument("--lr", type=positive(float), default=3e-4)
    sp.add_argument("--lora", action="store_true")
    sp.add_argument("--workers", type=non_negative(int), default=1)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--save-every", type=positive(int), default=100)
    sp.add_argument("--data", default="train", type=training_data,
                    help="training split or mixture: train, train-long, or train+train-long (default train)")
    sp.add_argument("--reference-noise", type=unit_interval, default=0.0,
                    help="share of reference masks replaced by a prediction-like perturbation (default 0)")
    sp.add_argument("--fov-crop", type=unit_interval, default=0.0,
                    help="share of dialogues cut to a random, often non-square field of view that keeps their "
                         "masks (default 0)")
    sp.add_argument("--fov-min-side", type=side_share, default=0.5,
                    help="smallest share of the slice's side a --fov-crop side takes (default 0.5)")
    sp.add_argument("--paraphrase", type=unit_interval, default=0.0,
                    help="share of queries re-worded by the paraphrase grammar (default 0: templates only)")
    sp.add_argument("--absent", type=unit_interval, default=0.0,
                    help="chance of an absent-target round (answered 'not on this slice', no segment) after each "
                         "round and before the first (default 0)")
    sp.add_argument("--repeat", type=unit_interval, default=0.0,
                    help="chance of a round asking again for an earlier round's structure after each round (default 0)")
    sp.add_argument("--product-references", type=unit_interval, default=0.0,
                    help="share of dialogues whose references are the ones the product's resolver reads from the "
                         "text, targets unchanged (default 0: the dataset's references)")
    sp.add_argument("--residual-correction", action="store_true",
                    help="stage 2 from --init: a residual correction MLP, the identity until trained")
    sp.add_argument("--correction-context", action="store_true",
                    help="with --residual-correction: the correction also sees the prompt's first decode "
                         "(pooled image embedding under the unrefined mask, and the decoder's mask token)")
    sp.add_argument("--correction-attention", action="store_true",
                    help="with --correction-context: the context also holds what the first decode's mask token "
                         "reads from the image embedding, each location marked inside/outside the unrefined mask")
    sp.add_argument("--correction-refiner", action="store_true",
                    help="with --residual-correction: corrected masks are also redrawn at the segmenter's full "
                         "resolution around themselves, from the slice and their logits (a small conv net)")
    sp.add_argument("--correction-focus", action="store_true",
                    help="stage 2: weigh each mask's correction loss by 1 - IoU of the unrefined mask")
    sp.add_argument("--features", help="stage 2 on cached features of the frozen --init model (one .safetensors "
                    "file or several joined by commas; build them with python -m MediRoundCore.train.jcm_features)")
    sp.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="fp32",
                    help="bf16: steps under bfloat16 autocast, float32 weights and Adam state (auto: where the CPU "
                         "or GPU multiplies bfloat16 natively; cached stage 2 of lite 2x faster on an AVX512-BF16 CPU)")
    sp.add_argument("--ce-weight", type=non_negative(float), default=1.0)
    sp.add_argument("--bce-weight", type=non_negative(float), default=2.0)
    sp.add_argument("--dice-weight", type=non_negative(float), default=0.5,
                    help="Dice weight of the mask loss, stage 1 and the stage-2 correction (paper: 0.5, with "
                         "pretrained MedSAM); the tiny model trained from scratch uses 2.0")
    sp.set_defaults(func=cmd_train)

    for name, func, text in (("eval", cmd_eval, "multi-round evaluation (see `mediround eval -h`)"),
                             ("bench", cmd_bench, "CPU latency / memory benchmarks"),
                             ("data", cmd_data, "build generated splits")):
        sp = sub.add_parser(name, help=text, add_help=False)
        sp.add_argument("rest", nargs=argparse.REMAINDER)
        sp.set_defaults(func=func)
    return p


PASS_THROUGH = ("eval", "bench", "data")  # sub-commands with their own argument parsers


_sigint_seen = False


def _on_sigint(signum, frame):
    """Python's own Ctrl-C handler (raise KeyboardInterrupt), remembering that it came: an extension module being
    imported at that instant may turn the KeyboardInterrupt into an ImportError of its own."""
    global _sigint_seen
    _sigint_seen = True
    raise KeyboardInterrupt


def main(argv=None) -> int:
    """Run one command. Every error a user can cause is one "error: …" line and a non-zero exit; Ctrl-C at any
    point is one "interrupted" line and exit 130."""
    try:
        if _EARLY and argv is None:  # from here a Ctrl-C unwinds (removing temporary files) to one line
            _import_native_modules(sys.argv[1:])
            signal.signal(signal.SIGINT, _on_sigint)
        code = _main(argv)
    except KeyboardInterrupt:
        code = _interrupted()
    if code == 130 and argv is None:
        _exit_now(130)
    if argv is None:  # done: a Ctrl-C while the interpreter shuts down must not turn the exit into a signal death
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    return code


NATIVE_MODULES = ("torch", "transformers", "SimpleITK")  # C/C++ extensions every model command imports


def _import_native_modules(argv) -> None:
    """Import the big extension modules while Ctrl-C still exits at once (`_interrupted_early`): nothing of ours
    has started, and a KeyboardInterrupt raised inside their initialisation can cross C++ and abort the process
    ("terminate called after throwing an instance of 'pybind11::error_already_set'", seen with torch). Skipped
    for help and version, which need none; a module that is missing is left for the command to report."""
    if not argv or any(a in ("-h", "--help", "--version") for a in argv):
        return
    import importlib

    for name in NATIVE_MODULES:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - the command that needs it reports it clearly
            pass


def _interrupted() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C while leaving adds no traceback
    try:
        print("interrupted", file=sys.stderr)
    except (OSError, ValueError):
        pass
    return 130


def _exit_now(code: int) -> None:
    """Leave with `code` at once. After an interrupt the interpreter would otherwise end itself by SIGINT (exit
    -2, not 130) when the signal landed inside code run by a C extension (pybind11 `exec` while importing), even
    though we handled it. Everything of ours is settled by now: the session was committed or left as it was,
    temporary files and staging folders removed on the way out, locks go with the process."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _main(argv) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    split = next((i for i, a in enumerate(argv) if not a.startswith("-")), len(argv))
    if split < len(argv) and argv[split] in PASS_THROUGH:
        args = parser.parse_args(argv[: split + 1])
        args.rest = [a for a in argv[split + 1:]]
        if args.rest[:1] == ["--"]:
            args.rest = args.rest[1:]
    else:
        args = parser.parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except MediRoundError as exc:
        _error_line(f"error: {exc}")
        return 2
    except KeyboardInterrupt:
        return _interrupted()
    except BrokenPipeError:
        _silence_stdout()
        _error_line("error: standard output is closed (the program reading it has exited)")
        return 2
    except OSError as exc:  # the file system said no: name the file and the reason
        if args.debug:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        _error_line(f"error: {where}{exc.strerror or exc}")
        return 2
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one clear line, no traceback
        if _sigint_seen:  # Ctrl-C inside a C extension's import surfaces as its ImportError: it is still Ctrl-C
            return _interrupted()
        if args.debug:
            raise
        _error_line(f"internal error: {type(exc).__name__}: {exc} (run with --debug for details)")
        return 1


def _error_line(text: str) -> None:
    try:
        print(text, file=sys.stderr)
    except (OSError, ValueError):
        pass


if __name__ == "__main__":  # python -m MediRoundCore.cli
    sys.exit(main())
