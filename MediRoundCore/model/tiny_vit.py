"""TinyViT image encoder of LiteMedSAM: a 256² slice → a (256, 64, 64) embedding for SAM's mask decoder.

Written from the public descriptions of the architecture (TinyViT, Wu et al. 2022; MobileSAM's
`tiny_vit_sam.py`; the LiteMedSAM branch of bowang-lab/MedSAM, `distillation/tiny_vit_sam.py` and
`CVPR24_LiteMedSAM_infer.py`), without timm. Module names follow that layout, so `lite_medsam.pth` loads
key for key (`checkpoints/lite_medsam.py`):

  patch_embed.seq.{0,2}            two pointwise Conv–BN (LiteMedSAM keeps full resolution: no strided stem)
  layers.0                         a convolutional stage of MBConv blocks, then a patch merge
  layers.1..3                      windowed-attention stages (TinyViTBlock), each but the last ends in a merge
  neck.{0..3}                      Conv1×1 → LayerNorm2d → Conv3×3 → LayerNorm2d, 256 channels (as SAM's neck)

Resolutions at 256² input: 256 → (merge /2) 128 → (/2) 64 → (/1) 64; the last merge keeps the resolution so the
embedding is 64×64, the grid SAM's prompt encoder and decoder expect at a 256² input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._sam import LayerNorm2d
from .config import TinyViTConfig


class Conv2dBN(nn.Sequential):
    """Convolution without bias followed by BatchNorm (`c`, `bn`)."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1):
        super().__init__()
        self.add_module("c", nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(cout))


