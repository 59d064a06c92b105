"""Multi-round dialogues on a generated slice, built from the paper's five relation types.

Round 1 names its target directly or by inference. Every later round refers to an earlier round's mask
(not always the previous one) through one relation:
  lesion       organ -> lesion inside it            ("Now segment the cyst inside it.")
  hierarchy    whole -> part                        ("Segment the renal pelvis of it.")
  attribute    same density/kind, larger/smaller    ("Segment the other solid organ with the same density as it.")
  spatial      patient left/right, front/behind, adjacent  ("Segment the kidney to the patient's left of it.")
  inferential  function, optionally tied to the reference ("Segment the organ that filters blood to make urine
               on the opposite side from it.")
Every target is unique in the dialogue and is the only structure that satisfies its query given the
referenced mask. Answers are `format_answer(entity, rationale)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..answers import format_answer
from .anatomy import AnatomySlice, Instance
from .shapes import dilate
from .templates import (KIND_PHRASES, LARGER_PHRASES, REL_PHRASES, SAME_PHRASES, SMALLER_PHRASES,
                        allowed_indices, render)

GROUP_NOUNS = {"solid": "solid organ", "vessel": "major vessel", "kidney": "kidney", "air-filled": "air-filled organ",
               "muscle": "muscle", "bone": "bone", "fluid-filled": "fluid-filled structure", "brain": "hemisphere"}
KIND_GROUPS = {"vessel", "muscle", "bone"}  # "of the same kind"; the others share density / signal
REL_FACTS = {"left": "to the patient's left of", "right": "to the patient's right of", "anterior": "in front of",
             "posterior": "behind", "adjacent": "next to"}
STRICT = 0.08        # normalised distance for a clear left/right/front/behind relation
TOUCH_PX, APART_PX = 2, 6
SIZE_RATIO = 1.25
# Relation draw weights: the relations that need the referenced mask most are drawn more often.
RELATION_WEIGHTS = {"lesion": 1.6, "hierarchy": 1.6, "attribute": 1.2, "spatial": 1.0, "inferential": 0.6}


@dataclass
class Move:
    """A candidate round: target, relation, query slots, rationale, the noun used and its distractors."""

    target: Instance
    relation: str
    ref: int | None
    slots: dict
    rationale: str
    noun: str
    distractors: int


@dataclass
class GeneratedRound:
    query: str
    answer: str          # format_answer(entity, rationale)
    entity: str
    target: str          # instance name (== entity)
    ref: int | None
    relation: str        # "direct" | one of RELATIONS
    template: int
    noun: str
    distractors: int


@dataclass
class GeneratedDialogue:
    """A dialogue on one generated slice."""

    slice: AnatomySlice
    rounds: list[GeneratedRound]
    info: dict = field(default_factory=dict)

    def masks(self) -> np.ndarray:
        return np.stack([self.slice.instance(r.target).mask for r in self.rounds])

    def meta(self) -> dict:
        """What a split records per conversation (for statistics and audits)."""
        return {**self.info, "region": self.slice.region, "modality": self.slice.modality, "seed": self.slice.seed,
                "noise_level": round(self.slice.params["noise_level"], 4),
                "contrast": round(self.slice.params["contrast"], 4),
                "rounds": [{"relation": r.relation, "template": r.template, "ref": r.ref, "noun": r.noun,
                            "distractors": r.distractors} for r in self.rounds]}


class _Geometry:
    """Cached relations between the instances of one slice."""

    def __init__(self, sl: AnatomySlice):
        self.sl = sl
        self.items = [i for i in sl.instances]
        self.by_name = {i.name: i for i in self.items}
        self._near: dict[tuple[str, int], np.ndarray] = {}

    def near(self, inst: Instance, px: int) -> np.ndarray:
        key = (inst.name, px)
        if key not in self._near:
            self._near[key] = dilate(inst.mask, px)
        return self._near[key]

    def related(self, a: Instance, b: Instance) -> bool:
        """a is b, or an ancestor or descendant of b."""
        return a.name == b.name or self.is_ancestor(a, b) or self.is_ancestor(b, a)

    def is_ancestor(self, a: Instance, b: Instance) -> bool:
        p = b.parent
        while p is not None:
            if p == a.name:
                return True
            p = self.by_name[p].parent if p in self.by_name else None
        return False

    def holds(self, rel: str, ref: Instance, x: Instance, margin: float) -> bool:
        du, dv = x.centroid[0] - ref.centroid[0], x.centroid[1] - ref.centroid[1]
        if rel == "left":
            return du > margin
        if rel == "right":
            return -du > margin
        if rel == "anterior":
            return -dv > margin
        if rel == "posterior":
            return dv > margin
        px = TOUCH_PX if margin > 0 else APART_PX
        return bool((self.near(ref, px) & x.mask).any())

    def same_noun(self, noun: str, exclude: Instance) -> list[Instance]:
        return [i for i in self.items if i.noun == noun and i.name != exclude.name]


def where(inst: Instance) -> str:
    """The rationale of a direct request: where the structure lies."""
    side = {"left": "on the patient's left", "right": "on the patient's right", None: "near the midline"}[inst.side]
    v = inst.centroid[1]
    depth = "anteriorly" if v < -0.15 else "posteriorly" if v > 0.15 else "centrally"
    return f"it lies {depth} {side}"


def first_round_moves(geo: _Geometry, modality: str) -> list[Move]:
    """Round-1 candidates: direct naming and inference without a reference."""
    moves = []
    for t in geo.items:
        if t.kind == "body":
            continue
        moves.append(Move(t, "direct", None, {"name": t.name}, where(t), t.noun,
                          len(geo.same_noun(t.noun, t))))
        if t.function:
            same = [i for i in geo.items if i.function == t.function and i.name != t.name]
            if not same:
                moves.append(Move(t, "inferential", None, {"desc": t.function}, f"the {t.name} {t.function_fact}",
                                  t.noun, 0))
            elif len(same) == 1 and t.side and same[0].side and same[0].side != t.side:
                moves.append(Move(t, "inferential", None, {"desc": f"{t.function} on the patient's {t.side}"},
                                  f"the {t.name} {t.function_fact}", t.noun, 1))
    return moves


def later_moves(geo: _Geometry, ref: Instance, r: int, used: set[str], modality: str,
                rng: np.random.Generator) -> list[Move]:
    """Candidates referring to round r (whose target is `ref`)."""
    src = f"the {ref.name} from round {r + 1}"
    moves: list[Move] = []
    for t in geo.items:
        if t.name in used or t.name == ref.name or t.kind == "body":
            continue
        others = geo.same_noun(t.noun, t)
        if t.parent == ref.name and t.kind == "lesion":
            qual = t.name.split()[0] if t.name.split()[0] in ("larger", "smaller") else ""
            phrase = f"{qual} {t.noun}".strip()
            moves.append(Move(t, "lesion", r, {"lesion": phrase}, f"it is the {phrase} inside {src}", t.noun, len(others)))
        if t.parent == ref.name and t.kind == "part":
            moves.append(Move(t, "hierarchy", r, {"part": t.noun}, f"the {t.noun} is part of {src}", t.noun,
                              len(others)))
        if ref.group and t.group == ref.group:
            group = [i for i in geo.items if i.group == ref.group and i.name != ref.name]
            if len(group) == 1:
                which = rng.choice(KIND_PHRASES if ref.group in KIND_GROUPS else SAME_PHRASES[modality])
                fact = "is of the same kind as" if ref.group in KIND_GROUPS else "has the same density as"
                if modality == "MR" and ref.group not in KIND_GROUPS:
                    fact = "has the same signal as"
                noun = GROUP_NOUNS[ref.group]
                moves.append(Move(t, "attribute", r, {"noun": noun, "which": str(which)}, f"it {fact} {src}", noun,
                                  len([i for i in geo.items if i.noun == noun and i.name != t.name])))
        if t.noun == ref.noun and len(others) == 1:
            ratio = t.area / max(ref.area, 1)
            if ratio >= SIZE_RATIO or ratio <= 1 / SIZE_RATIO:
                larger = ratio > 1
                which = str(rng.choice(LARGER_PHRASES if larger else SMALLER_PHRASES))
                moves.append(Move(t, "attribute", r, {"noun": t.noun, "which": which},
                                  f"it is {'larger' if larger else 'smaller'} than {src}", t.noun, len(others)))
        if not geo.related(t, ref):
            for rel in REL_FACTS:
                if not geo.holds(rel, ref, t, STRICT if rel != "adjacent" else 1.0):
                    continue
                rivals = [i for i in others if not geo.related(i, ref)]
                if any(geo.holds(rel, ref, i, 0.0) for i in rivals):
                    continue
                moves.append(Move(t, "spatial", r, {"noun": t.noun, "rel": str(rng.choice(REL_PHRASES[rel]))},
                                  f"it lies {REL_FACTS[rel]} {src}", t.noun, len(others)))
        if t.function:
            same = [i for i in geo.items if i.function == t.function and i.name != t.name]
            if not same:
                moves.append(Move(t, "inferential", r, {"desc": t.function}, f"the {t.name} {t.function_fact}",
                                  t.noun, 0))
            elif len(same) == 1 and ref.side and t.side and same[0].side and same[0].side != t.side:
                link = "on the same side as it" if t.side == ref.side else "on the opposite side from it"
                fact = "on the same side as" if t.side == ref.side else "on the opposite side from"
                moves.append(Move(t, "inferential", r, {"desc": f"{t.function} {link}"},
                                  f"the {t.name} {t.function_fact}, {fact} {src}", t.noun, 1))
    return moves


@dataclass
class DialoguePolicy:
    """How a split draws rounds: template pool, reach-back and distractor preferences, first-round style."""

    use_reserved: bool = False
    p_reach_back: float = 0.35     # prefer referring 2+ rounds back when possible
    p_distractor: float = 0.3      # prefer targets with same-class distractors when possible
    p_first_inferential: float = 0.4


def _pick(rng: np.random.Generator, moves: list[Move], k: int, policy: DialoguePolicy) -> Move:
    """Relation type first (weighted over those available), then the split's preferences within it."""
    relations = sorted({m.relation for m in moves})
    weights = np.array([RELATION_WEIGHTS[r] for r in relations])
    relation = relations[int(rng.choice(len(relations), p=weights / weights.sum()))]
    moves = [m for m in moves if m.relation == relation]
    if rng.uniform() < policy.p_distractor:
        moves = [m for m in moves if m.distractors > 0] or moves
    if k >= 2:
        back = [m for m in moves if m.ref is not None and k - m.ref >= 2]
        prev = [m for m in moves if m.ref is not None and k - m.ref == 1]
        if rng.uniform() < policy.p_reach_back:
            moves = back or moves
        else:
            moves = prev or moves
    return moves[int(rng.integers(len(moves)))]


