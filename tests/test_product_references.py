"""Training dialogues with the references a user gets (data/product_references.py): the product's resolver picks
them from the text, the query is read as the engine reads it, targets stay the truth."""

from __future__ import annotations

import itertools

import numpy as np

from MediRoundCore.data.dataset import Sample
from MediRoundCore.data.product_references import product_references, with_product_references
from MediRoundCore.references import refer_as_it
from MediRoundCore.session import Round, Session
from MediRoundCore.train.run import training_stream


def _sample(queries, entities, refs, absent=None):
    n = len(queries)
    masks = np.zeros((n, 8, 8), bool)
    for k in range(n):
        masks[k, k % 8, :] = True
    meta = {} if absent is None else {"absent": absent}
    return Sample(image=np.zeros((8, 8), np.float32), queries=list(queries), answers=[f"{e}: x. [SEG]" for e in entities],
                  masks=masks, ref_indices=list(refs), entities=list(entities), meta=meta)


def test_references_follow_the_resolver_rules():
    queries = ["Segment the liver.", "Segment the spleen.", "Now the lesion inside it.",
               "Go back to the liver.", "Segment the heart.", "Mark the lesion in the one from round 2."]
    entities = ["liver", "spleen", "lesion in the spleen", "liver", "heart", "lesion in the spleen"]
    absent = [False, False, False, False, True, False]
    refs = product_references(queries, entities, absent)
    # first round none; no scorer: the previous round; "go back to the liver" names round 1; round 5 is absent
    # (nothing to crop), so round 6 would skip it, but it names round 2 by number
    assert refs == [None, 0, 1, 0, 3, 1]
    assert product_references(["Segment it."] * 3, ["a", "b", "c"], [False, True, False]) == [None, 0, 0]


def test_resolver_references_match_the_session_resolver():
    """The same reference a Session gives the same rounds (what the engine does at an Ask)."""
    queries = ["Segment the left kidney.", "Now the lesion inside it.", "Return to the left kidney.",
               "Segment the first structure again."]
    entities = ["left kidney", "lesion in the left kidney", "left kidney", "left kidney"]
    session = Session("v")
    expected = []
    for k, (q, e) in enumerate(zip(queries, entities)):
        number = session.resolve_reference(q)
        expected.append(None if number is None else number - 1)
        session.rounds.append(Round(number=k + 1, view="axial", slice_index=0, query=q, answer=f"{e}: x.", entity=e,
                                    reference=number, mask=np.zeros((2, 2), bool)))
    assert product_references(queries, entities) == expected


def test_a_share_of_dialogues_refer_as_the_product_reads():
    sample = _sample(["Segment the liver.", "Segment the spleen.", "Now the lesion inside it."],
                     ["liver", "spleen", "lesion in the liver"], [None, None, 0])
    rng = np.random.default_rng(0)
    assert with_product_references(sample, rng, 0.0) is sample
    out = with_product_references(sample, rng, 1.0)
    assert out.ref_indices == [None, 0, 1]  # the product refers every later round (here: the previous one)
    assert out.masks is sample.masks and out.answers == sample.answers  # targets unchanged
    assert sample.ref_indices == [None, None, 0]  # the input is not changed
    named = _sample(["Segment the liver.", "Segment the spleen.", "Which lesion is in the liver?"],
                    ["liver", "spleen", "lesion in the liver"], [None, None, 0])
    out = with_product_references(named, rng, 1.0)
    assert out.ref_indices[2] == 0  # the query names the liver's round
    assert out.queries[2] == "Which lesion is in it?"  # as the engine's refer_as_it reads it
    shares = [with_product_references(sample, rng, 0.3) is not sample for _ in range(400)]
    assert 0.22 < np.mean(shares) < 0.38


def test_training_stream_takes_the_option():
    base = list(itertools.islice(training_stream("train", paraphrase=0.3, product_references=0.0)(3), 30))
    swapped = list(itertools.islice(training_stream("train", paraphrase=0.3, product_references=1.0)(3), 30))
    from MediRoundCore.data.product_references import shipped_scorer

    scorer = shipped_scorer()
    changed = 0
    for a, b in zip(base, swapped):
        assert b.queries == [q if r is None else refer_as_it(q, a.entities[r]) for q, r in zip(a.queries, b.ref_indices)]
        assert np.array_equal(a.masks, b.masks)
        assert b.ref_indices == product_references(a.queries, a.entities, (a.meta or {}).get("absent"), scorer)
        changed += b.ref_indices != a.ref_indices
    assert changed > 0


def test_repeated_structures_keep_the_reference_the_product_read_from_their_name():
    """A repeat round says "Segment it." because the product resolved the structure's name to its round
    (data/repeats.py); re-resolving "it" would lose that, so its reference stays."""
    sample = _sample(["Segment the liver.", "Segment the spleen.", "Now the lesion inside it.", "Segment it."],
                     ["liver", "spleen", "lesion in the spleen", "liver"], [None, None, 1, 0])
    sample.meta["repeat"] = [False, False, False, True]
    out = with_product_references(sample, np.random.default_rng(0), 1.0)
    assert out.ref_indices == [None, 0, 1, 0] and out.queries[3] == "Segment it."
