"""Ordinal and named references a user types ("the first one", "go back to the kidney"), and the precedence
user pick > named in the query > previous round; anatomical ordinals and new targets are not references."""

import pytest

import numpy as np

from MediRoundCore.references import GUESS_TRIES, head_noun, reference_candidates, resolve_reference

ENTITIES = ["liver", "left kidney", "lesion inside the left kidney", "spleen", "aorta"]


@pytest.mark.parametrize("query, expected", [
    ("Go back to the first structure.", 1),
    ("Now the first one again.", 1),
    ("The lesion near the second one.", 2),
    ("Compare with the second round.", 2),
    ("Use the third segmentation as the reference.", 3),
    ("Go back to the kidney.", 2),                   # the head noun of "left kidney", in a going-back query
    ("Return to the lesion, please.", 3),
    ("The spleen again.", 4),                         # a full name: as before
    ("Something bright next to the previous one.", 5),
    ("Back to the penultimate structure.", 4),
    ("Segment the first rib.", 5),                    # an anatomical ordinal: not a round
    ("Segment the fourth segment of the liver.", 1),  # liver segments count anatomy; "liver" names round 1
    ("Which part of it is the lesion?", 5),           # a bare noun without going back is the new target
    ("Now the kidney with the same density as it.", 5),
    ("Go back to the sixth structure.", 5),           # no such round: the previous one
    ("Segment the pancreas.", 5),
    ("The cyst inside the original structure.", 1),
    ("Now the part of the initial one.", 1),
])
def test_ordinal_and_named_references(query, expected):
    assert resolve_reference(query, ENTITIES) == expected


def test_precedence_and_ties():
    assert resolve_reference("Go back to the first structure.", ENTITIES, explicit=3) == 3  # the user's pick
    # "the kidney" when two kidneys were segmented: the most recent
    assert resolve_reference("Go back to the kidney.", ["left kidney", "liver", "right kidney", "spleen"]) == 3
    # a full name beats a head noun
    assert resolve_reference("Go back to the left kidney.", ["left kidney", "right kidney", "spleen"]) == 1


def test_head_noun():
    assert head_noun("left kidney") == "kidney"
    assert head_noun("lesion inside the left kidney") == "lesion"
    assert head_noun("right lobe of the liver") == "lobe"
    assert head_noun(None) is None and head_noun("in") is None


class FirstRoundScorer:
    """Stands in for the learned reference scorer (reference_scorer.ReferenceScorer.choose) with one that always
    picks round 1, so that a rule that takes precedence over the scorer shows."""

    def choose(self, query, entities, referable):
        return 1


@pytest.mark.parametrize("query, expected", [
    ("The vessel next to the one you just segmented.", 5),  # the latest, whatever the scorer says
    ("Something beside what we just did.", 5),
    ("The lesion in the one before.", 5),
    ("The lesion in the left kidney, not the one you just segmented.", 2),  # a name comes first
    ("Segment the vertebra, the one before the sacrum.", 1),  # anatomy, not a round: the scorer's
    ("Go back to the one before that.", 1),
    ("The bright spot.", 1),
])
def test_just_done_takes_the_latest_round_before_the_scorer(query, expected):
    assert resolve_reference(query, ENTITIES, scorer=FirstRoundScorer()) == expected


def test_just_done_skips_rounds_without_a_mask():
    assert resolve_reference("The one you just segmented.", ["liver", "kidney"], referable=[True, False],
                             scorer=FirstRoundScorer()) == 1
    assert resolve_reference("Now the part of what we just did.", ["liver", "kidney", "spleen"],
                             referable=[True, True, False], scorer=FirstRoundScorer()) == 2



def shipped_scorer():
    from MediRoundCore.checkpoint_info import DEFAULT_CHECKPOINT
    from MediRoundCore.reference_scorer import ReferenceScorer

    scorer = ReferenceScorer.from_pretrained(DEFAULT_CHECKPOINT)
    if scorer is None:
        pytest.skip("the default model folder has no reference scorer")
    return scorer


def test_a_guessed_reference_has_the_scorers_next_rounds_to_try():
    scorer = shipped_scorer()
    entities = ["esophagus", "right lung", "left lung", "heart"]
    query = "Now segment the nodule inside it."
    tries = reference_candidates(query, entities, scorer=scorer)
    assert tries[0] == resolve_reference(query, entities, scorer=scorer)
    assert len(tries) == GUESS_TRIES and len(set(tries)) == GUESS_TRIES
    assert {2, 3} <= set(tries)  # both lungs, whichever the scorer puts first
    # rounds answered absent are never tried; fewer rounds than tries give fewer
    tries = reference_candidates(query, entities, scorer=scorer, referable=[True, False, True, True])
    assert 2 not in tries
    assert reference_candidates(query, entities[:2], scorer=scorer) in ([1, 2], [2, 1])


