"""Probe: does a checkpoint read the reference's crop and box? Rounds 1..t-1 of hard-split dialogues are put in
the session with their ground-truth masks and answers; round t is asked with its dataset reference, with another
earlier round as reference, and with a blank mask; reports how far the [SEG] prompts move (issue 23: at step 550
the lite model's ind-nojcm and resolver-nojcm scores were equal to the digit)."""
import sys

import numpy as np
import torch

from MediRoundCore.data.splits import make_dialogue, to_sample
from MediRoundCore.engine import Engine
from MediRoundCore.imaging import SliceImage
from MediRoundCore.session import Round, Session

torch.set_num_threads(1)
engine = Engine.load(sys.argv[1], device="cpu")
moved_other, moved_blank, dice_pairs = [], [], []
for index in range(int(sys.argv[2]) if len(sys.argv) > 2 else 8):
    d = to_sample(make_dialogue("hard", 0, index))
    image = SliceImage(pixels=d.image.astype(np.float32), view="axial", index=0, axis=2, transpose=False,
                       flip_rows=False, flip_cols=False, modality=d.meta.get("modality", "CT"))
    for t in range(2, len(d.queries)):
        ref = d.ref_indices[t]
        others = [r for r in range(t) if r != ref]
        if ref is None or not others:
            continue
        prompts = {}
        for kind, reference, blank in (("dataset", ref, False), ("other", others[-1], False), ("blank", ref, True)):
            session = Session(f"probe{index}")
            for r in range(t):
                mask = d.masks[r].astype(bool)
                if blank and r == reference:
                    mask = np.zeros_like(mask)
                session.add_round(Round(number=r + 1, view="axial", slice_index=0, query=d.queries[r],
                                        answer=d.answers[r].replace("[SEG]", "").strip(), entity=None,
                                        reference=None if d.ref_indices[r] is None else d.ref_indices[r] + 1,
                                        mask=mask))
            prompts[kind] = engine.ask(session, d.queries[t], image, reference=reference + 1, use_jcm=False).raw_prompt
            engine.forget()
        scale = float(prompts["dataset"].norm())
        moved_other.append(float((prompts["other"] - prompts["dataset"]).norm()) / scale)
        moved_blank.append(float((prompts["blank"] - prompts["dataset"]).norm()) / scale)
print(f"{len(moved_other)} rounds: [SEG] prompt moved by another round's reference: median "
      f"{np.median(moved_other):.4f} of its norm (max {max(moved_other):.4f}); by a blank reference: median "
      f"{np.median(moved_blank):.4f} (max {max(moved_blank):.4f})")
