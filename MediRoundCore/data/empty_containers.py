"""Lesion queries whose referenced organ holds no lesion on the slice: answered absent, with no segment.

"Segment the nodule in it." after both lungs: only the image tells which lung has the nodule, and the product's
resolver guesses the round ("it"). With a wrong guess the model used to draw a confident lesion inside the
wrong organ (runs/probe/lite_container_evidence.py: inside it in every such round, and its JCM score no lower).
Trained on these rounds it says "nodule in the right lung: not on this slice." instead, and the engine then
tries the resolver's next candidate (`Engine.ask`). Two kinds of rounds are made:

- before a lesion round that refers to the lesion's organ, with probability p, the same query referring to an
  earlier round whose organ hosts lesions in the generator but holds none on this slice;
- in a dialogue whose references are the product's (data/product_references.py), a lesion round the resolver
  referred to such an empty organ becomes that absent round, followed by the same query referring to the
  lesion's own organ (the round the dataset meant). The engine's retry asks it without the absent turn in the
  history; here that turn stays, as in a dialogue where the user picked the wrong organ and then the right one.

Only "it" queries: one that names its organ or a round ("the cyst inside the left kidney", "… from round 2",
"the last one") is left as it is.
"""

from __future__ import annotations

import re

import numpy as np

from ..references import names_a_round
from ..answers import format_answer
from .absent import absent_answer, absent_query
from .dialogues import where
from .inserted_rounds import InsertedRounds

# Organ nouns the generator draws lesions in (scene._LESION_KINDS and the brain tumours of scene._brain).
HOST_NOUNS = frozenset({"liver", "spleen", "kidney", "lung", "hemisphere"})
_NAMES_A_ROUND = re.compile(r"\bround\s*\d", re.IGNORECASE)


def empty_hosts(sl) -> set[str]:
    """Names of the slice's organs that could hold a lesion but hold none on it."""
    with_lesion = {i.parent for i in sl.instances if i.kind == "lesion"}
    return {i.name for i in sl.instances if i.kind == "organ" and i.noun in HOST_NOUNS and i.name not in with_lesion}


def lesion_named_in(lesion, host: str) -> str:
    """The entity a lesion of `lesion`'s kind would have in organ `host` ("nodule in the right lung",
    "left hemisphere tumour")."""
    if lesion.parent and lesion.name.startswith(lesion.parent + " "):  # "right hemisphere tumour"
        return f"{host} {lesion.name[len(lesion.parent) + 1:]}"
    return f"{lesion.noun} in the {host}"


def _lesion_round(sample, sl, k: int):
    """The lesion instance round k asks for with an "it" query (one whose round the resolver's rules do not
    decide), or None. Bare requests ("Segment the lesion.": the slice's lesion, whatever the reference) and
    structures asked again are not such queries."""
    meta = sample.meta or {}
    if any((meta.get(flag) or [False] * sample.num_rounds)[k] for flag in ("bare", "repeat", "absent")):
        return None
    entity = sample.entities[k]
    lesion = next((i for i in sl.instances if i.name == entity and i.kind == "lesion"), None)
    query = (sample.queries[k] or "").lower()
    if lesion is None or lesion.parent is None or lesion.parent.lower() in query or _NAMES_A_ROUND.search(query) \
            or names_a_round(query, sample.entities[:k]):
        return None
    return lesion


def with_empty_container_rounds(sample, sl, rng: np.random.Generator, p: float = 0.3):
    """A copy of `sample` with the absent rounds described in the module's text (`meta["absent"]` flags them);
    `sample` itself when it has none."""
    empty = empty_hosts(sl)
    if not empty:
        return sample
    product = bool((sample.meta or {}).get("product_references"))
    meant = (sample.meta or {}).get("dataset_references") or sample.ref_indices  # the rounds the queries meant
    absent_flags = list((sample.meta or {}).get("absent") or [False] * sample.num_rounds)
    rounds = InsertedRounds(sample)
    made = False
    for k in range(sample.num_rounds):
        lesion = _lesion_round(sample, sl, k)
        ref = sample.ref_indices[k]
        if lesion is not None and ref is not None:
            mask = np.zeros(np.shape(sample.masks[k]), bool)
            guessed = product and meant[k] is not None and sample.entities[meant[k]] == lesion.parent
            if guessed and sample.entities[ref] in empty:  # the resolver's guess was an empty organ
                wrong = lesion_named_in(lesion, sample.entities[ref])
                rounds.insert(sample.queries[k], absent_answer(wrong), wrong, rounds.new_index(ref), mask, absent=True)
                rounds.keep(k, ref=meant[k])  # then the same query on the lesion's own organ
                made = True
                continue
            if not product and sample.entities[ref] == lesion.parent and rng.uniform() < p:
                organs = [j for j in range(k) if sample.entities[j] in empty and not absent_flags[j]]
                if organs:
                    j = rounds.new_index(organs[int(rng.integers(len(organs)))])
                    organ = rounds.entities[j]
                else:  # none asked for yet: a request for one first, answered and segmented
                    fresh = sorted(empty - set(sample.entities) - set(rounds.entities))
                    if not fresh:
                        rounds.keep(k)
                        continue
                    inst = sl.instance(fresh[int(rng.integers(len(fresh)))])
                    rounds.insert(absent_query(rng, inst.name), format_answer(inst.name, where(inst)), inst.name,
                                  len(rounds) - 1 if len(rounds) else None, inst.mask)
                    j, organ = len(rounds) - 1, inst.name
                wrong = lesion_named_in(lesion, organ)
                rounds.insert(sample.queries[k], absent_answer(wrong), wrong, j, mask, absent=True)
                made = True
        rounds.keep(k)
    if not made:
        return sample
    out = rounds.build("absent")
    out.meta.pop("dataset_references", None)  # indices of the rounds before the insertions
    return out
