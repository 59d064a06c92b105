"""Training dialogues whose references are the ones a user gets: the product's resolver picks them from the text.

A generated dialogue carries the round each query refers to. In the product nobody gives it: the resolver
(`references.resolve_reference`: a round the query names, else the learned `ReferenceScorer`'s pick, else the
previous round) reads it from the query and the earlier rounds' entities, and every later round gets one. Where
the text cannot decide ("Segment the nodule within it." after both lungs) the resolver's round is another than
the dataset's, and a model trained only on the dataset's references follows a wrong crop and box to a wrong
structure (hard split: 88.2 Dice with the dataset's references, 81.7 with the product's). Here a share of the
dialogues get the resolver's references, the query read as the engine reads it (`refer_as_it`), and their
target masks stay the truth: the model learns to find the asked structure from the text and the image when
the reference is not the one the dialogue meant.
"""

from __future__ import annotations

import copy
from typing import Sequence

import numpy as np

from ..references import refer_as_it, resolve_reference


def product_references(queries: Sequence[str], entities: Sequence[str | None],
                       absent: Sequence[bool] | None = None, scorer=None) -> list[int | None]:
    """The 0-based round each round refers to as the product resolves it (None for the first round, or where no
    earlier round can be referred to); rounds flagged `absent` have no mask and are referable only by number."""
    absent = [False] * len(queries) if absent is None else [bool(a) for a in absent]
    refs: list[int | None] = []
    for k, query in enumerate(queries):
        number = resolve_reference(query, list(entities[:k]), None, scorer, [not a for a in absent[:k]])
        refs.append(None if number is None else number - 1)
    return refs


def with_product_references(sample, rng: np.random.Generator, share: float, scorer=None):
    """With probability `share`, a copy of `sample` whose references are the product's (see the module's text),
    but for rounds flagged `meta["repeat"]`, already read as the product reads them; otherwise `sample` itself."""
    if share <= 0 or rng.uniform() >= share:
        return sample
    refs = product_references(sample.queries, sample.entities, (sample.meta or {}).get("absent"), scorer)
    # a repeated structure (data/repeats.py) is already read as the product reads it: the product resolved its
    # name to the earlier round and said "it"; its text no longer names the round, so its reference stays
    for k, repeated in enumerate((sample.meta or {}).get("repeat") or []):
        if repeated:
            refs[k] = sample.ref_indices[k]
    out = copy.copy(sample)
    out.ref_indices = refs
    out.queries = [q if r is None else refer_as_it(q, sample.entities[r]) for q, r in zip(sample.queries, refs)]
    out.meta = {**(sample.meta or {}), "product_references": True, "dataset_references": list(sample.ref_indices)}
    return out


def shipped_scorer():
    """The shipped model's reference scorer (None where the checkout has none: the resolver's rules alone). It
    reads only the text (query and earlier entities), not the model, and `train.export` keeps it beside the model
    trained here, so training and the product resolve with the same one."""
    from ..checkpoint_info import DEFAULT_CHECKPOINT
    from ..reference_scorer import ReferenceScorer

    return ReferenceScorer.from_pretrained(DEFAULT_CHECKPOINT)
