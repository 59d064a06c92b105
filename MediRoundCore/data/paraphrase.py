"""A paraphrase grammar for training queries: many wordings per relation, built from parts, not 20 sentences.

A generated round keeps its relation, target, reference and mask; only its query is re-worded. The grammar
composes a request frame (imperative, question, polite, terse, first-person, clinical, lay), a verb, the
target phrase (synonyms and spelling variants of the anatomical noun), the relation phrase (several wordings
of "inside it", "of it", "to the patient's left of it", "with the same density as it", …) and a reference
expression for the earlier round ("it", "that", "that structure", "the <entity>", "the one from round N",
"the first one", "the previous structure"), with optional typos. Side words are never changed: left/right are
the patient's and stay as the generator wrote them.

The held-out paraphrase test set (`data/paraphrase_test.py`) is written apart from this grammar and never
trained on; `tests/test_paraphrase.py` keeps the two disjoint.
"""

from __future__ import annotations

import re

import numpy as np

from .templates import (KIND_PHRASES, LARGER_PHRASES, REL_PHRASES, SAME_PHRASES, SMALLER_PHRASES,
                        TEMPLATES)

# The generator's own values of the phrase slots: matching them as alternatives splits "{noun} {which}" right.
_KNOWN_SLOTS = {
    "which": sorted({*KIND_PHRASES, *LARGER_PHRASES, *SMALLER_PHRASES, *(p for v in SAME_PHRASES.values() for p in v)},
                    key=len, reverse=True),
    "rel": sorted({p for v in REL_PHRASES.values() for p in v}, key=len, reverse=True),
}

VERBS = ("segment", "outline", "delineate", "highlight", "mark", "mask", "contour", "trace", "isolate",
         "pick out", "select", "label", "draw", "show", "find and segment", "annotate", "extract", "get",
         "demarcate", "localise", "localize", "identify and mask", "mask out", "cut out", "draw around",
         "locate and outline")
FRAMES = (
    "{Verb} the {target}.", "Please {verb} the {target}.", "Can you {verb} the {target}?",
    "Could you {verb} the {target} for me?", "I'd like you to {verb} the {target}.", "Now {verb} the {target}.",
    "Next, {verb} the {target}.", "{Verb} the {target}, please.", "Would you {verb} the {target}?",
    "I want the {target}.", "The {target}, please.", "And the {target}?", "What about the {target}?",
    "Let's do the {target} now.", "Go ahead and {verb} the {target}.", "Time for the {target}: {verb} it.",
    "Need the {target} too.", "Then the {target}.", "Show me the {target}.", "Where's the {target}? {Verb} it.",
    "Help me find the {target}.", "{Verb} only the {target}.", "Can I get the {target}?",
    "Please give me a mask of the {target}.", "Segmentation of the {target}, please.",
    "Can you {verb} the {target} here?", "Need a contour of the {target}.",
    "How about the {target}?", "{target}?", "{target}, please.", "Do the {target} next.", "Give me the {target}.",
    "I need to see the {target}.", "Is the {target} there? {Verb} it.", "Identify the {target}.",
    "Can you find the {target}?", "Locate the {target} and {verb} it.", "OK, {verb} the {target}.",
    "Next one: the {target}.", "{Verb} the {target} for me, thanks.", "Okay now the {target}.",
    "Could I get a mask for the {target}?", "Can we do the {target}?", "I'd also like the {target}.",
    "Want the {target} now.", "Please {verb} the {target} too.", "OK then, the {target}.",
    "Please {verb} the {target} in this scan.", "Mask for the {target}.", "Outline required: the {target}.",
)
# Anatomical noun variants (spelling, lay and clinical words) the grammar may swap in; keys as the generator writes.
NOUN_VARIANTS = {
    "tumour": ("tumor", "mass", "growth", "neoplasm"), "tumour core": ("tumor core", "core of the tumour",
                                                                       "enhancing core"),
    "oedema": ("edema", "swelling", "perilesional oedema"), "nodule": ("pulmonary nodule", "small nodule", "spot"),
    "cyst": ("cystic lesion", "fluid-filled cyst"), "lesion": ("abnormality", "focal lesion", "spot"),
    "kidney": ("renal organ",), "renal pelvis": ("collecting system", "pelvis of the kidney"),
    "esophagus": ("oesophagus", "gullet"), "hemisphere": ("cerebral hemisphere", "half of the brain"),
    "lateral ventricle": ("ventricle",), "vertebra": ("vertebral body", "backbone"), "aorta": ("main artery",),
    "heart": ("cardiac silhouette",), "lung": ("lung field",), "spinal canal": ("vertebral canal",),
    "gallbladder": ("gall bladder",), "sternum": ("breastbone",), "skull": ("cranium", "skull bone"),
    "psoas muscle": ("psoas",), "major vessel": ("large vessel", "great vessel"),
    "solid organ": ("parenchymal organ",), "air-filled organ": ("gas-filled organ",),
    "fluid-filled structure": ("fluid-containing structure",),
}
INSIDE = ("inside {ref}", "within {ref}", "in {ref}", "contained in {ref}", "that sits in {ref}",
          "lying inside {ref}", "located in {ref}", "embedded in {ref}", "occupying {ref}", "arising in {ref}",
          "seen in {ref}", "in the substance of {ref}", "involving {ref}", "sitting within {ref}",
          "enclosed by {ref}", "surrounded by {ref}", "inside the outline of {ref}")
