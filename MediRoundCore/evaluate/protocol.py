"""The paper's multi-round protocol: a real Session, round by round, each round's PREDICTED mask feeding the
rounds that refer to it (never the ground truth).

Configurations (`CONFIGS`), all run on the same dialogues in one run:

| name            | reference of round t                       | JCM | removed at evaluation time            |
|-----------------|--------------------------------------------|-----|---------------------------------------|
| ind+jcm         | the dataset's `ind` (reference = ind + 1)  | on  | –                                     |
| ind-nojcm       | the dataset's `ind`                        | off | –                                     |
| resolver+jcm    | the product's resolver reads the query     | on  | –                                     |
| resolver-nojcm  | the product's resolver                     | off | –                                     |
| noref           | the dataset's `ind`                        | on  | reference crop/box (features of a blank mask) |
| noref-nojcm     | the dataset's `ind`                        | off | reference crop/box (as noref)         |
| nohistory       | the dataset's `ind`                        | on  | earlier rounds' text (the reference mask stays) |
| prevround       | always round t-1                           | on  | the true reference                    |

A dataset round after the first without `ind` is asked with reference=None (the resolver decides), as the
product would. A round is *ambiguous without its reference* when it refers to an earlier round and its query
noun fits other structures on the slice (the generator's per-round `distractors` > 0, stored in each
conversation's `meta`); without that metadata ambiguity is unknown (None).

Predictors: `EvalEngine` (an `Engine` with the ablation switches; reuse one for all configs so the slice
encodings are computed once per dialogue) and `OracleEngine` (returns the ground truth; checks the protocol's
bookkeeping: it must score 100).
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..answers import says_absent
from ..engine import Engine, RoundResult
from ..imaging import SliceImage
from ..model.processing import reference_inputs
from ..references import GUESS_TRIES
from ..session import Round, Session
from .metrics import MaskCounts, mask_counts


@dataclass(frozen=True)
class EvalConfig:
    name: str
    reference: str  # "dataset" | "resolver" | "previous"
    jcm: bool = True
    blank_reference: bool = False
    no_history: bool = False
    description: str = ""


CONFIGS: dict[str, EvalConfig] = {c.name: c for c in (
    EvalConfig("ind+jcm", "dataset", True, description="dataset references, JCM on (the paper's setting)"),
    EvalConfig("ind-nojcm", "dataset", False, description="dataset references, JCM off"),
    EvalConfig("resolver+jcm", "resolver", True,
               description="references from the product's resolver (query text), JCM on"),
    EvalConfig("resolver-nojcm", "resolver", False, description="references from the product's resolver, JCM off"),
    EvalConfig("noref", "dataset", True, blank_reference=True,
               description="ablation: reference crop and box replaced by those of a blank mask (a model with round "
                           "tags: its query does not name the round either)"),
    EvalConfig("noref-nojcm", "dataset", False, blank_reference=True,
               description="ablation: blank reference crop and box (and no round named), JCM off (against "
                           "ind-nojcm: a model whose JCM is not trained yet)"),
    EvalConfig("nohistory", "dataset", True, no_history=True,
               description="ablation: no dialogue history (each round alone), the reference mask kept"),
    EvalConfig("prevround", "previous", True, description="ablation: always the previous round as reference"),
)}
DEFAULT_CONFIGS = ("ind+jcm", "ind-nojcm", "resolver+jcm", "noref", "nohistory", "prevround")
BASELINE = "ind+jcm"


def parse_configs(items) -> list[EvalConfig]:
    """Config names, given as a list and/or comma-separated; unknown names are an error."""
    names: list[str] = []
    for item in items:
        names += [n.strip() for n in str(item).split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise ValueError(f"unknown config(s) {', '.join(unknown)}; expected some of {', '.join(CONFIGS)}")
    if not names:
        raise ValueError("no configs given")
    return [CONFIGS[n] for n in dict.fromkeys(names)]


# -- samples ------------------------------------------------------------------------------------------------
def sample_image(sample) -> SliceImage:
    """The sample's [0,1] image as a slice whose normalisation is the identity (modality 'normalized'). A slice of
    a real scan (`meta["geometry"]`: its pixel spacing, CT body region and place in patient coordinates) keeps
    them, so the model sees it at the scale and place a user's Ask on that scan gets (model/field_placement.py)."""
    pixels = np.asarray(sample.image, dtype=np.float32)
    geometry = (sample.meta or {}).get("geometry") or {}
    centre = geometry.get("centre_mm")
    return SliceImage(pixels=pixels, view="axial", index=0, axis=2, transpose=False, flip_rows=False,
                      flip_cols=False, modality="normalized", spacing=tuple(geometry.get("spacing", (1.0, 1.0))),
                      region=geometry.get("region"), centre_mm=None if centre is None else tuple(centre))


