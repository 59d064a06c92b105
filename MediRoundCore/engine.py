"""Inference: `Engine.ask(session, query, image, reference)` runs one round and adds it to the session.

Per slice the engine keeps the segmenter's image embedding, the vision-tower image tokens and the language
model's KV cache of the dialogue so far, so a later round on the same slice feeds the language model only its
new tokens. The dialogue history is the session's; image tokens are the current slice's (a change of slice
rebuilds the prefix). `reuse_cache=False` re-runs the whole conversation every round (the public code's way,
kept for benchmarks and equivalence tests).
"""

from __future__ import annotations

import hashlib
import inspect
import os
import re
import time
import unicodedata
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .answers import parse_entity, says_absent
from .checkpoint_info import DEFAULT_CHECKPOINT, checkpoint_beta  # noqa: F401  (re-exported)
from .errors import MediRoundError, QueryError, SessionError
from .imaging import SliceImage, extract_slice
from .lesion_finder import LesionFinder, container_weights, lesion_kinds_asked, names_a_lesion
from .mask_components import keep_lesion_by_size
from .model.answer_drafts import AnswerDrafts
from .model.modeling import LAST_LOGITS_ONLY
from .model.field_placement import NO_PADDING, FieldPadding, slice_in_field
from .model.processing import (PromptBuilder, logits_to_slice, masks_to_segmenter_frame, reference_inputs,
                               segmenter_pixels, vision_pixels)
from .reference_scorer import ReferenceScorer, ScorerWithEvidence
from .references import GUESS_TRIES, asks_for_it_again, is_guess, refer_as_it
from .session import Round, Session

MAX_QUERY_CHARS = 2000
EVEN_EVIDENCE = 0.5  # the lesion finder's weight of an earlier round it cannot read (Engine._scorer_with_image)
EVIDENCE_FLOOR = 0.01  # no round ruled out by the finder alone: its weight is at least this
# transformers 5 renamed the forward's `past_key_values` to `cache`; Slicer may ship either.
_CACHE_KWARG = "cache" if "cache" in inspect.signature(
    __import__("transformers").MistralForCausalLM.forward).parameters else "past_key_values"


@dataclass
class RoundResult:
    """What one Ask produced; `round` is the session round that was added."""

    round: Round
    prompt: torch.Tensor  # (256,) the [SEG] prompt that was decoded (after JCM)
    raw_prompt: torch.Tensor  # (256,) before JCM
    forward_tokens: list[int] = field(default_factory=list)  # tokens given to each language-model forward
    answer_tokens: int = 0  # tokens the model generated (without [SEG])
    decode_forwards: int = 0  # the last forwards of `forward_tokens`, made while generating them (one token,
    # or one token and its draft, each)

    @property
    def mask(self) -> np.ndarray:
        return self.round.mask


@dataclass
class _SliceState:
    key: tuple
    pixels01: np.ndarray
    seg_embedding: torch.Tensor
    input_hw: tuple[int, int]
    image_tokens: torch.Tensor
    seg_pixels: torch.Tensor  # (3,S,S) segmenter input (a refining JCM correction looks at it)
    extent: tuple[float, float] | None = None  # the padded slice's share of the model's field of view
    padding: FieldPadding = NO_PADDING  # what puts the slice at its place in the field (model/field_placement.py)
    cache: object = None  # transformers DynamicCache
    cache_len: int = 0
    # The session's rounds (the objects: an undone round and its redone successor share a number) whose tokens
    # are in the cache, in order; None while the cache is being changed.
    rounds: list | None = field(default_factory=list)
    pending: list[int] = field(default_factory=list)  # tokens decided but not yet fed ([SEG], EOS)
    session_ref: object = None  # weakref to the session whose rounds the cache holds


def validate_query(query) -> str:
    if not isinstance(query, str):
        raise QueryError(f"query must be text, got {type(query).__name__}")
    text = query.strip()
    if not text:
        raise QueryError("the query is empty: type what to segment, e.g. 'Segment the liver.'")
    if len(text) > MAX_QUERY_CHARS:
        raise QueryError(f"the query is {len(text)} characters long; at most {MAX_QUERY_CHARS} are accepted")
    # Control characters only: format characters (the zero-width joiners of Persian or Hindi text, direction
    # marks), emoji and characters newer than this Python's Unicode tables are ordinary text.
    bad = [c for c in text if unicodedata.category(c) in ("Cc", "Cs") and c not in "\t\n\r"]
    if bad:
        raise QueryError(f"the query contains {len(bad)} unprintable control character(s) "
                         f"(first: U+{ord(bad[0]):04X}); remove them and ask again")
    return " ".join(text.split())


