"""The mask decoder's first-layer image side, computed once per slice.

In the first block of SAM's two-way transformer (segment_anything/modeling/transformer.py) the image embedding
is attended to, and attends, before any prompt has changed it: the keys `src + pe` the tokens attend to and the
image→token queries `q_proj(src + pe)` depend on the slice alone (src = the image embedding + SAM's no-mask
embedding, pe = the dense positional encoding). `ImageSide` keeps them, so a later round on the same slice runs
only the prompt-dependent rest.

`two_way_forward(transformer, side, tokens)` is `TwoWayTransformer.forward` with those products read from `side`
and the attention between the few tokens and the image folded (`decoder_few_tokens.py`); the tests hold it to
SAM's forward. At inference the engine keeps one slice's side across rounds (`MediRound.cached_image_side`). In
training, where a batch holds a few images and many rounds on each, the side is made once per image and each
round reads its image's rows (`rows`), with gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .decoder_few_tokens import image_attends_tokens, tokens_attend_image, two_way_block


@dataclass
class ImageSide:
    """B images' prompt-independent products of the decoder's first block (B = 1: broadcast over prompts)."""

    keys: Tensor  # (B, HW, C) src, flattened as the transformer flattens it
    key_pe: Tensor  # (1, HW, C)
    keys_pe: Tensor  # (B, HW, C) keys + key_pe: what the first block's tokens attend to
    image_to_token_q: Tensor  # (B, heads, HW, c) first block, image→token attention queries

    def rows(self, index: Tensor) -> "ImageSide":
        """The side of image index[k] for prompt k."""
        return ImageSide(self.keys[index], self.key_pe, self.keys_pe[index], self.image_to_token_q[index])


def supports(transformer) -> bool:
    """True for a two-way transformer whose first block skips the query PE in self-attention (SAM's layout)."""
    layers = getattr(transformer, "layers", None)
    return bool(layers) and bool(getattr(layers[0], "skip_first_layer_pe", False))


def image_side(transformer, src: Tensor, pos: Tensor) -> ImageSide:
    """The first block's image-side products for src (B, C, h, w) and one positional encoding pos (1, C, h, w)."""
    if pos.shape[0] != 1:
        raise ValueError(f"one positional encoding for every image, got a batch of {pos.shape[0]}")
    i2t = transformer.layers[0].cross_attn_image_to_token
    keys = src.flatten(2).transpose(1, 2).contiguous()  # row-major image rows: the per-round adds, norms and
    key_pe = pos.flatten(2).transpose(1, 2).contiguous()  # products read them in order
    keys_pe = keys + key_pe
    return ImageSide(keys=keys, key_pe=key_pe, keys_pe=keys_pe,
                     image_to_token_q=i2t._separate_heads(i2t.q_proj(keys_pe), i2t.num_heads))


def two_way_forward(transformer, side: ImageSide, point_embedding: Tensor) -> tuple[Tensor, Tensor]:
    """`TwoWayTransformer.forward(image_embedding, image_pe, point_embedding)` for the image(s) `side` was made of
    (one image for every prompt, or one per prompt): (queries (K, N, C), keys (K, HW, C)). Attention between the
    few tokens and the image runs folded (`decoder_few_tokens.py`)."""
    first = transformer.layers[0]
    pe = point_embedding
    # first block: self-attention without the query PE (skip_first_layer_pe)
    queries = first.norm1(first.self_attn(q=pe, k=pe, v=pe))
    queries = first.norm2(queries + tokens_attend_image(first.cross_attn_token_to_image, queries + pe,
                                                        side.keys_pe, side.keys))
    queries = first.norm3(queries + first.mlp(queries))
    keys = first.norm4(image_attends_tokens(first.cross_attn_image_to_token, None, queries + pe, queries,
                                            q_heads=side.image_to_token_q, residual=side.keys))
    for layer in transformer.layers[1:]:
        queries, keys = two_way_block(layer, queries, keys, pe, side.key_pe)
    attn_out = tokens_attend_image(transformer.final_attn_token_to_image, queries + pe, keys + side.key_pe, keys)
    return transformer.norm_final_attn(queries + attn_out), keys
