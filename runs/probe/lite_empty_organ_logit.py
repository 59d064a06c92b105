"""Probe: does training on empty-organ rounds (data/empty_containers.py) move the model towards the absent
answer? On val dialogues (never trained on) with those rounds inserted (p=1), each checkpoint answers the
rounds before with their dataset references; at an empty-organ round its answer is read up to "<entity>:" and
the probability of the absent answer's next token is recorded, on the empty organ and, for contrast, on the
lesion's own organ (the round that follows, same query).

    .venv/bin/python runs/probe/lite_empty_organ_logit.py CHECKPOINT [CHECKPOINT ...] [--n 40]
"""
import argparse

import numpy as np
import torch

from MediRoundCore.data.empty_containers import with_empty_container_rounds
from MediRoundCore.data.splits import make_dialogue, to_sample
from MediRoundCore.engine import Engine
from MediRoundCore.evaluate.protocol import sample_fingerprint, sample_image
from MediRoundCore.session import Session


class Reader(Engine):
    """Reads the answer up to `self.forced` (teacher-forced) and records P(next token = `self.wanted`)."""

    forced = None

    def _generate(self, state, new_tokens, crop_tokens, box_tokens, forward_tokens):
        if self.forced is None:
            return super()._generate(state, new_tokens, crop_tokens, box_tokens, forward_tokens)
        head = self.builder.answer(self.forced)[:-2]
        embeds = self.model.embed_inputs(torch.tensor([list(new_tokens) + head]), None, crop_tokens, box_tokens)
        _, hidden = self._lm(embeds, state, forward_tokens)
        logits = self.model.language_model.lm_head(hidden.to(self.model.language_model.lm_head.weight.dtype))
        self.p = float(torch.softmax(logits.float(), -1)[self.wanted])
        return hidden, head, True


def main():
    p = argparse.ArgumentParser()
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--n", type=int, default=40)
    args = p.parse_args()
    torch.set_num_threads(2)
    for folder in args.checkpoints:
        engine = Reader.load(folder, device="cpu")
        engine.guess_tries = 1
        absent_ids = engine.builder.answer("x: not on this slice.")[:-2]
        colon = engine.builder.answer("x:")[:-2]
        engine.wanted = absent_ids[len(colon)]
        empty, own, found, said_absent = [], [], 0, 0
        for i in range(400):
            dlg = make_dialogue("val", 0, i)
            s = with_empty_container_rounds(to_sample(dlg), dlg.slice, np.random.default_rng(i), p=1.0)
            flags = (s.meta or {}).get("absent") or [False] * s.num_rounds
            image = sample_image(s)
            session = Session(sample_fingerprint(s))
            for k, query in enumerate(s.queries):
                ref = None if s.ref_indices[k] is None else s.ref_indices[k] + 1
                if flags[k] and k + 1 < s.num_rounds and s.queries[k + 1] == query and ref is not None:
                    r = engine.ask(session, query, image, reference=ref).round  # its own answer
                    said_absent += r.absent
                    session.undo()
                    for target, out in ((ref, empty), (s.ref_indices[k + 1] + 1, own)):
                        engine.forced = s.answers[k].split(":")[0] + ":" if target == ref else \
                            s.answers[k + 1].split(":")[0] + ":"
                        engine.ask(session, query, image, reference=target)
                        out.append(engine.p)
                        session.undo()
                        engine.forced = None
                    found += 1
                engine.ask(session, query, image, reference=ref)
            if found >= args.n:
                break
        print(f"{folder}: {found} empty-organ rounds; answered absent {said_absent}; P(absent next) on the empty "
              f"organ median {np.median(empty):.4f} mean {np.mean(empty):.4f}, on the lesion's organ median "
              f"{np.median(own):.4f} mean {np.mean(own):.4f}; empty > own in {np.mean(np.array(empty) > np.array(own)):.0%}",
              flush=True)


if __name__ == "__main__":
    main()
