"""Which earlier round a query refers to: the one given; else one the query names ("round 2", "the second
round", "the first structure", "the first one", "the original structure", "the one you just segmented", an
entity named before, "back to the kidney" for an earlier "left kidney"); else the one a model's learned
reference scorer picks (reference_scorer.py); else the previous round."""

from __future__ import annotations

import numbers
import re
from typing import Sequence

import numpy as np

from .errors import RoundReferenceError

_ORDINALS = {"first": 1, "second": 2, "third": 3, "fourth": 4, "fifth": 5, "sixth": 6, "seventh": 7,
             "eighth": 8, "ninth": 9, "tenth": 10, "eleventh": 11, "twelfth": 12}
_ROUND_NUMBER = re.compile(r"\b(?:round|r|turn)\s*#?\s*(\d{1,4})\b", re.IGNORECASE)
_ROUND_ORDINAL = re.compile(r"\b(" + "|".join(_ORDINALS) + r")\s+(?:round|turn|answer|mask|result)\b", re.IGNORECASE)
# "the first structure", "the first one", "the second segmentation": an ordinal of a generic noun counts the
# rounds. Ordinals of anatomical nouns are anatomy ("the first rib", "the first lumbar vertebra"), never rounds.
_GENERIC_NOUNS = (r"one|structure|structures|organ|thing|object|item|segmentation|selection|"
                  r"finding|target|outline|contour|question|request|query|step|mask|answer|result|round|turn")
# (not "segment": "the fourth segment" is a liver segment)
_GENERIC_ORDINAL = re.compile(r"\bthe\s+(" + "|".join(_ORDINALS) + r"|very\s+first|original|initial|last|previous|"
                              r"latest|penultimate|second[\s-]+to[\s-]+last)\s+(?:" + _GENERIC_NOUNS + r")\b",
                              re.IGNORECASE)
# "the one you just segmented", "what we just did", "the one before": the latest round (not "the one before
# last", "the one before that", "the one before the sacrum")
_JUST_DONE = re.compile(r"\b(?:you|we|i)\s+just\s+(?:did|done|segmented|made|drew|outlined|marked|found|got)\b|"
                        r"\bthe\s+one\s+before\b(?!\s+(?:last|that|this|it|the|a|an)\b)", re.IGNORECASE)
_HEAD_STOP = re.compile(r"\b(?:in|inside|within|of|on|at|near|next|beside|around|along|behind|from|to|with|"
                        r"adjacent|between|under|over|above|below)\b")


def validate_reference(reference: int, num_rounds: int) -> int:
    if not isinstance(reference, numbers.Integral) or isinstance(reference, bool):  # numpy ints are fine
        raise RoundReferenceError(f"reference must be a round number, got {reference!r}")
    reference = int(reference)
    if num_rounds == 0:
        raise RoundReferenceError(f"reference to round {reference}, but the session has no rounds yet")
    if not 1 <= reference <= num_rounds:
        raise RoundReferenceError(f"reference to round {reference}, but the session has rounds 1..{num_rounds}"
                                  + (" (a reference must point to an earlier round)" if reference > num_rounds else ""))
    return reference


def _ordinal_value(word: str, n: int) -> int:
    word = re.sub(r"[\s-]+", " ", word.lower())
    if word in ("last", "previous", "latest"):
        return n
    if word in ("original", "initial"):
        return 1
    if word in ("penultimate", "second to last"):
        return n - 1
    return _ORDINALS[word.replace("very ", "")]


def head_noun(entity: str | None) -> str | None:
    """The noun an entity is called by for short: the last word before its first preposition ("left kidney" →
    "kidney", "lesion inside the left kidney" → "lesion", "right lobe of the liver" → "lobe")."""
    words = re.sub(r"[^a-z0-9]+", " ", (entity or "").lower()).split()
    cut = next((i for i, w in enumerate(words) if _HEAD_STOP.fullmatch(w)), len(words))
    return words[cut - 1] if cut > 0 else None


_BACK = re.compile(r"\b(?:back\s+to|return\s+to|revisit|again|once\s+more)\b", re.IGNORECASE)


