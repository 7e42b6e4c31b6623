"""Fused Triton kernels for the elementwise glue of a DiT block, each with a Triton forward and backward.

What each function computes (x is (B, *tokens, C), M = prod(tokens) tokens per sample):

- ``fused_modulate(x, shift, scale)``: ``x * (1 + scale) + shift`` (adaLN modulate).
- ``fused_layernorm_modulate(x, shift, scale, eps, weight, bias)``:
  ``(LN(x) * weight + bias) * (1 + scale) + shift``, LayerNorm over the last dim, affine optional.
- ``fused_rms_norm(x, weight, eps)``: ``x * rsqrt(mean(x^2, -1) + eps) * weight`` for any leading shape.
- ``fused_gate_residual(residual, gate, h)``: ``residual + gate * h``.

Modulation tensors (shift, scale, gate) are either (B, C), one vector per sample broadcast over its tokens,
or (B, G, C) with G dividing M: group g covers the contiguous tokens [g*M/G, (g+1)*M/G) of its sample in
row-major order (for x of shape (B, T, S, C) and G = T, one vector per frame). Any other shape raises
ValueError.

Precision: every input is loaded in its own dtype and all arithmetic is fp32; the output is stored in
``out_dtype`` (default: x's dtype, residual's for the gated residual) and every gradient in its input's
dtype. ``x * (1 + scale) + shift`` and ``residual + gate * h`` are single fused multiply-adds. The norms
scale each row by a power of two (exact) that brings its max |x| below 4 before taking moments, so rows up
to the largest finite fp32 value neither overflow nor underflow, and the mean is taken relative to the
row's first element, so a constant row has exactly zero variance (its output is the bias, not noise).
The gradients of the broadcast tensors (shift, scale, gate, weight, bias) are summed over tokens
deterministically: each program reduces a block of rows of one (sample, group) into an fp32 partial, and
torch sums the partials; no atomics.

The plain torch ``*_reference`` functions below (fp32 compute, or fp64 for fp64 inputs, cast to the output
dtype) are the ground truth that the tests and benchmarks compare the kernels against.

Every kernel is a ``torch.library.triton_op`` in the ``videosys`` namespace with its autograd registered, so
it traces into ``torch.compile`` graphs on CUDA; eagerly the same launchers and autograd formulas run through
a plain autograd.Function (see "Eager path"). On a CPU the kernels run only through
the Triton interpreter (TRITON_INTERPRET=1 set before triton is imported).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.library import triton_op, wrap_triton
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from videosys.ops.kernels import gate_residual_torch, modulate_torch, modulation_groups

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "Triton is not installed; pip install triton, or set the kernels.fused_* switches to false"
    ) from exc

__all__ = [
    "fused_gate_residual",
    "fused_layernorm_modulate",
    "fused_modulate",
    "fused_rms_norm",
    "gate_residual_reference",
    "layernorm_modulate_reference",
    "modulate_reference",
    "rms_norm_reference",
]

# Elementwise kernels: tiles of ELEMENTWISE_BLOCK_C columns (a multiple of 128 divides the usual DiT widths
# 1152 / 3072 exactly) x enough rows for TILE elements, which gives each thread a few 16-byte loads.
ELEMENTWISE_BLOCK_C = 128
TILE = 4096
# Norm kernels hold whole rows up to this width in registers; wider rows are processed in chunks. A program
# holds about NORM_TILE elements per row block, with a warp per NORM_FWD_ELEMS_PER_WARP elements forward
# and per NORM_BWD_ELEMS_PER_WARP backward (it keeps x, dy, their derived tiles and up to four column
# accumulators). Picked on an H200 for C = 1152 bf16: more rows or warps per program were slower.
MAX_NORM_BLOCK_C = 4096
NORM_TILE = 2048
NORM_FWD_ELEMS_PER_WARP = 1024
NORM_BWD_ELEMS_PER_WARP = 512


# ----------------------------------------------------------------------------------------------------------
# Shapes
# ----------------------------------------------------------------------------------------------------------


def _check_vector(v: Tensor | None, channels: int, name: str, x: Tensor) -> None:
    if v is not None and tuple(v.shape) != (channels,):
        raise ValueError(f"{name} must be ({channels},) for x of shape {tuple(x.shape)}, got {tuple(v.shape)}")


def _compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """fp32, or fp64 where an input is fp64 (the float64 ground truth in the tests)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


# ----------------------------------------------------------------------------------------------------------
# Torch references (ground truth)
# ----------------------------------------------------------------------------------------------------------