PART_OF = ("{part} of {ref}", "{part} belonging to {ref}", "{part} that is part of {ref}", "{part} in {ref}",
           "{part} region of {ref}", "{part} within {ref}", "{part} that belongs to {ref}", "{part} of {ref} only",
           "{part} inside {ref}", "{part} from {ref}")
SPATIAL = {
    "to the patient's left of it": ("to the patient's left of {ref}", "on the patient's left of {ref}",
                                    "left of {ref} (patient's left)", "on {ref}'s left, patient side",
                                    "just left of {ref} (patient left)"),
    "on the patient's left side of it": ("on the patient's left side of {ref}", "patient-left of {ref}",
                                         "on the left of {ref} as the patient sees it", "left-sided to {ref}"),
    "to the patient's right of it": ("to the patient's right of {ref}", "on the patient's right of {ref}",
                                     "right of {ref} (patient's right)", "on {ref}'s right, patient side",
                                     "just right of {ref} (patient right)"),
    "on the patient's right side of it": ("on the patient's right side of {ref}", "patient-right of {ref}",
                                          "on the right of {ref} as the patient sees it", "right-sided to {ref}"),
    "in front of it": ("in front of {ref}", "anterior to {ref}", "ventral to {ref}", "forward of {ref}",
                       "anteriorly from {ref}", "toward the front from {ref}"),
    "anterior to it": ("anterior to {ref}", "in front of {ref}", "ventral to {ref}", "just anterior of {ref}"),
    "above it on the image": ("above {ref} on the image", "above {ref} on screen", "over {ref} in this view",
                              "on top of {ref} on the image", "nearer the top of the image than {ref}",
                              "up from {ref} on the image"),
    "behind it": ("behind {ref}", "posterior to {ref}", "dorsal to {ref}", "in back of {ref}",
                  "posteriorly from {ref}", "toward the back from {ref}"),
    "posterior to it": ("posterior to {ref}", "behind {ref}", "dorsal to {ref}", "just posterior of {ref}"),
    "below it on the image": ("below {ref} on the image", "under {ref} on screen", "beneath {ref} in this view",
                              "underneath {ref} on the image", "nearer the bottom of the image than {ref}",
                              "down from {ref} on the image"),
    "next to it": ("next to {ref}", "beside {ref}", "bordering {ref}", "alongside {ref}", "near {ref}",
                   "neighbouring {ref}", "close to {ref}", "by {ref}"),
    "adjacent to it": ("adjacent to {ref}", "abutting {ref}", "neighbouring {ref}", "directly beside {ref}",
                       "immediately next to {ref}"),
    "touching it": ("touching {ref}", "in contact with {ref}", "that touches {ref}", "contiguous with {ref}",
                    "sharing a border with {ref}"),
}
# Wordings of the generator's attribute phrases (`templates.SAME_PHRASES` etc.), {ref} for the reference.
ATTRIBUTE = {
    "with the same density as it": ("with the same density as {ref}", "isodense to {ref}",
                                    "equally dense as {ref}", "with {ref}'s density", "as dense as {ref}",
                                    "with a density like {ref}'s"),
    "of similar density to it": ("of similar density to {ref}", "with a density close to {ref}'s",
                                 "about as dense as {ref}", "of comparable density to {ref}"),
    "with the same signal intensity as it": ("with the same signal intensity as {ref}", "isointense to {ref}",
                                             "as bright as {ref}", "with {ref}'s signal intensity",
                                             "with signal like {ref}'s"),
    "of similar signal to it": ("of similar signal to {ref}", "with a signal close to {ref}'s",
                                "about as bright as {ref}", "of comparable signal to {ref}"),
    "of the same tissue type as it": ("of the same tissue type as {ref}", "sharing {ref}'s tissue type",
                                      "composed of what {ref} is composed of", "with the tissue of {ref}",
                                      "of {ref}'s tissue type"),
    "of the same kind as it": ("of the same kind as {ref}", "like {ref}", "of {ref}'s kind",
                               "similar in nature to {ref}", "in the same category as {ref}",
                               "that is another one like {ref}"),
    "of the same type as it": ("of the same type as {ref}", "of {ref}'s type", "like {ref}",
                               "in the same class as {ref}"),
    "that is larger than it": ("that is larger than {ref}", "larger than {ref}", "of greater size than {ref}",
                               "exceeding {ref} in size", "that outsizes {ref}", "more sizeable than {ref}"),
    "that is bigger than it": ("that is bigger than {ref}", "bigger than {ref}", "that's bigger than {ref}",
                               "of greater size than {ref}"),
    "that is smaller than it": ("that is smaller than {ref}", "smaller than {ref}", "of lesser size than {ref}",
                                "more compact than {ref}", "less sizeable than {ref}"),
    "that looks smaller than it": ("that looks smaller than {ref}", "that appears smaller than {ref}",
                                   "that seems smaller than {ref}", "looking smaller than {ref}"),
}
# Wordings of the side clause that ends an inferential description ("... on the same side as it").
INFERENTIAL_SIDE = {
    " on the same side as it": (" on the same side as {ref}", " ipsilateral to {ref}",
                                " on the same side of the body as {ref}", " on the side where {ref} is"),
    " on the opposite side from it": (" on the opposite side from {ref}", " contralateral to {ref}",
                                      " on the other side from {ref}", " opposite {ref}",
                                      " on the far side from {ref}", " on the side away from {ref}"),
}
# Phrases inside the generator's slot values that mention the referenced round as "it".
IT_PHRASES = (" as it", " than it", " from it", " of it", " to it", " it")
TYPO_RATE = 0.04
SIDE_CLAUSE_RATE = 0.8  # from lite step 4800 (session 38)


