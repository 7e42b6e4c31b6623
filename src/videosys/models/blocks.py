"""Building blocks shared by every DiT-family model, for images and video.

Video activations are kept as (batch, frames, tokens per frame, channels). A block attends over
space (each frame on its own), over time (each spatial position on its own) or over the full 3D
sequence; the reshaping lives in `attend` so that models never re-derive it.

Every attention, self or cross, goes through its module's `attention_fn(q, k, v, mask)`, and every
modulation, norm and gated residual through its module's `ops` (`videosys.ops.kernels.BlockOps`),
both of which `videosys.parallelize` sets: the single hooks where attention backends and fused
kernels (and sequence parallelism and caches) attach.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from videosys.ops.attention import sdpa_attention
from videosys.ops.kernels import TORCH_OPS


def per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B, C) -> (B, 1, ..., 1, C) so that it broadcasts over every token axis of `like`."""
    return v.view(v.shape[0], *([1] * (like.dim() - 2)), v.shape[-1])


def cached_table(module: nn.Module, key: tuple, make: Callable[[], torch.Tensor]) -> torch.Tensor:
    """A table that `module` derives from shapes alone (positions for a token grid), made once per key and
    kept on the module. Made per forward, a table built on the host costs a host-to-device copy every
    step, which a CUDA graph cannot even capture."""
    tables = vars(module).setdefault("_derived_tables", {})
    if key not in tables:
        tables[key] = make()
    return tables[key]


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """Fixed sin/cos embedding of positions: (n,) -> (n, dim), computed in float64."""
    if dim % 2:
        raise ValueError(f"sin/cos embedding needs an even dimension, got {dim}")
    freqs = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.to(torch.float64)[:, None] * freqs[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int, row_scale: float = 1.0, col_scale: float = 1.0) -> torch.Tensor:
    """2D sin/cos position embedding for a row-major token grid: (grid_h * grid_w, dim).

    The first half of the channels encodes the column and the second half the row, the layout
    of the DiT / MAE reference embedding, so published checkpoints see the positions they learned.
    Positions are multiplied by `row_scale` / `col_scale`: models trained at several resolutions
    (PixArt, Latte, Open-Sora) rescale the grid so that every resolution spans the same range.
    """
    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    rows = rows.reshape(-1).to(torch.float64) * row_scale
    cols = cols.reshape(-1).to(torch.float64) * col_scale
    return torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1)


@dataclass(frozen=True)
class Rotary:
    """Rotary position embedding for (B, H, N, D) queries and keys: per-position `cos` / `sin`
    tables of shape (N_rot, D), applied to tokens `start:start + N_rot` (text tokens in front of
    video tokens stay unrotated). `interleaved` rotates channel pairs (2i, 2i + 1), the layout of
    rotary-embedding-torch and diffusers; otherwise halves (i, i + D/2), the Llama layout."""

    cos: torch.Tensor
    sin: torch.Tensor
    interleaved: bool = True
    start: int = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        end = self.start + self.cos.shape[0]
        if self.start or x.shape[-2] != end:
            body = self._rotate(x[..., self.start : end, :])
            if not torch.is_grad_enabled() and not torch.compiler.is_compiling():
                # eager inference: rotate in place, no copy of the whole tensor (compiled code fuses the copy)
                x[..., self.start : end, :] = body
                return x
            return torch.cat([x[..., : self.start, :], body, x[..., end:, :]], dim=-2)
        return self._rotate(x)

    def _rotate(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        if self.interleaved:
            # x * cos + (-x1, x0) * sin per channel pair, written as swap(x) * (-sin0, sin1): the sign sits
            # on the small table, not on a stack of selects of x. Inductor (torch 2.11, H200) generated an
            # out-of-bounds kernel for the stack form fused with the q/k RMSNorm at Open-Sora 480p.
            swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
            sin = self.sin.unflatten(-1, (-1, 2))
            signed_sin = torch.stack([-sin[..., 0], sin[..., 1]], dim=-1).flatten(-2)
            return (x * self.cos + swapped * signed_sin).to(dtype)
        first, second = x.chunk(2, dim=-1)
        return (x * self.cos + torch.cat([-second, first], dim=-1) * self.sin).to(dtype)


def rotary_tables(dim: int, positions: torch.Tensor, theta: float = 10000.0, interleaved: bool = True):
    """cos / sin tables (N, dim) for 1D positions (N,), in float32, for `Rotary`."""
    freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim)
    angles = positions.to(torch.float64)[:, None] * freqs[None, :]
    angles = angles.repeat_interleave(2, dim=-1) if interleaved else torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


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

    A model built with `dropout_prob` > 0 has the null row; training replaces that fraction of labels
    by it (in `videosys.tasks.conditioning`, from each sample's own draws), so the same network
    learns the unconditional model that guidance contrasts against.
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
        return self.embedding_table(labels)


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain, computed in fp32 (the Llama / T5 norm)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.ops = TORCH_OPS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)