@pytest.mark.parametrize("query, explicit, expected", [
    ("Now segment the nodule inside it.", 2, [2]),          # the user's pick: nothing else is tried
    ("Now the nodule in round 3.", None, [3]),              # named by the query
    ("The nodule inside the left lung.", None, [3]),
    ("Now the lesion in what we just did.", None, [4]),
])
def test_a_given_or_named_reference_is_the_only_one_tried(query, explicit, expected):
    entities = ["esophagus", "right lung", "left lung", "heart"]
    assert reference_candidates(query, entities, explicit, scorer=shipped_scorer()) == expected


class FixedScores:
    """Stands in for the learned reference scorer (reference_scorer.ReferenceScorer: `choose` is the best of
    `scores` among the referable rounds) with fixed scores per round."""

    def __init__(self, scores):
        self._scores = np.asarray(scores, np.float32)

    def scores(self, query, entities):
        return self._scores[:len(entities)]

    def choose(self, query, entities, referable=None):
        s = self.scores(query, entities).astype(np.float64)
        if referable is not None:
            s[~np.asarray(referable, bool)] = -np.inf
        return int(np.argmax(s)) + 1


def test_guesses_are_tried_best_first_among_referable_rounds():
    scorer = FixedScores([0.1, 0.9, 0.5, 0.7])
    entities = ["heart", "right lung", "left lung", "esophagus"]
    assert reference_candidates("The nodule in it.", entities, scorer=scorer) == [2, 4, 3]
    assert reference_candidates("The nodule in it.", entities, scorer=scorer, tries=4) == [2, 4, 3, 1]
    assert reference_candidates("The nodule in it.", entities, scorer=scorer, referable=[True, True, True, False]) == [2, 3, 1]
    assert reference_candidates("The nodule in it.", entities, scorer=scorer, tries=1) == [2]
    # a round answered absent hides its name from the rules, as in resolve_reference: "lesion" names nothing
    absent = ["lesion", "left kidney", "right kidney"]
    assert reference_candidates("Now the lesion inside it.", absent, scorer=FixedScores([0.0, 0.2, 0.9]),
                                referable=[False, True, True]) == [3, 2]
    # a scorer with a pick only (no scores) gives its pick alone
    assert reference_candidates("The nodule in it.", entities, scorer=FirstRoundScorer()) == [1]


def test_a_first_round_has_nothing_to_try():
    assert reference_candidates("Segment the liver.", [], scorer=None) == []
    assert reference_candidates("Now the lesion in it.", ["liver", "kidney"], scorer=None) == [2]


def test_close_alternatives_are_the_rounds_about_as_likely_as_the_guess():
    from MediRoundCore.references import alternatives_note, close_alternatives, is_guess

    entities = ["heart", "right lung", "left lung", "esophagus"]
    scorer = FixedScores([0.0, 2.0, 1.8, 1.0])  # softmax 0.06, 0.43, 0.35, 0.16: round 3 at 0.82 of round 2, round 4 at 0.37
    assert close_alternatives("The nodule in it.", entities, 2, scorer) == [3]
    assert close_alternatives("The nodule in it.", entities, 2, scorer, ratio=0.3) == [3, 4]
    assert close_alternatives("The nodule in it.", entities, 2, scorer, ratio=0.1, most=3) == [3, 4, 1]
    assert close_alternatives("The nodule in it.", entities, 2, scorer, referable=[True, True, False, True],
                              ratio=0.3) == [4]
    assert close_alternatives("The nodule in it.", entities, 2, None) == []
    # rounds the scorer rules out, or scores that are not numbers, are never offered
    assert close_alternatives("The nodule in it.", entities, 2, FixedScores([-np.inf, 2.0, -np.inf, -np.inf]),
                              ratio=0.0) == []
    assert close_alternatives("The nodule in it.", entities, 2, FixedScores([0.0, 2.0, np.nan, 1.0])) == []
    assert is_guess("The nodule in it.", entities) and not is_guess("The nodule in it.", entities, explicit=3)
    assert not is_guess("The nodule in the left lung.", entities) and not is_guess("The nodule in round 2.", entities)
    assert not is_guess("Segment the liver.", [])
    assert alternatives_note([3], entities) == "R3 (left lung) fits about as well"
    assert alternatives_note([3, 4], entities) == "R3 (left lung) or R4 (esophagus) fit about as well"
    assert alternatives_note([], entities) == ""


@pytest.mark.parametrize("query, again", [
    ("Segment it.", True),
    ("Show me that one again, please.", True),
    ("Could you redo it?", True),
    ("Which part of it is the tumour?", False),
    ("Now segment its oedema.", False),
    ("The kidney on the same side as it.", False),
    ("Mark the smaller lesion it harbours.", False),
    ("", False),
    ("...", False),
])
def test_a_query_asks_for_it_again_only_with_nothing_but_a_request(query, again):
    from MediRoundCore.references import asks_for_it_again

    assert asks_for_it_again(query) is again