def _cap(text: str) -> str:
    return text[0].upper() + text[1:] if text else text


def reference_expression(rng: np.random.Generator, ref_round: int, current: int, entity: str | None) -> str:
    """How the query names the earlier round `ref_round` (0-based) from round `current` (0-based)."""
    options = ["it", "it", "that", "that structure", "this structure", "the structure from before",
               "the earlier structure", "the one we segmented", "that mask", "the same structure"]
    if entity:
        options += [f"the {entity}", f"the {entity}", f"that {entity}", f"the {entity} from before"]
    options += [f"the one from round {ref_round + 1}", f"round {ref_round + 1}'s structure",
                f"the mask from round {ref_round + 1}", f"what round {ref_round + 1} found"]
    if ref_round == 0:
        options += ["the first one", "the first structure", "the very first mask", "the original structure"]
    if ref_round == current - 1:
        options += ["the previous structure", "the last one", "the one you just segmented", "the latest mask",
                    "the one before"]
    return str(options[int(rng.integers(len(options)))])


def vary_noun(rng: np.random.Generator, noun: str, p: float = 0.35) -> str:
    """`noun` or, with probability p, a variant of its head noun (the generator noun that ends the phrase or
    comes before " in the"/" of the": "right hemisphere tumour oedema" varies "oedema", never "hemisphere")."""
    for key in sorted(NOUN_VARIANTS, key=len, reverse=True):
        pattern = r"\b" + re.escape(key) + r"(?=$|\s+(?:in|of)\s+the\b)"
        if re.search(pattern, noun):
            if rng.uniform() >= p:
                return noun
            variant = str(NOUN_VARIANTS[key][int(rng.integers(len(NOUN_VARIANTS[key])))])
            return re.sub(pattern, variant, noun, count=1)
    return noun


