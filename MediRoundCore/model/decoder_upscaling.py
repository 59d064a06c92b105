"""SAM's mask upscaling as two matrix products over image rows, without image-shaped copies.

`MaskDecoder.output_upscaling` (segment_anything/modeling/mask_decoder.py) is ConvTranspose2d(k=2, s=2) →
LayerNorm2d → GELU → ConvTranspose2d(k=2, s=2) → GELU, and the mask is the hypernetwork vector's dot product
with the 32 channels at each pixel. A 2×2, stride-2 transposed convolution maps each input pixel to its own 2×2
output block: it is one matrix product of the pixel's channels with the weight laid out (in, 2·2·out). Run on
the transformer's keys, which are already image rows × channels, every stage stays rows × channels
(channels last), LayerNorm2d becomes a layer norm over the last dimension, and only the one-channel mask is
reordered into the 4×-upsampled grid at the end. On CPU the convolutions' layout conversions and the
(K, 256, h, w) copy of the keys cost about twice the arithmetic (LiteMedSAM: 25 ms of a 64² decode).

The result is SAM's up to float rounding (tests hold it to `output_upscaling`, gradients included).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def _is_2x2_stride_2(conv) -> bool:
    return (type(conv) is nn.ConvTranspose2d and conv.kernel_size == (2, 2) and conv.stride == (2, 2)
            and conv.padding == (0, 0) and conv.output_padding == (0, 0) and conv.dilation == (1, 1)
            and conv.groups == 1 and conv.bias is not None)


def supports(upscaling) -> bool:
    """True for SAM's layout: ConvTranspose2d(2, 2), LayerNorm2d, activation, ConvTranspose2d(2, 2), activation."""
    parts = list(upscaling) if isinstance(upscaling, nn.Sequential) else []
    return (len(parts) == 5 and _is_2x2_stride_2(parts[0]) and _is_2x2_stride_2(parts[3])
            and type(parts[1]).__name__ == "LayerNorm2d" and hasattr(parts[1], "eps"))


def _pixel_products(rows: Tensor, conv: nn.ConvTranspose2d) -> Tensor:
    """(..., in) rows → (..., 2, 2, out): each row's 2×2 output block of the transposed convolution."""
    c_in, c_out = conv.weight.shape[:2]
    weight = conv.weight.permute(0, 2, 3, 1).reshape(c_in, 4 * c_out)  # (in, (a, c, out))
    out = F.linear(rows, weight.t(), conv.bias.repeat(4))
    return out.reshape(*rows.shape[:-1], 2, 2, c_out)


def upscaled_masks(upscaling, keys: Tensor, grid: tuple[int, int], hyper: Tensor) -> Tensor:
    """(K,1,4h,4w) mask logits: `hyper` (K,c) · output_upscaling(keys as (K,C,h,w)), for keys (K,h·w,C)."""
    conv1, norm, act1, conv2, act2 = upscaling
    k, (h, w) = keys.shape[0], grid
    x = _pixel_products(keys.reshape(k, h, w, -1), conv1)  # (K,h,w,a,c,C1)
    x = act1(F.layer_norm(x, x.shape[-1:], norm.weight, norm.bias, norm.eps))
    x = act2(_pixel_products(x, conv2))  # (K,h,w,a,c,a2,c2,C2)
    mask = (x.reshape(k, -1, x.shape[-1]) @ hyper.unsqueeze(-1)).reshape(k, h, w, 2, 2, 2, 2)
    # output row 4i + 2a + a2, column 4j + 2c + c2
    return mask.permute(0, 1, 3, 5, 2, 4, 6).reshape(k, 1, 4 * h, 4 * w)
