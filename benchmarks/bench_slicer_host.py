"""Ask time of the Slicer module inside the real PythonQt of Slicer 5.8 (issue 22).

    python benchmarks/bench_slicer_host.py                 # 3 sessions, results in benchmarks/RESULTS.md
    python benchmarks/bench_slicer_host.py --runs 1 --out /tmp/b --unyielded   # also the old 50 ms poll, no yield

Each run is one process of the PythonQt host (../shared/pythonqt/build.sh; tests/pythonqt_host.py) that drives
tests/pythonqt/host_panel_session.py: the module's widget, panel and logic with the bundled model on the bundled
volume, the Qt event loop running and the main thread holding the GIL while it idles, as in Slicer (CTK does not
enable PythonQt's thread support). A session is 4 Asks through the panel's button (3 rounds, undo, save, new
session, 1 round); the first Ask loads the model. Then the Red view scrolls to another slice and the user asks at
once (the Ask encodes the slice), and to a third slice where the panel encodes the slice ahead (after its 300 ms
debounce) before the user asks. The time of an Ask runs from the click until its answer reaches the main thread. For reference the same session runs once with the GIL released while Qt idles
(PQ_THREADS=1: what the worker would get with thread support). It writes the `<!-- slicer -->` section.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]
from _bench import command_line, fmt, machine_info, table, write_section  # noqa: E402
from pythonqt_host import HostUnavailable, describe, run_script  # noqa: E402


EXEC_S = 400  # how long one host session may run


def session(extra_env: dict) -> tuple[list[float | None], dict]:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            done, result = run_script("host_panel_session.py", Path(tmp), exec_ms=EXEC_S * 1000, timeout=EXEC_S + 200,
                                      extra_env=extra_env)
        except HostUnavailable as exc:
            raise SystemExit(str(exc)) from None
    if done.returncode != 0 or result is None or result["errors"]:
        raise SystemExit(f"the host session failed:\n{describe(done)}\n{result and result['errors']}")
    # None: not answered before the host's time ran out
    times = [a.get("seconds") for a in result["asks"]] + [a.get("seconds") for a in result["slice_asks"]]
    return times + [None] * (6 - len(times)), result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="sessions with the GIL held by the main loop (3)")
    ap.add_argument("--unyielded", action="store_true",
                    help="also one session with the poll timer of before issue 22 (50 ms, no GIL hand-over)")
    ap.add_argument("--out", default=str(HERE), help="folder of RESULTS.md (default: benchmarks/)")
    args = ap.parse_args(argv)
    info = machine_info()
    modes = [("GIL held while Qt idles (as Slicer); the panel's poll lends it to the worker", {}, args.runs),
             ("reference: GIL released while Qt idles (PQ_THREADS=1)", {"PQ_THREADS": "1"}, 1)]
    if args.unyielded:
        modes.append(("GIL held; old poll (50 ms timer, no hand-over)",
                      {"MEDIROUND_POLL_MS": "50", "MEDIROUND_YIELD_MS": "0"}, 1))
    rows = []
    for label, env, runs in modes:
        sessions = [session(env) for _ in range(runs)]
        times = [t for t, _ in sessions]
        stall = max(r["poll_ms_p99"] for _, r in sessions)
        ahead = [r["scrolls"][-1].get("prepare_seconds") if r["scrolls"] else None for _, r in sessions]
        print(label, times, ahead, flush=True)
        if any(x is None for t in times for x in t) or None in ahead:
            done = [x for t in times for x in t if x is not None]
            rows.append([label, runs, f"not all answered within the host's {EXEC_S} s "
                         f"({len(done)} of {sum(len(t) for t in times)} Asks; answered ones: "
                         f"{', '.join(fmt(x, 1) for x in done) or 'none'})", "–", "–", "–", "–", "–",
                         fmt(stall, 0)])
            continue
        first = [t[0] for t in times]
        later = [x for t in times for x in t[1:4]]
        other_slice = [t[4] for t in times]
        encoded_ahead = [t[5] for t in times]
        rows.append([label, runs, fmt(statistics.median(first), 2), fmt(statistics.median(later), 2),
                     f"{fmt(min(later), 2)} – {fmt(max(later), 2)}", fmt(statistics.median(other_slice), 2),
                     fmt(statistics.median(ahead), 2), fmt(statistics.median(encoded_ahead), 2), fmt(stall, 0)])
    body = "\n".join([
        "## Inside Slicer's PythonQt (the module's panel)",
        "",
        f"- Machine: {info['cpu']}, {info['cores']} core(s), torch {info['torch']}, Python {info['python']}; "
        f"load average at the start: {info['load']}, at the end: {machine_info()['load']} (other work on the machine slows these times).",
        "- Host: commontk/PythonQt db525aff (the PythonQt of Slicer 5.8) built by `../shared/pythonqt/build.sh`, "
        "initialised as CTK does, no thread support; `qt` is PythonQt's, MRML is slicer-core's.",
        "- Session: the bundled model and volume, axial slice 12; Ask ×3 through the panel's button, undo, save, "
        "new session, Ask. The first Ask loads the model (imports torch and transformers). Then the Red view "
        "scrolls to slice 14 and the user asks at once (*another slice*: that Ask encodes it), and to slice 10, "
        "where the panel encodes the slice ahead (300 ms after the view stopped changing: `Engine.prepare`, the "
        "segmenter, vision tower and dialogue prefix) before the user asks (*encoded ahead*: that Ask runs no "
        "encoder). Seconds from the click until the answer reaches the main thread; *encoding ahead* from the "
        "scroll until the slice is ready (the debounce included).",
        f"- Command: `{command_line()}` ({info['date']}, git {info['git']}).",
        "",
        table(["main thread", "sessions", "first Ask (s, median)", "later Asks (s, median)", "later min – max (s)",
               "first Ask on another slice (s)", "encoding ahead, scroll → ready (s)",
               "first Ask on a slice encoded ahead (s)", "poll call p99 (ms)"], rows),
        "",
        "The last column is how long one call of the panel's poll keeps the main thread (the event loop waits "
        "meanwhile), 99th percentile over a session's calls: the interface's longest usual stall during an Ask.",
    ])
    path = write_section(Path(args.out) / "RESULTS.md", "slicer", body)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