def slots_of(relation: str, template: int, query: str) -> dict[str, str]:
    """The slot values a generator query was rendered with (inverse of `templates.render`)."""
    parts = re.split(r"(\{[a-z]+\})", TEMPLATES[relation][template])

    def group(name: str) -> str:
        known = _KNOWN_SLOTS.get(name)
        return f"(?P<{name}>" + ("|".join(map(re.escape, known)) if known else ".+?") + ")"

    body = "".join(group(p[1:-1]) if p.startswith("{") else re.escape(p) for p in parts)
    match = re.match(f"^{body}$", query, re.IGNORECASE)
    if match is None:
        raise ValueError(f"query {query!r} is not template {template} of {relation!r}")
    return match.groupdict()


def _with_ref(phrase: str, ref: str) -> str:
    """A generator phrase that says "it" for the reference, with `ref` instead."""
    for it in IT_PHRASES:
        if phrase.endswith(it) or (it + " ") in phrase:
            return re.sub(r"\bit\b", ref, phrase, count=1)
    return phrase


def _possessive_ok(ref: str) -> bool:
    """Whether "{ref}'s" reads as English: a short noun phrase ("the left kidney's"), not a pronoun ("it's") or a
    clause ("the one we segmented's", "what round 2 found's")."""
    words = ref.split()
    return (ref.startswith(("the ", "that ")) and len(words) <= 4
            and not {"one", "we", "you", "from", "before", "round", "found"} & set(words))


def target_phrase(rng: np.random.Generator, relation: str, slots: dict[str, str], ref: str) -> str:
    """The thing asked for, with its relation to the reference worded by the grammar."""
    possessive = _possessive_ok(ref)

    def pick(options):
        options = [o for o in options if possessive or "{ref}'s" not in o] or list(options)
        return str(options[int(rng.integers(len(options)))])
    if relation == "direct":
        return vary_noun(rng, slots["name"])
    if relation == "lesion":
        return f"{vary_noun(rng, slots['lesion'])} " + str(INSIDE[int(rng.integers(len(INSIDE)))]).format(ref=ref)
    if relation == "hierarchy":
        frame = str(PART_OF[int(rng.integers(len(PART_OF)))])
        return frame.format(part=vary_noun(rng, slots["part"]), ref=ref)
    if relation == "spatial":
        options = SPATIAL.get(slots["rel"], (slots["rel"].replace("it", "{ref}"),))
        return f"{vary_noun(rng, slots['noun'])} " + pick(options).format(ref=ref)
    if relation == "attribute":
        options = ATTRIBUTE.get(slots["which"].lower())
        which = _with_ref(slots["which"], ref) if options is None else pick(options).format(ref=ref)
        return f"{vary_noun(rng, slots['noun'])} {which}"
    if relation == "inferential":
        desc = slots["desc"]
        for tail, options in INFERENTIAL_SIDE.items():
            if desc.endswith(tail):
                return desc[: -len(tail)] + pick(options).format(ref=ref)
        return _with_ref(desc, ref)
    raise ValueError(f"unknown relation {relation!r}")


_KEYBOARD_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")
# Letters next to each letter on a QWERTY keyboard: each row sits half a key right of the one above, so a key
# touches two keys above (same column and the next) and two below (the previous column and the same): g has
# t y / f h / v b.
_TOUCHING = {-1: (0, 1), 0: (-1, 1), 1: (-1, 0)}  # row offset -> column offsets
KEY_NEIGHBOURS = {
    ch: "".join(_KEYBOARD_ROWS[r + dr][c + dc] for dr, cols in _TOUCHING.items() for dc in cols
                if 0 <= r + dr < 3 and 0 <= c + dc < len(_KEYBOARD_ROWS[r + dr]))
    for r, row in enumerate(_KEYBOARD_ROWS) for c, ch in enumerate(row)}
