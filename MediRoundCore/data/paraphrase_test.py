"""The held-out paraphrase test set: wordings written apart from the training grammar (`paraphrase.py`) and the
templates, never trained on. Same dialogues, images, masks and references as a split; only the queries
change, so its Dice is comparable round by round with the templated wording of the same rounds.

Frames, verbs, relation wordings and reference expressions here share no frame or verb with the grammar
(`tests/test_paraphrase.py` checks it). Misspellings are hand-written, not the grammar's random slips.
"""

from __future__ import annotations

import numpy as np

from .paraphrase import slots_of

FRAMES = (
    "Kindly shade in the {target}.", "Point out the {target} and colour it in.", "Paint the {target} for me.",
    "I'm looking for the {target} - can you circle it?", "Bring up the {target}.",
    "Segmentation request: {target}.", "Could we see the {target} coloured?", "Make the {target} stand out.",
    "Pull out the {target}, if you would.", "Fill in the {target}.", "Single out the {target}.",
    "Carve out the {target} on this picture.", "Would you be able to pick the {target}?",
    "Colour the {target} please", "Let me see the {target} on its own.",
)
INSIDE = ("{lesion} that's in {ref}", "{lesion} found within the borders of {ref}", "{lesion} inside of {ref}",
          "{lesion} hiding in {ref}")
PART_OF = ("{ref}'s {part}", "{part} portion of {ref}", "{part} component of {ref}")
SIDE = {"left": "lying on the patient's left-hand side of {ref}",
        "right": "lying on the patient's right-hand side of {ref}",
        "anterior": "sitting ahead of {ref}", "posterior": "sitting at the back of {ref}",
        "adjacent": "right up against {ref}", "above": "higher up than {ref} on the picture",
        "below": "lower down than {ref} on the picture"}
ATTRIBUTE = {"same density": "that matches {ref} in density", "similar density": "that matches {ref} in density",
             "same tissue": "made of the same tissue as {ref}", "same signal": "that matches {ref} in signal",
             "similar signal": "that matches {ref} in signal", "same kind": "of the same sort as {ref}",
             "same type": "of the same sort as {ref}", "larger": "bigger in size than {ref}",
             "bigger": "bigger in size than {ref}", "smaller": "tinier than {ref}"}
MISSPELLINGS = {"kidney": "kindey", "liver": "livr", "nodule": "nodul", "tumour": "tumur", "aorta": "aortha",
                "spleen": "splen", "lung": "lunng", "vertebra": "vertebrea", "stomach": "stomache"}


def reference_words(rng: np.random.Generator, ref_round: int, current: int, entity: str | None) -> str:
    options = ["it", "that one", "the same one as earlier"]
    if entity:
        options.append(f"the {entity}")
    if ref_round == 0:
        options.append("the structure we started with")
    if ref_round == current - 1:
        options.append("what we just did")
    return str(options[int(rng.integers(len(options)))])


def _side_key(rel: str) -> str:
    for key in ("left", "right", "adjacent", "next", "touching", "front", "anterior", "behind", "posterior",
                "above", "below"):
        if key in rel:
            aliases = {"next": "adjacent", "touching": "adjacent", "front": "anterior", "behind": "posterior"}
            return aliases.get(key, key)
    raise ValueError(f"unknown spatial phrase {rel!r}")


def _attribute(which: str, ref: str) -> str:
    for key, text in ATTRIBUTE.items():
        if key in which:
            return text.format(ref=ref)
    raise ValueError(f"unknown attribute phrase {which!r}")


def heldout_target(relation: str, slots: dict[str, str], ref: str, rng: np.random.Generator) -> str:
    pick = lambda options: str(options[int(rng.integers(len(options)))])  # noqa: E731
    if relation == "direct":
        return slots["name"]
    if relation == "lesion":
        return pick(INSIDE).format(lesion=slots["lesion"], ref=ref)
    if relation == "hierarchy":
        return pick(PART_OF).format(part=slots["part"], ref=ref)
    if relation == "spatial":
        return f"{slots['noun']} " + SIDE[_side_key(slots["rel"])].format(ref=ref)
    if relation == "attribute":
        return f"{slots['noun']} {_attribute(slots['which'], ref)}"
    if relation == "inferential":
        desc = slots["desc"]
        for tail in (" on the same side as it", " on the opposite side from it"):
            if desc.endswith(tail):
                side = "on the same side as" if "same" in tail else "across from"
                return desc[: -len(tail)] + f" {side} {ref}"
        return desc
    raise ValueError(f"unknown relation {relation!r}")


def heldout_queries(dlg, rng: np.random.Generator, misspell: float = 0.15) -> list[str]:
    """Every round of a generated dialogue in held-out wording."""
    queries = []
    for k, r in enumerate(dlg.rounds):
        slots = slots_of(r.relation, r.template, r.query)
        ref = "it" if r.ref is None else reference_words(rng, r.ref, k, dlg.rounds[r.ref].entity)
        text = str(FRAMES[int(rng.integers(len(FRAMES)))]).format(target=heldout_target(r.relation, slots, ref, rng))
        if rng.uniform() < misspell:
            for word, wrong in MISSPELLINGS.items():
                if f" {word}" in text:
                    text = text.replace(f" {word}", f" {wrong}", 1)
                    break
        queries.append(text[0].upper() + text[1:])
    return queries


def paraphrase_sample(split: str, seed: int, index: int):
    """Dialogue `index` of `split` as a Sample whose queries are held-out wordings; the templated queries of
    the same rounds are kept in `meta["templated_queries"]`."""
    from .splits import make_dialogue, to_sample

    dlg = make_dialogue(split, seed, index)
    sample = to_sample(dlg)
    rng = np.random.default_rng([seed, index, 23])
    sample.meta = dict(sample.meta or {}, templated_queries=list(sample.queries), wording="heldout-paraphrase")
    sample.queries = heldout_queries(dlg, rng)
    return sample
