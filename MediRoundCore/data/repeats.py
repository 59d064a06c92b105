"""Repeated targets: a later round that asks again for a structure an earlier round already segmented.

Users do this ("Segment the spleen." a second time, "show me the liver again"). The product's resolver refers
such a query to the earlier round (it names its entity) and the model reads the name as "it" (`refer_as_it`:
"Segment it."), with the earlier mask as the reference crop and box. No generated dialogue asked twice, so the
model answered with another structure; `with_repeated_rounds` inserts such rounds, worded as a direct request
and read as the product reads it, answered with the earlier round's answer and mask.
"""

from __future__ import annotations

import numpy as np

from ..references import refer_as_it
from .absent import absent_query
from .inserted_rounds import InsertedRounds


def with_repeated_rounds(sample, rng: np.random.Generator, p: float = 0.1, use_reserved: bool = False):
    """A copy of `sample` with, after each round but the last (probability p), a round that asks again for a
    random earlier round's structure (never one answered absent): it refers to that round and gets its answer
    and mask. References of later rounds are renumbered; `meta["absent"]` (if any) stays aligned and
    `meta["repeat"]` flags the inserted rounds."""
    rounds = InsertedRounds(sample)
    for k in range(sample.num_rounds):
        rounds.keep(k)
        earlier = [j for j in range(len(rounds)) if not rounds.flags["absent"][j] and rounds.entities[j]
                   and rounds.masks[j].any()]
        if k < sample.num_rounds - 1 and earlier and rng.uniform() < p:
            j = earlier[int(rng.integers(len(earlier)))]
            query = refer_as_it(absent_query(rng, rounds.entities[j], use_reserved=use_reserved), rounds.entities[j])
            rounds.insert(query, rounds.answers[j], rounds.entities[j], j, rounds.masks[j], repeat=True)
    return rounds.build("repeat")
