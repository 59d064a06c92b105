"""Shared pieces of the benchmark scripts: RESULTS.md sections, machine description, statistics, and a timer
around the engine's language-model forwards.

RESULTS.md is written only by the scripts: `bench_cpu.py` owns the block between `<!-- cpu -->` and
`<!-- /cpu -->`, `bench_gpu.py` the one between `<!-- gpu -->` and `<!-- /gpu -->`, `bench_slicer_host.py` the
`<!-- slicer -->` one, `bench_server.py` the `<!-- server -->` one; each run replaces its own block and leaves the
others as they are.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from MediRoundCore import report_sections

REPO = Path(__file__).resolve().parent.parent
SECTIONS = ("cpu", "cpu-lite", "cpu-full", "gpu", "slicer", "server")
HEADER = """# MediRound: speed and memory

Written by the benchmark scripts (`benchmarks/bench_cpu.py`, run by `mediround bench`,
`benchmarks/bench_gpu.py`, `benchmarks/bench_slicer_host.py` and `benchmarks/bench_server.py`); each replaces its
own section. Never edited by hand. Quality figures are in
`benchmarks/QUALITY.md`.
"""


# -- RESULTS.md ---------------------------------------------------------------------------------------------
def write_section(path: str | Path, name: str, body: str) -> Path:
    """Replace (or add) the `<!-- name -->` … `<!-- /name -->` block of the results file, atomically, keeping
    the sections in a fixed order."""
    if name not in SECTIONS:
        raise ValueError(f"unknown section {name!r}; expected one of {SECTIONS}")
    return report_sections.write_section(path, name, body, new_file=HEADER, order=SECTIONS)


def read_section(path: str | Path, name: str) -> str | None:
    path = Path(path)
    if not path.is_file():
        return None
    m = re.search(rf"<!-- {name} -->\n(.*?)<!-- /{name} -->", path.read_text(), re.S)
    return m.group(1) if m else None


# -- machine --------------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (rev + (" (with uncommitted changes)" if dirty else "")) if rev else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def command_line() -> str:
    """The command as typed (the interpreter's own argv, so `mediround bench …` shows as such)."""
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable] + sys.argv)
    home = str(Path.home())
    return shlex.join(a.replace(str(REPO) + "/", "").replace(home, "~") for a in argv)


def machine_info() -> dict:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return {
        "cpu": cpu_model(), "cores": cores, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": platform.python_version(), "platform": platform.platform(terse=True),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "git": git_revision(), "load": _load(),
    }


def _load() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover
        return "n/a"


def peak_rss_mib() -> float:
    """The process's peak resident set size so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


# -- numbers ----------------------------------------------------------------------------------------------------
def summary(values) -> dict:
    values = [float(v) for v in values]
    if not values:
        return {"n": 0, "median": float("nan"), "min": float("nan"), "max": float("nan")}
    return {"n": len(values), "median": statistics.median(values), "min": min(values), "max": max(values)}


def fmt(x, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and x != x):
        return "–"
    if isinstance(x, int):
        return str(x)
    return f"{x:.{digits}f}"


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(c if isinstance(c, str) else fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def verdict(ok: bool) -> str:
    return "**PASS**" if ok else "**MISS**"


# -- instrumentation -------------------------------------------------------------------------------------------
class ForwardTimer:
    """Times every language-model forward of one engine (wraps the instance's `_lm`; the engine is unchanged).

    `calls` holds (tokens, ms) per forward since the last `clear()`."""

    def __init__(self, engine):
        self.calls: list[tuple[int, float]] = []
        inner = engine._lm
        cuda = engine.model.device.type == "cuda"

        def timed(embeds, state, forward_tokens, **kwargs):
            t = time.perf_counter()
            out = inner(embeds, state, forward_tokens, **kwargs)
            if cuda:
                torch.cuda.synchronize()
            self.calls.append((int(embeds.shape[1]), (time.perf_counter() - t) * 1000))
            return out

        engine._lm = timed

    def clear(self) -> None:
        self.calls.clear()


TIMING_KEYS = ("segmenter_encoder_ms", "vision_tower_ms", "prefix_ms", "language_model_ms", "mask_decoder_ms")


def round_record(result, calls: list[tuple[int, float]], wall_ms: float, query_tokens: int | None = None) -> dict:
    """One Ask's figures: wall time, the engine's timings, and the tokens of its language-model forwards split into
    the prompt side (every forward before decoding) and the generated answer (the engine's `decode_forwards`:
    one forward per answer token, or fewer with answer drafts)."""
    ft = list(result.forward_tokens)
    answer = result.answer_tokens
    k = len(ft) - result.decode_forwards
    timed = len(calls) == len(ft) and [c[0] for c in calls] == ft
    prompt_ms = sum(ms for _, ms in calls[:k]) if timed else float("nan")
    decode_ms = sum(ms for _, ms in calls[k:]) if timed else float("nan")
    timings = dict(result.round.timings)
    rec = {
        "round": result.round.number, "wall_ms": wall_ms, "total_ms": timings.get("total_ms", float("nan")),
        "lm_tokens": sum(ft), "prompt_tokens": sum(ft[:k]), "first_forward_tokens": ft[0] if ft else 0,
        "answer_tokens": answer, "forwards": len(ft), "decode_forwards": result.decode_forwards,
        "prompt_ms": prompt_ms, "decode_ms": decode_ms,
        "decode_ms_per_token": decode_ms / answer if answer and timed else float("nan"),
        "seg_forced": bool(result.round.seg_forced), "answer": result.round.answer,
    }
    for key in TIMING_KEYS:
        rec[key] = timings.get(key, 0.0)
    parts = sum(rec[key] for key in TIMING_KEYS)
    rec["other_engine_ms"] = rec["total_ms"] - parts  # reference crop/box features, tokenising, bookkeeping
    rec["outside_engine_ms"] = wall_ms - rec["total_ms"]  # slice extraction from the volume
    if query_tokens is not None:
        rec["query_tokens"] = query_tokens
    return rec