class PatchEmbed(nn.Module):
    def __init__(self, cin: int, dim: int):
        super().__init__()
        self.seq = nn.Sequential(Conv2dBN(cin, dim // 2), nn.GELU(), Conv2dBN(dim // 2, dim))

    def forward(self, x):
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual: pointwise expand, depthwise 3×3, pointwise project, residual, GELU after each."""

    def __init__(self, dim: int, expand: float):
        super().__init__()
        hidden = int(dim * expand)
        self.conv1 = Conv2dBN(dim, hidden)
        self.conv2 = Conv2dBN(hidden, hidden, 3, groups=hidden)
        self.conv3 = Conv2dBN(hidden, dim)

    def forward(self, x):
        y = F.gelu(self.conv1(x))
        y = F.gelu(self.conv2(y))
        return F.gelu(self.conv3(y) + x)


class PatchMerging(nn.Module):
    """(B,C,H,W) → (B, H/s·W/s, C'): pointwise, depthwise 3×3 with stride s, pointwise."""

    def __init__(self, dim: int, out_dim: int, stride: int):
        super().__init__()
        self.conv1 = Conv2dBN(dim, out_dim)
        self.conv2 = Conv2dBN(out_dim, out_dim, 3, stride, groups=out_dim)
        self.conv3 = Conv2dBN(out_dim, out_dim)

    def forward(self, x):
        x = F.gelu(self.conv1(x))
        x = F.gelu(self.conv2(x))
        return self.conv3(x)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside a w×w window with a learned bias per head and |Δrow|,|Δcol| offset."""

    def __init__(self, dim: int, num_heads: int, window: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window * window))
        rows, cols = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
        r, c = rows.reshape(-1), cols.reshape(-1)
        offsets = (r[:, None] - r[None]).abs() * window + (c[:, None] - c[None]).abs()
        self.register_buffer("attention_bias_idxs", offsets, persistent=False)

    def forward(self, x):  # (B, N, C) with N = w·w
        b, n, _ = x.shape
        qkv = self.qkv(self.norm(x)).view(b, n, self.num_heads, 3 * self.head_dim)
        q, k, v = qkv.permute(0, 2, 1, 3).split(self.head_dim, dim=-1)  # per head: [q | k | v]
        bias = self.attention_biases[:, self.attention_bias_idxs].to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class TinyViTBlock(nn.Module):
    """Windowed attention (zero-padded to whole windows) + residual, depthwise conv, MLP + residual."""

    def __init__(self, dim: int, num_heads: int, window: int, mlp_ratio: float, local_conv: int):
        super().__init__()
        self.window = window
        self.attn = WindowAttention(dim, num_heads, window)
        self.local_conv = Conv2dBN(dim, dim, local_conv, groups=dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, hw: tuple[int, int]):  # (B, H·W, C)
        (h, w), s = hw, self.window
        b, n, c = x.shape
        grid = x.view(b, h, w, c)
        pad_b, pad_r = (-h) % s, (-w) % s
        if pad_b or pad_r:
            grid = F.pad(grid, (0, 0, 0, pad_r, 0, pad_b))
        ph, pw = h + pad_b, w + pad_r
        windows = grid.view(b, ph // s, s, pw // s, s, c).transpose(2, 3).reshape(-1, s * s, c)
        out = self.attn(windows).view(b, ph // s, pw // s, s, s, c).transpose(2, 3).reshape(b, ph, pw, c)
        x = x + out[:, :h, :w].reshape(b, n, c)
        x = self.local_conv(x.transpose(1, 2).reshape(b, c, h, w)).reshape(b, c, n).transpose(1, 2)
        return x + self.mlp(x)


class ConvStage(nn.Module):
    def __init__(self, dim: int, depth: int, expand: float, merge: PatchMerging | None):
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, expand) for _ in range(depth))
        self.downsample = merge

    def forward(self, x):  # (B,C,H,W) → (B,C',H',W')
        for block in self.blocks:
            x = block(x)
        return self.downsample(x) if self.downsample is not None else x


class AttentionStage(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, window: int, cfg: TinyViTConfig, merge: PatchMerging | None):
        super().__init__()
        self.blocks = nn.ModuleList(TinyViTBlock(dim, heads, window, cfg.mlp_ratio, cfg.local_conv_size)
                                    for _ in range(depth))
        self.downsample = merge

    def forward(self, x):  # (B,C,H,W) → (B,C',H',W')
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        for block in self.blocks:
            tokens = block(tokens, (h, w))
        x = tokens.transpose(1, 2).reshape(b, c, h, w)
        return self.downsample(x) if self.downsample is not None else x


class TinyViT(nn.Module):
    """(B,3,S,S) pixels in [0,1] → (B, out_chans, S/4, S/4) embedding (LiteMedSAM's image encoder)."""

    def __init__(self, cfg: TinyViTConfig, img_size: int = 256, out_chans: int = 256, in_chans: int = 3):
        super().__init__()
        self.img_size = img_size  # read by segment_anything's Sam.preprocess
        dims = cfg.embed_dims
        self.patch_embed = PatchEmbed(in_chans, dims[0])
        self.layers = nn.ModuleList()
        for i, dim in enumerate(dims):
            merge = PatchMerging(dim, dims[i + 1], cfg.merge_strides[i]) if i + 1 < len(dims) else None
            if i == 0:
                self.layers.append(ConvStage(dim, cfg.depths[0], cfg.mbconv_expand_ratio, merge))
            else:
                self.layers.append(AttentionStage(dim, cfg.depths[i], cfg.num_heads[i], cfg.window_sizes[i], cfg,
                                                  merge))
        self.neck = nn.Sequential(nn.Conv2d(dims[-1], out_chans, 1, bias=False), LayerNorm2d(out_chans),
                                  nn.Conv2d(out_chans, out_chans, 3, padding=1, bias=False),
                                  LayerNorm2d(out_chans))

    def forward(self, x):
        if x.device.type == "cpu" and x.shape[0] > 1 and not torch.is_grad_enabled():
            # one image at a time: a batch's 256-channel full-resolution maps outgrow the CPU's caches
            # (1.6 s an image in a batch of 4 against 0.95 s alone, two cores)
            return torch.cat([self.forward(row[None]) for row in x])
        # channels-last: the convolutions run 20 % faster on the CPU, and the attention stages' tokens are a
        # view of the map instead of a copy; the same arithmetic
        x = self.patch_embed(x.contiguous(memory_format=torch.channels_last))
        for layer in self.layers:
            x = layer(x)
        return self.neck(x).contiguous()


def build_tiny_vit(cfg: TinyViTConfig, img_size: int = 256, out_chans: int = 256) -> TinyViT:
    return TinyViT(cfg, img_size, out_chans)
