"""SAM's two-way attention for a handful of prompt tokens, without projecting the image rows.

In the mask decoder (segment_anything/modeling/transformer.py) 6 tokens (IoU, four mask tokens, our `[SEG]`
prompt) meet 4096 image positions (LiteMedSAM's 64² grid). `Attention.forward` projects every image position to
queries, keys or values and projects every image position's output back: 4096 × 256 × 128 multiply-adds each,
five to seven times a decode, per prompt. With so few tokens the same results follow from products with the
tokens' side folded into the weights first (heads h, head width d, tokens N, image rows HW):

  tokens attend to the image   scores_h = (q_h W_k,h) kᵀ    (k_proj's bias adds a constant per token row, which
                                                            the softmax removes)
                               out_h    = (A_h v) W_v,hᵀ + b_v,h   (each row of A_h sums to one)
  the image attends to tokens  scores_h = q (W_q,hᵀ k_hᵀ) + b_q,h k_hᵀ
                               out      = Σ_h A_h (v_h W_o,hᵀ + b_o / h)   (likewise)

so each image-sized product is HW × 256 × h·N (48 here) instead of HW × 256 × 128, and the 128-wide
projections of the image rows are never made. The results are SAM's up to float rounding (the tests hold them
to its forward, gradients included); training and inference both use them (`decoder_image_side.py`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _heads(attention) -> tuple[int, int]:
    return attention.num_heads, attention.internal_dim // attention.num_heads


def _per_head(weight: Tensor, heads: int, width: int) -> Tensor:
    """(heads, width, C) rows of a projection's (heads·width, C) weight, head by head."""
    return weight.reshape(heads, width, weight.shape[-1])


def tokens_attend_image(attention, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """`attention(q=q, k=k, v=v)` for few query tokens q (K,N,C) and image rows k, v (K or 1, HW, C)."""
    h, d = _heads(attention)
    queries = attention.q_proj(q)
    b, n, _ = queries.shape
    queries = queries.reshape(b, n, h, d).transpose(1, 2)  # (K,h,N,d) as SAM separates heads
    folded = queries @ _per_head(attention.k_proj.weight, h, d)  # (K,h,N,C)
    scores = folded.reshape(b, h * n, -1) @ k.transpose(1, 2)  # (K,h·N,HW)
    weights = torch.softmax(scores / math.sqrt(d), dim=-1)
    read = (weights @ v).reshape(b, h, n, -1)  # (K,h,N,C): each head's weighted image rows
    out = read @ _per_head(attention.v_proj.weight, h, d).transpose(1, 2) + attention.v_proj.bias.reshape(h, 1, d)
    return attention.out_proj(out.transpose(1, 2).reshape(b, n, h * d))


def _softmax_few(scores: Tensor) -> Tensor:
    """Softmax over a short last dimension (the tokens), as exp(x - max) / sum: torch's softmax kernel is slow
    for rows of a few elements."""
    weights = torch.exp(scores - scores.amax(-1, keepdim=True))
    return weights / weights.sum(-1, keepdim=True)


def image_attends_tokens(attention, q: Tensor | None, k: Tensor, v: Tensor, q_heads: Tensor | None = None,
                         residual: Tensor | None = None) -> Tensor:
    """`attention(q=q, k=k, v=v)` for image rows q (K or 1, HW, C) and few tokens k, v (K,N,C); or, with
    `q_heads` (K or 1, h, HW, d), the image rows' queries already projected and split into heads. With
    `residual` (K or 1, HW, C): residual + the attention, in one product."""
    h, d = _heads(attention)
    keys = attention.k_proj(k)
    b, n, _ = keys.shape
    keys = keys.reshape(b, n, h, d).transpose(1, 2)  # (K,h,N,d)
    values = attention.v_proj(v).reshape(b, n, h, d).transpose(1, 2)
    if q_heads is not None:
        scores = (q_heads @ keys.transpose(-1, -2)).transpose(1, 2)  # (K,HW,h,N)
    else:
        weight = _per_head(attention.q_proj.weight, h, d)  # (h,d,C)
        folded = weight.transpose(1, 2) @ keys.transpose(-1, -2)  # (K,h,C,N)
        bias = attention.q_proj.bias.reshape(h, 1, d) @ keys.transpose(-1, -2)  # (K,h,1,N)
        folded = folded.permute(0, 2, 1, 3).reshape(b, -1, h * n)  # (K,C,h·N)
        scores = (q @ folded + bias.reshape(b, 1, h * n)).reshape(b, q.shape[1], h, n)
    weights = _softmax_few(scores / math.sqrt(d)).reshape(b, -1, h * n)
    out_weight = attention.out_proj.weight  # (C, h·d)
    written = values @ out_weight.reshape(-1, h, d).permute(1, 2, 0)  # (K,h,N,C): each token's output rows
    # out_proj's bias, shared among the heads: each head's weights sum to one over the tokens
    written = (written + attention.out_proj.bias / h).reshape(b, h * n, -1)
    if residual is None:
        return weights @ written
    return torch.baddbmm(residual.expand(b, -1, -1), weights, written)


def two_way_block(layer, queries: Tensor, keys: Tensor, query_pe: Tensor, key_pe: Tensor) -> tuple[Tensor, Tensor]:
    """`TwoWayAttentionBlock.forward` (a block after the first: the query PE in self-attention)."""
    q = queries + query_pe
    queries = layer.norm1(queries + layer.self_attn(q=q, k=q, v=queries))
    keys_pe = keys + key_pe
    queries = layer.norm2(queries + tokens_attend_image(layer.cross_attn_token_to_image, queries + query_pe,
                                                        keys_pe, keys))
    queries = layer.norm3(queries + layer.mlp(queries))
    keys = layer.norm4(image_attends_tokens(layer.cross_attn_image_to_token, keys_pe, queries + query_pe, queries,
                                            residual=keys))
    return queries, keys
