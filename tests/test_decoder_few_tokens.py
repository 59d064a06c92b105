"""The mask decoder's attention between few tokens and the image, folded (model/decoder_few_tokens.py): equal
to segment_anything's `Attention.forward` and `TwoWayAttentionBlock.forward`, outputs and gradients, with
non-zero biases, one image shared by several prompts or one image per prompt."""

import pytest
import torch

from MediRoundCore._sam import TwoWayTransformer
from MediRoundCore.model.decoder_few_tokens import image_attends_tokens, tokens_attend_image, two_way_block


def _transformer(seed: int = 0):
    torch.manual_seed(seed)
    transformer = TwoWayTransformer(depth=2, embedding_dim=256, num_heads=8, mlp_dim=512)
    with torch.no_grad():  # biases away from their zero initialisation, so a dropped or misplaced one shows
        for p in transformer.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return transformer


def _close(ours, theirs, rtol=1e-4):
    torch.testing.assert_close(ours, theirs, rtol=rtol, atol=rtol * max(1.0, float(theirs.abs().max())))


@pytest.mark.parametrize("images", [1, 3], ids=["shared image", "image per prompt"])
def test_tokens_attend_image_equals_sams_attention(images):
    attention = _transformer().layers[1].cross_attn_token_to_image
    q, k, v = torch.randn(3, 6, 256), torch.randn(images, 100, 256) * 2, torch.randn(images, 100, 256)
    with torch.no_grad():
        theirs = attention(q=q, k=k.expand(3, -1, -1), v=v.expand(3, -1, -1))
        ours = tokens_attend_image(attention, q, k, v)
    _close(ours, theirs)


@pytest.mark.parametrize("images", [1, 3], ids=["shared image", "image per prompt"])
def test_image_attends_tokens_equals_sams_attention_with_queries_folded_or_given(images):
    attention = _transformer().layers[1].cross_attn_image_to_token
    q, k, v = torch.randn(images, 100, 256) * 2, torch.randn(3, 6, 256), torch.randn(3, 6, 256)
    with torch.no_grad():
        theirs = attention(q=q.expand(3, -1, -1), k=k, v=v)
        folded = image_attends_tokens(attention, q, k, v)
        q_heads = attention._separate_heads(attention.q_proj(q), attention.num_heads)
        given = image_attends_tokens(attention, None, k, v, q_heads=q_heads)
    _close(folded, theirs)
    _close(given, theirs)


def test_two_way_block_equals_sams_block_outputs_and_gradients():
    layer = _transformer().layers[1]
    assert not layer.skip_first_layer_pe
    torch.manual_seed(1)
    inputs = [torch.randn(2, 6, 256), torch.randn(2, 64, 256), torch.randn(2, 6, 256), torch.randn(1, 64, 256)]
    weights = list(layer.parameters())

    def run(fn):
        x = [t.clone().requires_grad_() for t in inputs]
        queries, keys = fn(x)
        loss = (queries * torch.linspace(-1, 1, queries.numel()).reshape(queries.shape)).sum() + keys.square().mean()
        return queries.detach(), keys.detach(), torch.autograd.grad(loss, x + weights, allow_unused=True)

    theirs = run(lambda x: layer(queries=x[0], keys=x[1], query_pe=x[2], key_pe=x[3].expand(2, -1, -1)))
    ours = run(lambda x: two_way_block(layer, *x))
    _close(ours[0], theirs[0])
    _close(ours[1], theirs[1])
    unused = layer.cross_attn_token_to_image.k_proj.bias
    for weight, a, b in zip(inputs + weights, ours[2], theirs[2]):
        if weight is unused:  # the softmax removes it: SAM's gradient is rounding noise, ours is not computed
            assert a is None and float(b.abs().max()) < 1e-5
            continue
        _close(a, b, rtol=1e-3)
