"""Probe: how often could any reference chooser pick the generator's reference, knowing the whole scene? For
each later round that names no round, every earlier round that could have produced the same query (same
relation, same part/lesion/noun, same relation category) under the split's policy (distractor and reach-back
preferences, then uniform) is weighed by that policy; the most probable round is the Bayes choice. Compares it
with the shipped reference scorer (text only) on the same rounds. Hard seed 1 and val (never seed 0).

    PYTHONPATH=$PWD python runs/probe/reference_ceiling.py [--split hard --seed 1 --n 150]
"""

import argparse
from collections import defaultdict

import numpy as np

from MediRoundCore.data.dialogues import _Geometry, later_moves
from MediRoundCore.data.splits import _params, make_dialogue
from MediRoundCore.data.templates import KIND_PHRASES, LARGER_PHRASES, REL_PHRASES, SAME_PHRASES, SMALLER_PHRASES
from MediRoundCore.engine import DEFAULT_CHECKPOINT
from MediRoundCore.reference_scorer import ReferenceScorer
from MediRoundCore.references import named_round


def _category(slots: dict) -> tuple:
    out = []
    for key, value in sorted(slots.items()):
        if key == "rel":
            value = next(k for k, v in REL_PHRASES.items() if value in v)
        elif key == "which":
            value = ("larger" if value in LARGER_PHRASES else "smaller" if value in SMALLER_PHRASES
                     else "kind" if value in KIND_PHRASES else "same" if any(value in v for v in SAME_PHRASES.values())
                     else value)
        out.append((key, value))
    return tuple(out)


def move_probabilities(moves, k, p_distractor, p_back):
    """P(each move) once its relation is drawn, as dialogues._pick draws."""
    prob = np.zeros(len(moves))
    for d_on, p_d in ((True, p_distractor), (False, 1 - p_distractor)):
        pool = [i for i in range(len(moves)) if moves[i].distractors > 0] if d_on else []
        pool = pool or list(range(len(moves)))
        for b_on, p_b in ((True, p_back), (False, 1 - p_back)):
            if k >= 2:
                sub = [i for i in pool if (k - moves[i].ref >= 2) == b_on]
                sub = sub or pool
            else:
                sub = pool
            for i in sub:
                prob[i] += p_d * p_b / len(sub)
    return prob


def generator_posterior(dlg, geo, k, params):
    """For round k (0-based) of a generated dialogue: the policy's probability of each earlier round (0-based)
    having produced its query, of each target, and of each target per round."""
    rnd = dlg.rounds[k]
    used = {r.target for r in dlg.rounds[:k]}
    moves = []
    for r, prev in enumerate(dlg.rounds[:k]):
        moves += later_moves(geo, geo.by_name[prev.target], r, used, dlg.slice.modality, np.random.default_rng(0))
    same_relation = [m for m in moves if m.relation == rnd.relation]
    truth = next(m for m in same_relation if m.ref == rnd.ref and m.target.name == rnd.target)
    prob = move_probabilities(same_relation, k, params.p_distractor, params.p_reach_back)
    posterior, by_target = defaultdict(float), defaultdict(float)
    from_ref = defaultdict(lambda: defaultdict(float))  # ref -> target -> probability
    for m, p in zip(same_relation, prob):
        if m.noun == truth.noun and _category(m.slots) == _category(truth.slots):
            posterior[m.ref] += p
            by_target[m.target.name] += p
            from_ref[m.ref][m.target.name] += p
    return posterior, by_target, from_ref


def bayes_reference(posterior) -> int:
    """The most probable round; ties to the earliest."""
    best = max(posterior.values())
    return min(r for r, v in posterior.items() if abs(v - best) < 1e-9)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--split", default="hard")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--n", type=int, default=150)
    args = parser.parse_args()
    params = _params(args.split)
    scorer = ReferenceScorer.from_pretrained(DEFAULT_CHECKPOINT)
    # relation -> rounds; reference right: Bayes, scorer; target right: Bayes, scorer, all votes, best three
    counts = defaultdict(lambda: np.zeros(7))
    ties = 0
    for index in range(args.n):
        dlg = make_dialogue(args.split, args.seed, index)
        geo = _Geometry(dlg.slice)
        entities = [r.entity for r in dlg.rounds]
        for k in range(1, len(dlg.rounds)):
            rnd = dlg.rounds[k]
            if rnd.ref is None or named_round(rnd.query, entities[:k]) is not None:
                continue
            posterior, by_target, from_ref = generator_posterior(dlg, geo, k, params)
            best = max(posterior.values())
            ties += sum(abs(v - best) < 1e-9 for v in posterior.values()) > 1
            bayes = bayes_reference(posterior)
            guess = scorer.choose(rnd.query, entities[:k]) - 1
            targets = from_ref.get(guess, {})
            scorer_target = max(targets, key=targets.get) if targets else None
            sc = scorer.scores(rnd.query, entities[:k]).astype(float)
            p_ref = np.exp(sc - sc.max())
            p_ref /= p_ref.sum()
            votes = defaultdict(float)  # each referable round's answer, weighed by the scorer's probability of it
            for r in range(k):
                t = from_ref.get(r)
                if t:
                    votes[max(t, key=t.get)] += p_ref[r]
            voted = max(votes, key=votes.get) if votes else None
            votes3 = defaultdict(float)  # the same among the scorer's three best rounds
            for r in np.argsort(-p_ref, kind="stable")[:3]:
                t = from_ref.get(int(r))
                votes3[max(t, key=t.get) if t else None] += p_ref[r]
            voted3 = max(votes3, key=votes3.get)
            bayes_target = max(by_target, key=by_target.get)
            counts[rnd.relation] += (1, bayes == rnd.ref, guess == rnd.ref, bayes_target == rnd.target,
                                     scorer_target == rnd.target, voted == rnd.target, voted3 == rnd.target)
    total = sum(counts.values())
    share = 100 * total[1:] / total[0]
    print(f"{args.split} seed {args.seed}, {args.n} dialogues, {int(total[0])} rounds that name no round "
          f"({ties} Bayes ties): reference Bayes {share[0]:.1f} %, scorer {share[1]:.1f} %; target Bayes "
          f"{share[2]:.1f} %, scorer {share[3]:.1f} %, scorer's vote {share[4]:.1f} %, among its best three "
          f"{share[5]:.1f} %")
    for relation, (n, b, s, bt, st, vt, v3) in sorted(counts.items()):
        print(f"  {relation:12s} {int(n):4d} rounds  reference Bayes {100 * b / n:5.1f} %  scorer {100 * s / n:5.1f} %"
              f"  target Bayes {100 * bt / n:5.1f} %  scorer {100 * st / n:5.1f} %  vote {100 * vt / n:5.1f} %"
              f"  best three {100 * v3 / n:5.1f} %")


if __name__ == "__main__":
    main()
