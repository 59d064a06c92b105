"""Probe (issue 23): what encoding ahead saves at the engine level with the shipped model on the bundled volume's
512² slice 12: the first Ask on a slice alone, `Engine.prepare`, and the Ask after it (medians of N runs, each on
a fresh slice cache and session). Prints a table; nothing is written.

    PYTHONPATH=. python runs/probe/encode_ahead.py [N]
"""
import statistics
import sys
import time

import torch

from MediRoundCore.engine import Engine
from MediRoundCore.imaging import extract_slice, load_volume
from MediRoundCore.session import Session

torch.set_num_threads(2)
N = int(sys.argv[1]) if len(sys.argv) > 1 else 10
engine = Engine.load(device="cpu")
volume = load_volume("MediRoundCore/data/bundled/demo_abdomen.nrrd")
image = extract_slice(volume, "axial", 12)
query = "Segment the left kidney."
alone, prepare, after = [], [], []
for i in range(N + 2):
    engine.forget()
    t = time.perf_counter()
    engine.ask(Session(volume.fingerprint()), query, image)
    t_alone = time.perf_counter() - t
    engine.forget()
    session = Session(volume.fingerprint())
    t = time.perf_counter()
    engine.prepare(session, image)
    t_prepare = time.perf_counter() - t
    t = time.perf_counter()
    engine.ask(session, query, image)
    t_after = time.perf_counter() - t
    if i >= 2:  # warm-up
        alone.append(t_alone)
        prepare.append(t_prepare)
        after.append(t_after)
ms = lambda xs: f"{1000 * statistics.median(xs):.1f}"  # noqa: E731
print(f"slice {image.pixels.shape}, {N} runs, torch threads {torch.get_num_threads()}")
print(f"first Ask alone {ms(alone)} ms | prepare {ms(prepare)} ms | Ask after prepare {ms(after)} ms")