def _to_round(move: Move, rng: np.random.Generator, policy: DialoguePolicy) -> GeneratedRound:
    indices = allowed_indices(move.relation, policy.use_reserved)
    index = int(indices[int(rng.integers(len(indices)))])
    query = render(move.relation, index, **move.slots)
    entity = move.target.name
    return GeneratedRound(query, format_answer(entity, move.rationale), entity, entity, move.ref, move.relation, index,
                          move.noun, move.distractors)


def generate_dialogue(sl: AnatomySlice, n_rounds: int, seed, policy: DialoguePolicy | None = None,
                      attempts: int = 30) -> GeneratedDialogue:
    """A dialogue of exactly `n_rounds` rounds on `sl` (deterministic per seed); ValueError if impossible."""
    policy = policy or DialoguePolicy()
    geo = _Geometry(sl)
    for attempt in range(attempts):
        rng = np.random.default_rng([*np.atleast_1d(seed).tolist(), attempt, 11])
        first = first_round_moves(geo, sl.modality)
        inferential = [m for m in first if m.relation == "inferential"]
        direct = [m for m in first if m.relation == "direct" and m.target.kind != "lesion"]
        pool = inferential if (inferential and rng.uniform() < policy.p_first_inferential) else direct
        moves = [pool[int(rng.integers(len(pool)))]]
        rounds = [_to_round(moves[0], rng, policy)]
        used = {moves[0].target.name}
        for k in range(1, n_rounds):
            cands = []
            for r, prev in enumerate(rounds):
                cands += later_moves(geo, geo.by_name[prev.target], r, used, sl.modality, rng)
            if not cands:
                break
            move = _pick(rng, cands, k, policy)
            rounds.append(_to_round(move, rng, policy))
            used.add(move.target.name)
        if len(rounds) == n_rounds:
            return GeneratedDialogue(sl, rounds)
    raise ValueError(f"cannot build {n_rounds} rounds on this {sl.region} slice (seed {seed}): "
                     f"{len(sl.instances)} instances")
