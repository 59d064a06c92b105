"""The mask decoder's first-block image side computed once per slice (model/decoder_image_side.py): the decode
equals SAM's own transformer forward, for the tiny preset's decoder and LiteMedSAM's, one prompt or several; the
products are reused for the same slice and made again for another slice or changed weights."""

import pytest
import torch

from MediRoundCore.model.config import lite_segmenter_config, tiny_config
from MediRoundCore.model.decoder_image_side import image_side, two_way_forward
from MediRoundCore.model.modeling import MediRound
from MediRoundCore.model.tokenizer import TokenIds, train_tiny_tokenizer


def _model(lite_decoder: bool):
    tokenizer = train_tiny_tokenizer(["segment the liver.", "user: assistant:"] * 20, vocab_size=300)
    config = tiny_config(len(tokenizer))
    if lite_decoder:
        config.segmenter = lite_segmenter_config()
    torch.manual_seed(0)
    model = MediRound(config, TokenIds.from_tokenizer(tokenizer)).eval()
    with torch.no_grad():  # a decoder that is not at its initialisation (SAM's zero-ish biases hide mistakes)
        for p in model.segmenter.mask_decoder.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        model.segmenter.prompt_encoder.no_mask_embed.weight.add_(0.3)
    return model


def _sam_decode(model, embedding, prompts):
    """The decode through segment_anything's own `TwoWayTransformer.forward` (the path used while training)."""
    with torch.enable_grad():
        return [t.detach() for t in model.decode_with_tokens(embedding, prompts)]


@pytest.mark.parametrize("lite_decoder", [False, True], ids=["tiny", "litemedsam"])
@pytest.mark.parametrize("prompts", [1, 3])
def test_decode_with_the_cached_image_side_equals_sams_forward(lite_decoder, prompts):
    model = _model(lite_decoder)
    grid = model.config.segmenter.image_size // model.config.segmenter.patch_size
    embedding = torch.randn(1, 256, grid, grid)
    p = torch.randn(prompts, 256)
    reference = _sam_decode(model, embedding, p)
    with torch.inference_mode():
        first = model.decode_with_tokens(embedding, p)
        again = model.decode_with_tokens(embedding, p)
    for ours, theirs in zip(first, reference):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_the_image_side_is_reused_for_the_same_slice_and_remade_otherwise():
    model = _model(False)
    made = []
    original = image_side

    def counting(*args):
        made.append(1)
        return original(*args)

    import MediRoundCore.model.decoder_image_side as module
    module_image_side, module.image_side = module.image_side, counting
    try:
        embedding, other = torch.randn(1, 256, 16, 16), torch.randn(1, 256, 16, 16)
        p = torch.randn(1, 256)
        with torch.inference_mode():
            model.decode_with_tokens(embedding, p)
            model.decode_with_tokens(embedding, torch.randn(1, 256))  # a later round, same slice
            assert len(made) == 1
            model.decode_with_tokens(other, p)  # another slice
            assert len(made) == 2
        first_block = model.segmenter.mask_decoder.transformer.layers[0]
        with torch.no_grad():  # a weight the products depend on changes in place (fine-tuning, a load)
            first_block.cross_attn_image_to_token.q_proj.weight.mul_(1.5)
        with torch.inference_mode():
            after = model.decode_with_tokens(other, p)
        assert len(made) == 3
        torch.testing.assert_close(after[0], _sam_decode(model, other, p)[0], rtol=1e-4, atol=1e-4)
        with torch.no_grad():  # a weight read per prompt, not kept: the same products, the new weight applied
            first_block.cross_attn_token_to_image.k_proj.weight.mul_(1.5)
        with torch.inference_mode():
            changed = model.decode_with_tokens(other, p)
        assert len(made) == 3 and not torch.allclose(changed[0], after[0])
        torch.testing.assert_close(changed[0], _sam_decode(model, other, p)[0], rtol=1e-4, atol=1e-4)
        with torch.enable_grad():  # training never reads the cache
            model.decode_with_tokens(other, p)
        assert len(made) == 3
    finally:
        module.image_side = module_image_side


