"""The mask decoder's first-layer image side, computed once per slice.

In the first block of SAM's two-way transformer (segment_anything/modeling/transformer.py) the image embedding
is attended to, and attends, before any prompt has changed it: the token→image keys `k_proj(src + pe)` and
values `v_proj(src)`, and the image→token queries `q_proj(src + pe)`, depend on the slice alone (src = the
image embedding + SAM's no-mask embedding, pe = the dense positional encoding). SAM computes them at every
decode; `ImageSide` keeps them, so a later round on the same slice runs only the prompt-dependent rest. For
LiteMedSAM's 64² embedding that is about a third of the transformer's arithmetic.

`two_way_forward(transformer, side, tokens)` is `TwoWayTransformer.forward` with those three products read from
`side`: the same operations in the same order otherwise (the tests hold it to SAM's forward). At inference the
engine keeps one slice's side across rounds (`MediRound.cached_image_side`). In training, where a batch holds a
few images and many rounds on each, the side is made once per image and each round reads its image's rows
(`rows`), with gradients, instead of projecting the same image again for every round.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class ImageSide:
    """B images' prompt-independent products of the decoder's first block (B = 1: broadcast over prompts)."""

    keys: Tensor  # (B, HW, C) src, flattened as the transformer flattens it
    key_pe: Tensor  # (1, HW, C)
    token_to_image_k: Tensor  # (B, heads, HW, c) first block, token→image attention keys
    token_to_image_v: Tensor  # (B, heads, HW, c) its values
    image_to_token_q: Tensor  # (B, heads, HW, c) first block, image→token attention queries

    def rows(self, index: Tensor) -> "ImageSide":
        """The side of image index[k] for prompt k."""
        return ImageSide(self.keys[index], self.key_pe, self.token_to_image_k[index],
                         self.token_to_image_v[index], self.image_to_token_q[index])


def supports(transformer) -> bool:
    """True for a two-way transformer whose first block skips the query PE in self-attention (SAM's layout)."""
    layers = getattr(transformer, "layers", None)
    return bool(layers) and bool(getattr(layers[0], "skip_first_layer_pe", False))


def image_side(transformer, src: Tensor, pos: Tensor) -> ImageSide:
    """The first block's image-side products for src (B, C, h, w) and one positional encoding pos (1, C, h, w)."""
    if pos.shape[0] != 1:
        raise ValueError(f"one positional encoding for every image, got a batch of {pos.shape[0]}")
    first = transformer.layers[0]
    keys = src.flatten(2).permute(0, 2, 1)
    key_pe = pos.flatten(2).permute(0, 2, 1)
    k = keys + key_pe
    t2i, i2t = first.cross_attn_token_to_image, first.cross_attn_image_to_token
    return ImageSide(keys=keys, key_pe=key_pe,
                     token_to_image_k=t2i._separate_heads(t2i.k_proj(k), t2i.num_heads),
                     token_to_image_v=t2i._separate_heads(t2i.v_proj(keys), t2i.num_heads),
                     image_to_token_q=i2t._separate_heads(i2t.q_proj(k), i2t.num_heads))


def _attend(attention, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """SAM's `Attention.forward` after its input projections (heads separated), through its output projection."""
    c_per_head = q.shape[-1]
    weights = torch.softmax((q @ k.permute(0, 1, 3, 2)) / math.sqrt(c_per_head), dim=-1)
    return attention.out_proj(attention._recombine_heads(weights @ v))


def two_way_forward(transformer, side: ImageSide, point_embedding: Tensor) -> tuple[Tensor, Tensor]:
    """`TwoWayTransformer.forward(image_embedding, image_pe, point_embedding)` for the image(s) `side` was made of
    (one image for every prompt, or one per prompt): (queries (K, N, C), keys (K, HW, C))."""
    first = transformer.layers[0]
    # first block: self-attention without the query PE (skip_first_layer_pe)
    queries = first.norm1(first.self_attn(q=point_embedding, k=point_embedding, v=point_embedding))
    t2i = first.cross_attn_token_to_image
    q = t2i._separate_heads(t2i.q_proj(queries + point_embedding), t2i.num_heads)
    queries = first.norm2(queries + _attend(t2i, q, side.token_to_image_k, side.token_to_image_v))
    queries = first.norm3(queries + first.mlp(queries))
    i2t = first.cross_attn_image_to_token
    tokens = queries + point_embedding
    k = i2t._separate_heads(i2t.k_proj(tokens), i2t.num_heads)
    v = i2t._separate_heads(i2t.v_proj(queries), i2t.num_heads)
    keys = first.norm4(side.keys + _attend(i2t, side.image_to_token_q, k, v))
    key_pe = side.key_pe.expand(keys.shape[0], -1, -1)
    for layer in transformer.layers[1:]:
        queries, keys = layer(queries=queries, keys=keys, query_pe=point_embedding, key_pe=key_pe)
    attn_out = transformer.final_attn_token_to_image(q=queries + point_embedding, k=keys + key_pe, v=keys)
    return transformer.norm_final_attn(queries + attn_out), keys
