"""Requests that name no structure: "Segment the lesion.", "Is there a mass? Segment it.", "Segment the largest
lesion." A radiologist's first words on a scan with one abnormality name no organ, but the generator's rounds
always do ("the lesion in the left kidney"), so a model learns to copy the words instead of looking: on real
brain MR, "Segment the lesion." was answered "lesion in the left kidney" (lite, step 1850).

Inserted rounds here ask with a generic noun (or the lesion's own: "Segment the nodule.") and nothing else. The
target is the slice's only lesion shown, or for "the largest …" the clearly largest one (at least 1.3 times the
next); a slice that shows none is answered absent ("lesion: not on this slice."). The answer names the
structure found, as a direct request's does; the mask is the structure's.
"""

from __future__ import annotations

import numpy as np

from ..answers import format_answer
from .absent import absent_answer, is_absent_answer
from .dialogues import where
from .inserted_rounds import InsertedRounds

GENERIC_NOUNS = ("lesion", "abnormality", "mass", "finding", "lesion", "tumour", "tumor")
ONE = ("Segment the {noun}.", "Is there a {noun}? Segment it.", "Outline the {noun}.", "Find the {noun}.",
       "Please segment the {noun} on this slice.", "Show me the {noun}.", "Where is the {noun}?",
       "Can you segment the {noun}?", "Mark the {noun}.", "Highlight the {noun}.", "{Noun}?", "Any {noun} here?",
       "Segment the {noun} please", "Contour the {noun}.")
LARGEST = ("Segment the largest {noun}.", "Outline the biggest {noun}.", "Which {noun} is largest? Segment it.",
           "Show me the largest {noun}.", "Segment the biggest {noun} on this slice.", "The largest {noun}, please.")
CLEARLY_LARGER = 1.3


def shown_lesions(sl) -> list:
    """The slice's lesion-kind structures with pixels in this view, largest first."""
    found = [i for i in sl.instances if i.kind == "lesion" and i.mask.any()]
    return sorted(found, key=lambda i: int(i.mask.sum()), reverse=True)


def bare_request(sl, rng: np.random.Generator) -> tuple[str, str, str, np.ndarray] | None:
    """(query, answer, entity, mask) of one request without a structure's name for this slice, or None when
    the slice supports none (several lesions, none clearly the largest)."""
    def pick(options):
        return str(options[int(rng.integers(len(options)))])

    lesions = shown_lesions(sl)
    empty = np.zeros(np.shape(sl.instances[0].mask), bool)
    if not lesions:
        noun = pick(GENERIC_NOUNS)
        return _render(pick(ONE), noun), absent_answer(noun), noun, empty
    if len(lesions) == 1:
        target, frames = lesions[0], ONE
    elif lesions[0].mask.sum() >= CLEARLY_LARGER * lesions[1].mask.sum():
        target, frames = lesions[0], LARGEST
    else:
        return None
    noun = pick(GENERIC_NOUNS + (target.noun,))
    return _render(pick(frames), noun), format_answer(target.name, where(target)), target.name, target.mask


def _render(frame: str, noun: str) -> str:
    return frame.format(noun=noun, Noun=noun[0].upper() + noun[1:])


def with_bare_requests(sample, sl, rng: np.random.Generator, p: float = 0.1, refer_previous: bool = True):
    """A copy of a generated Sample with a bare request before the first round (probability p) or after a
    round (probability p/2 each); at most one per dialogue. An inserted round after others refers to the round
    before it (as the product's resolver makes every later round do) when `refer_previous`; later rounds'
    references are renumbered (`InsertedRounds`)."""
    request = bare_request(sl, rng) if sl.instances else None
    if request is None:
        return sample
    query, answer, entity, mask = request
    absent = is_absent_answer(answer)
    rounds = InsertedRounds(sample)
    done = False
    if rng.uniform() < p:
        rounds.insert(query, answer, entity, None, mask, absent=absent, bare=True)
        done = True
    for k in range(sample.num_rounds):
        rounds.keep(k)
        if not done and k < sample.num_rounds - 1 and rng.uniform() < p / 2:
            rounds.insert(query, answer, entity, len(rounds) - 1 if refer_previous else None, mask, absent=absent,
                          bare=True)
            done = True
    return rounds.build("absent", "bare") if done else sample