def test_two_way_forward_matches_the_transformer_directly():
    model = _model(True)
    transformer = model.segmenter.mask_decoder.transformer
    src, pos = torch.randn(1, 256, 64, 64), torch.randn(1, 256, 64, 64)
    tokens = torch.randn(2, 6, 256)
    with torch.no_grad():
        q_ref, k_ref = transformer(src.expand(2, -1, -1, -1), pos.expand(2, -1, -1, -1), tokens)
        q, k = two_way_forward(transformer, image_side(transformer, src, pos), tokens)
    torch.testing.assert_close(q, q_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(k, k_ref, rtol=1e-4, atol=1e-4)


def test_in_place_changes_autocast_inference_weights_pickling_and_forget():
    import io

    model = _model(False)
    embedding, p = torch.randn(1, 256, 16, 16), torch.randn(1, 256)
    with torch.no_grad():
        model.decode_with_tokens(embedding, p)
        embedding.mul_(2.0)  # the same tensor changed in place: its version counter moved
        after = model.decode_with_tokens(embedding, p)
    torch.testing.assert_close(after[0], _sam_decode(model, embedding, p)[0], rtol=1e-4, atol=1e-4)
    # autocast never reads or fills the cache (its products would have the wrong dtype)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.cached_image_side(embedding) is None
        model.decode_with_tokens(embedding, p)
    with torch.no_grad():
        torch.testing.assert_close(model.decode_with_tokens(embedding, p)[0], after[0])
    # a model whose weights were made in inference mode (no version counters) still decodes, cached
    with torch.inference_mode():
        inference_model = _model(True)
        grid = inference_model.config.segmenter.image_size // inference_model.config.segmenter.patch_size
        e = torch.randn(1, 256, grid, grid)
        first = inference_model.decode_with_tokens(e, p)[0]
        assert inference_model.cached_image_side(e) is not None
        torch.testing.assert_close(inference_model.decode_with_tokens(e, p)[0], first)
    # the whole model pickles after a decode (the weak reference is not saved), and forget drops the products
    buffer = io.BytesIO()
    torch.save(model, buffer)
    assert model._image_side_cache is not None
    model.forget_image_side()
    assert model._image_side_cache is None


def test_engine_forget_drops_the_decoders_image_side():
    from MediRoundCore.engine import Engine

    engine = Engine.random_tiny(0)
    with torch.inference_mode():
        engine.model.decode_with_tokens(torch.randn(1, 256, 16, 16), torch.randn(1, 256))
    assert engine.model._image_side_cache is not None
    engine.forget()
    assert engine.model._image_side_cache is None


@pytest.mark.parametrize("lite_decoder", [False, True], ids=["tiny", "litemedsam"])
def test_training_decode_with_one_image_side_per_image_equals_sams_forward_with_gradients(lite_decoder):
    """Training decodes many rounds on a few images: `rows` makes the first block's image side once per image.
    Outputs and every gradient (image embeddings, prompts, decoder weights) equal SAM's forward on the gathered
    rows."""
    model = _model(lite_decoder).train()
    grid = model.config.segmenter.image_size // model.config.segmenter.patch_size
    torch.manual_seed(3)
    images = torch.randn(3, 256, grid, grid)
    prompts = torch.randn(7, 256)
    rows = torch.tensor([0, 0, 2, 1, 2, 2, 0])
    weights = [p for p in model.segmenter.mask_decoder.parameters() if p.requires_grad]

    def run(shared: bool):
        e, p = images.clone().requires_grad_(), prompts.clone().requires_grad_()
        out = model.decode_with_prompts(e, p, rows=rows) if shared else model.decode_with_prompts(e[rows], p)
        loss = (out.sigmoid() * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum()
        grads = torch.autograd.grad(loss, [e, p, *weights], allow_unused=True)  # IoU head, other mask tokens
        return out.detach(), grads

    ours, our_grads = run(True)
    theirs, their_grads = run(False)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert our_grads[0].abs().sum() > 0 and our_grads[1].abs().sum() > 0
    for a, b in zip(our_grads, their_grads):
        if b is None:  # SAM's decode leaves it unused too (the IoU head, the other mask tokens)
            assert a is None
            continue
        if a is None:  # the folded attention does not read token→image k_proj biases: their gradient is zero,
            # in SAM's forward a sum of terms that cancel (rounding noise at the scale of the other gradients)
            assert float(b.abs().max()) < 1e-5 * max(float(g.abs().max()) for g in their_grads if g is not None)
            continue
        # float32 sums over 4096 rows in another order: on an AMD EPYC one of 128 elements differed by 2.2e-4
        torch.testing.assert_close(a, b, rtol=1e-3, atol=5e-4 * max(1.0, float(b.abs().max())))
