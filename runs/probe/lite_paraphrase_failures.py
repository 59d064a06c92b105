"""Probe (session 36): which held-out paraphrase rounds lose the entity that the templated wording of the same
round gets, by relation and by what the wording changes (frame, reference expression, misspelling)?
Diagnostic only: the held-out set is never trained on; what this shows guides the training grammar's breadth by
category, not by copying its wordings.
  python runs/probe/lite_paraphrase_failures.py CHECKPOINT DIALOGUES"""
import copy, sys, collections, torch
from MediRoundCore.data.paraphrase_test import paraphrase_sample, MISSPELLINGS
from MediRoundCore.engine import Engine
from MediRoundCore.evaluate.protocol import EvalEngine, evaluate_sample, CONFIGS
torch.set_num_threads(2)
predictor = EvalEngine.from_engine(Engine.load(sys.argv[1], device="cpu"))
cfg = CONFIGS["ind+jcm"]
tally = collections.Counter()
for i in range(int(sys.argv[2])):
    s = paraphrase_sample("hard", 0, i)
    plain = copy.copy(s); plain.queries = list(s.meta["templated_queries"])
    (a,) = evaluate_sample(predictor, plain, [cfg], f"t{i}", beta=0.0, keep_sessions=True)
    (b,) = evaluate_sample(predictor, s, [cfg], f"h{i}", beta=0.0, keep_sessions=True)
    for k, (ra, rb) in enumerate(zip(a.records, b.records)):
        typo = any(w in s.queries[k] for w in MISSPELLINGS.values())
        key = (ra.relation, "typo" if typo else "", "T" if ra.entity_ok else "t", "H" if rb.entity_ok else "h")
        tally[key] += 1
        if ra.entity_ok and not rb.entity_ok:
            print(f"{i}.{k+1} {ra.relation:11s} {s.entities[k]!r}\n   T {plain.queries[k]!r} -> {a.session.rounds[k].answer[:50]!r} {ra.dice:.2f}"
                  f"\n   H {s.queries[k]!r} -> {b.session.rounds[k].answer[:50]!r} {rb.dice:.2f}")
for k, v in sorted(tally.items()): print(k, v)