TYPO_KINDS = ("swap", "drop", "double", "neighbour", "insert")


def slip_word(rng: np.random.Generator, word: str) -> str:
    """One keyboard slip in `word` after its first letter: two letters swapped, one dropped or
    doubled, one replaced by a neighbouring key, or a neighbouring key's letter slipped in beside it."""
    i = int(rng.integers(1, len(word) - 1))
    kind = TYPO_KINDS[int(rng.integers(len(TYPO_KINDS)))]
    if kind == "swap":
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if kind == "drop":
        return word[:i] + word[i + 1:]
    if kind == "double":
        return word[:i] + word[i] + word[i:]
    near = KEY_NEIGHBOURS.get(word[i].lower())
    if not near:  # not a letter of the keyboard's rows: double it instead
        return word[:i] + word[i] + word[i:]
    key = near[int(rng.integers(len(near)))]
    key = key.upper() if word[i].isupper() else key
    return word[:i] + key + word[i + 1:] if kind == "neighbour" else word[:i + 1] + key + word[i + 1:]


def add_typos(rng: np.random.Generator, text: str, rate: float = TYPO_RATE) -> str:
    """Keyboard slips (`slip_word`) in some words of five letters or more; side words are left intact, and a
    slip that writes one of the held-out set's misspellings is not made (that set stays unseen)."""
    from .paraphrase_test import MISSPELLINGS  # (imports this module: here, not at the top)

    held_out = {wrong.lower() for wrong in MISSPELLINGS.values()}

    def slip(match: re.Match) -> str:
        word = match.group(0)
        if word.lower() in ("left", "right") or rng.uniform() >= rate:
            return word
        slipped = slip_word(rng, word)
        return word if slipped.lower() in held_out else slipped
    return re.sub(r"[A-Za-z]{5,}", slip, text)


def rephrase(rng: np.random.Generator, relation: str, slots: dict[str, str], ref: str = "it",
             typos: bool = True) -> str:
    """One wording of a request from the grammar."""
    frame = str(FRAMES[int(rng.integers(len(FRAMES)))])
    verb = str(VERBS[int(rng.integers(len(VERBS)))])
    target = target_phrase(rng, relation, slots, ref)
    text = frame.format(verb=verb, Verb=_cap(verb), target=target)
    text = _cap(text)
    return add_typos(rng, text) if typos else text


def side_clause(dlg, k: int) -> str | None:
    """The side clause an inferential description of round k may add where the generator adds none: the target
    is the only structure of its function but lies on one side, and so does the referenced round's ("the organ
    that removes old red blood cells on the same side as it" after the left kidney). The generator words such
    clauses only for paired structures; a radiologist says them of any structure with a side."""
    r = dlg.rounds[k]
    if r.relation != "inferential" or r.ref is None:
        return None
    target, ref = dlg.slice.instance(r.target).side, dlg.slice.instance(dlg.rounds[r.ref].target).side
    if target is None or ref is None:
        return None
    return " on the same side as it" if target == ref else " on the opposite side from it"


def rephrase_dialogue(dlg, rng: np.random.Generator, p: float = 0.7, typos: bool = True,
                      p_side: float = SIDE_CLAUSE_RATE) -> list[str]:
    """New queries for a generated dialogue: each round re-worded by the grammar with probability `p`
    (else its template query is kept); references named by `reference_expression`; an inferential description
    without a side clause gains one (`side_clause`) with probability `p_side`."""
    queries = []
    for k, r in enumerate(dlg.rounds):
        if rng.uniform() >= p:
            queries.append(r.query)
            continue
        slots = slots_of(r.relation, r.template, r.query)
        if r.relation == "inferential" and not slots["desc"].endswith(tuple(INFERENTIAL_SIDE)):
            clause = side_clause(dlg, k)
            if clause is not None and p_side > 0 and rng.uniform() < p_side:  # p_side 0: the stream as before
                slots = dict(slots, desc=slots["desc"] + clause)
        ref = "it" if r.ref is None else reference_expression(rng, r.ref, k, dlg.rounds[r.ref].entity)
        queries.append(rephrase(rng, r.relation, slots, ref, typos))
    return queries