class Engine:
    def __init__(self, model, tokenizer, reuse_cache: bool = True, max_slices: int = 4, reference_scorer=None,
                 fast_decode: bool = True, answer_drafts=None, lesion_finder=None):
        from .model.decode_step import DecodeStep

        self.model = model.eval()
        # answer tokens one at a time without transformers' per-call work (None: its forward for every token)
        self._decode_step = DecodeStep.for_model(model.language_model) if fast_decode else None
        # drafts of the next answer tokens, checked in one forward (model/answer_drafts.py; None: one per forward)
        self.answer_drafts = answer_drafts if fast_decode else None
        self.tokenizer = tokenizer
        self.reference_scorer = reference_scorer  # picks what "it" means when a query names no round
        self.lesion_finder = lesion_finder  # weighs that guess by the image for lesion queries (lesion_finder.py)
        self.guess_tries = GUESS_TRIES  # the scorer's guesses an Ask tries while their answers are not taken
        self.new_structure_guesses = True  # a guess whose answer is another round's structure gives way
        self.one_lesion_by_size = True  # "the smaller nodule": the mask keeps one blob (mask_components.py)
        self.reuse_cache = reuse_cache
        self.builder = PromptBuilder.for_model(tokenizer, model)
        self._slices: OrderedDict[tuple, _SliceState] = OrderedDict()
        self._max_slices = max_slices
        # Per live session (weakly held, so closed sessions free their memory): round number -> generated
        # answer ids, and round number -> (crop, box) features of its reference.
        self._memory: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.forward_log: list[int] = []  # tokens per language-model forward, for tests and benchmarks

    # -- construction --------------------------------------------------------------------------------
    @classmethod
    def load(cls, checkpoint: str | Path | None = None, device: str | None = None, **kwargs) -> "Engine":
        """Our checkpoint folder (default: the bundled default model, `DEFAULT_CHECKPOINT`) on CUDA (bf16) if present,
        else CPU."""
        from .model.modeling import MediRound

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
        folder = Path(checkpoint) if checkpoint is not None else DEFAULT_CHECKPOINT
        model, tokenizer = MediRound.from_pretrained(folder, device=device, dtype=dtype)
        kwargs.setdefault("reference_scorer", ReferenceScorer.from_pretrained(folder))
        kwargs.setdefault("lesion_finder", LesionFinder.from_pretrained(folder))
        kwargs.setdefault("answer_drafts", AnswerDrafts.from_pretrained(folder, model.config.text.vocab_size,
                                                                        stop=_stop_tokens(model.token_ids)))
        return cls(model, tokenizer, **kwargs)

    @classmethod
    def random_tiny(cls, seed: int = 0, corpus: tuple[str, ...] = (), **kwargs) -> "Engine":
        """An untrained tiny model (same code paths), for tests and for machines without weights; `corpus`: more
        text its small tokenizer learns words from (else words outside its own few sentences are spelt out in
        letters, as the `tokenizers` release in use splits them)."""
        from .model.modeling import MediRound
        from .model.config import tiny_config
        from .model.tokenizer import TokenIds, train_tiny_tokenizer

        tokenizer = train_tiny_tokenizer(list(_SMALL_CORPUS) + list(corpus), vocab_size=400)
        torch.manual_seed(seed)
        config = tiny_config(vocab_size=len(tokenizer))
        config.max_answer_tokens = 12  # an untrained model rarely stops by itself; keep its babble short
        model = MediRound(config, TokenIds.from_tokenizer(tokenizer))
        return cls(model, tokenizer, **kwargs)

    @property
    def device_description(self) -> str:
        device = self.model.device
        if device.type == "cuda":
            return f"GPU: {torch.cuda.get_device_name(device)}"
        return f"CPU ({torch.get_num_threads()} threads)"

    # -- the round -----------------------------------------------------------------------------------
    def ask(self, session: Session, query: str, image: SliceImage, reference: int | None = None,
            use_jcm: bool = True, beta: float | None = None, progress=None) -> RoundResult:
        """Run one round on `image` (a slice of the session's volume) and append it to the session. A GPU
        out-of-memory or device error retries the round once on the CPU (see device.py)."""
        from .device import with_cpu_fallback

        return with_cpu_fallback(self, session, lambda: self._ask(session, query, image, reference, use_jcm, beta,
                                                                  progress), progress)

    def prepare(self, session: Session, image: SliceImage, progress=None) -> dict[str, float]:
        """Everything an Ask on `image` does before it reads the query: encode the slice (segmenter and vision
        tower) and fill the language model's cache with the image prefix and the session's rounds so far. The
        next `ask` on the same slice and session then starts at its query (its result is the same as without
        `prepare`). Run it while the user types or scrolls. Returns the timings of what it did (empty when the
        slice was ready already). A device fault falls back to the CPU as in `ask`."""
        from .device import with_cpu_fallback

        return with_cpu_fallback(self, session, lambda: self._prepare(session, image, progress), progress)

    @torch.inference_mode()
    def _prepare(self, session, image, progress) -> dict[str, float]:
        say = progress or (lambda message, fraction: None)
        if not isinstance(image, SliceImage):
            raise MediRoundError(f"image must be a SliceImage, got {type(image).__name__}")
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        say("encoding the slice ahead", 0.1)
        self._slice_state(session, image, timings, None)
        if timings:
            timings["total_ms"] = (time.perf_counter() - t0) * 1000
        say("slice ready", 1.0)
        return timings

    @torch.inference_mode()
    def _ask(self, session, query, image, reference, use_jcm, beta, progress) -> RoundResult:
        say = progress or (lambda message, fraction: None)
        query = validate_query(query)
        if beta is not None and not (isinstance(beta, (int, float)) and 0.0 <= beta <= 1.0):  # NaN fails too
            raise MediRoundError(f"the JCM threshold beta must be a number from 0 to 1, got {beta!r}")
        if not isinstance(image, SliceImage):
            raise MediRoundError(f"image must be a SliceImage, got {type(image).__name__}")
        explicit = reference
        guesses = session.reference_candidates(query, reference, self.reference_scorer, self.guess_tries) or [None]
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        say("encoding the slice", 0.1)
        forward_tokens: list[int] = []
        state = self._slice_state(session, image, timings, forward_tokens)
        scorer = self._scorer_with_image(session, query, explicit, state, image, timings)
        if scorer is not self.reference_scorer:
            guesses = session.reference_candidates(query, reference, scorer, self.guess_tries) or [None]
        say("reading the dialogue", 0.4)
        if not self.reuse_cache:
            self._rebuild_prefix(session, state, forward_tokens, timings)
        held, state.rounds = state.rounds, None  # the cache grows now: until the round is added it matches none
        start, lm_ms, tries = state.cache_len, 0.0, []

        def ask_turn(number, features):
            """One answer to the query with reference `number`, after the turns before this round's."""
            nonlocal lm_ms
            self._drop_rejected(state, state.cache_len - start)
            t1 = time.perf_counter()
            before = len(forward_tokens) + 1  # and the prompt forward
            new_tokens = list(state.pending) + self._user_turn(session, query, number, len(session.rounds) + 1)
            hidden, answer_ids, forced = self._generate(state, new_tokens, *features, forward_tokens)
            lm_ms += (time.perf_counter() - t1) * 1000
            answer = self.builder.decode(answer_ids)
            absent = forced and says_absent(answer)  # "<entity>: not on this slice." and no [SEG]: draw nothing
            tries.append((number, features, hidden, answer_ids, forced, answer, absent, before))
            return answer, absent

        attempted = []  # every guess reached, a try or one whose round could not be read
        chosen = None  # the try whose answer stands
        for number in guesses:
            attempted.append(number)
            try:
                features = (None, None) if number is None else self._reference_features(session, number, state, image)
            except SessionError:
                if not tries:
                    raise
                break  # a later guess on a slice this session cannot read: no more tries
            answer, absent = ask_turn(number, features)
            entity = parse_entity(answer)
            if absent:
                # A guessed round that lacks the asked structure ("nodule in the right lung: not on this slice."
                # with the right lung as the reference) gives way to the scorer's next guess
                # (references.reference_candidates); a structure absent from the slice ("liver: not on this
                # slice.") is absent whatever the reference, unless an earlier guess found it.
                if _inside_reference(entity, session, number) or any(not t[6] for t in tries[:-1]):  # t[6]: absent
                    continue
            elif self.new_structure_guesses and _segmented_elsewhere(entity, session, number, image.view,
                                                                     image.index, asks_for_it_again(query)):
                # A guess that leads to a structure a round on the slice has drawn ("the cavity that holds
                # cerebrospinal fluid on the opposite side from it" answered with round 2's ventricle, "Which
                # part of it is the tumour?" with the guessed tumour itself): "it" asks for something new, so
                # the next guess is tried.
                continue
            chosen = len(tries) - 1
            break
        if chosen is None:  # no guess gave a new answer: the first that drew a mask (a repeat), else the first
            chosen = next((k for k, t in enumerate(tries) if not t[6]), 0)
        if chosen != len(tries) - 1:
            ask_turn(*tries[chosen][:2])  # asked again: the cache holds the last try
        reference, (crop_tokens, box_tokens), hidden, answer_ids, forced, answer, absent, before = tries[-1]
        entity = parse_entity(answer)  # the answer taken (the loop's last try may not be it)
        decode_forwards = len(forward_tokens) - before
        timings["language_model_ms"] = lm_ms
        if len(tries) > 1:
            timings["reference_tries"] = float(len(tries))
        t2 = time.perf_counter()
        if absent:
            raw = torch.zeros(1, 256)
            prompts, mask, jcm_score, corrected = raw, np.zeros(image.pixels.shape, bool), None, False
        else:
            say("decoding the mask", 0.8)
            raw = self.model.seg_prompts(hidden[None].to(self.model.dtype))
            out = self.model.decode_masks(state.seg_embedding, raw, use_jcm=use_jcm, beta=beta,
                                          pixels=state.seg_pixels[None])
            logits = logits_to_slice(out.logits, state.input_hw, self.model.config.segmenter.image_size,
                                     state.pixels01.shape)
            mask = state.padding.unpad((logits[0] > self.model.segmenter.mask_threshold).cpu().numpy())
            if self.one_lesion_by_size:
                mask = keep_lesion_by_size(mask, entity)
            prompts = out.prompts
            jcm_score = None if out.scores is None else float(out.scores[0])
            corrected = bool(out.corrected[0]) if out.corrected is not None else False
        timings["mask_decoder_ms"] = (time.perf_counter() - t2) * 1000
        timings["total_ms"] = (time.perf_counter() - t0) * 1000
        if forced and not absent:
            answer = (answer + " " if answer else "") + "(the model gave no segmentation token; the answer was closed with one)"
        number = len(session.rounds) + 1
        guessed, alternatives = session.reference_guess(query, explicit, reference, scorer,
                                                        tried=[n for n in attempted if n != reference])
        round_ = Round(number=number, view=image.view, slice_index=image.index, query=query, answer=answer,
                       entity=entity, reference=reference, mask=mask,
                       jcm_score=jcm_score, corrected=corrected, seg_forced=forced and not absent, absent=absent,
                       reference_guessed=guessed, reference_alternatives=alternatives,
                       lm_tokens=sum(forward_tokens), timings=timings)
        session.add_round(round_)
        memory = self._session_memory(session)
        memory["answers"][number] = answer_ids
        if reference is not None:
            memory["refs"][number] = (crop_tokens, box_tokens)
        state.rounds = None if held is None else held + [round_]
        state.pending = self._round_end(round_)
        say("done", 1.0)
        return RoundResult(round_, prompts[0].float().cpu(), raw[0].float().cpu(), forward_tokens, len(answer_ids),
                           decode_forwards)

    # -- pieces --------------------------------------------------------------------------------------
    def _finder_kinds(self, session: Session, query: str, explicit) -> tuple[str, ...] | None:
        """The lesion kinds the finder is to look for in the earlier rounds for this query: those it asks for
        inside a round it does not name, of the kinds the finder knows, when there are two rounds or more to
        choose from; None otherwise."""
        kinds = lesion_kinds_asked(query)
        if self.lesion_finder is None or not hasattr(self.reference_scorer, "scores") or kinds is None:
            return None
        visible = [e if not r.absent else None for e, r in zip(session.entities, session.rounds)]
        if not is_guess(query, visible, explicit) or sum(not r.absent for r in session.rounds) < 2:
            return None
        kinds = tuple(k for k in kinds if k in self.lesion_finder.config.kinds)
        return kinds or None

    def possible_references(self, session: Session, query: str, explicit: int | None = None) -> list[int]:
        """Every round an Ask on `query` may end up referring to, whatever the slice shows: the reference scorer's
        guesses, or every referable round where the lesion finder may reorder them (a server asks for the
        slices of all of them before it queues the round)."""
        if self._finder_kinds(session, query, explicit) is None:
            return session.reference_candidates(query, explicit, self.reference_scorer, self.guess_tries)
        return session.reference_candidates(query, explicit, self.reference_scorer, len(session.rounds))

    def _scorer_with_image(self, session, query, explicit, state, image, timings):
        """The reference scorer, weighed by the lesion finder when the query asks for a lesion inside a round it
        does not name ("the nodule within it" after both lungs): each earlier organ on this slice by how likely
        its mask holds the kind asked for, and less where no cell of it is as sure as a spot's (`SPOT_P`: a faint
        cell at a predicted mask's edge is not a lesion seen) or the number of such lesions it sees does not fit
        the wording (one for "the nodule", two for "the larger nodule"; not read for tumours). A round the finder
        cannot read (on another slice, a mask too small for its grid, itself a lesion) gets an even chance. The
        scorer itself otherwise."""
        kinds = self._finder_kinds(session, query, explicit)
        if kinds is None:
            return self.reference_scorer
        t = time.perf_counter()
        evidence = np.full(len(session.rounds), EVEN_EVIDENCE)
        here = [k for k, r in enumerate(session.rounds)
                if r.view == image.view and r.slice_index == image.index and r.mask is not None and r.mask.any()
                and r.mask.shape == image.pixels.shape and not names_a_lesion(r.entity)]
        if here:
            size = self.model.config.segmenter.image_size
            masks = np.stack([state.padding.pad(np.asarray(session.rounds[k].mask, bool)) for k in here])
            frames = masks_to_segmenter_frame(masks, state.input_hw, size)
            cells = self.lesion_finder.cell_probabilities(state.seg_embedding, frames, kinds)  # the head runs once
            weights = container_weights(cells, kinds, query)
            evidence[here] = np.where(np.isnan(weights), EVEN_EVIDENCE, weights)
        timings["lesion_finder_ms"] = (time.perf_counter() - t) * 1000
        return ScorerWithEvidence(self.reference_scorer, np.log(np.clip(evidence, EVIDENCE_FLOOR, 1.0)))

    def _slice_state(self, session: Session, image: SliceImage, timings, forward_tokens) -> _SliceState:
        key = _slice_key(session, image, self.model.config)
        state = self._slices.get(key)
        if state is None:
            t = time.perf_counter()
            pixels01, extent, padding = slice_in_field(image, self.model.config)
            seg_pixels, input_hw = segmenter_pixels(pixels01, self.model.config, extent)
            seg_embedding = self.model.encode_segmenter_image(seg_pixels[None])
            timings["segmenter_encoder_ms"] = (time.perf_counter() - t) * 1000
            t = time.perf_counter()
            image_tokens = self.model.encode_image_tokens(vision_pixels(pixels01, self.model.config, extent)[None])
            timings["vision_tower_ms"] = (time.perf_counter() - t) * 1000
            state = _SliceState(key, pixels01, seg_embedding, input_hw, image_tokens, seg_pixels, extent, padding)
            self._slices[key] = state
            while len(self._slices) > self._max_slices:
                self._slices.popitem(last=False)
        self._slices.move_to_end(key)
        # The cache must hold exactly the session's rounds so far, in order; else rebuild it.
        if self.reuse_cache and (state.cache is None or not _holds_rounds(state, session)
                                 or state.session_ref is None or state.session_ref() is not session):
            state.session_ref = weakref.ref(session)
            self._rebuild_prefix(session, state, forward_tokens, timings)
        return state

    def _rebuild_prefix(self, session: Session, state: _SliceState, forward_tokens, timings) -> _SliceState:
        """Fill the cache with prefix + every round of the session (one forward)."""
        from .model.kv_cache import new_cache

        t = time.perf_counter()
        # One reading of the rounds (a prepare runs beside the main thread, where an Undo may remove one), and no
        # list of rounds until the cache holds them: a failure on the way leaves a cache that matches nothing.
        rounds = list(session.rounds)
        state.rounds = None
        memory = self._session_memory(session)
        ids = self.builder.prefix()
        crops, boxes = [], []
        for r in rounds:
            if r.reference is not None:
                crop, box = memory["refs"].get(r.number) or self._reference_features(session, r.reference, state, None)
                crops.append(crop)
                boxes.append(box)
            ids += self._user_turn(session, r.query, r.reference, r.number)
            answer_ids = memory["answers"].get(r.number)
            if answer_ids is None:
                answer_ids = self.builder.answer(_strip_note(r.answer))[:-2]
            ids += answer_ids + self._round_end(r)
        # The last round's closing tokens ([SEG] EOS, or EOS of an absent round) are fed with the next round.
        keep = len(self._round_end(rounds[-1])) if rounds else 0
        feed, state.pending = (ids[:-keep], ids[-keep:]) if keep else (ids, [])
        state.cache = new_cache()
        state.cache_len = 0
        embeds = self.model.embed_inputs(torch.tensor([feed]), state.image_tokens,
                                         torch.cat(crops) if crops else None, torch.cat(boxes) if boxes else None)
        self._lm(embeds, state, forward_tokens)
        state.rounds = rounds
        timings["prefix_ms"] = (time.perf_counter() - t) * 1000
        return state

    def _round_end(self, round_: Round) -> list[int]:
        """The tokens that close a round's answer in the history: [SEG] EOS, or EOS alone for an absent target
        (as in training, train/batching.py)."""
        ids = self.model.token_ids
        return [ids.eos] if round_.absent else [ids.seg, ids.eos]

    def _user_turn(self, session: Session, query: str, reference: int | None, number: int) -> list[int]:
        """Token ids of round `number`'s user turn, through the opening of its answer."""
        tagged = self._tagged_reference(reference)
        return self.builder.user(self._model_text(session, query, reference), reference is not None,
                                 first=number == 1, number=number, reference=tagged,
                                 reference_entity=None if tagged is None else session.round(tagged).entity)

    def _tagged_reference(self, reference: int | None) -> int | None:
        """The reference a tagged prompt names (the evaluation's blank-reference ablation names none)."""
        return reference

    @staticmethod
    def _model_text(session: Session, query: str, reference: int | None) -> str:
        """What the model reads of a query: its mention of the referenced round's entity said as "it"."""
        if reference is None:
            return query
        return refer_as_it(query, session.round(reference).entity)

    def _session_memory(self, session: Session) -> dict:
        memory = self._memory.setdefault(session, {"answers": {}, "refs": {}})
        known = {r.number for r in session.rounds}
        for table in memory.values():  # forget undone rounds
            for number in [n for n in table if n not in known]:
                del table[number]
        return memory

    def _reference_features(self, session, reference, state, image):
        """Crop (via the vision tower's CLS) and box features of the referenced round's mask, on its own slice."""
        ref = session.round(reference)
        if (ref.view, ref.slice_index) == state.key[1:3]:
            pixels01, extent, padding = state.pixels01, state.extent, state.padding
        else:
            if hasattr(session, "slice_image"):  # a server's session: the slices its client uploaded
                other = session.slice_image(ref.view, ref.slice_index)
            elif session.volume is not None:
                other = extract_slice(session.volume, ref.view, ref.slice_index)
            else:
                raise SessionError(f"round {reference} lies on another slice ({ref.view} {ref.slice_index}); attach "
                                   f"the volume to the session (session.volume) to refer to it")
            pixels01, extent, padding = slice_in_field(other, self.model.config)
        if padding.padded_hw(ref.mask.shape) != pixels01.shape:
            raise SessionError(f"round {reference}'s mask has shape {ref.mask.shape}, its slice "
                               f"{padding.unpad(pixels01).shape}")
        crop_pixels, box = reference_inputs(pixels01, padding.pad(ref.mask), self.model.config, extent)
        return self.model.encode_crops(crop_pixels[None]), self.model.encode_boxes(box[None])

    def _lm(self, embeds, state: _SliceState, forward_tokens, every_position: bool = False):
        """Feed `embeds` (1,n,h) after the slice's cache: (greedy next token, last hidden state) of the last
        position, or of every position (n,), (n,h) with `every_position` (a token and its answer draft). The cache
        keeps all n."""
        n = embeds.shape[1]
        step = self._decode_step
        if step is not None and step.supports(state.cache_len, n):  # the same computation, lighter
            tokens, hidden = step.greedy(embeds, state.cache, state.cache_len, last_only=not every_position)
        else:
            positions = torch.arange(state.cache_len, state.cache_len + n, device=embeds.device)[None]
            out = self.model.language_model(inputs_embeds=embeds, use_cache=True, position_ids=positions,
                                            output_hidden_states=True, **{_CACHE_KWARG: state.cache},
                                            **({} if every_position else LAST_LOGITS_ONLY))
            tokens, hidden = out.logits[0].argmax(-1), out.hidden_states[-1][0]
        # the cache was extended in place
        state.cache_len += n
        self.forward_log.append(n)
        if forward_tokens is not None:
            forward_tokens.append(n)
        return (tokens, hidden) if every_position else (tokens[-1], hidden[-1])

    @staticmethod
    def _drop_rejected(state: _SliceState, count: int) -> None:
        """Remove the last `count` positions (rejected draft tokens, a turn asked with a rejected reference) from
        the slice's cache."""
        if count:
            state.cache.crop(-count)
            state.cache_len -= count

    def _generate(self, state, new_tokens, crop_tokens, box_tokens, forward_tokens):
        """Greedy decoding with the KV cache until [SEG] (or EOS / the token limit, then closed with [SEG]).

        With answer drafts, each decoded token is fed together with a draft of the next ones; drafted tokens are
        kept while they are the model's own greedy choice at their position, so the answer is greedy decoding's."""
        ids = self.model.token_ids
        ends = _stop_tokens(ids)
        stop = ends - {ids.seg}
        limit = self.model.config.max_answer_tokens
        embeds = self.model.embed_inputs(torch.tensor([new_tokens]), None, crop_tokens, box_tokens)
        next_token, hidden = self._lm(embeds, state, forward_tokens)
        answer: list[int] = []
        while len(answer) < limit:
            token = int(next_token)
            if token == ids.seg:
                return hidden, answer, False
            if token in stop:
                return hidden, answer, True
            answer.append(token)
            draft = self.answer_drafts.draft(answer, limit - len(answer)) if self.answer_drafts is not None else []
            draft = draft[:next((i for i, t in enumerate(draft) if t in ends), len(draft))]  # never fed
            all_tokens, all_hidden = self._lm(self.model.embed_inputs(torch.tensor([[token] + draft])), state,
                                              forward_tokens, every_position=True)
            kept = 0  # position i predicts the token after draft[:i]
            while kept < len(draft) and int(all_tokens[kept]) == draft[kept]:
                answer.append(draft[kept])
                kept += 1
            self._drop_rejected(state, len(draft) - kept)
            next_token, hidden = all_tokens[kept], all_hidden[kept]
        return hidden, answer, True

    def _asked_state(self, session: Session, image: SliceImage) -> _SliceState:
        state = self._slices.get(_slice_key(session, image, self.model.config))
        if state is None:
            raise KeyError("this slice has not been asked on (or its cache was dropped)")
        return state

    def slice_embedding(self, session: Session, image: SliceImage) -> tuple[torch.Tensor, tuple[int, int]]:
        """The cached segmenter image embedding (1,C,g,g) of a slice asked on, and the extent in the frame of the
        slice as it was shown (padded to its place in the field: `slice_padding`), before the frame's padding."""
        state = self._asked_state(session, image)
        return state.seg_embedding, state.input_hw

    def slice_padding(self, session: Session, image: SliceImage) -> FieldPadding:
        """What put a slice asked on at its place in the model's field (pad its masks with it to frame them)."""
        return self._asked_state(session, image).padding

    def slice_pixels(self, session: Session, image: SliceImage) -> torch.Tensor:
        """The cached (3,S,S) segmenter input of a slice asked on."""
        return self._asked_state(session, image).seg_pixels

    def forget(self) -> None:
        """Drop every cache (e.g. after loading another model)."""
        self._slices.clear()
        if self._decode_step is not None:
            self._decode_step.clear()
        forget_image_side = getattr(self.model, "forget_image_side", None)
        if forget_image_side is not None:
            forget_image_side()


