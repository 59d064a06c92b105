"""The training paraphrase grammar and the held-out paraphrase test set: every generated round re-words, the
meaning-bearing words survive, wordings are many, and the held-out set shares no frame or verb with training."""

import re

import numpy as np
import pytest

from MediRoundCore.data import paraphrase, paraphrase_test
from MediRoundCore.data.splits import make_dialogue, to_sample
from MediRoundCore.data.templates import TEMPLATES


def _sides(text):
    return {w for w in re.findall(r"[a-z]+", text.lower()) if w in ("left", "right")}


@pytest.mark.parametrize("split", ["train", "hard"])
def test_every_round_rewords_and_keeps_sides_and_target(split):
    rng = np.random.default_rng(1)
    for i in range(12):
        dlg = make_dialogue(split, 0, i)
        grammar = paraphrase.rephrase_dialogue(dlg, rng, p=1.0, typos=False)
        heldout = paraphrase_test.heldout_queries(dlg, rng, misspell=0.0)
        for r, q, h in zip(dlg.rounds, grammar, heldout):
            slots = paraphrase.slots_of(r.relation, r.template, r.query)
            # said with "it" as the generator says it, the request has exactly the generator's patient sides
            plain = paraphrase.rephrase(rng, r.relation, slots, "it", typos=False)
            assert _sides(plain) == _sides(r.query), (r.query, plain)
            for text in (q, h):
                # the patient sides of the request survive (a named reference may add its own side)
                assert _sides(r.query) <= _sides(text), (r.query, text)
            if r.relation == "inferential":  # the description itself, up to its side clause
                assert slots["desc"].split(" on the ")[0].lower() in q.lower(), (r.query, q)
                continue
            head = (slots.get("name") or slots.get("lesion") or slots.get("part") or slots.get("noun")).split()[-1]
            variants = {head, *(v.split()[-1] for k, vs in paraphrase.NOUN_VARIANTS.items() if k.endswith(head)
                                for v in vs)}
            assert any(v in q.lower() for v in variants), (r.query, q)


def test_many_wordings_per_round():
    dlg = make_dialogue("train", 0, 3)
    r = dlg.rounds[1]
    slots = paraphrase.slots_of(r.relation, r.template, r.query)
    rng = np.random.default_rng(0)
    wordings = {paraphrase.rephrase(rng, r.relation, slots, "it", typos=False) for _ in range(200)}
    assert len(wordings) >= 4 * len(TEMPLATES[r.relation])  # measured 101 distinct of 200 draws (templates: 20)


def test_heldout_is_written_apart_from_training():
    training_text = " ".join(paraphrase.FRAMES + paraphrase.VERBS + tuple(t for v in TEMPLATES.values() for t in v))
    training_frames = {f.lower() for f in paraphrase.FRAMES}
    for frame in paraphrase_test.FRAMES:
        assert frame.lower() not in training_frames
        words = set(re.findall(r"[a-z']+", frame.replace("{target}", "").lower()))
        fresh = words - set(re.findall(r"[a-z']+", training_text.lower())) - {"i'm", "the"}
        assert fresh, f"held-out frame {frame!r} uses only training words"
    heldout_refs = {"that one", "the same one as earlier", "the structure we started with", "what we just did"}
    rng = np.random.default_rng(0)
    grammar_refs = {paraphrase.reference_expression(rng, 0, k, None) for k in range(1, 4) for _ in range(100)}
    assert not heldout_refs & grammar_refs


def test_paraphrase_sample_changes_only_queries():
    sample = paraphrase_test.paraphrase_sample("hard", 0, 4)
    templated = to_sample(make_dialogue("hard", 0, 4))
    assert sample.meta["templated_queries"] == templated.queries
    assert sample.queries != templated.queries and len(sample.queries) == len(templated.queries)
    assert np.array_equal(sample.masks, templated.masks) and sample.ref_indices == templated.ref_indices
    assert sample.entities == templated.entities


def _phrase_set(options) -> set[str]:
    """Relation wordings with their slots as one mark, spaces and case normalised."""
    return {re.sub(r"\{[a-z]+\}", "X", " ".join(o.split()).lower()) for o in options}


def test_heldout_relation_wordings_are_not_in_the_grammar():
    grammar = _phrase_set(paraphrase.INSIDE + paraphrase.PART_OF
                          + tuple(o for v in paraphrase.SPATIAL.values() for o in v)
                          + tuple(o for v in paraphrase.ATTRIBUTE.values() for o in v)
                          + tuple(o for v in paraphrase.INFERENTIAL_SIDE.values() for o in v))
    heldout = _phrase_set(paraphrase_test.INSIDE + paraphrase_test.PART_OF
                          + tuple(paraphrase_test.SIDE.values()) + tuple(paraphrase_test.ATTRIBUTE.values()))
    heldout |= {"X across from X", "across from X"}  # paraphrase_test.heldout_target's opposite-side wording
    assert not {h.removeprefix("X ") for h in heldout} & {g.removeprefix("X ") for g in grammar}


@pytest.mark.parametrize("relation", ["attribute", "inferential", "spatial"])
def test_relation_phrases_are_reworded_and_keep_their_meaning(relation):
    """Every generator phrase of these relations has grammar wordings, and they come out (some differing from
    the generator's) with the reference named."""
    rng = np.random.default_rng(3)
    seen = 0
    for i in range(40):
        dlg = make_dialogue("train-long", 0, i)
        for r in dlg.rounds:
            if r.relation != relation:
                continue
            slots = paraphrase.slots_of(r.relation, r.template, r.query)
            if relation == "inferential" and not slots["desc"].endswith(tuple(paraphrase.INFERENTIAL_SIDE)):
                continue  # a description without a side clause names no reference
            texts = {paraphrase.target_phrase(rng, r.relation, slots, "REF") for _ in range(30)}
            assert all("REF" in t for t in texts), texts
            assert len(texts) >= 3, texts
            seen += 1
    assert seen >= 5