def sample_fingerprint(sample) -> str:
    """Identifies the sample's image (shared by every config, so the engine's slice caches are reused)."""
    image = np.ascontiguousarray(sample.image, dtype=np.float32)
    return "eval-" + hashlib.sha256(str(image.shape).encode() + image.tobytes()).hexdigest()[:16]


def round_meta(sample, k: int) -> dict:
    rounds = (sample.meta or {}).get("rounds")
    if isinstance(rounds, list) and k < len(rounds) and isinstance(rounds[k], dict):
        return rounds[k]
    return {}


def is_ambiguous(sample, k: int) -> bool | None:
    """Round k (0-based) refers to an earlier round and its noun fits other structures (None: unknown)."""
    meta = round_meta(sample, k)
    if "distractors" not in meta:
        return None
    return sample.ref_indices[k] is not None and int(meta["distractors"]) > 0


def config_reference(config: EvalConfig, sample, k: int) -> int | None:
    """The `reference` argument for round k (0-based) under `config` (1-based round number or None)."""
    if config.reference == "dataset":
        ind = sample.ref_indices[k]
        return None if ind is None else int(ind) + 1
    if config.reference == "previous":
        return k if k >= 1 else None
    return None  # resolver


# -- records ------------------------------------------------------------------------------------------------
@dataclass
class RoundRecord:
    config: str
    dialogue: str
    round: int  # 1-based
    counts: MaskCounts
    gt_reference: int | None  # 1-based, from the dataset
    reference: int | None  # 1-based, the one used
    ambiguous: bool | None
    relation: str | None
    entity_ok: bool | None
    jcm_score: float | None
    corrected: bool
    seg_forced: bool
    seconds: float
    entity: str | None = None  # what the answer named
    reference_tries: int = 1  # references the Ask tried (engine.Engine._ask: a guess that gave way)

    @property
    def dice(self) -> float:
        return self.counts.dice

    @property
    def iou(self) -> float:
        return self.counts.iou


@dataclass
class DialogueRun:
    config: EvalConfig
    dialogue: str
    session: Session
    records: list[RoundRecord] = field(default_factory=list)


