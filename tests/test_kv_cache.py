"""The engine's key/value cache (model/kv_cache.py): transformers' DynamicCache with layers that keep spare
room. The same keys and values as DynamicCache through transformers' forward, DecodeStep steps, growth past the
buffer, crops (rejected answer drafts) and a replaced view; a step copies only its own states."""

import torch
from transformers import DynamicCache, MistralConfig, MistralForCausalLM

from MediRoundCore.engine import _CACHE_KWARG
from MediRoundCore.model.decode_step import DecodeStep
from MediRoundCore.model.kv_cache import new_cache


def _lm():
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return MistralForCausalLM(config).eval()


def _feed(lm, step, cache, start, embeds):
    n = embeds.shape[1]
    if n == 1 or step is None:
        if step is None:
            out = lm(inputs_embeds=embeds, use_cache=True, position_ids=torch.arange(start, start + n)[None],
                     **{_CACHE_KWARG: cache})
            return out.logits[0, -1]
        return step(embeds, cache, start)[0]
    return step.many(embeds, cache, start)[0][-1]


def test_roomy_cache_equals_dynamic_cache_through_forwards_steps_growth_and_crops():
    lm = _lm()
    step = DecodeStep.for_model(lm)
    ours, theirs = new_cache(), DynamicCache()
    assert len(ours.layers) == 0  # layers are made at the first update
    g = torch.Generator().manual_seed(1)
    position = 0
    plan = [(40, None), (1, step), (1, step), (5, step), ("crop", 3), (30, None), (1, step), ("crop", 1),
            (7, step), (1, step)]  # 40 + 30 + … passes the first buffer (64 rows)
    with torch.inference_mode():
        for n, how in plan:
            if n == "crop":
                ours.crop(-how)
                theirs.crop(-how)
                position -= how
                continue
            embeds = torch.randn(1, n, 32, generator=g)
            a = _feed(lm, how, ours, position, embeds)
            b = _feed(lm, how, theirs, position, embeds)
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
            position += n
    assert type(ours.layers[0]).__name__ == "RoomyLayer"
    assert ours.get_seq_length() == theirs.get_seq_length() == position
    for mine, reference in zip(ours.layers, theirs.layers):
        torch.testing.assert_close(mine.keys, reference.keys)
        torch.testing.assert_close(mine.values, reference.values)
        assert mine._key_buffer.shape[-2] >= position  # the views' storage has room


def test_a_step_writes_in_place_and_a_replaced_view_is_taken_over():
    cache = new_cache()
    k = torch.randn(1, 2, 10, 8)
    cache.update(k, k + 1, 0)
    layer = cache.layers[0]
    buffer = layer._key_buffer
    cache.update(torch.ones(1, 2, 1, 8), torch.ones(1, 2, 1, 8), 0)
    assert layer._key_buffer is buffer and layer.keys.data_ptr() == buffer.data_ptr()  # no copy of the cache
    layer.keys, layer.values = layer.keys[..., :4, :].clone(), layer.values[..., :4, :].clone()  # a reorder
    keys, values = cache.update(torch.zeros(1, 2, 2, 8), torch.zeros(1, 2, 2, 8), 0)
    torch.testing.assert_close(keys[..., :4, :], k[..., :4, :])
    assert keys.shape[-2] == 6 and float(keys[..., 4:, :].abs().sum()) == 0
