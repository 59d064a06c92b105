"""One query through the frozen MiniLM encoder without transformers' per-call work.

Each round the default model reads its query with all-MiniLM-L6-v2 (`MediRound.query_states`): about 20 tokens
through 6 BERT layers, a few hundred microseconds of arithmetic that transformers' `BertModel.forward` wraps in
several milliseconds of module dispatch, mask preparation and output bookkeeping (lite's later rounds: 8 of
about 80 ms). `QueryEncoderStep` runs the same computation as `BertModel.forward(input_ids)` for one sequence
without padding, in eval mode (models/bert/modeling_bert.py: word + absolute position + token-type-0 embeddings
and LayerNorm; per layer self-attention over all tokens, output dense + residual LayerNorm, GELU intermediate,
output dense + residual LayerNorm), on the model's own weight tensors. Tests hold it to `BertModel`'s output.

`for_model` returns None where it would not be that computation (another model class or activation, relative
position embeddings, training mode); the caller keeps transformers' forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class QueryEncoderStep:
    """`step(input_ids (1,T)) -> last hidden states (1,T,H)`, as `BertModel(input_ids).last_hidden_state`."""

    def __init__(self, bert):
        self.bert = bert
        self.heads = bert.config.num_attention_heads

    @classmethod
    def for_model(cls, bert) -> "QueryEncoderStep | None":
        from transformers import BertModel

        cfg = getattr(bert, "config", None)
        if type(bert) is not BertModel or cfg is None or cfg.hidden_act != "gelu":
            return None
        if getattr(cfg, "position_embedding_type", "absolute") != "absolute" or getattr(cfg, "is_decoder", False):
            return None
        return cls(bert)

    def supports(self, input_ids: torch.Tensor) -> bool:
        """One sequence within the position table, an eval-mode encoder, no gradients wanted."""
        return (input_ids.dim() == 2 and input_ids.shape[0] == 1 and not self.bert.training
                and not torch.is_grad_enabled()
                and input_ids.shape[1] <= self.bert.embeddings.position_embeddings.num_embeddings)

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        emb = self.bert.embeddings
        t = input_ids.shape[1]
        x = (emb.word_embeddings.weight[input_ids[0]] + emb.position_embeddings.weight[:t]
             + emb.token_type_embeddings.weight[0])
        x = F.layer_norm(x, x.shape[-1:], emb.LayerNorm.weight, emb.LayerNorm.bias, emb.LayerNorm.eps)
        h = self.heads
        for layer in self.bert.encoder.layer:
            attn = layer.attention.self
            d = x.shape[-1] // h

            def heads(linear):
                return F.linear(x, linear.weight, linear.bias).reshape(t, h, d).transpose(0, 1)

            context = F.scaled_dot_product_attention(heads(attn.query), heads(attn.key), heads(attn.value))
            out = layer.attention.output
            x = F.layer_norm(F.linear(context.transpose(0, 1).reshape(t, h * d), out.dense.weight, out.dense.bias) + x,
                             x.shape[-1:], out.LayerNorm.weight, out.LayerNorm.bias, out.LayerNorm.eps)
            inner = F.gelu(F.linear(x, layer.intermediate.dense.weight, layer.intermediate.dense.bias))
            out = layer.output
            x = F.layer_norm(F.linear(inner, out.dense.weight, out.dense.bias) + x, x.shape[-1:],
                             out.LayerNorm.weight, out.LayerNorm.bias, out.LayerNorm.eps)
        return x[None]