def modulate_reference(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    dtype = _compute_dtype(x, shift, scale)
    return modulate_torch(x.to(dtype), shift.to(dtype), scale.to(dtype)).to(x.dtype)


def layernorm_modulate_reference(
    x: Tensor,
    shift: Tensor,
    scale: Tensor,
    eps: float,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    dtype = _compute_dtype(x, shift, scale, weight, bias)
    channels = x.shape[-1]
    _check_vector(weight, channels, "weight", x)
    _check_vector(bias, channels, "bias", x)
    w = None if weight is None else weight.to(dtype)
    b = None if bias is None else bias.to(dtype)
    # Two-pass moments written out (not F.layer_norm): in fp64 the autograd of this form stays exact for
    # constant rows of huge values, where F.layer_norm's backward cancels catastrophically.
    xf = x.to(dtype)
    centred = xf - xf.mean(-1, keepdim=True)
    normed = centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps)
    if w is not None:
        normed = normed * w
    if b is not None:
        normed = normed + b
    return modulate_torch(normed, shift.to(dtype), scale.to(dtype)).to(out_dtype or x.dtype)


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float, out_dtype: torch.dtype | None = None) -> Tensor:
    dtype = _compute_dtype(x, weight)
    _check_vector(weight, x.shape[-1], "weight", x)
    xf = x.to(dtype)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.to(dtype)
    return y.to(out_dtype or x.dtype)


def gate_residual_reference(residual: Tensor, gate: Tensor, h: Tensor) -> Tensor:
    if residual.shape != h.shape:
        raise ValueError(f"residual and h must have the same shape, got {tuple(residual.shape)} and {tuple(h.shape)}")
    dtype = _compute_dtype(residual, gate, h)
    return gate_residual_torch(residual.to(dtype), gate.to(dtype), h.to(dtype)).to(residual.dtype)


# ----------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------
# Layout everywhere: the token rows of x are the rows of a contiguous (R, C) matrix, R = B * M; a modulation
# tensor is a contiguous (B * G, C) matrix, and row r uses its row r // L, L = M // G (rows of one sample are
# consecutive, and so are the L rows of one group). Offsets are int64: R * C can pass 2^31.