def test_the_grammar_never_writes_a_reserved_template():
    """Reserved templates (every fifth) are the validation and test splits' own wording: the grammar must not
    reproduce one (a frame and a verb once rebuilt 'Delineate the {name} on this slice.')."""
    from MediRoundCore.data.templates import is_reserved, template_regex

    reserved = [template_regex(rel, i) for rel in TEMPLATES for i in range(len(TEMPLATES[rel])) if is_reserved(i)]
    rng = np.random.default_rng(7)
    checked = 0
    for i in range(80):
        for r in make_dialogue("train-long", 0, i).rounds:
            slots = paraphrase.slots_of(r.relation, r.template, r.query)
            for _ in range(20):
                text = paraphrase.rephrase(rng, r.relation, slots, "it", typos=False)
                assert not any(p.match(text) for p in reserved), text
                checked += 1
    assert checked > 5000


def test_possessives_only_after_noun_phrases():
    for ref in ("it", "that", "the one we segmented", "what round 2 found", "the structure from before",
                "the one from round 3"):
        assert not paraphrase._possessive_ok(ref)
    for ref in ("the left kidney", "that structure", "the first structure"):
        assert paraphrase._possessive_ok(ref)
    rng = np.random.default_rng(2)
    dlg = make_dialogue("train-long", 0, 5)
    texts = [paraphrase.rephrase(rng, r.relation, paraphrase.slots_of(r.relation, r.template, r.query), "it",
                                 typos=False) for _ in range(100) for r in dlg.rounds]
    assert not any("it's" in t for t in texts)



def test_typos_are_keyboard_slips_that_keep_sides_and_word_edges():
    rng = np.random.default_rng(5)
    seen = set()
    for _ in range(400):
        word = "oesophagus"
        slipped = paraphrase.slip_word(rng, word)
        assert slipped != word  # no two equal letters side by side here, so every slip shows
        assert slipped[0] == word[0] and abs(len(slipped) - len(word)) <= 1
        if len(slipped) == len(word):
            diff = [i for i, (a, b) in enumerate(zip(word, slipped)) if a != b]
            if len(diff) == 1:  # one letter replaced: by a key next to it
                i = diff[0]
                assert slipped[i] in paraphrase.KEY_NEIGHBOURS[word[i]]
                seen.add("neighbour")
            elif len(diff) == 2:
                seen.add("swap")
        else:
            seen.add("longer" if len(slipped) > len(word) else "drop")
    assert seen == {"neighbour", "swap", "longer", "drop"}
    text = "Segment the right kidney left of the vertebra"
    assert all(w in paraphrase.add_typos(rng, text, rate=1.0).split() for w in ("right", "left", "the"))
    held_out = set(paraphrase_test.MISSPELLINGS.values())
    for word in paraphrase_test.MISSPELLINGS:
        if len(word) >= 5:
            slips = {paraphrase.add_typos(rng, word, rate=1.0) for _ in range(3000)}
            assert len(slips) > 5 and not slips & held_out, (word, slips & held_out)
    near = paraphrase.KEY_NEIGHBOURS
    assert near["g"] == "tyfhvb" and near["a"] == "qwsz" and near["p"] == "ol" and near["m"] == "jkn"
    assert all(a in near[b] for a in near for b in near[a])  # touching is mutual


def test_descriptions_of_unpaired_structures_gain_a_true_side_clause():
    """"The organ that removes old red blood cells on the same side as it" (the demo's round 4): the generator
    words side clauses only for paired structures, so training re-wordings add them to any description whose
    target and reference both lie on a side, saying the side relation that holds."""
    rng = np.random.default_rng(0)
    seen = {"same": 0, "opposite": 0}
    for i in range(60):
        dlg = make_dialogue("train-long", 0, i)
        queries = paraphrase.rephrase_dialogue(dlg, rng, p=1.0, typos=False, p_side=1.0)
        for k, (r, q) in enumerate(zip(dlg.rounds, queries)):
            if r.relation != "inferential" or r.ref is None:
                continue
            desc = paraphrase.slots_of(r.relation, r.template, r.query)["desc"]
            target = dlg.slice.instance(r.target).side
            ref = dlg.slice.instance(dlg.rounds[r.ref].target).side
            if desc.endswith(tuple(paraphrase.INFERENTIAL_SIDE)) or target is None or ref is None:
                assert paraphrase.side_clause(dlg, k) is None or desc.endswith(tuple(paraphrase.INFERENTIAL_SIDE))
                continue
            kind = "same" if target == ref else "opposite"
            wordings = paraphrase.INFERENTIAL_SIDE[f" on the {kind} side {'as' if kind == 'same' else 'from'} it"]
            said = [w.split("{ref}")[0] for w in wordings]
            assert any(s in q for s in said), (q, target, ref)
            seen[kind] += 1
    assert seen["same"] >= 3 and seen["opposite"] >= 3, seen
    # and never without the rate
    dlg = make_dialogue("train-long", 0, 1)
    plain = paraphrase.rephrase_dialogue(dlg, np.random.default_rng(0), p=1.0, typos=False, p_side=0.0)
    r = dlg.rounds[3]
    assert r.relation == "inferential" and paraphrase.side_clause(dlg, 3) == " on the same side as it"
    assert not any(w.split("{ref}")[0] in plain[3] for v in paraphrase.INFERENTIAL_SIDE.values() for w in v)
