"""Probe: the real-image validation rounds through a user's Ask path, for several checkpoints side by side
(design notes, "Real-image validation measures a user's Ask"). Each checkpoint folder needs the reference scorer
beside it (copy `MediRoundCore/weights/mediround-tiny/reference_scorer.*`).

    .venv/bin/python runs/probe/real_checkpoints.py runs/tiny11/stage1/checkpoint runs/tiny12/stage1/checkpoint ...

Prints, per checkpoint, the Dice of lung1's lung and lesion, lung2's lung and lesion, and the MNI152 left and
right hemispheres, and their mean.
"""

import sys

import numpy as np

from MediRoundCore.data.real_validation import mni152_folder, mni152_sample, real_sample
from MediRoundCore.engine import Engine
from MediRoundCore.evaluate.protocol import sample_image
from MediRoundCore.session import Session

samples = [real_sample("lung1"), real_sample("lung2"), mni152_sample(mni152_folder())]
for checkpoint in sys.argv[1:]:
    engine = Engine.load(checkpoint, device="cpu")
    row = []
    for n, sample in enumerate(samples):
        session, image = Session(f"{checkpoint}-{n}"), sample_image(sample)
        for k, query in enumerate(sample.queries):
            ref = None if sample.ref_indices[k] is None else sample.ref_indices[k] + 1
            mask, truth = engine.ask(session, query, image, reference=ref, beta=0.9).mask, sample.masks[k]
            row.append(round(float(2 * (mask & truth).sum() / max(1, mask.sum() + truth.sum())), 3))
    print(f"{checkpoint:40s}", row, "mean", round(float(np.mean(row)), 3), flush=True)