@triton.jit
def _scale_add_fwd_kernel(
    x_ptr,
    m_ptr,
    add_ptr,
    out_ptr,
    n_rows,
    C,
    group_len,
    ONE_PLUS: tl.constexpr,
    ADD_PER_GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """out = x * (1 + m) + add (modulate: add = shift, per group) or x * m + add (gate: add = residual)."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < n_rows)[:, None] & (cols < C)[None, :]
    offs = rows[:, None] * C + cols[None, :]
    mod_offs = (rows // group_len)[:, None] * C + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + mod_offs, mask=mask, other=0.0).to(tl.float32)
    if ONE_PLUS:
        m = 1.0 + m
    if ADD_PER_GROUP:
        a = tl.load(add_ptr + mod_offs, mask=mask, other=0.0).to(tl.float32)
    else:
        a = tl.load(add_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, tl.fma(x, m, a).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scale_add_bwd_kernel(
    dy_ptr,
    x_ptr,
    m_ptr,
    dx_ptr,
    part_ptr,
    C,
    group_len,
    rows_per_split,
    n_splits,
    n_groups,
    ONE_PLUS: tl.constexpr,
    SUM_DY: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Backward of out = x * (1 + m) + add for program (group g, split, column block): writes
    dx = dy * (1 + m) for its rows and the fp32 partial column sums part[0, g, split] = sum(dy * x) (the
    gradient of m) and, with SUM_DY, part[1, g, split] = sum(dy) (the gradient of a per-group add)."""
    g = tl.program_id(0)
    split = tl.program_id(1)
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    # All rows of this program share one modulation vector: load it once.
    m = tl.load(m_ptr + g.to(tl.int64) * C + cols, mask=cmask, other=0.0).to(tl.float32)
    if ONE_PLUS:
        m = 1.0 + m
    start = split * rows_per_split
    end = tl.minimum(start + rows_per_split, group_len)
    base = g.to(tl.int64) * group_len
    # 2-D accumulators: the cross-row (cross-warp) reduction happens once, after the loop.
    acc_m = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    acc_dy = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    for r0 in range(start, end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        mask = (rows < end)[:, None] & cmask[None, :]
        offs = (base + rows)[:, None] * C + cols[None, :]
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + offs, (dy * m[None, :]).to(dx_ptr.dtype.element_ty), mask=mask)
        acc_m += dy * x
        if SUM_DY:
            acc_dy += dy
    plane = n_groups * n_splits * C
    out = (g * n_splits + split).to(tl.int64) * C + cols
    tl.store(part_ptr + out, tl.sum(acc_m, axis=0), mask=cmask)
    if SUM_DY:
        tl.store(part_ptr + plane + out, tl.sum(acc_dy, axis=0), mask=cmask)


@triton.jit
def _pow2_row_scale(absmax):
    """Per row, 2^-k with k = clamp(exponent of absmax, 0, 126): exact to apply, it brings a max |x| >= 1
    into [1, 2) ([2, 4) at the very top of the fp32 range) and leaves smaller rows alone (s = 1; an all-zero
    row included), so sums of squares of the scaled row can neither overflow nor underflow needlessly."""
    exponent = (absmax.to(tl.int32, bitcast=True) >> 23) & 0xFF
    k = tl.minimum(tl.maximum(exponent - 127, 0), 126)
    return ((127 - k) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _normalize(x, s, pivot, md, r_s, mask):
    """xhat = ((x * s - pivot) - md) * r_s, zero outside `mask`; the same expression forward and backward."""
    xhat = ((x * s[:, None] - pivot[:, None]) - md[:, None]) * r_s[:, None]
    return tl.where(mask, xhat, 0.0)


@triton.jit
def _norm_fwd_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    shift_ptr,
    scale_ptr,
    y_ptr,
    stats_ptr,
    n_rows,
    C,
    group_len,
    eps,
    inv_sqrt_eps,
    CENTER: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_MOD: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """LayerNorm (CENTER) or RMSNorm of BLOCK_M rows, then optional affine and modulate.

    Per row (s: power-of-two row scale, pivot = s * x[0] for LayerNorm, 0 for RMSNorm):
      md = mean(s*x - pivot), var = mean((s*x - pivot - md)^2)  (for RMSNorm: mean((s*x)^2)),
      r_s = rsqrt(var + eps * s^2) (0 where that is 0: a constant row with eps underflowed),
      rstd = 1 / sqrt(var / s^2 + eps), the unscaled factor that dx needs.
    stats (5, R) fp32 = (s, pivot, md, r_s, rstd) is saved for the backward.
    ONE_CHUNK: the whole row is one register tile, loaded once; otherwise the passes loop over chunks.
    """
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rmask = rows < n_rows
    row_offs = rows * C
    mod_offs = (rows // group_len) * C
    cols0 = tl.arange(0, BLOCK_C)

    # Pass 1: max |x| per row.
    if ONE_CHUNK:
        mask = rmask[:, None] & (cols0 < C)[None, :]
        x = tl.load(x_ptr + row_offs[:, None] + cols0[None, :], mask=mask, other=0.0).to(tl.float32)
        absmax = tl.max(tl.abs(x), axis=1)
    else:
        absmax = tl.zeros([BLOCK_M], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + cols0
            mask = rmask[:, None] & (cols < C)[None, :]
            xc = tl.load(x_ptr + row_offs[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            absmax = tl.maximum(absmax, tl.max(tl.abs(xc), axis=1))
    s = _pow2_row_scale(absmax)
    zero = tl.zeros([BLOCK_M], dtype=tl.float32)

    # Pass 2 (LayerNorm): mean relative to the first element, exact zero for a constant row.
    pivot = zero
    md = zero
    if CENTER:
        pivot = tl.load(x_ptr + row_offs, mask=rmask, other=0.0).to(tl.float32) * s
        if ONE_CHUNK:
            md = tl.sum(tl.where(mask, x * s[:, None] - pivot[:, None], 0.0), axis=1) / C
        else:
            acc = zero
            for c0 in range(0, C, BLOCK_C):
                cols = c0 + cols0
                mask = rmask[:, None] & (cols < C)[None, :]
                xc = tl.load(x_ptr + row_offs[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                acc += tl.sum(tl.where(mask, xc * s[:, None] - pivot[:, None], 0.0), axis=1)
            md = acc / C

    # Pass 3: variance (LayerNorm) or mean square (RMSNorm) of the scaled, centred row.
    one = zero + 1.0
    if ONE_CHUNK:
        d = _normalize(x, s, pivot, md, one, mask)
        var = tl.sum(d * d, axis=1) / C
    else:
        acc = zero
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + cols0
            mask = rmask[:, None] & (cols < C)[None, :]
            xc = tl.load(x_ptr + row_offs[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            d = _normalize(xc, s, pivot, md, one, mask)
            acc += tl.sum(d * d, axis=1)
        var = acc / C
    denom = var + eps * s * s
    r_s = tl.where(denom > 0.0, tl.rsqrt(tl.where(denom > 0.0, denom, 1.0)), 0.0)
    # var > 0 means var >= ~1e-14 / C in the scaled domain, where s * r_s is accurate; a zero variance
    # (eps * s^2 may have underflowed) is rstd = 1 / sqrt(eps) exactly.
    rstd = tl.where(var > 0.0, s * r_s, inv_sqrt_eps)
    tl.store(stats_ptr + rows, s, mask=rmask)
    tl.store(stats_ptr + n_rows + rows, pivot, mask=rmask)
    tl.store(stats_ptr + 2 * n_rows + rows, md, mask=rmask)
    tl.store(stats_ptr + 3 * n_rows + rows, r_s, mask=rmask)
    tl.store(stats_ptr + 4 * n_rows + rows, rstd, mask=rmask)

    # Pass 4: normalise, affine, modulate, store.
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + cols0
        cmask = cols < C
        mask = rmask[:, None] & cmask[None, :]
        if not ONE_CHUNK:
            x = tl.load(x_ptr + row_offs[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        z = _normalize(x, s, pivot, md, r_s, mask)
        if HAS_WEIGHT:
            z = z * tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            z = z + tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        if HAS_MOD:
            offs = mod_offs[:, None] + cols[None, :]
            sc = tl.load(scale_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            sh = tl.load(shift_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            z = tl.fma(z, 1.0 + sc, sh)
        tl.store(y_ptr + row_offs[:, None] + cols[None, :], z.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_stats(stats_ptr, n_rows, rows, rmask):
    s = tl.load(stats_ptr + rows, mask=rmask, other=1.0)
    pivot = tl.load(stats_ptr + n_rows + rows, mask=rmask, other=0.0)
    md = tl.load(stats_ptr + 2 * n_rows + rows, mask=rmask, other=0.0)
    r_s = tl.load(stats_ptr + 3 * n_rows + rows, mask=rmask, other=0.0)
    rstd = tl.load(stats_ptr + 4 * n_rows + rows, mask=rmask, other=0.0)
    return s, pivot, md, r_s, rstd


@triton.jit
def _norm_bwd_tile(x_ptr, dy_ptr, offs, mask, s, pivot, md, r_s, w, one_plus_scale):
    """(dy, xhat, dz, dxhat) of a tile: z = xhat * w + b is the affine output, dz = dy * (1 + scale) its
    gradient and dxhat = dz * w the gradient of the normalised row (w = 1, scale = 0 when absent)."""
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    xhat = _normalize(x, s, pivot, md, r_s, mask)
    dz = dy * one_plus_scale
    return dy, xhat, dz, dz * w


@triton.jit
def _norm_bwd_rowsum_kernel(
    dy_ptr,
    x_ptr,
    w_ptr,
    scale_ptr,
    stats_ptr,
    rowsum_ptr,
    n_rows,
    C,
    group_len,
    HAS_WEIGHT: tl.constexpr,
    HAS_MOD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Rows wider than one register tile: the row means mean(dxhat) and mean(dxhat * xhat) that dx needs,
    into rowsum (2, R) fp32, chunk by chunk."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rmask = rows < n_rows
    mod_offs = (rows // group_len) * C
    s, pivot, md, r_s, rstd = _load_stats(stats_ptr, n_rows, rows, rmask)
    c1 = tl.zeros([BLOCK_M], dtype=tl.float32)
    c2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < C
        mask = rmask[:, None] & cmask[None, :]
        w = tl.full([BLOCK_C], 1.0, tl.float32)
        if HAS_WEIGHT:
            w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        one_plus_scale = tl.full([BLOCK_M, BLOCK_C], 1.0, tl.float32)
        if HAS_MOD:
            sc = tl.load(scale_ptr + mod_offs[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            one_plus_scale = 1.0 + sc
        offs = rows[:, None] * C + cols[None, :]
        dy, xhat, dz, dxhat = _norm_bwd_tile(x_ptr, dy_ptr, offs, mask, s, pivot, md, r_s, w[None, :], one_plus_scale)
        c1 += tl.sum(dxhat, axis=1)
        c2 += tl.sum(dxhat * xhat, axis=1)
    tl.store(rowsum_ptr + rows, c1 / C, mask=rmask)
    tl.store(rowsum_ptr + n_rows + rows, c2 / C, mask=rmask)


@triton.jit
def _norm_bwd_kernel(
    dy_ptr,
    x_ptr,
    w_ptr,
    b_ptr,
    scale_ptr,
    stats_ptr,
    rowsum_ptr,
    dx_ptr,
    part_ptr,
    n_rows,
    C,
    group_len,
    rows_per_split,
    n_splits,
    n_groups,
    CENTER: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_MOD: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Backward of the norm kernel for program (group g, split, column block), one pass over x and dy:
      dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))   (no mean(dxhat) term for RMSNorm)
    and the fp32 partial column sums over its rows, part (4, n_groups, n_splits, C):
      [0] sum dy (d shift), [1] sum dy * z (d scale), [2] sum dz * xhat (d weight), [3] sum dz (d bias).
    ONE_CHUNK: a row fits one tile and the row means are computed here; otherwise rowsum holds them."""
    g = tl.program_id(0)
    split = tl.program_id(1)
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    # Loaded once: every row of this program belongs to group g.
    w = tl.full([BLOCK_C], 1.0, tl.float32)
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    b = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_BIAS:
        b = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    one_plus_scale = tl.full([BLOCK_C], 1.0, tl.float32)
    if HAS_MOD:
        one_plus_scale = 1.0 + tl.load(scale_ptr + g.to(tl.int64) * C + cols, mask=cmask, other=0.0).to(tl.float32)
    base = g.to(tl.int64) * group_len
    end = tl.minimum((split + 1) * rows_per_split, group_len)
    acc_shift = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    acc_scale = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    acc_w = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    for r0 in range(split * rows_per_split, end, BLOCK_M):
        local = r0 + tl.arange(0, BLOCK_M)
        rmask = local < end
        rows = base + local
        mask = rmask[:, None] & cmask[None, :]
        offs = rows[:, None] * C + cols[None, :]
        s, pivot, md, r_s, rstd = _load_stats(stats_ptr, n_rows, rows, rmask)
        dy, xhat, dz, dxhat = _norm_bwd_tile(
            x_ptr, dy_ptr, offs, mask, s, pivot, md, r_s, w[None, :], one_plus_scale[None, :]
        )
        if ONE_CHUNK:
            c2 = tl.sum(dxhat * xhat, axis=1) / C
            c1 = tl.sum(dxhat, axis=1) / C
        else:
            c1 = tl.load(rowsum_ptr + rows, mask=rmask, other=0.0)
            c2 = tl.load(rowsum_ptr + n_rows + rows, mask=rmask, other=0.0)
        if CENTER:
            dx = rstd[:, None] * (dxhat - c1[:, None] - xhat * c2[:, None])
        else:
            dx = rstd[:, None] * (dxhat - xhat * c2[:, None])
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if HAS_MOD:
            acc_shift += dy
            acc_scale += dy * (xhat * w[None, :] + b[None, :])
        if HAS_WEIGHT:
            acc_w += dz * xhat
        if HAS_BIAS:
            acc_b += dz
    plane = n_groups * n_splits * C
    out = (g * n_splits + split).to(tl.int64) * C + cols
    if HAS_MOD:
        tl.store(part_ptr + out, tl.sum(acc_shift, axis=0), mask=cmask)
        tl.store(part_ptr + plane + out, tl.sum(acc_scale, axis=0), mask=cmask)
    if HAS_WEIGHT:
        tl.store(part_ptr + 2 * plane + out, tl.sum(acc_w, axis=0), mask=cmask)
    if HAS_BIAS:
        tl.store(part_ptr + 3 * plane + out, tl.sum(acc_b, axis=0), mask=cmask)


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------


def _launch(kernel, probe: Tensor):
    """`kernel` as a launcher. wrap_triton is what lets torch.compile / export trace the launch, but in eager
    mode it costs ~0.2 ms of CPU per launch (measured on an H100), so it is used only while tracing: fake or
    functional tensors, or a dispatch mode (FakeTensorMode, proxy tracing) active."""
    if _tracing(probe):
        return wrap_triton(kernel)
    return kernel


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@functools.cache
def _target_programs(device_type: str, index: int | None) -> int:
    """Programs to aim for in the split reductions: a few waves on a GPU; few on the (slow) interpreter."""
    if device_type == "cuda":
        return 4 * torch.cuda.get_device_properties(index or 0).multi_processor_count
    return 8


def _splits(group_len: int, n_groups: int, n_col_blocks: int, block_m: int, device: torch.device) -> tuple[int, int]:
    """(n_splits, rows_per_split): each group's rows are cut into splits of whole BLOCK_M tiles, enough that
    the grid fills the device, at least one tile each."""
    want = triton.cdiv(_target_programs(device.type, device.index), n_groups * n_col_blocks)
    splits = max(1, min(triton.cdiv(group_len, block_m), want))
    rows_per_split = triton.cdiv(triton.cdiv(group_len, splits), block_m) * block_m
    return triton.cdiv(group_len, rows_per_split), rows_per_split


def _elementwise_blocks(channels: int) -> tuple[int, int]:
    block_c = min(_next_pow2(channels), ELEMENTWISE_BLOCK_C)
    return TILE // block_c, block_c


def _norm_blocks(channels: int, elems_per_warp: int) -> tuple[int, int, int, bool]:
    """(BLOCK_M, BLOCK_C, num_warps, ONE_CHUNK) for the norm kernels: whole rows up to MAX_NORM_BLOCK_C,
    rows per program so that a tile holds about NORM_TILE elements."""
    block_c = min(_next_pow2(channels), MAX_NORM_BLOCK_C)
    block_m = max(1, NORM_TILE // block_c)
    num_warps = min(16, max(1, block_m * block_c // elems_per_warp))
    return block_m, block_c, num_warps, channels <= block_c


def _launch_scale_add(x: Tensor, m: Tensor, add: Tensor, one_plus: bool, add_per_group: bool, out_dtype) -> Tensor:
    """x (B, M, C), m (B, G, C), add (B, G, C) or (B, M, C) -> x * (1 + m) + add or x * m + add."""
    x, m, add = x.contiguous(), m.contiguous(), add.contiguous()
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    n_rows, channels = x.numel() // max(1, x.shape[-1]), x.shape[-1]
    if out.numel() == 0:
        return out
    block_m, block_c = _elementwise_blocks(channels)
    grid = (triton.cdiv(n_rows, block_m), triton.cdiv(channels, block_c))
    _launch(_scale_add_fwd_kernel, x)[grid](
        x, m, add, out, n_rows, channels, x.shape[1] // m.shape[1],
        ONE_PLUS=one_plus, ADD_PER_GROUP=add_per_group, BLOCK_M=block_m, BLOCK_C=block_c, num_warps=4,
    )  # fmt: skip
    return out


def _launch_scale_bwd(
    dy: Tensor, x: Tensor, m: Tensor, one_plus: bool, sum_dy: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """dx = dy * (1 + m) (or dy * m) in x's dtype, and the fp32 (B, G, C) sums over each group's tokens of
    dy * x (gradient of m) and, with sum_dy, of dy (gradient of a per-group add; else None)."""
    dy, x, m = dy.contiguous(), x.contiguous(), m.contiguous()
    batch, tokens, channels = x.shape
    n_groups = batch * m.shape[1]
    group_len = tokens // m.shape[1]
    dx = torch.empty_like(x)
    if x.numel() == 0:
        zeros = torch.zeros(m.shape, dtype=torch.float32, device=x.device)
        return dx, zeros, zeros.clone() if sum_dy else None
    block_m, block_c = _elementwise_blocks(channels)
    n_col_blocks = triton.cdiv(channels, block_c)
    n_splits, rows_per_split = _splits(group_len, n_groups, n_col_blocks, block_m, x.device)
    part = torch.empty((2, n_groups, n_splits, channels), dtype=torch.float32, device=x.device)
    _launch(_scale_add_bwd_kernel, x)[(n_groups, n_splits, n_col_blocks)](
        dy, x, m, dx, part, channels, group_len, rows_per_split, n_splits, n_groups,
        ONE_PLUS=one_plus, SUM_DY=sum_dy, BLOCK_M=block_m, BLOCK_C=block_c, num_warps=4,
    )  # fmt: skip
    dm = part[0].sum(dim=1).reshape(m.shape)
    return dx, dm, part[1].sum(dim=1).reshape(m.shape) if sum_dy else None


def _launch_norm_fwd(x2d, weight, bias, shift, scale, group_len, eps, center, out_dtype) -> tuple[Tensor, Tensor]:
    """x2d (R, C); shift/scale (R // group_len, C) or None. Returns y (R, C) and the stats (5, R)."""
    n_rows, channels = x2d.shape
    y = torch.empty((n_rows, channels), dtype=out_dtype, device=x2d.device)
    stats = torch.empty((5, n_rows), dtype=torch.float32, device=x2d.device)
    if y.numel() == 0:
        return y, stats
    block_m, block_c, num_warps, one_chunk = _norm_blocks(channels, NORM_FWD_ELEMS_PER_WARP)
    inv_sqrt_eps = 1.0 / math.sqrt(eps) if eps > 0 else 0.0
    _launch(_norm_fwd_kernel, x2d)[(triton.cdiv(n_rows, block_m),)](
        x2d, x2d if weight is None else weight, x2d if bias is None else bias,
        x2d if shift is None else shift, x2d if scale is None else scale, y, stats,
        n_rows, channels, group_len, eps, inv_sqrt_eps,
        CENTER=center, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, HAS_MOD=scale is not None,
        ONE_CHUNK=one_chunk, BLOCK_M=block_m, BLOCK_C=block_c, num_warps=num_warps,
    )  # fmt: skip
    return y, stats


def _launch_norm_bwd(dy2d, x2d, weight, bias, scale, stats, group_len, center) -> tuple[Tensor, Tensor]:
    """dx (R, C) in x's dtype and the fp32 partial sums (4, n_groups, n_splits, C) (see _norm_bwd_kernel)."""
    n_rows, channels = x2d.shape
    n_groups = n_rows // group_len if group_len else 0
    dx = torch.empty_like(x2d)
    if x2d.numel() == 0:
        return dx, torch.zeros((4, n_groups, 1, channels), dtype=torch.float32, device=x2d.device)
    block_m, block_c, num_warps, one_chunk = _norm_blocks(channels, NORM_BWD_ELEMS_PER_WARP)
    flags = dict(HAS_WEIGHT=weight is not None, HAS_MOD=scale is not None, BLOCK_M=block_m, BLOCK_C=block_c)
    w = x2d if weight is None else weight
    sc = x2d if scale is None else scale
    rowsum = stats  # unused placeholder when a row fits one tile
    if not one_chunk:
        rowsum = torch.empty((2, n_rows), dtype=torch.float32, device=x2d.device)
        _launch(_norm_bwd_rowsum_kernel, x2d)[(triton.cdiv(n_rows, block_m),)](
            dy2d, x2d, w, sc, stats, rowsum, n_rows, channels, group_len, **flags, num_warps=num_warps
        )
    n_col_blocks = triton.cdiv(channels, block_c)
    n_splits, rows_per_split = _splits(group_len, n_groups, n_col_blocks, block_m, x2d.device)
    # Planes that a configuration does not compute stay uninitialised and are never read.
    part = torch.empty((4, n_groups, n_splits, channels), dtype=torch.float32, device=x2d.device)
    _launch(_norm_bwd_kernel, x2d)[(n_groups, n_splits, n_col_blocks)](
        dy2d, x2d, w, x2d if bias is None else bias, sc, stats, rowsum, dx, part,
        n_rows, channels, group_len, rows_per_split, n_splits, n_groups,
        CENTER=center, HAS_BIAS=bias is not None, ONE_CHUNK=one_chunk, **flags, num_warps=num_warps,
    )  # fmt: skip
    return dx, part


# ----------------------------------------------------------------------------------------------------------
# Custom ops (namespace videosys) and their autograd
# ----------------------------------------------------------------------------------------------------------
# The ops take x as (B, M, C) and modulation as (B, G, C); the public functions below reshape (views, so
# autograd maps the gradients back to the callers' shapes).


def _custom_op(name: str, impl):
    """`impl` (a launcher with a typed signature) registered as the custom op videosys::`name`."""
    return triton_op(f"videosys::{name}", mutates_args=())(impl)


def _modulate_impl(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return _launch_scale_add(x, scale, shift, one_plus=True, add_per_group=True, out_dtype=x.dtype)


_modulate_op = _custom_op("modulate", _modulate_impl)


def _modulate_backward_impl(dy: Tensor, x: Tensor, scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    dx, dscale, dshift = _launch_scale_bwd(dy, x, scale, one_plus=True, sum_dy=True)
    return dx, dshift, dscale


_modulate_backward_op = _custom_op("modulate_backward", _modulate_backward_impl)


def _modulate_setup(ctx, inputs, output):
    x, shift, scale = inputs
    ctx.save_for_backward(x, scale)
    ctx.shift_dtype = shift.dtype


def _modulate_backward(ctx, dy):
    x, scale = ctx.saved_tensors
    dx, dshift, dscale = _traced_or_eager(_modulate_backward_op, _modulate_backward_impl, dy)(dy, x, scale)
    return dx, dshift.to(ctx.shift_dtype), dscale.to(scale.dtype)


_modulate_op.register_autograd(_modulate_backward, setup_context=_modulate_setup)


def _gate_residual_impl(residual: Tensor, gate: Tensor, h: Tensor) -> Tensor:
    return _launch_scale_add(h, gate, residual, one_plus=False, add_per_group=False, out_dtype=residual.dtype)


_gate_residual_op = _custom_op("gate_residual", _gate_residual_impl)


def _gate_residual_backward_impl(dout: Tensor, gate: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
    dh, dgate, _ = _launch_scale_bwd(dout, h, gate, one_plus=False, sum_dy=False)
    return dh, dgate


_gate_residual_backward_op = triton_op("videosys::gate_residual_backward", mutates_args=())(
    _gate_residual_backward_impl
)


def _gate_residual_setup(ctx, inputs, output):
    residual, gate, h = inputs
    ctx.save_for_backward(gate, h)
    ctx.residual_dtype = residual.dtype


def _gate_residual_backward(ctx, dout):
    gate, h = ctx.saved_tensors
    dh, dgate = _traced_or_eager(_gate_residual_backward_op, _gate_residual_backward_impl, dout)(dout, gate, h)
    # d residual is dout itself: no kernel, no copy unless the dtype differs.
    return dout.to(ctx.residual_dtype), dgate.to(gate.dtype), dh


_gate_residual_op.register_autograd(_gate_residual_backward, setup_context=_gate_residual_setup)


def _layernorm_modulate_impl(
    x: Tensor,
    shift: Tensor,
    scale: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    out_dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    batch, tokens, channels = x.shape
    y, stats = _launch_norm_fwd(
        x.contiguous().reshape(-1, channels),
        None if weight is None else weight.contiguous(),
        None if bias is None else bias.contiguous(),
        shift.contiguous().reshape(-1, channels),
        scale.contiguous().reshape(-1, channels),
        tokens // shift.shape[1],
        eps,
        True,
        out_dtype,
    )
    return y.reshape(batch, tokens, channels), stats


_layernorm_modulate_op = _custom_op("layernorm_modulate", _layernorm_modulate_impl)


def _layernorm_modulate_backward_impl(
    dy: Tensor, x: Tensor, scale: Tensor, weight: Tensor | None, bias: Tensor | None, stats: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """dx, and fp32 dshift, dscale (B, G, C), dweight, dbias (C,) (empty where weight / bias is None)."""
    batch, tokens, channels = x.shape
    dx, part = _launch_norm_bwd(
        dy.contiguous().reshape(-1, channels),
        x.contiguous().reshape(-1, channels),
        None if weight is None else weight.contiguous(),
        None if bias is None else bias.contiguous(),
        scale.contiguous().reshape(-1, channels),
        stats,
        tokens // scale.shape[1],
        True,
    )
    dw = part[2].sum(dim=(0, 1)) if weight is not None else x.new_empty(0, dtype=torch.float32)
    db = part[3].sum(dim=(0, 1)) if bias is not None else x.new_empty(0, dtype=torch.float32)
    dshift = part[0].sum(dim=1).reshape(scale.shape)
    dscale = part[1].sum(dim=1).reshape(scale.shape)
    return dx.reshape(x.shape), dshift, dscale, dw, db


_layernorm_modulate_backward_op = triton_op("videosys::layernorm_modulate_backward", mutates_args=())(
    _layernorm_modulate_backward_impl
)


def _layernorm_modulate_setup(ctx, inputs, output):
    x, shift, scale, weight, bias, _, _ = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, scale, weight, bias, output[1])
    ctx.shift_dtype = shift.dtype


def _layernorm_modulate_backward(ctx, dy, _dstats):
    x, scale, weight, bias, stats = ctx.saved_tensors
    dx, dshift, dscale, dw, db = _traced_or_eager(
        _layernorm_modulate_backward_op, _layernorm_modulate_backward_impl, dy
    )(dy, x, scale, weight, bias, stats)
    return (
        dx,
        dshift.to(ctx.shift_dtype),
        dscale.to(scale.dtype),
        None if weight is None else dw.to(weight.dtype),
        None if bias is None else db.to(bias.dtype),
        None,
        None,
    )


_layernorm_modulate_op.register_autograd(_layernorm_modulate_backward, setup_context=_layernorm_modulate_setup)


def _rms_norm_impl(x: Tensor, weight: Tensor, eps: float, out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """x (R, C)."""
    return _launch_norm_fwd(
        x.contiguous(), weight.contiguous(), None, None, None, max(1, x.shape[0]), eps, False, out_dtype
    )


_rms_norm_op = _custom_op("rms_norm", _rms_norm_impl)


def _rms_norm_backward_impl(dy: Tensor, x: Tensor, weight: Tensor, stats: Tensor) -> tuple[Tensor, Tensor]:
    # One group of all rows: the splits alone spread the weight-gradient reduction over the device.
    dx, part = _launch_norm_bwd(
        dy.contiguous(), x.contiguous(), weight.contiguous(), None, None, stats, x.shape[0], False
    )
    return dx, part[2].sum(dim=(0, 1))


_rms_norm_backward_op = _custom_op("rms_norm_backward", _rms_norm_backward_impl)


def _rms_norm_setup(ctx, inputs, output):
    x, weight, _, _ = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, weight, output[1])


def _rms_norm_backward(ctx, dy, _dstats):
    x, weight, stats = ctx.saved_tensors
    dx, dw = _traced_or_eager(_rms_norm_backward_op, _rms_norm_backward_impl, dy)(dy, x, weight, stats)
    return dx, dw.to(weight.dtype), None, None


_rms_norm_op.register_autograd(_rms_norm_backward, setup_context=_rms_norm_setup)


# ----------------------------------------------------------------------------------------------------------
# Eager path
# ----------------------------------------------------------------------------------------------------------
# A custom op call with autograd costs ~0.2 ms of CPU in the dispatcher's wrapper (measured on an H200), more
# than the kernels themselves at DiT sizes. Outside of tracing, the same launchers and the same autograd
# formulas run through a plain autograd.Function instead; torch.compile and export see the custom ops.


def _tracing(probe: Tensor) -> bool:
    """Whether torch.compile / export is tracing: fake or functional tensors, or a dispatch mode active."""
    plain = type(probe) in (torch.Tensor, torch.nn.Parameter)
    return not plain or is_in_torch_dispatch_mode() or torch.compiler.is_compiling()


def _traced_or_eager(op, impl, probe: Tensor):
    """The custom op while tracing, else its launcher."""
    return op if _tracing(probe) else impl


@dataclass(frozen=True)
class _OpSpec:
    op: object  # the registered custom op
    impl: object  # its launcher
    setup: object  # its setup_context(ctx, inputs, output)
    backward: object  # its backward(ctx, *grads)


class _EagerAutograd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec: _OpSpec, *inputs):
        output = spec.impl(*inputs)
        spec.setup(ctx, inputs, output)
        ctx.spec = spec
        return output

    @staticmethod
    def backward(ctx, *grads):
        return (None, *ctx.spec.backward(ctx, *grads))


def _call(spec: _OpSpec, *inputs):
    if _tracing(inputs[0]):
        return spec.op(*inputs)
    return _EagerAutograd.apply(spec, *inputs)


_MODULATE = _OpSpec(_modulate_op, _modulate_impl, _modulate_setup, _modulate_backward)
_GATE_RESIDUAL = _OpSpec(_gate_residual_op, _gate_residual_impl, _gate_residual_setup, _gate_residual_backward)
_LAYERNORM_MODULATE = _OpSpec(
    _layernorm_modulate_op, _layernorm_modulate_impl, _layernorm_modulate_setup, _layernorm_modulate_backward
)
_RMS_NORM = _OpSpec(_rms_norm_op, _rms_norm_impl, _rms_norm_setup, _rms_norm_backward)


# ----------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------


def _tokens_view(x: Tensor) -> Tensor:
    """x (B, *tokens, C) as (B, M, C)."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


def fused_modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """x * (1 + scale) + shift; shift / scale (B, C) or (B, G, C) (see the module docstring)."""
    shift, scale = modulation_groups(x, shift, "shift"), modulation_groups(x, scale, "scale")
    return _call(_MODULATE, _tokens_view(x), shift, scale).reshape(x.shape)


def fused_layernorm_modulate(
    x: Tensor,
    shift: Tensor,
    scale: Tensor,
    eps: float,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """(LayerNorm(x) * weight + bias) * (1 + scale) + shift, LayerNorm over the last dim."""
    shift, scale = modulation_groups(x, shift, "shift"), modulation_groups(x, scale, "scale")
    _check_vector(weight, x.shape[-1], "weight", x)
    _check_vector(bias, x.shape[-1], "bias", x)
    args = (_tokens_view(x), shift, scale, weight, bias, float(eps), out_dtype or x.dtype)
    y, _ = _call(_LAYERNORM_MODULATE, *args)
    return y.reshape(x.shape)


def fused_rms_norm(x: Tensor, weight: Tensor, eps: float, out_dtype: torch.dtype | None = None) -> Tensor:
    """x * rsqrt(mean(x^2, -1) + eps) * weight over the last dim, any leading shape."""
    if x.dim() < 1:
        raise ValueError(f"x must have at least one dimension, got shape {tuple(x.shape)}")
    _check_vector(weight, x.shape[-1], "weight", x)
    y, _ = _call(_RMS_NORM, x.reshape(-1, x.shape[-1]), weight, float(eps), out_dtype or x.dtype)
    return y.reshape(x.shape)


def fused_gate_residual(residual: Tensor, gate: Tensor, h: Tensor) -> Tensor:
    """residual + gate * h; gate (B, C) or (B, G, C), residual and h of one shape (B, *tokens, C)."""
    if residual.shape != h.shape:
        raise ValueError(f"residual and h must have the same shape, got {tuple(residual.shape)} and {tuple(h.shape)}")
    gate = modulation_groups(h, gate, "gate")
    return _call(_GATE_RESIDUAL, _tokens_view(residual), gate, _tokens_view(h)).reshape(residual.shape)
