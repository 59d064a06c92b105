"""`mediround eval`: the multi-round evaluation, every config on the same dialogues, written to QUALITY.md.

    mediround eval --split hard --limit 100 --threads 1 --out benchmarks   # the bundled model
    mediround eval --checkpoint runs/stage2 --split regular --configs ind+jcm,ind-nojcm
    mediround eval --random --split hard --limit 3 --out /tmp/q            # untrained model: a smoke test
    mediround eval --oracle --data path/to/MR-MedSeg --limit 20            # ground truth: must score 100
    mediround eval --sets paraphrase,absent,real --split hard --set-limit 40  # issue 23's sets only

A generated split is written once into the cache folder (`--cache`, default ~/.cache/mediround/splits) and
reused; dialogue i of a split and seed is the same whatever the count, so a larger cached build serves a
smaller --limit. Outputs in --out: QUALITY.md, quality.csv (per config: overall, rounds ≥ 4, ambiguous,
per round), quality_rounds.png, and with --records quality_records.csv (one row per round and config).

On a CPU shared with other jobs use --threads 1: torch's extra threads then wait on each other (measured on
2 shared cores: 0.06 s per round with 1 thread, 0.3-1.3 s with 2).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ..checkpoint_info import default_model_name
from ..errors import MediRoundError
from . import sets as sets_module
from .protocol import CONFIGS, DEFAULT_CONFIGS, EvalEngine, OracleEngine, evaluate_sample, parse_configs
from .sets import SETS

DEFAULT_LIMIT = 100
EVAL_SPLITS = ("regular", "hard", "val")


def default_cache() -> Path:
    root = os.environ.get("MEDIROUND_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "mediround") / "splits"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mediround eval", description="Multi-round evaluation (Dice, gIoU, cIoU "
                                "overall and per round; ablations) written to QUALITY.md.")
    model = p.add_mutually_exclusive_group()
    model.add_argument("--checkpoint", help=f"our checkpoint folder (default: the bundled {default_model_name()})")
    model.add_argument("--random", action="store_true", help="an untrained tiny model (smoke tests)")
    model.add_argument("--oracle", action="store_true", help="answer with the ground truth (checks the protocol)")
    data = p.add_mutually_exclusive_group()
    data.add_argument("--split", choices=EVAL_SPLITS, default="hard", help="generated split (default hard)")
    data.add_argument("--data", help="an existing MR-MedSeg folder (images/, masks/, one .json)")
    p.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    p.add_argument("--limit", type=int, default=DEFAULT_LIMIT,
                   help=f"number of dialogues (default {DEFAULT_LIMIT}; 0 = all of --data)")
    p.add_argument("--configs", nargs="+", default=[",".join(DEFAULT_CONFIGS)],
                   help="configs, comma- or space-separated: " + ", ".join(CONFIGS)
                   + f" (default {','.join(DEFAULT_CONFIGS)})")
    p.add_argument("--out", default="benchmarks", help="output folder (default benchmarks)")
    p.add_argument("--cache", default=None, help="folder for generated splits (default ~/.cache/mediround/splits)")
    p.add_argument("--beta", type=float, default=None, help="JCM threshold (default: the checkpoint's)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default min(cores, 8))")
    p.add_argument("--device", default=None, help="cpu or cuda (default cuda if present)")
    p.add_argument("--records", action="store_true", help="also write quality_records.csv (every round)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--sets", default="main",
                   help="what to evaluate, comma-separated: main (the configs above) and/or paraphrase, absent, "
                   "real (issue 23's sets), variants (issue 26: the demo on cropped and re-oriented copies); each its own "
                   "QUALITY.md section, the rest of the file is kept")
    p.add_argument("--set-limit", type=int, default=40,
                   help="dialogues of --split for the paraphrase and absent sets (default 40)")
    p.add_argument("--real-data", default=None,
                   help="folder of the real labelled scans (default: $MEDIROUND_REAL_DATA or shared/data)")
    return p


# -- data ---------------------------------------------------------------------------------------------------
def ensure_split(name: str, seed: int, n: int, cache: Path, say=print) -> Path:
    """A folder holding at least the first n dialogues of split `name` (built once, atomically)."""
    from ..data.splits import build_split

    folder = Path(cache) / f"{name}-seed{seed}"
    marker = folder / "count.txt"
    try:
        have = int(marker.read_text().strip())
    except (OSError, ValueError):
        have = 0
    if have >= n:
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    t = time.perf_counter()
    say(f"building split {name} (seed {seed}, {n} dialogues) into {folder} ...")
    build_split(name, tmp, n, seed)
    (tmp / "count.txt").write_text(f"{n}\n")
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    say(f"  built in {time.perf_counter() - t:.0f} s")
    return folder


def load_samples(folder: Path, limit: int):
    from ..data.dataset import MRMedSegDataset

    dataset = MRMedSegDataset(folder)
    n = len(dataset) if limit <= 0 else min(limit, len(dataset))
    samples = [dataset[i] for i in range(n)]
    ids = [Path(dataset.conversations[i].image_path).stem for i in range(n)]
    return samples, ids


# -- model --------------------------------------------------------------------------------------------------
def make_predictor(args):
    from ..engine import DEFAULT_CHECKPOINT, Engine

    if args.oracle:
        return OracleEngine(), "oracle: the ground truth (protocol check)"
    if args.random:
        engine = Engine.random_tiny(seed=0)
        return EvalEngine.from_engine(engine), "random untrained MediRound-Tiny (Engine.random_tiny(seed=0))"
    folder = Path(args.checkpoint) if args.checkpoint else DEFAULT_CHECKPOINT
    if not folder.is_dir():
        raise MediRoundError(f"{folder}: no checkpoint folder" + ("" if args.checkpoint else
                             " (the bundled weights are missing); pass --checkpoint DIR or --random"))
    engine = Engine.load(folder, device=args.device)
    size = getattr(engine.model.config, "size", "?")
    return EvalEngine.from_engine(engine), f"{folder} ({size}; files {checkpoint_digest(folder)})"


def checkpoint_digest(folder: Path) -> str:
    """sha256 (12 hex) over the folder's file names and contents (files over 64 MiB: name and size only)."""
    h = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        size = path.stat().st_size
        h.update(f"{rel}\0{size}\0".encode())
        if size <= 64 << 20:
            h.update(path.read_bytes())
    return h.hexdigest()[:12]


