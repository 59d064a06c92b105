"""Probe (session 35): ask "Segment it." with each earlier round of hard-split dialogues as the reference (history
with ground-truth masks and answers): does the answer, and the mask, follow the reference?
  python runs/probe/lite_answers_it_by_reference.py CHECKPOINT DIALOGUES"""
import sys, numpy as np, torch
from MediRoundCore.data.splits import make_dialogue, to_sample
from MediRoundCore.answers import parse_entity
from MediRoundCore.engine import Engine
from MediRoundCore.imaging import SliceImage
from MediRoundCore.session import Round, Session
torch.set_num_threads(1)
engine = Engine.load(sys.argv[1], device="cpu")
hits=tot=0
for index in range(int(sys.argv[2])):
    d = to_sample(make_dialogue("hard", 0, index))
    image = SliceImage(pixels=d.image.astype(np.float32), view="axial", index=0, axis=2, transpose=False,
                       flip_rows=False, flip_cols=False, modality=d.meta.get("modality", "CT"))
    t = min(4, len(d.queries))
    session = Session(f"p{index}")
    for r in range(t):
        session.add_round(Round(number=r + 1, view="axial", slice_index=0, query=d.queries[r],
                                answer=d.answers[r].replace("[SEG]", "").strip(), entity=parse_entity(d.answers[r]),
                                reference=None if d.ref_indices[r] is None else d.ref_indices[r] + 1,
                                mask=d.masks[r].astype(bool)))
    for j in range(t):
        if not d.masks[j].any(): continue
        s2 = Session(f"p{index}")
        for rr in session.rounds: s2.add_round(rr)
        res = engine.ask(s2, "Segment it.", image, reference=j + 1, use_jcm=False)
        m = res.round.mask; g = d.masks[j].astype(bool)
        dice = 2*(m&g).sum()/max(1,m.sum()+g.sum())
        tot+=1; hits+= dice>0.5
        print(index, j+1, repr(d.answers[j][:40]), "->", repr(res.round.answer[:40]), "dice %.2f"%dice)
        engine.forget()
print("dice>0.5:", hits, "/", tot)
