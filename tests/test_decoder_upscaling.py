"""SAM's mask upscaling as matrix products over image rows (model/decoder_upscaling.py): the same mask logits
and gradients as `output_upscaling` followed by the hypernetwork dot product, for LiteMedSAM's and the tiny
preset's decoder layout; other layouts are not taken."""

import pytest
import torch
from torch import nn

from MediRoundCore._sam import MaskDecoder, TwoWayTransformer
from MediRoundCore.model.decoder_upscaling import supports, upscaled_masks


def _decoder(seed: int = 0):
    torch.manual_seed(seed)
    decoder = MaskDecoder(transformer_dim=256, transformer=TwoWayTransformer(depth=2, embedding_dim=256, num_heads=8,
                                                                             mlp_dim=512))
    with torch.no_grad():  # away from the initialisation (LayerNorm2d's ones and zeros hide a swapped layout)
        for p in decoder.output_upscaling.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return decoder


def _sams(decoder, keys, grid, hyper):
    k, (h, w) = keys.shape[0], grid
    upscaled = decoder.output_upscaling(keys.transpose(1, 2).reshape(k, -1, h, w))
    _, c, hu, wu = upscaled.shape
    return (hyper.unsqueeze(1) @ upscaled.reshape(k, c, hu * wu)).reshape(k, 1, hu, wu)


@pytest.mark.parametrize("grid", [(16, 16), (8, 12)])
def test_upscaled_masks_equal_sams_upscaling_outputs_and_gradients(grid):
    decoder = _decoder()
    assert supports(decoder.output_upscaling)
    keys = torch.randn(3, grid[0] * grid[1], 256)
    hyper = torch.randn(3, 32)
    weights = list(decoder.output_upscaling.parameters())

    def run(fn):
        x, y = keys.clone().requires_grad_(), hyper.clone().requires_grad_()
        out = fn(decoder, x, grid, y)
        loss = (out.tanh() * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum()
        return out.detach(), torch.autograd.grad(loss, [x, y, *weights])

    ours, our_grads = run(upscaled_masks_of)
    theirs, their_grads = run(_sams)
    assert ours.shape == (3, 1, 4 * grid[0], 4 * grid[1])
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    for a, b in zip(our_grads, their_grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4 * max(1.0, float(b.abs().max())))


def upscaled_masks_of(decoder, keys, grid, hyper):
    return upscaled_masks(decoder.output_upscaling, keys, grid, hyper)


def test_other_layouts_are_not_taken():
    decoder = _decoder()
    parts = list(decoder.output_upscaling)
    assert not supports(nn.Sequential(*parts[:4]))
    other = nn.ConvTranspose2d(64, 32, kernel_size=3, stride=2)
    assert not supports(nn.Sequential(parts[0], parts[1], parts[2], other, parts[4]))
    assert not supports(nn.Sequential(parts[0], nn.BatchNorm2d(64), parts[2], parts[3], parts[4]))
