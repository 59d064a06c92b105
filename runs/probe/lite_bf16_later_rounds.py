"""Probe: later rounds of the shipped Lite model on the CPU under bf16 autocast, against float32: latency and
Dice of the demo dialogue (lead for the 80 ms later-round target; design notes, "Latency margin").

    PYTHONPATH=$PWD python runs/probe/lite_bf16_later_rounds.py [--repeats 5]
"""

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from demo_variants import demo_variant, dice  # noqa: E402

from MediRoundCore.engine import Engine  # noqa: E402
from MediRoundCore.imaging import extract_slice  # noqa: E402
from MediRoundCore.session import Session  # noqa: E402


def dialogue(engine, context):
    volume, labels, index, script = demo_variant("original")
    image = extract_slice(volume, "axial", index)
    truth = extract_slice(labels, "axial", index).pixels
    session = Session(volume.fingerprint())
    session.volume = volume
    times, scores, entities = [], [], []
    for step in script:
        ref = None if step.get("refers_to") is None else step["refers_to"] + 1
        t = time.perf_counter()
        with context():
            r = engine.ask(session, step["query"], image, reference=ref).round
        times.append((time.perf_counter() - t) * 1000)
        scores.append(dice(r.mask, truth == step["expected_label"]))
        entities.append(r.entity)
    return times, scores, entities


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(2)
    engine = Engine.load(device="cpu")
    modes = {"float32": contextlib.nullcontext,
             "bf16 autocast": lambda: torch.autocast("cpu", dtype=torch.bfloat16)}
    for name, context in modes.items():
        later, result = [], None
        for _ in range(args.repeats):
            engine.forget()
            times, scores, entities = dialogue(engine, context)
            later += times[1:]
            result = (scores, entities)
        print(f"{name}: later rounds median {statistics.median(later):.1f} ms; Dice "
              f"{' / '.join(f'{d:.3f}' for d in result[0])}; {result[1]}", flush=True)


if __name__ == "__main__":
    main()
