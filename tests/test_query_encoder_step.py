"""One query through the frozen MiniLM encoder without transformers' per-call work
(model/query_encoder_step.py): the same last hidden states as `BertModel`, on a random BERT and on the pinned
all-MiniLM-L6-v2 when present; `MediRound.query_states` the same either way; transformers' forward kept for
batches, gradients, training mode and other layouts."""

import pytest
import torch
from transformers import BertConfig, BertModel

from MediRoundCore.checkpoints import base_weights
from MediRoundCore.model.query_encoder_step import QueryEncoderStep


def _bert(**overrides):
    settings = dict(vocab_size=120, hidden_size=48, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96,
                    max_position_embeddings=40, type_vocab_size=2, layer_norm_eps=1e-12)
    torch.manual_seed(0)
    model = BertModel(BertConfig(**{**settings, **overrides}), add_pooling_layer=False).eval()
    with torch.no_grad():  # LayerNorm weights and biases away from ones and zeros
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def test_random_bert_matches_transformers():
    bert = _bert()
    step = QueryEncoderStep.for_model(bert)
    ids = torch.randint(0, 120, (1, 17))
    with torch.no_grad():
        assert step.supports(ids)
        torch.testing.assert_close(step(ids), bert(input_ids=ids).last_hidden_state, rtol=1e-5, atol=1e-5)


def test_transformers_forward_is_kept_where_the_step_is_not_the_same_computation():
    bert = _bert()
    step = QueryEncoderStep.for_model(bert)
    ids = torch.randint(0, 120, (1, 9))
    assert not step.supports(torch.randint(0, 120, (2, 9)))  # a batch (padding masks)
    assert not step.supports(torch.randint(0, 120, (1, 41)))  # past the position table
    with torch.enable_grad():
        assert not step.supports(ids)
    with torch.no_grad():
        bert.train()
        assert not step.supports(ids)
    assert QueryEncoderStep.for_model(_bert(hidden_act="relu")) is None
    assert QueryEncoderStep.for_model(_bert(position_embedding_type="relative_key")) is None


def test_pinned_minilm_matches_transformers():
    from MediRoundCore.errors import CheckpointError
    from MediRoundCore.model.text_encoder import load_minilm

    try:
        base_weights.locate("minilm")
    except CheckpointError:
        pytest.skip("MiniLM weights not on this machine: python -m MediRoundCore.checkpoints.base_weights fetch")
    minilm = load_minilm()
    ids = minilm.tokenize(["segment the lesion inside the left kidney, the smaller one"])["input_ids"]
    step = QueryEncoderStep.for_model(minilm.model)
    with torch.no_grad():
        torch.testing.assert_close(step(ids), minilm.model(input_ids=ids).last_hidden_state, rtol=1e-5, atol=1e-5)


def test_query_states_of_the_lite_model_are_the_same_with_the_step(monkeypatch):
    from MediRoundCore.errors import CheckpointError
    from MediRoundCore.model.lite import build_lite
    from MediRoundCore.model.processing import PromptBuilder

    try:
        model, tokenizer = build_lite()
    except CheckpointError:
        pytest.skip("the lite base weights are not on this machine")
    model.eval()
    builder = PromptBuilder.for_model(tokenizer, model)
    ids = torch.tensor([builder.user("Now the smaller lesion inside it, please.", True, False, number=2, reference=1)])
    with torch.no_grad():
        model.query_projection.weight.normal_(0, 0.02)
        calls = []
        real = QueryEncoderStep.__call__
        monkeypatch.setattr(QueryEncoderStep, "__call__", lambda self, x: calls.append(1) or real(self, x))
        stepped = model.query_states(ids)
        assert calls == [1]
        monkeypatch.setattr(QueryEncoderStep, "for_model", classmethod(lambda cls, bert: None))
        plain = model.query_states(ids)
    assert stepped.abs().sum() > 0
    torch.testing.assert_close(stepped, plain, rtol=1e-5, atol=1e-5)
