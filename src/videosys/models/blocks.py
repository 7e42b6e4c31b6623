"""Building blocks shared by every DiT-family model.

Attention always goes through `Attention.attention_fn`, which `videosys.parallelize` sets; that is
the single hook where attention backends (and later sequence parallelism and caches) attach.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from videosys.ops.attention import sdpa_attention


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation with one (shift, scale) per sample, broadcast over tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """Fixed sin/cos embedding of positions: (n,) -> (n, dim), computed in float64."""
    if dim % 2:
        raise ValueError(f"sin/cos embedding needs an even dimension, got {dim}")
    freqs = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.to(torch.float64)[:, None] * freqs[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """2D sin/cos position embedding for a row-major token grid: (grid_h * grid_w, dim).

    The first half of the channels encodes the column and the second half the row, the layout
    of the DiT / MAE reference embedding, so published checkpoints see the positions they learned.
    """
    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    return torch.cat([sincos_1d(dim // 2, cols.reshape(-1)), sincos_1d(dim // 2, rows.reshape(-1))], dim=1)


class PatchEmbed(nn.Module):
    """Split an image into non-overlapping p x p patches and project each to `dim`."""

    def __init__(self, patch_size: int, in_channels: int, dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, C, H, W) -> (B, N, dim). Made contiguous: elementwise ops keep their first input's
        # layout, so a transposed view here would make the whole residual stream strided (slow).
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of the (possibly fractional) timestep followed by a two-layer MLP.

    `freq_shift` moves the frequency spacing denominator from half to half - shift; 0 is the DiT
    paper's embedding and 1 is the one diffusers' DiT uses.
    """

    def __init__(self, dim: int, freq_dim: int = 256, freq_shift: int = 0, max_period: float = 10000.0):
        super().__init__()
        self.freq_dim = freq_dim
        self.freq_shift = freq_shift
        self.max_period = max_period
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def frequency_features(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        exponent = -math.log(self.max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
        freqs = torch.exp(exponent / (half - self.freq_shift))
        angles = t.float()[:, None] * freqs[None, :]
        features = torch.cat([angles.cos(), angles.sin()], dim=-1)
        if self.freq_dim % 2:
            features = F.pad(features, (0, 1))
        return features

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = self.frequency_features(t)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class-label embedding with one extra 'null' row (index num_classes) for classifier-free guidance.

    During training a fraction `dropout_prob` of labels is replaced by the null label, so the same
    network learns the unconditional model that guidance contrasts against.
    """

    def __init__(self, num_classes: int, dim: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), dim)

    @property
    def null_label(self) -> int:
        if self.dropout_prob <= 0:
            raise ValueError("this model was built with class_dropout_prob=0 and has no null label for CFG")
        return self.num_classes

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        # (B, H, N, D) x3 -> (B, H, N, D). Set by videosys.parallelize; SDPA until then.
        self.attention_fn = sdpa_attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).view(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        # unbind, not qkv[i]: its backward is one stack instead of three zero-filled full-size gradients.
        q, k, v = qkv.unbind(0)
        out = self.attention_fn(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class Mlp(nn.Module):
    """Transformer feed-forward: Linear -> tanh-approximated GELU -> Linear."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class AdaLNFinalLayer(nn.Module):
    """adaLN-modulated LayerNorm followed by the projection back to patch pixels."""

    def __init__(self, dim: int, out_features: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out_features)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))