# -- predictors ---------------------------------------------------------------------------------------------
class _FirstTurnBuilder:
    """The prompt builder with every user turn built as the first one (no history before it)."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def user(self, query, has_reference, first, number=None, reference=None, reference_entity=None):
        # as a first turn, round tags included: "round 1:", the reference's round not named (it is not there)
        return self._inner.user(query, has_reference, True, number=1, reference=None)


class EvalEngine(Engine):
    """An Engine with the evaluation-time ablations: blank reference features and no dialogue history."""

    blank_reference = False
    no_history = False

    @classmethod
    def from_engine(cls, engine: Engine, max_slices: int = 4) -> "EvalEngine":
        evaluator = cls(engine.model, engine.tokenizer, reuse_cache=engine.reuse_cache, max_slices=max_slices,
                        reference_scorer=engine.reference_scorer, fast_decode=engine._decode_step is not None,
                        lesion_finder=engine.lesion_finder)
        evaluator.new_structure_guesses = engine.new_structure_guesses
        evaluator.one_lesion_by_size = engine.one_lesion_by_size
        return evaluator

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._plain_builder = self.builder
        self._blank: tuple[torch.Tensor, torch.Tensor] | None = None

    @contextlib.contextmanager
    def mode(self, config: EvalConfig):
        self.blank_reference, self.no_history = config.blank_reference, config.no_history
        self.guess_tries = 1 if config.blank_reference else GUESS_TRIES  # blank: every guess reads the same
        self.builder = _FirstTurnBuilder(self._plain_builder) if config.no_history else self._plain_builder
        try:
            yield self
        finally:
            self.blank_reference = self.no_history = False
            self.guess_tries = GUESS_TRIES
            self.builder = self._plain_builder

    def _tagged_reference(self, reference):
        # blank: no crop, no box, and (round tags) no "(about round M)" either; the turn keeps its placeholders
        return None if self.blank_reference else reference

    def _reference_features(self, session, reference, state, image):
        if not self.blank_reference:
            return super()._reference_features(session, reference, state, image)
        if self._blank is None:
            blank = np.zeros((8, 8), np.float32)
            crop, box = reference_inputs(blank, blank.astype(bool), self.model.config)
            with torch.inference_mode():
                self._blank = (self.model.encode_crops(crop[None]), self.model.encode_boxes(box[None]))
        return self._blank

    def _rebuild_prefix(self, session, state, forward_tokens, timings):
        state.cache_len = 0
        if not self.no_history:
            return super()._rebuild_prefix(session, state, forward_tokens, timings)
        from ..model.kv_cache import new_cache

        t = time.perf_counter()
        state.cache = new_cache()
        embeds = self.model.embed_inputs(torch.tensor([self.builder.prefix()]), state.image_tokens)
        self._lm(embeds, state, forward_tokens)
        state.pending = []
        state.rounds = [-1]  # matches no session: the next round rebuilds this history-free prefix again
        timings["prefix_ms"] = (time.perf_counter() - t) * 1000
        return state

    def end_dialogue(self, sessions) -> None:
        """Drop the per-session entries (answer ids, reference features) of finished sessions."""
        for session in sessions:
            self._memory.pop(session, None)
        self.forward_log.clear()


class OracleEngine:
    """Answers every round with its ground truth (mask, answer, entity): the protocol must score 100."""

    device_description = "oracle (ground truth)"

    def __init__(self):
        self._truth: dict[str, object] = {}

    def begin_dialogue(self, fingerprint: str, sample) -> None:
        self._truth[fingerprint] = sample

    def end_dialogue(self, sessions) -> None:
        for s in sessions:
            self._truth.pop(s.volume_fingerprint, None)

    @contextlib.contextmanager
    def mode(self, config: EvalConfig):
        yield self

    def ask(self, session, query, image, reference=None, use_jcm=True, beta=None, progress=None) -> RoundResult:
        sample = self._truth[session.volume_fingerprint]
        reference = session.resolve_reference(query, reference)
        k = len(session.rounds)
        round_ = Round(number=k + 1, view=image.view, slice_index=image.index, query=query,
                       answer=sample.answers[k], entity=sample.entities[k], reference=reference,
                       mask=np.asarray(sample.masks[k], bool).copy(), absent=says_absent(sample.answers[k]))
        session.add_round(round_)
        zero = torch.zeros(256)
        return RoundResult(round_, zero, zero)


# -- the protocol -------------------------------------------------------------------------------------------
def evaluate_dialogue(predictor, sample, config: EvalConfig, dialogue_id: str = "0",
                      beta: float | None = None) -> DialogueRun:
    """Run one dialogue under one config in a new Session; score each round's predicted mask."""
    image = sample_image(sample)
    fingerprint = sample_fingerprint(sample)
    session = Session(fingerprint, volume_name=str(dialogue_id))
    run = DialogueRun(config, str(dialogue_id), session)
    masks = np.asarray(sample.masks).astype(bool)
    if masks.shape[0] != sample.num_rounds or masks.shape[1:] != image.pixels.shape:
        raise ValueError(f"dialogue {dialogue_id}: {masks.shape[0]} masks of {masks.shape[1:]} for "
                         f"{sample.num_rounds} rounds on a {image.pixels.shape} image")
    with predictor.mode(config):
        for k, query in enumerate(sample.queries):
            t = time.perf_counter()
            result = predictor.ask(session, query, image, reference=config_reference(config, sample, k),
                                   use_jcm=config.jcm, beta=beta)
            seconds = time.perf_counter() - t
            rnd = result.round
            gt_ref = sample.ref_indices[k]
            truth_entity = sample.entities[k] if k < len(sample.entities) else None
            run.records.append(RoundRecord(
                config=config.name, dialogue=str(dialogue_id), round=k + 1, counts=mask_counts(rnd.mask, masks[k]),
                gt_reference=None if gt_ref is None else int(gt_ref) + 1, reference=rnd.reference,
                ambiguous=is_ambiguous(sample, k), relation=round_meta(sample, k).get("relation"),
                entity_ok=None if truth_entity is None else (rnd.entity or "").strip().lower() == truth_entity.lower(),
                jcm_score=rnd.jcm_score, corrected=bool(rnd.corrected), seg_forced=bool(rnd.seg_forced),
                seconds=seconds, entity=rnd.entity, reference_tries=int((rnd.timings or {}).get("reference_tries", 1))))
    return run


def evaluate_sample(predictor, sample, configs, dialogue_id: str = "0", beta: float | None = None,
                    keep_sessions: bool = False) -> list[DialogueRun]:
    """Every config on one dialogue, one after the other (the slice is encoded once, by the first)."""
    fingerprint = sample_fingerprint(sample)
    begin = getattr(predictor, "begin_dialogue", None)
    if begin is not None:
        begin(fingerprint, sample)
    runs = []
    try:
        for config in configs:
            runs.append(evaluate_dialogue(predictor, sample, config, dialogue_id, beta))
    finally:
        end = getattr(predictor, "end_dialogue", None)
        if end is not None:
            end([r.session for r in runs])
    if not keep_sessions:
        for r in runs:
            r.session = None
    return runs
