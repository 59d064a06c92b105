"""One answer token through the language model, without transformers' per-call machinery.

Greedy decoding feeds the language model one token at a time. For the small default model the arithmetic of
such a step is a few hundred microseconds; transformers' forward (causal-mask construction, output recording,
module dispatch of 29 linear layers) costs several times that. `DecodeStep` runs the same computation as
`transformers.MistralForCausalLM.forward` for one new token over a `DynamicCache` (RMSNorm, rotary embedding
of the default type, grouped-query attention over the cached keys and values, SiLU-gated MLP, final norm, LM
head; `models/mistral/modeling_mistral.py`), with the query/key/value and gate/up projections fused into one
matrix product each, and extends the caller's cache through its public `update`, so the cache stays the one
transformers reads for the next multi-token forward.

It is used only where it is the same computation: an unwrapped Mistral (no peft adapters on its projections,
default RoPE, no sliding window shorter than the sequence, SiLU), in eval mode. Anything else returns None from
`for_model` or falls back per call, and the engine keeps transformers' forward. The fused weights are rebuilt
when any source weight changes in place (tensor version counters).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """MistralRMSNorm: in float32, weight applied in the input's dtype."""
    dtype = x.dtype
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class DecodeStep:
    """`step(embeds (1,1,h), cache, position) -> (logits (V,), last hidden state (h,))` for one new token."""

    def __init__(self, language_model):
        self.lm = language_model
        self.base = language_model.model
        cfg = language_model.config
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.intermediate = cfg.intermediate_size
        self.sliding_window = getattr(cfg, "sliding_window", None)
        self._sources: list[torch.Tensor] = []
        self._versions: list[int] = []
        self._layers: list[dict] = []

    @classmethod
    def for_model(cls, language_model) -> "DecodeStep | None":
        """A step for `language_model`, or None where it would not be transformers' own computation."""
        base = getattr(language_model, "model", None)
        cfg = getattr(language_model, "config", None)
        if base is None or cfg is None or getattr(cfg, "model_type", None) != "mistral":
            return None
        if getattr(cfg, "hidden_act", None) != "silu":
            return None
        rotary = getattr(base, "rotary_emb", None)
        if rotary is None or getattr(rotary, "rope_type", "default") != "default" \
                or float(getattr(rotary, "attention_scaling", 1.0)) != 1.0:
            return None
        linear = [language_model.lm_head]
        for layer in base.layers:
            attn, mlp = layer.self_attn, layer.mlp
            linear += [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]
        if any(type(m) is not torch.nn.Linear or m.bias is not None for m in linear):  # peft adapters, biases
            return None
        return cls(language_model)

    # -- weights ---------------------------------------------------------------------------------------
    def _fused(self) -> list[dict]:
        sources = [p for p in self.lm.parameters()]
        versions = [p._version for p in sources]
        if self._layers and len(sources) == len(self._sources) \
                and all(a is b for a, b in zip(sources, self._sources)) and versions == self._versions:
            return self._layers
        with torch.no_grad():
            layers = []
            for layer in self.base.layers:
                attn, mlp = layer.self_attn, layer.mlp
                layers.append({
                    "qkv": torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]),
                    "o": attn.o_proj.weight,
                    "gate_up": torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]),
                    "down": mlp.down_proj.weight,
                    "norm1": (layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon),
                    "norm2": (layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon),
                })
        self._sources, self._versions, self._layers = sources, versions, layers
        return layers

    # -- the step --------------------------------------------------------------------------------------
    def supports(self, position: int) -> bool:
        """False where transformers would mask by a sliding window, or the model is training."""
        if self.lm.training:
            return False
        return self.sliding_window is None or position < self.sliding_window

    @torch.inference_mode()
    def __call__(self, embeds: torch.Tensor, cache, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        layers = self._fused()
        hidden = embeds.reshape(1, -1)
        dtype = hidden.dtype
        inv_freq = self.base.rotary_emb.inv_freq
        freqs = float(position) * inv_freq.to(torch.float32)
        angles = torch.cat((freqs, freqs))
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
        nq, nkv, d = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.head_dim
        for index, p in enumerate(layers):
            x = _rms_norm(hidden, *p["norm1"])
            qkv = F.linear(x, p["qkv"])
            q = qkv[:, :nq].view(1, self.heads, 1, d)
            k = qkv[:, nq:nq + nkv].view(1, self.kv_heads, 1, d)
            v = qkv[:, nq + nkv:].view(1, self.kv_heads, 1, d)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            keys, values = cache.update(k, v, index)
            if self.heads != self.kv_heads:  # as transformers' repeat_kv: each key/value head serves a group
                keys = keys.repeat_interleave(self.heads // self.kv_heads, dim=1)
                values = values.repeat_interleave(self.heads // self.kv_heads, dim=1)
            attn = F.scaled_dot_product_attention(q, keys, values, scale=d ** -0.5)
            hidden = hidden + F.linear(attn.reshape(1, nq), p["o"])
            x = _rms_norm(hidden, *p["norm2"])
            gate_up = F.linear(x, p["gate_up"])
            hidden = hidden + F.linear(F.silu(gate_up[:, :self.intermediate]) * gate_up[:, self.intermediate:], p["down"])
        norm = self.base.norm
        hidden = _rms_norm(hidden, norm.weight, norm.variance_epsilon)
        return self.lm.lm_head(hidden)[0], hidden[0]