def _stop_tokens(ids) -> frozenset:
    """Tokens that end an answer: [SEG], and those the model should never write (EOS, padding, placeholders)."""
    return frozenset((ids.seg, ids.eos, ids.pad, ids.image, ids.crop, ids.box, ids.bos))


def _holds_rounds(state: _SliceState, session: Session) -> bool:
    """Whether the slice's cache holds exactly the session's rounds, in order (the same round objects)."""
    held, now = state.rounds, list(session.rounds)
    return held is not None and len(held) == len(now) and all(a is b for a, b in zip(held, now))


def _inside_reference(entity: str | None, session: Session, reference: int | None) -> bool:
    """Whether an absent answer's entity places it in the referenced round's structure, as the training rounds
    word it (data/empty_containers.py: "nodule in the right lung", "right hemisphere tumour" for the right
    lung's or hemisphere's round; not "descending aorta" for the aorta's)."""
    if reference is None or not entity:
        return False
    words, asked = _words(session.round(reference).entity), _words(entity)
    return bool(words) and (asked.endswith(f" in the {words}") or asked.startswith(f"{words} ")) and asked != words


def _segmented_elsewhere(entity: str | None, session: Session, reference: int | None, view: str,
                         slice_index: int, again: bool = False) -> bool:
    """Whether an answer's entity is the structure of an earlier round on the same slice with a mask drawn. The
    referenced round's own structure counts too ("Which part of it is the tumour?" answered with the guessed
    tumour itself), except for a query that asks for it again (`again`, references.asks_for_it_again:
    "Segment it."). Structures compare by name; the same structure on another slice is new there."""
    asked = _words(entity)
    if not asked or (again and reference is not None and asked == _words(session.round(reference).entity)):
        return False
    return any(r.view == view and r.slice_index == slice_index and r.mask is not None and np.asarray(r.mask).any()
               and _words(r.entity) == asked for r in session.rounds)


