"""Probe: the lungs of the two pyradiomics chest CTs over their extent (`real_validation.lung_extent_samples`:
8 slices each), every lung asked in a fresh session as a user's first Ask, for several checkpoints side by side.
`mediround eval --sets real` asks the same slices as two-round dialogues; this probe is the quick gate for a
training change (session 46: a GPU continuation answered both lungs absent on two of lung1's slices).

    .venv/bin/python runs/probe/real_lung_slices.py CHECKPOINT [CHECKPOINT ...]
"""

import sys

import numpy as np

from MediRoundCore.data.real_validation import lung_extent_samples
from MediRoundCore.engine import Engine
from MediRoundCore.evaluate.metrics import dice
from MediRoundCore.evaluate.protocol import sample_image
from MediRoundCore.session import Session

cases = {case: lung_extent_samples(case) for case in ("lung1", "lung2")}
for checkpoint in sys.argv[1:]:
    engine = Engine.load(checkpoint, device="cpu")
    scores = {}
    for case, samples in cases.items():
        for sample in samples:
            image = sample_image(sample)
            for query, truth in zip(sample.queries, sample.masks):
                answer = engine.ask(Session(f"{checkpoint}-{case}-{sample.meta['slice']}-{query}"), query, image)
                mask = answer.mask if answer.mask is not None else np.zeros_like(truth)
                scores.setdefault(case, []).append(dice(mask, truth))
    every = [d for v in scores.values() for d in v]
    print(checkpoint, {c: round(100 * float(np.mean(v)), 1) for c, v in scores.items()},
          "all", round(100 * float(np.mean(every)), 1), "n", len(every), flush=True)