class HeadLayerNorm(nn.LayerNorm):
    """LayerNorm of each head's q or k that keeps its input's dtype. CUDA autocast runs LayerNorm in
    fp32 and returns fp32, which doubles the traffic of the rotary embedding after it and hands the
    attention fp32 inputs; the kernel accumulates in fp32 either way. The gains are cast to x's dtype, as
    autocast casts a Linear's weight: CUDA's LayerNorm takes no fp32 gains with bf16 input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)


def qk_norm_layer(kind: str | None, head_dim: int, eps: float) -> nn.Module:
    """Per-head query/key normalisation: None, "rms" (Open-Sora) or "layernorm" (CogVideoX)."""
    if kind is None:
        return nn.Identity()
    if kind == "rms":
        return RMSNorm(head_dim, eps)
    if kind == "layernorm":
        return HeadLayerNorm(head_dim, eps=eps)
    raise ValueError(f"qk_norm={kind!r} is not known; use None, 'rms' or 'layernorm'")


class AttentionModule(nn.Module):
    """Base of every attention module: holds the `attention_fn` that `videosys.parallelize` sets."""

    def __init__(self):
        super().__init__()
        # (B, H, Nq, D), (B, H, Nk, D) x2, optional bool mask -> (B, H, Nq, D). SDPA until parallelized.
        self.attention_fn = sdpa_attention
        # The sequence-parallel plan `attend` hands video self-attention to (None: one process).
        self.sp = None


class Attention(AttentionModule):
    """Multi-head self-attention with a fused qkv projection, optional per-head q/k norm and rotary."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        qk_norm: str | None = None,
        qk_norm_eps: float = 1e-6,
        out_bias: bool = True,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = qk_norm_layer(qk_norm, self.head_dim, qk_norm_eps)
        self.k_norm = qk_norm_layer(qk_norm, self.head_dim, qk_norm_eps)
        self.proj = nn.Linear(dim, dim, bias=out_bias)

    def forward(
        self,
        x: torch.Tensor,
        rope: Rotary | None = None,
        mask: torch.Tensor | None = None,
        attention_fn: Callable[..., torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x: (B, N, C). `attention_fn` replaces this module's own for one call (sequence parallelism)."""
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).view(batch, tokens, 3, self.num_heads, self.head_dim)
        # unbind, not qkv[i]: its backward is one stack instead of three zero-filled full-size gradients.
        q, k, v = qkv.unbind(2)
        # Norm in (B, N, H, D) order, then view as (B, H, N, D): the normed q and k keep the
        # token-major memory layout that the fused attention kernels read fastest.
        q, k = self.q_norm(q).transpose(1, 2), self.k_norm(k).transpose(1, 2)
        v = v.transpose(1, 2)
        if rope is not None:
            q, k = rope(q), rope(k)
        out = (attention_fn or self.attention_fn)(q, k, v, mask)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class CrossAttention(AttentionModule):
    """Multi-head attention from the tokens to a (text) context, with a padding mask on the context."""

    def __init__(self, dim: int, num_heads: int, context_dim: int | None = None, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_linear = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv_linear = nn.Linear(context_dim or dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None) -> torch.Tensor:
        """x: (B, ..., C) tokens (any token layout), context: (B, L, C_ctx), context_mask: (B, L) bool."""
        shape = x.shape
        batch, dim = shape[0], shape[-1]
        x = x.reshape(batch, -1, dim)
        q = self.q_linear(x).view(batch, -1, self.num_heads, self.head_dim).transpose(1, 2)
        kv = self.kv_linear(context).view(batch, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)
        mask = None
        if context_mask is not None:
            mask = context_mask.to(torch.bool)
            # A caption with no real token attends to all of them (what an additive -10000 bias does in
            # the reference implementations) instead of producing NaN.
            mask = (mask | ~mask.any(dim=1, keepdim=True))[:, None, None, :]
        out = self.attention_fn(q, k, v, mask)
        return self.proj(out.transpose(1, 2).reshape(shape))


ATTENTION_LAYOUTS = ("spatial", "temporal", "full")


def attend(attn: Attention, x: torch.Tensor, layout: str, rope: Rotary | None = None) -> torch.Tensor:
    """Self-attention over a (B, T, S, C) video along one axis: "spatial" attends within each frame,
    "temporal" across frames at each spatial position, "full" over all T*S tokens at once. Under
    sequence parallelism the module's plan (`attn.sp`) decides how (videosys.parallelize.sequence)."""
    if attn.sp is not None:
        return attn.sp.attend(attn, x, layout, rope)
    return attend_locally(attn, x, layout, rope)


def attend_locally(
    attn: Attention,
    x: torch.Tensor,
    layout: str,
    rope: Rotary | None = None,
    attention_fn: Callable[..., torch.Tensor] | None = None,
) -> torch.Tensor:
    """`attend` on the tokens at hand; `attention_fn` overrides the module's for this call."""
    batch, frames, spatial, dim = x.shape
    if layout == "spatial":
        out = attn(x.reshape(batch * frames, spatial, dim), rope, attention_fn=attention_fn)
        return out.view(batch, frames, spatial, dim)
    if layout == "temporal":
        seq = x.transpose(1, 2).reshape(batch * spatial, frames, dim)
        return attn(seq, rope, attention_fn=attention_fn).view(batch, spatial, frames, dim).transpose(1, 2)
    if layout == "full":
        out = attn(x.reshape(batch, frames * spatial, dim), rope, attention_fn=attention_fn)
        return out.view(batch, frames, spatial, dim)
    raise ValueError(f"attention layout {layout!r} is not one of {ATTENTION_LAYOUTS}")


def cached(cache, kind: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """A block's cacheable branch: compute() without a step-reuse policy; with one (a block's `cache`,
    set by `videosys.cache` for a sampling call), the policy decides whether to compute or hand back the
    branch output it stored. `kind` is the attention layout, "cross" or "mlp". The block must not modify
    the returned tensor in place: it may be handed out again at a later step."""
    return compute() if cache is None else cache.reuse(kind, compute)


class LocalSequence:
    """A model's sequence hooks in one process: nothing is split. `videosys.parallelize` replaces it
    with a sequence-parallel plan that keeps one chunk of axis `dim` per rank between the two."""

    def scatter(self, x: torch.Tensor, dim: int, name: str | None = None) -> torch.Tensor:
        return x

    def gather(self, x: torch.Tensor, dim: int, name: str | None = None) -> torch.Tensor:
        return x

    def local_rotary(self, rope: Rotary, dim: int) -> Rotary:
        return rope


class Mlp(nn.Module):
    """Transformer feed-forward: Linear -> tanh-approximated GELU -> Linear (out_dim defaults to dim)."""

    def __init__(self, dim: int, hidden_dim: int, out_dim: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, out_dim or dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class AdaLNFinalLayer(nn.Module):
    """adaLN-modulated LayerNorm followed by the projection back to patch pixels."""

    def __init__(self, dim: int, out_features: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out_features)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.ops = TORCH_OPS

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(self.ops.norm_modulate(self.norm_final, x, shift, scale))


@torch.no_grad()
def xavier_init(model: nn.Module, patch_proj: nn.Module) -> None:
    """The DiT-family base initialisation: Xavier-uniform weights and zero biases for every Linear, and
    for the patch projection on its flattened kernel (as if it were a Linear over patch pixels)."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    nn.init.xavier_uniform_(patch_proj.weight.view(patch_proj.weight.shape[0], -1))
    nn.init.zeros_(patch_proj.bias)


class PatchEmbed3D(nn.Module):
    """Split a video (B, C, T, H, W) into (pt, ph, pw) patches: (B, T/pt, (H/ph)(W/pw), dim)."""

    def __init__(self, patch_size: tuple[int, int, int], in_channels: int, dim: int):
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.proj = nn.Conv3d(in_channels, dim, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The convolution as one GEMM over gathered patches: the same weights and math, without
        # cuDNN's 3D-convolution path (slower, and it reserves a large workspace).
        batch, channels, frames, height, width = x.shape
        pt, ph, pw = self.patch_size
        grid = (frames // pt, height // ph, width // pw)
        patches = x.reshape(batch, channels, grid[0], pt, grid[1], ph, grid[2], pw)
        patches = patches.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(batch, grid[0], grid[1] * grid[2], -1)
        weight = self.proj.weight.reshape(self.proj.weight.shape[0], -1)
        return F.linear(patches, weight, self.proj.bias)


def unpatchify_video(x: torch.Tensor, grid: tuple[int, int, int], patch: tuple[int, int, int], channels: int):
    """(B, T', S', pt*ph*pw*C) patch tokens -> (B, C, T'*pt, H'*ph, W'*pw); the inverse of PatchEmbed3D
    for a linear output layer whose features are ordered (pt, ph, pw, C)."""
    (t, h, w), (pt, ph, pw) = grid, patch
    x = x.reshape(x.shape[0], t, h, w, pt, ph, pw, channels)
    return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(x.shape[0], channels, t * pt, h * ph, w * pw)


class AdaLNSingleBlock(nn.Module):
    """The PixArt-alpha transformer block shared by Open-Sora (STDiT3), Latte and Open-Sora-Plan.

    One timestep embedding, projected once per model to (B, 6, C), plus this block's learned
    `scale_shift_table` give shift/scale/gate for self-attention and the MLP ("adaLN-single").
    Self-attention runs over `layout` (spatial, temporal or full); an unmodulated cross-attention to
    the text sits between them when `cross_attention` is set. Parameter names follow Open-Sora.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        layout: str,
        cross_attention: bool,
        mlp_ratio: float = 4.0,
        qk_norm: str | None = None,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        if layout not in ATTENTION_LAYOUTS:
            raise ValueError(f"attention layout {layout!r} is not one of {ATTENTION_LAYOUTS}")
        self.layout = layout
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)
        self.attn = Attention(dim, num_heads, qkv_bias=True, qk_norm=qk_norm)
        self.cross_attn = CrossAttention(dim, num_heads) if cross_attention else None
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)
        self.ops = TORCH_OPS
        self.cache = None  # step-reuse policy handle while sampling (videosys.cache)
        self.cache_kinds = (layout, "cross", "mlp") if cross_attention else (layout, "mlp")  # what `cached` wraps

    def forward(
        self,
        x: torch.Tensor,
        t6: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        rope: Rotary | None = None,
    ) -> torch.Tensor:
        """x: (B, T, S, C); t6: (B, 6, C) projected timestep; context: (B, L, C) projected text."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (self.scale_shift_table[None] + t6).unbind(1)
        ops, cache = self.ops, self.cache
        # Cached branches are stored before their gate, so a reused output gets this step's gate.
        h = cached(
            cache,
            self.layout,
            lambda: attend(self.attn, ops.norm_modulate(self.norm1, x, shift_msa, scale_msa), self.layout, rope),
        )
        x = ops.gate_residual(x, gate_msa, h)
        if self.cross_attn is not None:
            x = x + cached(cache, "cross", lambda: self.cross_attn(x, context, context_mask))
        h = cached(cache, "mlp", lambda: self.mlp(ops.norm_modulate(self.norm2, x, shift_mlp, scale_mlp)))
        return ops.gate_residual(x, gate_mlp, h)


class AdaLNSingleFinalLayer(nn.Module):
    """Final LayerNorm modulated by the timestep embedding plus a learned (2, C) table, then the
    projection to patch values (PixArt / Open-Sora / Latte)."""

    def __init__(self, dim: int, out_features: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out_features)
        self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim**0.5)
        self.ops = TORCH_OPS

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.scale_shift_table[None] + t[:, None]).unbind(1)
        return self.linear(self.ops.norm_modulate(self.norm_final, x, shift, scale))
