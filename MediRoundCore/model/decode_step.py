"""Answer tokens (and a round's query) through the language model, without transformers' per-call machinery.

Greedy decoding feeds the language model one token at a time. For the small default model the arithmetic of
such a step is a few hundred microseconds; transformers' forward (causal-mask construction, output recording,
module dispatch of 29 linear layers) costs several times that. `DecodeStep` runs the same computation as
`transformers.MistralForCausalLM.forward` for one new token over a `DynamicCache` (RMSNorm, rotary embedding
of the default type, grouped-query attention over the cached keys and values, SiLU-gated MLP, final norm, LM
head; `models/mistral/modeling_mistral.py`), `many` the same for a few new tokens (causal among themselves: a
token and its answer draft, or a round's query, whose LM head then runs at the last position only), with the
query/key/value and gate/up projections fused into one matrix product each, and extends the caller's cache
through its public `update`, so the cache stays the one transformers reads for its next forward.

It is used only where it is the same computation: a `MistralForCausalLM` itself (not a peft wrapper, no adapters
on its projections), default RoPE, no sliding window shorter than the sequence, SiLU, in eval mode. Anything
else returns None from `for_model` or falls back per call, and the engine keeps transformers' forward.

Fusing copies the projections, so only small models are fused (`FUSE_LIMIT_BYTES`: the default models; the
7B `full` model would need gigabytes more and gains little, its step being compute-bound): larger ones run the
same step on their own weight tensors. The fused copies are rebuilt whenever a source weight is replaced,
moved, cast or changed through autograd-visible in-place operations (identity, storage, device, dtype and
version counter of every parameter; the step holds the tensors it fused, so a cast's new storage cannot reuse
their addresses). A change through `.data` is invisible: `clear()` after one.

A small model's step runs on one CPU thread (the caller's thread count is restored after it): its matrix
products are too small to split, and with OpenMP's default spinning two threads on a busy machine took 7–27 ms
per token against 2 ms on one (measured while an evaluation used both cores). A step that reads more weights
than `ONE_THREAD_MAX_BYTES` keeps the caller's threads: it is bound by reading them (lite, 73 MB with its
30.5 k-word head in float32: 6.5–7.1 ms per token on one thread, 3.7 ms on two, idle machine; tiny: 1.4 ms on
one).

`greedy` is what the engine calls: the next tokens rather than the logits, so a large head is read through its
int8 screen (`greedy_head.py`; lite: 37 MB a step instead of 73, the same tokens).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .greedy_head import ScreenedArgmax

FUSE_LIMIT_BYTES = 256 << 20  # fuse q/k/v and gate/up only when the copies take at most this
ONE_THREAD_MAX_BYTES = 16 << 20  # a step reading at most this many weight bytes runs on one thread
ONE_THREAD_MAX_TOKENS = 11  # … and feeding at most this many tokens (a token and its draft of up to 10; a
# query's products split)


def _sdpa_groups_heads() -> bool:
    """Whether this torch's scaled_dot_product_attention shares key/value heads among query heads (enable_gqa,
    torch 2.5+)."""
    try:
        q, kv = torch.zeros(1, 4, 1, 2), torch.zeros(1, 2, 3, 2)
        return F.scaled_dot_product_attention(q, kv, kv, enable_gqa=True).shape == (1, 4, 1, 2)
    except (TypeError, RuntimeError):
        return False


_SDPA_GQA = _sdpa_groups_heads()


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """MistralRMSNorm: in float32, weight applied in the input's dtype."""
    dtype = x.dtype
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """transformers' rotate_half: (x1, x2) → (-x2, x1) over the last dimension."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class DecodeStep:
    """`step(embeds (1,1,h), cache, position) -> (logits (V,), last hidden state (h,))` for one new token;
    `step.many` for a few (a token and its answer draft); `step.greedy` their greedy next tokens."""

    def __init__(self, language_model):
        self.lm = language_model
        self.base = language_model.model
        cfg = language_model.config
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.intermediate = cfg.intermediate_size
        self.sliding_window = getattr(cfg, "sliding_window", None)
        self._signature: list[tuple] = []
        self._layers: list[dict] = []
        self._held: list[torch.Tensor] = []
        projections = [w for layer in self.base.layers for w in
                       (layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight, layer.self_attn.v_proj.weight,
                        layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight)]
        self.fused = sum(w.numel() * w.element_size() for w in projections) <= FUSE_LIMIT_BYTES
        read = projections + [w for layer in self.base.layers for w in
                              (layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight)]
        self._layer_bytes = sum(w.numel() * w.element_size() for w in read)
        head = language_model.lm_head.weight
        self.weight_bytes = self._layer_bytes + head.numel() * head.element_size()  # read once per step (`many`)
        screen = ScreenedArgmax.for_head(language_model.lm_head)  # greedy choice without the float32 head
        if screen is not None:
            screen.prepare()  # its tables and check now, not in the first Ask

    @classmethod
    def for_model(cls, language_model) -> "DecodeStep | None":
        """A step for `language_model`, or None where it would not be transformers' own computation."""
        from transformers import MistralForCausalLM

        if not isinstance(language_model, MistralForCausalLM):  # a peft wrapper, another architecture
            return None
        base, cfg = language_model.model, language_model.config
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
    def _weights(self) -> list[dict]:
        """Per layer: the q/k/v and gate/up projections (fused copies, or the model's own tensors in a tuple)."""
        if not self.fused:
            return [self._layer_weights(layer, False) for layer in self.base.layers]
        signature = [(id(p), p.data_ptr(), p.device, p.dtype, p._version) for p in self.lm.parameters()]
        if not self._layers or signature != self._signature:
            with torch.no_grad():
                self._layers = [self._layer_weights(layer, True) for layer in self.base.layers]
            self._signature = signature
            self._held = [p.detach() for p in self.lm.parameters()]  # their addresses cannot be reused meanwhile
        return self._layers

    @staticmethod
    def _layer_weights(layer, fuse: bool) -> dict:
        attn, mlp = layer.self_attn, layer.mlp
        qkv = (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight)
        gate_up = (mlp.gate_proj.weight, mlp.up_proj.weight)
        return {"qkv": torch.cat(qkv) if fuse else qkv, "o": attn.o_proj.weight,
                "gate_up": torch.cat(gate_up) if fuse else gate_up, "down": mlp.down_proj.weight,
                "norm1": (layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon),
                "norm2": (layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon)}

    @staticmethod
    def _project(x: torch.Tensor, weight) -> torch.Tensor:
        if isinstance(weight, tuple):
            return torch.cat([F.linear(x, w) for w in weight], dim=-1)
        return F.linear(x, weight)

    def clear(self) -> None:
        """Drop the fused copies and the head's screen tables (rebuilt at the next step)."""
        self._signature, self._layers, self._held = [], [], []
        screen = self._screen
        if screen is not None:
            screen.clear()

    # -- the step --------------------------------------------------------------------------------------
    def supports(self, position: int, n: int = 1) -> bool:
        """False where transformers would mask by a sliding window (n tokens from `position`), or the model is
        training."""
        if self.lm.training:
            return False
        return self.sliding_window is None or position + n - 1 < self.sliding_window

    def __call__(self, embeds: torch.Tensor, cache, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One token (embeds (1,1,h)): (logits (V,), last hidden state (h,))."""
        logits, hidden = self.many(embeds, cache, position)
        return logits[0], hidden[0]

    def many(self, embeds: torch.Tensor, cache, position: int, last_only: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """n new tokens at positions position.. (embeds (1,n,h); causal among themselves, as transformers' forward
        over a cache): (logits (n,V), last hidden states (n,h)), or only the last position's with `last_only`."""
        return self._run(embeds, cache, position, last_only, self.lm.lm_head, self.weight_bytes)

    def greedy(self, embeds: torch.Tensor, cache, position: int, last_only: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """As `many`, but (greedy next tokens (n,), last hidden states (n,h)): the argmax of the same logits, from
        the head's int8 screen where it has one (`greedy_head.ScreenedArgmax`). The engine checks answer
        drafts, and feeds a round's query, this way."""
        screen = self._screen
        if screen is None:
            return self._run(embeds, cache, position, last_only, lambda h: self.lm.lm_head(h).argmax(-1),
                             self.weight_bytes)
        return self._run(embeds, cache, position, last_only, screen, self._greedy_bytes(screen))

    @property
    def _screen(self) -> ScreenedArgmax | None:
        """The head's int8 screen (looked up each time: the head may have been replaced or cast)."""
        return ScreenedArgmax.for_head(self.lm.lm_head)

    @property
    def greedy_weight_bytes(self) -> int:
        """Weight bytes a greedy step reads: the layers, and the head through its screen where one is in use."""
        return self._greedy_bytes(self._screen)

    def _greedy_bytes(self, screen: ScreenedArgmax | None) -> int:
        head = self.lm.lm_head.weight
        screened = screen is not None and screen.usable
        return self._layer_bytes + head.numel() * (1 if screened else head.element_size())

    def _run(self, embeds, cache, position, last_only, head, weight_bytes):
        threads = torch.get_num_threads()
        if (not self.fused or threads == 1 or embeds.device.type != "cpu"
                or weight_bytes > ONE_THREAD_MAX_BYTES or embeds.shape[1] > ONE_THREAD_MAX_TOKENS):
            return self._step(embeds, cache, position, last_only, head)
        torch.set_num_threads(1)
        try:
            return self._step(embeds, cache, position, last_only, head)
        finally:
            torch.set_num_threads(threads)

    @torch.inference_mode()
    def _step(self, embeds: torch.Tensor, cache, position: int, last_only: bool, head
              ) -> tuple[torch.Tensor, torch.Tensor]:
        layers = self._weights()
        n = embeds.shape[1]
        hidden = embeds.reshape(n, -1)
        dtype = hidden.dtype
        inv_freq = self.base.rotary_emb.inv_freq.to(torch.float32)
        positions = torch.arange(position, position + n, dtype=torch.float32, device=hidden.device)
        freqs = positions[:, None] * inv_freq[None]
        angles = torch.cat((freqs, freqs), dim=-1)  # (n, d)
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
        nq, nkv, d = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.head_dim
        mask = None
        if n > 1:  # token i sees the cache and the new tokens up to itself
            seen = torch.arange(position + n, device=hidden.device)
            mask = seen[None, :] <= torch.arange(position, position + n, device=hidden.device)[:, None]
        for index, p in enumerate(layers):
            x = _rms_norm(hidden, *p["norm1"])
            qkv = self._project(x, p["qkv"])
            q = qkv[:, :nq].reshape(n, self.heads, d).transpose(0, 1)[None]
            k = qkv[:, nq:nq + nkv].reshape(n, self.kv_heads, d).transpose(0, 1)[None]
            v = qkv[:, nq + nkv:].reshape(n, self.kv_heads, d).transpose(0, 1)[None]
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            keys, values = cache.update(k, v, index)
            grouped = {}
            if self.heads != self.kv_heads:  # as transformers' repeat_kv: each key/value head serves a group
                if _SDPA_GQA:  # without copying the cache per group
                    grouped = {"enable_gqa": True}
                else:
                    keys = keys.repeat_interleave(self.heads // self.kv_heads, dim=1)
                    values = values.repeat_interleave(self.heads // self.kv_heads, dim=1)
            attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=d ** -0.5, **grouped)
            hidden = hidden + F.linear(attn[0].transpose(0, 1).reshape(n, nq), p["o"])
            x = _rms_norm(hidden, *p["norm2"])
            gate_up = self._project(x, p["gate_up"])
            hidden = hidden + F.linear(F.silu(gate_up[:, :self.intermediate]) * gate_up[:, self.intermediate:], p["down"])
        if last_only:
            hidden = hidden[-1:]
        norm = self.base.norm
        hidden = _rms_norm(hidden, norm.weight, norm.variance_epsilon)
        return head(hidden), hidden