def _words(name: str | None) -> str:
    """A structure's name as names compare: lower-case words, single spaces."""
    return " ".join(re.sub(r"[^a-z0-9]+", " ", (name or "").lower()).split())


def _slice_key(session: Session, image: SliceImage, config) -> tuple:
    """What identifies a slice's caches: everything that changes its encoding (the session's volume, the view
    and voxel plane, the slice index and shape, the modality, the CT window the model sees it through and its
    extent and place in the model's field) and the
    pixels themselves (a digest): on a server the volume fingerprint is only what a client claims, so encodings are
    never shared between slices whose pixels differ (another user's, or a re-upload)."""
    pixels = np.ascontiguousarray(image.pixels)
    digest = hashlib.blake2b(pixels.view(np.uint8).reshape(-1), digest_size=16).hexdigest()
    return (session.volume_fingerprint, image.view, image.index, pixels.shape, str(pixels.dtype), image.axis,
            image.modality, image.ct_window(config.ct_windows), _rounded(image.frame_extent(config.field_of_view_mm)),
            _rounded(image.frame_shift(config.field_of_view_mm)), digest)


def _rounded(extent):
    return None if extent is None else tuple(round(float(v), 6) for v in extent)


def _strip_note(answer: str) -> str:
    return answer.split(" (the model gave no segmentation token")[0]


def set_cpu_threads(n: int | None = None) -> None:
    torch.set_num_threads(n or max(1, min(os.cpu_count() or 1, 8)))


_SMALL_CORPUS = [
    "segment the liver.", "liver: the largest organ in the right upper abdomen.",
    "now the lesion inside it.", "lesion in the liver: a low-density spot inside the liver.",
    "segment the left kidney.", "left kidney: the kidney on the patient's left side.",
    "which organ stores bile?", "the organ left of the aorta.", "spleen: it lies in the left upper abdomen.",
    "user: assistant: round", "the right lung and the heart and the nodule in it.",
]
