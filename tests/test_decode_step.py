"""The engine's one-token decoding step (model/decode_step.py) against transformers' own MistralForCausalLM forward:
the same logits, last hidden state and cache, on the shipped model and on a random model with grouped-query
attention; the engine's answers and masks the same with and without it; transformers' forward wherever the step
would not be the same computation (peft adapters, a sliding window, training mode)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, MistralConfig, MistralForCausalLM

from MediRoundCore.engine import _CACHE_KWARG, Engine
from MediRoundCore.model.decode_step import DecodeStep
from conftest import needs_shipped_model


def _random_mistral(**overrides):
    settings = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=8,
                    num_key_value_heads=2, max_position_embeddings=512, rope_theta=10000.0, sliding_window=None)
    config = MistralConfig(**{**settings, **overrides})
    torch.manual_seed(0)
    return MistralForCausalLM(config).eval()


def _hf_step(lm, embeds, cache, position):
    out = lm(inputs_embeds=embeds, use_cache=True, position_ids=torch.tensor([[position]]),
             output_hidden_states=True, **{_CACHE_KWARG: cache})
    return out.logits[0, -1], out.hidden_states[-1][0, -1]


def _prefilled(lm, n=37, seed=1):
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randn(1, n, lm.config.hidden_size, generator=g).to(lm.dtype)
    cache = DynamicCache()
    with torch.inference_mode():
        lm(inputs_embeds=prefix, use_cache=True, position_ids=torch.arange(n)[None], **{_CACHE_KWARG: cache})
    return cache, n


def _layer_tensors(cache, index):
    if hasattr(cache, "layers"):  # transformers 5
        return cache.layers[index].keys, cache.layers[index].values
    return cache.key_cache[index], cache.value_cache[index]


def _compare(lm, steps=6, step=None, tolerance=1e-5):
    step = step or DecodeStep.for_model(lm)
    assert step is not None
    ours, theirs = _prefilled(lm), _prefilled(lm)
    g = torch.Generator().manual_seed(2)
    for i in range(steps):
        embeds = (torch.randn(1, 1, lm.config.hidden_size, generator=g) * 3).to(lm.dtype)
        with torch.inference_mode():
            logits, hidden = step(embeds, ours[0], ours[1] + i)
            ref_logits, ref_hidden = _hf_step(lm, embeds, theirs[0], theirs[1] + i)
        torch.testing.assert_close(logits, ref_logits, rtol=tolerance, atol=tolerance)
        torch.testing.assert_close(hidden, ref_hidden, rtol=tolerance, atol=tolerance)
    for index in range(lm.config.num_hidden_layers):
        for a, b in zip(_layer_tensors(ours[0], index), _layer_tensors(theirs[0], index)):
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance)


def test_random_grouped_query_model_matches_transformers():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _compare(_random_mistral())
        assert torch.get_num_threads() == 2  # the step's single thread is given back
    finally:
        torch.set_num_threads(before)


def test_a_step_bound_by_reading_its_weights_keeps_the_callers_threads():
    """Small steps run on one thread; one that reads more weights than ONE_THREAD_MAX_BYTES (a large vocabulary
    head, as lite's) runs on the caller's threads, and is still transformers' computation."""
    from MediRoundCore.model.decode_step import ONE_THREAD_MAX_BYTES

    small, large = _random_mistral(), _random_mistral(vocab_size=ONE_THREAD_MAX_BYTES // (64 * 4) + 1)
    seen = {}
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for name, lm in (("small", small), ("large", large)):
            step = DecodeStep.for_model(lm)
            inner = step._step

            def recording(*args, _inner=inner, _name=name):
                seen[_name] = torch.get_num_threads()
                return _inner(*args)

            step._step = recording
            _compare(lm, steps=2, step=step)
            assert torch.get_num_threads() == 2
        assert seen == {"small": 1, "large": 2}
        assert DecodeStep.for_model(large).weight_bytes > ONE_THREAD_MAX_BYTES >= DecodeStep.for_model(
            small).weight_bytes
    finally:
        torch.set_num_threads(before)


@needs_shipped_model
def test_shipped_model_matches_transformers():
    engine = Engine.load(device="cpu")
    _compare(engine.model.language_model)


def test_weights_changed_in_place_moved_or_cast_are_followed():
    lm = _random_mistral()
    step = DecodeStep.for_model(lm)
    assert step.fused

    def run_once():
        cache, n = _prefilled(lm)
        with torch.inference_mode():
            step(torch.ones(1, 1, lm.config.hidden_size, dtype=lm.dtype), cache, n)  # builds the fused weights

    run_once()
    with torch.no_grad():
        lm.model.layers[1].self_attn.k_proj.weight.mul_(-0.5)
        lm.model.layers[2].mlp.up_proj.weight.add_(0.1)
    _compare(lm, step=step)
    run_once()
    lm.to(torch.bfloat16)  # the CPU fallback and dtype changes move the same parameter objects
    _compare(lm, step=step, tolerance=2e-2)
    lm.load_state_dict(_random_mistral().to(torch.bfloat16).state_dict())
    _compare(lm, step=step, tolerance=2e-2)


def test_large_models_run_unfused_on_their_own_weights(monkeypatch):
    """Above the fusing limit nothing is copied: the same step on the model's own projection tensors."""
    import MediRoundCore.model.decode_step as decode_step

    monkeypatch.setattr(decode_step, "FUSE_LIMIT_BYTES", 0)
    lm = _random_mistral()
    step = DecodeStep.for_model(lm)
    assert not step.fused
    _compare(lm, step=step)
    assert step._layers == []  # no copies kept


def test_unsupported_models_keep_transformers_forward():
    from peft import LoraConfig, get_peft_model

    lm = _random_mistral()
    wrapped = get_peft_model(_random_mistral(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    assert DecodeStep.for_model(wrapped) is None  # the peft wrapper, as the engine holds it with LoRA applied
    assert DecodeStep.for_model(wrapped.base_model.model) is None  # adapters on the projections
    windowed = DecodeStep.for_model(_random_mistral(sliding_window=16))
    assert windowed.supports(15) and not windowed.supports(16)
    step = DecodeStep.for_model(lm)
    lm.train()
    assert not step.supports(0)


def test_engine_answers_and_masks_unchanged(tiny_engine, monkeypatch):
    """A three-round dialogue through the engine with the step and without: the same answers, prompts, masks;
    every language-model forward (queries and answer tokens) went through the step."""
    import numpy as np

    from MediRoundCore.imaging import SliceImage
    from MediRoundCore.session import Session

    slow = Engine(tiny_engine.model, tiny_engine.tokenizer, fast_decode=False)
    fast = Engine(tiny_engine.model, tiny_engine.tokenizer)
    assert fast._decode_step is not None and slow._decode_step is None
    pixels = np.zeros((64, 80), np.float32)
    pixels[20:40, 10:50] = 1.0
    image = SliceImage(pixels=pixels, view="axial", index=0, axis=2, transpose=False, flip_rows=False,
                       flip_cols=False, modality="MR")
    calls = []
    real_greedy = DecodeStep.greedy
    monkeypatch.setattr(DecodeStep, "greedy", lambda self, *a, **k: calls.append(1) or real_greedy(self, *a, **k))
    results = []
    for engine in (slow, fast):
        session = Session("vol")
        before = len(calls)
        results.append([engine.ask(session, q, image) for q in
                        ("Segment the liver.", "Now the lesion inside it.", "Go back to the first one.")])
        one_token = sum(1 for n in engine.forward_log if n == 1)
        forwards = len(engine.forward_log)
        assert one_token > 0 and len(calls) - before == (forwards if engine is fast else 0)
    for a, b in zip(*results):
        assert a.round.answer == b.round.answer
        torch.testing.assert_close(a.prompt, b.prompt, rtol=1e-5, atol=1e-5)
        assert (a.round.mask == b.round.mask).mean() > 0.999


def test_engine_moved_to_cpu_float32_after_a_round_keeps_answering(tiny_engine):
    """The CPU fallback (device.move_engine_to_cpu) casts the model after rounds were answered in another dtype:
    the next round decodes with the cast weights, with the answer an engine built in float32 gives."""
    import copy

    import numpy as np

    from MediRoundCore.device import move_engine_to_cpu
    from MediRoundCore.imaging import SliceImage
    from MediRoundCore.session import Session

    model = copy.deepcopy(tiny_engine.model).to(torch.bfloat16)
    engine = Engine(model, tiny_engine.tokenizer)
    pixels = np.zeros((48, 48), np.float32)
    pixels[10:30, 12:40] = 1.0
    image = SliceImage(pixels=pixels, view="axial", index=0, axis=2, transpose=False, flip_rows=False,
                       flip_cols=False, modality="MR")
    session = Session("vol")
    engine.ask(session, "Segment the liver.", image)
    move_engine_to_cpu(engine, "test")
    assert engine.model.dtype == torch.float32
    moved = engine.ask(session, "Now the lesion inside it.", image)
    fresh = Engine(engine.model, tiny_engine.tokenizer, fast_decode=False)
    again = Session("vol")
    again.add_round(session.rounds[0])
    assert fresh.ask(again, "Now the lesion inside it.", image).round.answer == moved.round.answer


@pytest.mark.parametrize("n", [2, 5])
def test_several_new_tokens_match_transformers(n):
    """`DecodeStep.many`: a token and its answer draft in one step, causal among themselves: logits and hidden
    states of every position, and the cache, as transformers' forward of the same tokens."""
    lm = _random_mistral()
    step = DecodeStep.for_model(lm)
    ours, theirs = _prefilled(lm), _prefilled(lm)
    g = torch.Generator().manual_seed(4)
    for i in range(2):
        embeds = torch.randn(1, n, lm.config.hidden_size, generator=g) * 3
        start = ours[1] + i * n
        with torch.inference_mode():
            logits, hidden = step.many(embeds, ours[0], start)
            out = lm(inputs_embeds=embeds, use_cache=True, position_ids=torch.arange(start, start + n)[None],
                     output_hidden_states=True, **{_CACHE_KWARG: theirs[0]})
        assert logits.shape == (n, lm.config.vocab_size)
        torch.testing.assert_close(logits, out.logits[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(hidden, out.hidden_states[-1][0], rtol=1e-5, atol=1e-5)
    for index in range(lm.config.num_hidden_layers):
        for a, b in zip(_layer_tensors(ours[0], index), _layer_tensors(theirs[0], index)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
