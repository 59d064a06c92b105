"""Absent targets: rounds that ask for a structure the slice does not show, answered as absent with no segment.

A user on a chest slice may ask for the liver; a slice above the kidneys has none. Such a round's answer is
`<entity>: not on this slice.` without `[SEG]` (so the engine draws nothing) and its mask is empty. The
candidates are the organs the generator draws in any region (`CATALOGUE`) minus every structure present on
the slice by name or by noun (a slice with a "descending aorta" is not asked for "the aorta" as absent).
"""

from __future__ import annotations

import numpy as np

from ..answers import format_answer
from .dialogues import where
from .inserted_rounds import InsertedRounds
from .paraphrase import rephrase
from .templates import allowed_indices, render

ABSENT_TEXT = "not on this slice"
# Organs the generator draws, per region (tests/test_absent.py keeps it equal to what it draws).
CATALOGUE = {
    "abdomen": ("liver", "spleen", "left kidney", "right kidney", "aorta", "inferior vena cava", "gallbladder",
                "stomach", "vertebra", "left psoas muscle", "right psoas muscle", "spinal canal",
                "left renal pelvis", "right renal pelvis"),
    "chest": ("left lung", "right lung", "heart", "descending aorta", "esophagus", "sternum", "vertebra",
              "spinal canal"),
    "brain": ("left hemisphere", "right hemisphere", "left lateral ventricle", "right lateral ventricle", "skull"),
}
NOUNS = {"inferior vena cava": "vein", "descending aorta": "aorta", "left psoas muscle": "psoas muscle",
         "right psoas muscle": "psoas muscle", "left renal pelvis": "renal pelvis",
         "right renal pelvis": "renal pelvis",
         "left lateral ventricle": "lateral ventricle", "right lateral ventricle": "lateral ventricle"}


def absent_answer(entity: str) -> str:
    """The answer to a round whose target is not on the slice: names it, says so, carries no [SEG]."""
    return f"{entity}: {ABSENT_TEXT}."


def is_absent_answer(answer: str) -> bool:
    return ABSENT_TEXT in (answer or "") and "[SEG]" not in (answer or "")


def _noun(name: str) -> str:
    return NOUNS.get(name, name.split()[-1] if name.split()[0] in ("left", "right") else name)


def absent_candidates(sl) -> list[str]:
    """Organ names a user could ask for that the slice does not show (by name or noun)."""
    present_names = {i.name for i in sl.instances}
    present_nouns = {i.noun for i in sl.instances} | {_noun(n) for n in present_names}
    names = sorted({n for names in CATALOGUE.values() for n in names})
    return [n for n in names if n not in present_names and _noun(n) not in present_nouns
            and not any(n in p or p in n for p in present_names)]


def absent_query(rng: np.random.Generator, name: str, grammar: float = 0.5, use_reserved: bool = False) -> str:
    """A direct request for `name`: a template (train templates unless `use_reserved`) or the grammar."""
    if rng.uniform() < grammar:
        return rephrase(rng, "direct", {"name": name}, typos=True)
    indices = allowed_indices("direct", use_reserved)
    return render("direct", int(indices[int(rng.integers(len(indices)))]), name=name)


def with_absent_rounds(sample, sl, rng: np.random.Generator, p: float = 0.15, use_reserved: bool = False,
                       present: float = 0.0, refer_previous: bool = False, first: float = 0.0):
    """A copy of a generated Sample with absent-target rounds inserted after some rounds (probability p each),
    and with probability `first` one before the first round (a user's first question can be about a structure
    the slice lacks; the dialogue's first round then follows it, referring to nothing, as the product's resolver
    never refers to a round answered absent). An inserted round refers to nothing, has an empty mask and the
    absent answer; the references of later rounds are renumbered. `meta["absent"]` flags each round.

    With `present` > 0, direct requests for structures that *are* on the slice (not asked before in the
    dialogue) are inserted the same way (probability `present` after each round), answered and segmented as a
    first round is: absent rounds are direct requests, and without present ones to contrast them a model learns
    "a later direct request means absent" from the wording instead of looking at the slice. With
    `refer_previous` an inserted round refers to the round before it, as the product's resolver makes every
    later round do."""
    candidates = absent_candidates(sl)
    rounds = InsertedRounds(sample)
    if candidates and first > 0 and rng.uniform() < first:
        name = str(candidates[int(rng.integers(len(candidates)))])
        rounds.insert(absent_query(rng, name, use_reserved=use_reserved), absent_answer(name), name, None,
                      np.zeros(np.shape(sample.masks[0]), bool), absent=True)
    for k in range(sample.num_rounds):
        rounds.keep(k)
        if present > 0 and k < sample.num_rounds - 1 and rng.uniform() < present:
            asked = set(rounds.entities) | set(sample.entities)
            shown = [i for i in sl.instances if i.kind != "body" and i.name not in asked]
            if shown:
                inst = shown[int(rng.integers(len(shown)))]
                rounds.insert(absent_query(rng, inst.name, use_reserved=use_reserved),
                              format_answer(inst.name, where(inst)), inst.name,
                              len(rounds) - 1 if refer_previous else None, inst.mask)
        if candidates and k < sample.num_rounds - 1 and rng.uniform() < p:
            name = str(candidates[int(rng.integers(len(candidates)))])
            rounds.insert(absent_query(rng, name, use_reserved=use_reserved), absent_answer(name), name,
                          len(rounds) - 1 if refer_previous else None, np.zeros(np.shape(sample.masks[0]), bool),
                          absent=True)
    return rounds.build("absent")
