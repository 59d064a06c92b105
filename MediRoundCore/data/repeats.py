"""Repeated targets: a later round that asks again for a structure an earlier round already segmented.

Users do this ("Segment the spleen." a second time, "show me the liver again"). The product's resolver refers
such a query to the earlier round (it names its entity) and the model reads the name as "it" (`refer_as_it`:
"Segment it."), with the earlier mask as the reference crop and box. No generated dialogue asked twice, so the
model answered with another structure; `with_repeated_rounds` inserts such rounds, worded as a direct request
and read as the product reads it, answered with the earlier round's answer and mask.
"""

from __future__ import annotations

import copy

import numpy as np

from ..references import refer_as_it
from .absent import absent_query
from .round_numbers import renumber


def with_repeated_rounds(sample, rng: np.random.Generator, p: float = 0.1, use_reserved: bool = False):
    """A copy of `sample` with, after each round but the last (probability p), a round that asks again for a
    random earlier round's structure (never one answered absent): it refers to that round and gets its answer
    and mask. References of later rounds are renumbered; `meta["absent"]` (if any) stays aligned and
    `meta["repeat"]` flags the inserted rounds."""
    absent = list((sample.meta or {}).get("absent") or [False] * sample.num_rounds)
    queries, answers, entities, refs, masks, flags, repeat = [], [], [], [], [], [], []
    new_index, numbers = {}, {}  # numbers: old round number → new (1-based)
    for k in range(sample.num_rounds):
        new_index[k] = len(queries)
        numbers[k + 1] = len(queries) + 1
        ref = sample.ref_indices[k]
        queries.append(renumber(sample.queries[k], numbers))
        answers.append(renumber(sample.answers[k], numbers))
        entities.append(sample.entities[k])
        refs.append(None if ref is None else new_index[ref])
        masks.append(np.asarray(sample.masks[k], bool))
        flags.append(absent[k])
        repeat.append(False)
        earlier = [j for j in range(len(queries)) if not flags[j] and entities[j] and masks[j].any()]
        if k < sample.num_rounds - 1 and earlier and rng.uniform() < p:
            j = earlier[int(rng.integers(len(earlier)))]
            queries.append(refer_as_it(absent_query(rng, entities[j], use_reserved=use_reserved), entities[j]))
            answers.append(answers[j])
            entities.append(entities[j])
            refs.append(j)
            masks.append(masks[j])
            flags.append(False)
            repeat.append(True)
    out = copy.copy(sample)
    out.queries, out.answers, out.entities, out.ref_indices = queries, answers, entities, refs
    out.masks = np.stack(masks)
    out.meta = dict(sample.meta or {}, repeat=repeat)
    if "absent" in (sample.meta or {}):
        out.meta["absent"] = flags
    return out