def _round_by_head_noun(text: str, entities: Sequence[str | None]) -> int | None:
    """In a query that goes back ("go back to the kidney", "the kidney again"), the latest round whose entity's
    head noun it names as a whole phrase: "the <noun>" right before punctuation or the end. Without such a cue a
    bare noun is what the query asks for ("Which part of it is the nodule?" after "nodule in the right lung"
    asks for another nodule), and "the kidney with the same density" describes another structure."""
    lowered = text.lower()
    if not _BACK.search(lowered):
        return None
    best = None
    for number, entity in enumerate(entities, start=1):
        noun = head_noun(entity)
        phrase_end = r"s?(?=\s*(?:[.,;:!?]|$|\s+(?:again|please|once more)\b))"
        if noun and re.search(r"\bthe\s+" + re.escape(noun) + phrase_end, lowered):
            best = number  # ties go to the most recent round
    return best


def named_round(query: str, entities: Sequence[str | None]) -> int | None:
    """The round (1-based) the query names by number, by ordinal, or by an earlier entity, or None."""
    n = len(entities)
    text = query or ""
    for pattern, value in ((_ROUND_NUMBER, lambda m: int(m.group(1))),
                           (_ROUND_ORDINAL, lambda m: _ORDINALS[m.group(1).lower()]),
                           (_GENERIC_ORDINAL, lambda m: _ordinal_value(m.group(1), n))):
        match = pattern.search(text)
        if match:
            number = value(match)
            return number if 1 <= number <= n else None
    lowered = " " + re.sub(r"[^a-z0-9]+", " ", text.lower()) + " "
    best: tuple[int, int] | None = None  # (name length, round)
    for number, entity in enumerate(entities, start=1):
        if not entity:
            continue
        name = " " + re.sub(r"[^a-z0-9]+", " ", entity.lower()).strip() + " "
        if name.strip() and name in lowered and (best is None or len(name) >= best[0]):
            best = (len(name), number)
    return best[1] if best else _round_by_head_noun(text, entities)


def names_a_round(query: str, entities: Sequence[str | None]) -> bool:
    """Whether the rules decide the query's round (by number, ordinal, name or "the one you just segmented")
    rather than the reference scorer's guess."""
    return named_round(query, entities) is not None or bool(entities and _JUST_DONE.search(query or ""))


def resolve_reference(query: str, entities: Sequence[str | None], explicit: int | None = None,
                      scorer=None, referable: Sequence[bool] | None = None) -> int | None:
    """Reference of a new round given the entities of the rounds so far (None for a first round): the one given;
    else the round the query names; else the latest for "the one you just segmented"; else the one `scorer` (a `reference_scorer.ReferenceScorer`) picks; else the
    previous round. `referable` (one flag per round, default all) leaves out rounds with nothing to refer to (a
    target answered as not on the slice has no mask): only a query that names such a round by number or ordinal
    gets it, and with no referable round a query refers to none."""
    if explicit is not None:
        return validate_reference(explicit, len(entities))
    if not entities:
        return None
    ok = [True] * len(entities) if referable is None else [bool(v) for v in referable]
    if len(ok) != len(entities):
        raise ValueError(f"referable has {len(ok)} flags for {len(entities)} rounds")
    named = named_round(query, [e if usable else None for e, usable in zip(entities, ok)])
    if named is not None:
        return named
    if not any(ok):
        return None
    latest = max(number for number, usable in enumerate(ok, start=1) if usable)
    if _JUST_DONE.search(query or ""):  # after names: "the lesion in the kidney, not the one you just did"
        return latest
    return (scorer.choose(query, entities, ok) if scorer is not None else None) or latest


GUESS_TRIES = 3  # the scorer's best rounds an Ask tries in turn while the answer places the asked structure,
# absent, inside the round tried ("nodule in the right lung: not on this slice." on the right lung's round) or
# is a structure another round on the slice has drawn (Engine.ask)


# What a query that only asks for "it" again is made of: request verbs, politeness and the reference.
_AGAIN_WORDS = frozenset("""it this that one structure again once more please segment segmentation show me mark outline
delineate highlight draw redo repeat mask of can could you would give now do a the same and just""".split())


def asks_for_it_again(query: str) -> bool:
    """Whether a query asks only for the referenced structure again ("Segment it.", "Show me that one again,
    please."): no word beyond a request, politeness and the reference. Its answer may be the referenced round's
    own structure; any other query with "it" asks for something new (Engine.ask)."""
    words = re.findall(r"[a-z]+", (query or "").lower())
    return bool(words) and all(w in _AGAIN_WORDS for w in words)