# -- machine ------------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
        else:
            name = platform.processor() or platform.machine()
    except OSError:
        name = platform.processor() or platform.machine()
    return f"{name}, {os.cpu_count()} logical cores"


def code_version() -> str:
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no",
                                "MediRoundCore"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    if not head:
        return "unknown (not a git checkout)"
    return f"git {head}" + (" (MediRoundCore has uncommitted changes)" if dirty else "")


def versions() -> str:
    import numpy
    import torch

    return f"Python {platform.python_version()}, torch {torch.__version__}, numpy {numpy.__version__}"


# -- the run ------------------------------------------------------------------------------------------------
def evaluate(predictor, samples, ids, configs, beta: float | None = None, progress: bool = True) -> list:
    """Every config on every dialogue (dialogue-major, so each slice is encoded once): the round records."""
    from tqdm import tqdm

    records = []
    n_rounds = sum(s.num_rounds for s in samples)
    bar = tqdm(total=n_rounds * len(configs), unit="round", disable=not progress, dynamic_ncols=True,
               desc="eval", file=sys.stderr)
    t_loop = time.perf_counter()
    first = configs[0].name
    for i, (sample, dialogue_id) in enumerate(zip(samples, ids)):
        for run in evaluate_sample(predictor, sample, configs, dialogue_id, beta=beta):
            records += run.records
        bar.update(sample.num_rounds * len(configs))
        if progress and i == 0 and len(samples) > 1:
            spent = time.perf_counter() - t_loop
            eta = spent / sample.num_rounds * (n_rounds - sample.num_rounds)
            bar.write(f"first dialogue: {spent:.1f} s for {sample.num_rounds} rounds × {len(configs)} configs; "
                      f"estimated remaining {eta / 60:.1f} min")
        base = [r.counts.dice for r in records if r.config == first]
        bar.set_postfix_str(f"{first} Dice {100 * sum(base) / max(len(base), 1):.1f}")
    bar.close()
    return records


