"""Probe: how sure is the model when it answers "<entity>: not on this slice."? For every absent answer, the
margin of the absent answer's first word over the best other token at that position (logits, read with the
answer teacher-forced up to "<entity>:"), on:
- real: the lungs of the two pyradiomics chest CTs over their extent (runs/probe/real_lung_slices.py's asks;
  every lung is on its slice, so every absent answer there is wrong);
- absent: val dialogues with absent-target rounds inserted (evaluate.sets.absent_sample, seed 1: never the
  evaluator's seed 0), split by whether the target was absent.
A threshold t (answer absent only when the margin is at least t) keeps the absent answers above it.

    .venv/bin/python runs/probe/absent_margin.py CHECKPOINT [--n 60]
"""
import argparse

import numpy as np
import torch

from MediRoundCore.answers import says_absent
from MediRoundCore.data.real_validation import lung_extent_samples
from MediRoundCore.engine import Engine
from MediRoundCore.evaluate.protocol import sample_fingerprint, sample_image
from MediRoundCore.evaluate.sets import absent_sample
from MediRoundCore.session import Session


class MarginReader(Engine):
    """Records, for each absent answer, logit(absent word) − max other logit after "<entity>:"."""

    margins: list

    def _generate(self, state, new_tokens, crop_tokens, box_tokens, forward_tokens):
        start = state.cache_len
        hidden, answer, forced = super()._generate(state, new_tokens, crop_tokens, box_tokens, forward_tokens)
        if not (forced and says_absent(self.builder.decode(answer)) and self.colon in answer):
            return hidden, answer, forced
        self._drop_rejected(state, state.cache_len - start)
        head = answer[:answer.index(self.colon) + 1]
        embeds = self.model.embed_inputs(torch.tensor([list(new_tokens) + head]), None, crop_tokens, box_tokens)
        _, last = self._lm(embeds, state, forward_tokens)
        head_weight = self.model.language_model.lm_head.weight
        logits = self.model.language_model.lm_head(last.to(head_weight.dtype)).float().reshape(-1)
        wanted = float(logits[self.absent_word])
        logits[self.absent_word] = -float("inf")
        self.margins.append(wanted - float(logits.max()))
        self._drop_rejected(state, state.cache_len - start)
        return super()._generate(state, new_tokens, crop_tokens, box_tokens, forward_tokens)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint")
    p.add_argument("--n", type=int, default=60)
    args = p.parse_args()
    torch.set_num_threads(2)
    engine = MarginReader.load(args.checkpoint, device="cpu")
    colon = engine.builder.answer("x:")[:-2]
    engine.colon = colon[-1]
    engine.absent_word = engine.builder.answer("x: not on this slice.")[:-2][len(colon)]
    engine.margins = []
    real, asks = [], 0
    for case in ("lung1", "lung2"):
        for sample in lung_extent_samples(case):
            image = sample_image(sample)
            for query in sample.queries:
                before, asks = len(engine.margins), asks + 1
                engine.ask(Session(f"{case}-{sample.meta['slice']}-{query}"), query, image)
                real += engine.margins[before:]
    print(f"real lungs: {len(real)} of {asks} asks answered absent; margins {np.round(sorted(real), 2).tolist()}",
          flush=True)
    on_absent, on_present, n_absent, n_present = [], [], 0, 0
    for i in range(args.n):
        sample = absent_sample("val", 1, i)
        flags, image = sample.meta["absent"], sample_image(sample)
        session = Session(sample_fingerprint(sample) + f"-{i}")
        for k, query in enumerate(sample.queries):
            ref = None if sample.ref_indices[k] is None else sample.ref_indices[k] + 1
            before = len(engine.margins)
            engine.ask(session, query, image, reference=ref)
            got = engine.margins[before:]
            if flags[k]:
                n_absent += 1
                on_absent += got[-1:]
            else:
                n_present += 1
                on_present += got[-1:]
    print(f"absent set (val, seed 1, {args.n} dialogues): absent targets {n_absent}, answered absent "
          f"{len(on_absent)}; present targets {n_present}, answered absent {len(on_present)}")
    for t in (0, 1, 2, 3, 4, 5, 6, 6.5, 7, 8, 10):
        kept = sum(m >= t for m in on_absent)
        print(f"  t={t:>2}: absent targets answered absent {100 * kept / max(1, n_absent):.1f} %, present "
              f"{100 * sum(m >= t for m in on_present) / max(1, n_present):.1f} %, real lungs "
              f"{sum(m >= t for m in real)} absent")
    print("absent-target margins, lowest 20:", np.round(sorted(on_absent)[:20], 2).tolist())


if __name__ == "__main__":
    main()
