"""Probe (session 36): on the real pyradiomics chest CTs, what does lite answer, and how well does it segment, for
each lung (first round, no history), on the validation slice and on the image mirrored left-right?
  python runs/probe/lite_real_chest_sides.py CHECKPOINT"""
import sys, numpy as np, torch
from MediRoundCore.data.real_validation import real_sample, lung_masks
from MediRoundCore.engine import Engine
from MediRoundCore.evaluate.protocol import sample_image
import dataclasses
from MediRoundCore.session import Session
torch.set_num_threads(1)
engine = Engine.load(sys.argv[1], device="cpu")
for case in ("lung1", "lung2"):
    s = real_sample(case)
    lungs = {"left lung": None, "right lung": None}
    for flip in (False, True):
        px = s.image.astype(np.float32)
        if flip: px = px[:, ::-1].copy()
        image = dataclasses.replace(sample_image(s), pixels=px)
        for q, side in (("Segment the right lung.", "right"), ("Segment the left lung.", "left")):
            gt = s.masks[0] if s.entities[0].startswith(side) else None
            res = engine.ask(Session("p"), q, image, use_jcm=False)
            m = res.round.mask
            cols = np.nonzero(m)[1].mean() / m.shape[1] if m is not None and m.any() else float("nan")
            print(case, "flip" if flip else "    ", q, "->", repr(res.round.answer[:50]),
                  "area %.3f" % (0 if m is None else m.mean()), "col %.2f" % cols,
                  "" if gt is None or flip else "dice %.2f" % (2*(m&gt).sum()/max(1, m.sum()+gt.sum())))
            engine.forget()