def reference_candidates(query: str, entities: Sequence[str | None], explicit: int | None = None,
                         scorer=None, referable: Sequence[bool] | None = None, tries: int = GUESS_TRIES) -> list[int]:
    """The rounds (1-based) an Ask may refer to, in the order it tries them: `resolve_reference`'s round first;
    where that round is the reference scorer's guess (no round given or named), the scorer's next best referable
    rounds after it, `tries` in all (Engine.ask tries the next one when the model answers that the asked
    structure is not in the guessed round's, data/empty_containers.py, or is one another round has drawn).
    Empty for a first round or when no round can be referred to."""
    first = resolve_reference(query, entities, explicit, scorer, referable)
    if first is None:
        return []
    ok = np.ones(len(entities), bool) if referable is None else np.asarray(referable, bool)
    visible = [e if usable else None for e, usable in zip(entities, ok)]  # as resolve_reference reads the names
    if explicit is not None or not hasattr(scorer, "scores") or names_a_round(query, visible):
        return [first]
    scores = scorer.scores(query, entities).astype(np.float64)
    order = [int(j) + 1 for j in np.argsort(-scores, kind="stable") if ok[j]]
    return ([first] + [n for n in order if n != first])[:max(1, tries)]


CLOSE_ALTERNATIVE = 0.5  # another round fits about as well when the scorer gives it at least half the chosen one's
# probability (hard split, guessed references: a third of them have one; where the guess was not the dataset's
# round, that round is among them in 36 %, session 41)


def is_guess(query: str, entities: Sequence[str | None], explicit: int | None = None) -> bool:
    """Whether a later round's reference is a guess: no round given and none the rules read from the query."""
    return explicit is None and bool(entities) and not names_a_round(query, entities)


def close_alternatives(query: str, entities: Sequence[str | None], chosen: int, scorer=None,
                       referable: Sequence[bool] | None = None, ratio: float = CLOSE_ALTERNATIVE,
                       most: int = 2) -> list[int]:
    """Other referable rounds (1-based, likeliest first, `most` at most) that the reference scorer rates about as
    likely as the guessed round `chosen`: at least `ratio` times its softmax probability. Empty without a
    scorer. The panel shows them beside a guessed reference, so that the user can pick one and ask again."""
    if not hasattr(scorer, "scores") or not entities:
        return []
    scores = scorer.scores(query, entities).astype(np.float64)
    ok = np.ones(len(entities), bool) if referable is None else np.asarray(referable, bool)
    p = np.exp(scores - scores.max())
    p /= p.sum()
    if not np.all(np.isfinite(scores)) or not p[chosen - 1] > 0:
        return []
    floor = ratio * p[chosen - 1]
    order = [int(j) + 1 for j in np.argsort(-p, kind="stable")
             if ok[j] and p[j] > 0 and p[j] >= floor and j != chosen - 1]
    return order[:most]


def alternatives_note(alternatives: Sequence[int], entities: Sequence[str | None]) -> str:
    """"R5 (left kidney) fits about as well" for a round whose guessed reference had close alternatives (1-based
    round numbers; `entities` of the session's rounds); "" without any."""
    named = [f"R{n} ({entities[n - 1] or 'unnamed'})" if 1 <= n <= len(entities) else f"R{n}" for n in alternatives]
    if not named:
        return ""
    return " or ".join(named) + (" fits" if len(named) == 1 else " fit") + " about as well"


def refer_as_it(query: str, entity: str | None) -> str:
    """The query as the model reads it: "the <entity of the referenced round>" becomes "it", as in every
    training dialogue, where the reference travels in the crop and box tokens and the text says "it"
    ("Now the lesion inside the left kidney." → "Now the lesion inside it."). Only the whole name, and only where
    it ends a phrase (before punctuation or the end): "the kidney of the same density" after "left kidney" names
    another structure, and "the artery that carries blood from the heart to the body" is a description, not a
    reference. Without such a mention the query is kept as it is."""
    if not entity or not query:
        return query
    words = r"\s+".join(map(re.escape, re.sub(r"[^a-z0-9]+", " ", entity.lower()).split()))
    if not words:
        return query
    return re.sub(r"\bthe\s+" + words + r"(?=\s*(?:[.,;:!?]|$))", "it", query, flags=re.IGNORECASE)