# -- main ---------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # `mediround eval -- --random ...`
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    try:
        configs = parse_configs(args.configs)
    except ValueError as exc:
        raise MediRoundError(str(exc)) from None
    if args.limit < 0:
        raise MediRoundError("--limit must be 0 (all) or a positive number of dialogues")
    import torch

    from ..engine import set_cpu_threads
    from . import report

    set_cpu_threads(args.threads)
    say = print if not args.quiet else (lambda *a, **k: None)
    t_start = time.perf_counter()
    wanted = [s.strip() for s in args.sets.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in ("main",) + SETS]
    if unknown or not wanted:
        raise MediRoundError(f"unknown set(s) {', '.join(unknown) or '(none)'}; expected some of main, "
                             + ", ".join(SETS))
    if args.set_limit < 1:
        raise MediRoundError("--set-limit must be a positive number of dialogues")
    predictor, model_desc = make_predictor(args)  # first: a bad checkpoint fails before any split is built
    if "main" not in wanted:
        return run_sets(args, argv, wanted, predictor, model_desc, say)
    if args.data:
        folder = Path(args.data)
        if not folder.is_dir():
            raise MediRoundError(f"{folder}: no such MR-MedSeg folder")
        data_desc = f"MR-MedSeg folder `{folder}`"
    else:
        if args.limit <= 0:
            raise MediRoundError("--limit 0 (all) needs --data; a generated split needs a number of dialogues")
        cache = Path(args.cache) if args.cache else default_cache()
        folder = ensure_split(args.split, args.seed, args.limit, cache, say)
        data_desc = (f"generated split `{args.split}`, seed {args.seed}, dialogues 0–{args.limit - 1} "
                     f"(cache `{folder}`)")
    samples, ids = load_samples(folder, args.limit)
    if not samples:
        raise MediRoundError(f"{folder}: no dialogues")
    device = getattr(predictor, "device_description", "?")
    n_rounds = sum(s.num_rounds for s in samples)
    say(f"evaluating {len(samples)} dialogues ({n_rounds} rounds) × {len(configs)} configs "
        f"[{', '.join(c.name for c in configs)}] on {device}")

    records = evaluate(predictor, samples, ids, configs, beta=args.beta, progress=not args.quiet)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = [c.name for c in configs]
    files = {"summary CSV": report.write_csv(records, names, out / "quality.csv").name}
    if args.records:
        files["per-round records CSV"] = report.write_records_csv(records, out / "quality_records.csv").name
    if not args.no_plot:
        files["plot"] = report.write_plot(records, names, out / "quality_rounds.png",
                                          f"{model_desc.split(' (')[0]} on {data_desc.split(' (')[0]}").name
    notes = []
    if args.oracle:
        notes.append("Oracle run: every answer is the ground truth, so every score must be 100.")
    if args.random:
        notes.append("Random untrained model: the scores are meaningless (a smoke test of the pipeline).")
    info = report.RunInfo(
        command="mediround eval " + shlex.join(argv),
        date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        model=model_desc, device=device, cpu=cpu_model(), threads=torch.get_num_threads(), versions=versions(),
        code=code_version(), data=data_desc, split_sizes=report.split_sizes(samples),
        wall_seconds=time.perf_counter() - t_start, notes=notes)
    md = out / "QUALITY.md"
    old = md.read_text() if md.is_file() else ""
    md.write_text(report.markdown(records, names, info, files) + sets_module.kept_sections(old))
    if not args.quiet:
        for t, m, v in report.targets(records, names):
            print(f"  {v:4s}  {t}: {m}")
        for c in names:
            s = report.group(records, c)
            print(f"  {c:15s} Dice {s.dice:5.1f}  gIoU {s.giou:5.1f}  cIoU {s.ciou:5.1f}  (n={s.n})")
        print(f"wrote {md} ({(time.perf_counter() - t_start) / 60:.1f} min)")
    extra = [s for s in wanted if s != "main"]
    return run_sets(args, argv, extra, predictor, model_desc, say) if extra else 0


def run_sets(args, argv, names, predictor, model_desc, say) -> int:
    """Issue 23's sets (evaluate/sets.py), each written into its own section of --out/QUALITY.md."""
    import torch
    from tqdm import tqdm

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        t = time.perf_counter()
        bar = tqdm(unit="round", disable=args.quiet, dynamic_ncols=True, desc=name, file=sys.stderr)
        if name == "real":
            result = sets_module.real_set(predictor, args.real_data, beta=args.beta, tick=bar.update)
        elif name == "variants":
            result = sets_module.variants_set(predictor, beta=args.beta, tick=bar.update)
        else:
            run = sets_module.paraphrase_set if name == "paraphrase" else sets_module.absent_set
            result = run(predictor, args.split, args.seed, args.set_limit, beta=args.beta, tick=bar.update)
        bar.close()
        header = (f"Written by `mediround eval {shlex.join(argv)}` on "
                  f"{_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M')} UTC; model {model_desc}; "
                  f"{code_version()}; {getattr(predictor, 'device_description', '?')}, torch threads "
                  f"{torch.get_num_threads()}; {result.rounds} rounds in {(time.perf_counter() - t) / 60:.1f} min. "
                  f"Protocol `{sets_module.CONFIG.name}` (dataset references, JCM on). Do not edit by hand.")
        if args.random:
            header += " Random untrained model: the scores are meaningless (a smoke test)."
        if args.oracle:
            header += " Oracle run: every answer is the ground truth."
        sets_module.write_section(out / "QUALITY.md", name, sets_module.section_text(result, header))
        for target, measured, verdict in result.verdicts:
            say(f"  {verdict:4s}  {target}: {measured}")
        say(f"wrote the {name} section of {out / 'QUALITY.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
