"""Load benchmark of `mediround serve` (issue 25): N concurrent clients, each an 8-round dialogue.

    python benchmarks/bench_server.py                      # the shipped model; N = 1, 4, 16; RESULTS.md here
    python benchmarks/bench_server.py --clients 1,2 --rounds 2 --random --out /tmp/b   # a quick try

One real server process on loopback (`python -m MediRoundCore.cli serve`, default options but `--threads` and a
token file), clients on threads of this process with our urllib client (`RemoteEngine`), each a user of its own
(its own token) with its own session of its own
volume (the bundled demo volume, one voxel changed per client: same anatomy, another fingerprint) on one of six
axial slices. Every client asks the same 8-round dialogue with references. Measured per N: rounds per second
(all rounds over the wall time of the pass), per-round latency as the client sees it (p50 / p95 / max), the
largest queue position a client was told. Checked per N: no lost round (each client's local session and the
server's hold the same 8 round digests) and no mixed-up round (every mask equals the one a lone client got for
the same slice and round in a reference pass before the timed ones). It writes the `<!-- server -->` section of
RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))
from _bench import command_line, fmt, machine_info, table, verdict, write_section  # noqa: E402

from MediRoundCore.cli import BUNDLED, open_session  # noqa: E402
from MediRoundCore.imaging import Volume, extract_slice, load_volume  # noqa: E402
from MediRoundCore.remote.client import RemoteEngine  # noqa: E402
from MediRoundCore.remote.protocol import round_digest  # noqa: E402
from MediRoundCore.server.jobs import MAX_QUEUED_PER_OWNER  # noqa: E402
from MediRoundCore.server.serve import default_cache_slices  # noqa: E402

DIALOGUE = [  # (query, reference): the demo's rounds and their references, twice over
    ("Segment the left kidney.", None), ("Now the lesion inside it.", 1), ("Segment the organ that stores bile.", 2),
    ("Now segment the organ that removes old red blood cells on the same side as it.", 1),
    ("Segment the liver.", None), ("Now the lesion inside it.", 5), ("Segment the right kidney.", None),
    ("Now the lesion inside it.", 7),
]
SLICES = (9, 10, 11, 12, 13, 14)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", default="1,4,16", help="concurrent clients per pass (1,4,16)")
    ap.add_argument("--rounds", type=int, default=8, help="rounds per dialogue (at most 8)")
    ap.add_argument("--threads", type=int, default=2, help="the server's torch threads (2)")
    ap.add_argument("--random", action="store_true", help="serve an untrained tiny model (tests)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent), help="folder of RESULTS.md")
    return ap.parse_args(argv)


def client_volume(base: Volume, tag: int) -> Volume:
    array = base.array.copy()
    array[0, tag // base.array.shape[2] % base.array.shape[1], tag % base.array.shape[2]] += 1 + tag % 50
    return Volume(array, base.spacing, base.origin, base.direction, name=f"client-{tag}")


def client_token(i: int) -> str:
    """The token of client `i`: every client is a user of its own, as the Slicer panels of a department are."""
    return f"bench-client-{i:03d}-0123456789abcdef"


def write_client_tokens(folder: Path, clients: int) -> Path:
    path = folder / "tokens"
    path.write_text("".join(f"client{i}:{client_token(i)}\n" for i in range(clients)))
    path.chmod(0o600)
    return path


def dialogue(url: str, volume: Volume, index: int, rounds: int, record: dict, token: str) -> None:
    """One client: its own session, `rounds` rounds on one slice; latencies and queue positions into `record`."""
    engine = RemoteEngine.connect(url, token=token, poll_s=2.0)
    session = open_session(None, volume)
    image = extract_slice(volume, "axial", index)
    positions = [0]

    def progress(message, fraction):
        if "ahead in the queue" in message:
            positions.append(int(message.split(":")[1].split()[0]))

    for query, reference in DIALOGUE[:rounds]:
        t = time.perf_counter()
        engine.ask(session, query, image, reference=reference, progress=progress)
        record["latency_ms"].append((time.perf_counter() - t) * 1000)
    sid = engine._sids[volume.fingerprint()]
    listed = engine.client.call("GET", f"/v1/sessions/{sid}/rounds", volume=volume.fingerprint())[1]["rounds"]
    record.update(session=session, server_digests=[r["digest"] for r in listed], max_position=max(positions))


def run_pass(url: str, base: Volume, clients: int, rounds: int, first_tag: int) -> dict:
    records = [{"latency_ms": [], "index": SLICES[i % len(SLICES)]} for i in range(clients)]
    errors: list[str] = []

    def one(i):
        try:
            dialogue(url, client_volume(base, first_tag + i), records[i]["index"], rounds, records[i],
                     client_token(i))
        except Exception as exc:  # noqa: BLE001 - counted and reported, the pass goes on
            errors.append(f"client {i}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return {"records": records, "wall_s": time.perf_counter() - t, "errors": errors}


def check(result: dict, reference: dict[int, list[np.ndarray]], rounds: int) -> dict:
    lost = mixed = 0
    for rec in result["records"]:
        session = rec.get("session")
        if session is None:
            lost += rounds
            continue
        local = [round_digest(r) for r in session.rounds]
        lost += rounds - len(session.rounds) + (0 if local == rec["server_digests"] else 1)
        for r in session.rounds:
            expected = reference[rec["index"]][r.number - 1]
            mixed += int(r.number > len(reference[rec["index"]]) or not np.array_equal(r.mask, expected))
    return {"lost": lost, "mixed": mixed}


def percentile(values, q):
    return float(np.percentile(values, q)) if values else float("nan")


def run(argv=None) -> dict:
    args = parse_args(argv)
    counts = [int(n) for n in args.clients.split(",")]
    rounds = min(args.rounds, len(DIALOGUE))
    from server_helpers import ServerProcess

    info = machine_info()
    info["command"] = command_line()
    base = load_volume(BUNDLED / "demo_abdomen.nrrd")
    say = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        tokens = write_client_tokens(Path(tmp), max(counts + [len(SLICES)]))
        server = ServerProcess(Path(tmp) / "sessions", tokens=tokens, extra=["--threads", str(args.threads)]
                               + (["--random"] if args.random else []))
        try:
            server_info = RemoteEngine.connect(server.url, token=client_token(0)).info
            say(f"bench_server: {server_info['model']} on {server_info['device']}; reference pass")
            reference: dict[int, list[np.ndarray]] = {}
            for k, index in enumerate(SLICES):  # a lone client per slice, one after another
                rec = {"latency_ms": [], "index": index}
                dialogue(server.url, client_volume(base, 1000 + k), index, rounds, rec, client_token(k))
                reference[index] = [r.mask for r in rec["session"].rounds]
            passes = []
            for n, clients in enumerate(counts):
                say(f"bench_server: {clients} concurrent client(s) × {rounds} rounds")
                result = run_pass(server.url, base, clients, rounds, first_tag=2000 + 100 * n)
                result.update(check(result, reference, rounds), clients=clients)
                lat = [ms for rec in result["records"] for ms in rec["latency_ms"]]
                result.update(rounds=len(lat), rps=len(lat) / result["wall_s"], p50=percentile(lat, 50),
                              p95=percentile(lat, 95), max=max(lat) if lat else float("nan"),
                              max_position=max((rec.get("max_position", 0) for rec in result["records"]), default=0))
                say(f"  {result['rps']:.2f} rounds/s, p50 {result['p50']:.0f} ms, p95 {result['p95']:.0f} ms, "
                    f"lost {result['lost']}, mixed {result['mixed']}, errors {len(result['errors'])}")
                passes.append(result)
        finally:
            server.stop()
    section = render(info, server_info, args, rounds, passes)
    path = write_section(Path(args.out) / "RESULTS.md", "server", section)
    say(f"bench_server: wrote {path}")
    return {"passes": passes, "server": server_info, "results": path}


def render(info: dict, server: dict, args, rounds: int, passes: list[dict]) -> str:
    ok = all(p["lost"] == 0 and p["mixed"] == 0 and not p["errors"] for p in passes)
    L = ["## Server (`mediround serve`, concurrent clients)", ""]
    L.append(f"- Machine: {info['cpu']}, {info['cores']} core(s) for the server *and* all clients, torch "
             f"{info['torch']}, Python {info['python']}; load average at start {info['load']}.")
    L.append(f"- Server: one process on loopback, model {server['model']} ({server['size']}, "
             f"{server['parameters'] / 1e6:.1f} M parameters) on {server['device']}; one device queue; "
             f"default slice cache ({default_cache_slices(server['size'])} slices, LRU). Protocol "
             f"{server['protocol']}.")
    L.append(f"- Clients: threads of the benchmark process, each a user of its own (its own token: the server's "
             f"queue limit of {MAX_QUEUED_PER_OWNER} waiting rounds applies per user) with our urllib client and its "
             f"own session of "
             f"its own volume (256×256 axial slices of the bundled demo volume, six slices), asking the same "
             f"{rounds}-round dialogue with references (rounds 2, 3, 4, 6, 8 refer to earlier ones).")
    L.append(f"- Command: `{info['command']}` ({info['date']}, git {info['git']}).")
    L.append("- Latency: from the client's call to the round in its local session (HTTP, queueing, the round, the "
             "mask back). A reference pass (one lone client per slice) gave the masks every later client must get.")
    L.append("")
    rows = [[str(p["clients"]), str(p["rounds"]), fmt(p["wall_s"]), fmt(p["rps"], 2), fmt(p["p50"], 0),
             fmt(p["p95"], 0), fmt(p["max"], 0), str(p["max_position"]), str(p["lost"]), str(p["mixed"]),
             str(len(p["errors"]))] for p in passes]
    L.append(table(["clients", "rounds", "wall (s)", "rounds/s", "p50 (ms)", "p95 (ms)", "max (ms)",
                    "max queue position", "lost", "mixed up", "errors"], rows))
    L.append("")
    L.append(f"No lost or mixed-up rounds: {verdict(ok)}.")
    for p in passes:
        for e in p["errors"][:3]:
            L.append(f"- error with {p['clients']} clients: {e}")
    if len(passes) > 1:
        one, most = passes[0], passes[-1]
        L.append("")
        L.append(f"From {one['clients']} to {most['clients']} concurrent clients throughput went "
                 f"{one['rps']:.2f} → {most['rps']:.2f} rounds/s ({most['rps'] / one['rps']:.2f}×) and the median "
                 f"latency {one['p50']:.0f} → {most['p50']:.0f} ms. Rounds of different sessions do not batch (the "
                 "engine decodes one session's round at a time, with its own KV cache): they queue on the device, "
                 "and latency grows with the queue. With more sessions than cached slices, a round also re-encodes "
                 "its slice and rebuilds its dialogue's cache. More throughput: more replicas (docs/server.md).")
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
