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
deterministically: each program reduces its rows of one (sample, group) into an fp32 partial, and the
partials are summed in a fixed order (by the last program of the group to finish, or by _sum_partials).

Launch choices (rows per tile, column block, warps, pipelining depth, programs per SM, norm prefetch, row
interleaving) live in one frozen ``LAUNCH = LaunchParams(...)``, one ``PassLaunch`` per kernel pass, from
which small pure functions derive the block sizes for a channel count; benchmarks/tune_kernels.py measures
alternatives.

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
try:  # grid dependency control, for programmatic dependent launches (Triton 3.4+)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - older Triton: kernels launch one after the other
    gdc_launch_dependents = gdc_wait = None

__all__ = [
    "LAUNCH",
    "LaunchParams",
    "PassLaunch",
    "fused_gate_residual",
    "fused_layernorm_modulate",
    "fused_modulate",
    "fused_rms_norm",
    "gate_residual_reference",
    "layernorm_modulate_reference",
    "modulate_reference",
    "rms_norm_reference",
]

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
# Launch parameters
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PassLaunch:
    """How one kernel pass is launched at any channel count C (the launchers derive the block sizes):

    - tile: elements per row tile: BLOCK_M = tile // (its columns), at least 1, at most the group's rows.
    - block_c: elementwise kernels: the widest column block. Norms: the widest row held in registers (as a
      power-of-two head plus a power-of-two tail, so C = 1152 is 1024 + 128 lanes, none idle); wider rows
      are processed in chunks of block_c. A power of two.
    - warp_elems: tile elements per warp: num_warps = BLOCK_M * (columns) // warp_elems, within 1..8.
    - num_stages: software-pipelining depth of the loop over row tiles.
    - programs_per_sm: the (group, split[, column block]) grid aims at about this many programs per SM.
    - prefetch: norms whose row fits in registers: load the next row tile (x; backward also dy and the row
      stats) before reducing and storing the current one, so a load is in flight during the reductions.
      Costs the registers of one more tile (held in the input dtype). Elementwise kernels ignore it.
    - max_registers: norms: a cap on registers per thread (Triton's maxnreg), None for the compiler's choice.
      Left alone, ptxas may take so many that fewer programs fit on an SM than the grid wants there.
    - interleave: deal a group's row tiles to its splits in turn (split s walks tiles s, s + n_splits, ...)
      rather than one contiguous run each. The programs of a group then move through one window of memory
      together instead of each streaming its own distant run, which the GPU's DRAM serves faster.
    """

    tile: int
    block_c: int
    warp_elems: int
    num_stages: int
    programs_per_sm: int
    prefetch: bool = False
    max_registers: int | None = None
    interleave: bool = False


@dataclass(frozen=True)
class LaunchParams:
    """Every kernel pass's launch choices. The launchers read the module attribute LAUNCH at each call, so a
    benchmark may swap in a modified copy (dataclasses.replace) to tune them; nothing else should."""

    modulate_fwd: PassLaunch
    modulate_bwd: PassLaunch
    gate_residual_fwd: PassLaunch
    gate_residual_bwd: PassLaunch
    layernorm_modulate_fwd: PassLaunch
    layernorm_modulate_bwd: PassLaunch
    rms_norm_fwd: PassLaunch
    rms_norm_bwd: PassLaunch


# fp32 values in a row's record of norm statistics (see _store_stats): 32 bytes, one DRAM sector.
STATS_WIDTH = tl.constexpr(8)

# Tuned on an H200 (benchmarks/tune_kernels.py, bf16, shapes 2x24180x1152:13 and 32x256x1152, the geometric
# mean of both): elementwise kernels in ~8-16-element-per-thread tiles; norm rows one per warp (row
# reductions stay in the warp; RMSNorm forward two rows per warp), the next row tile prefetched, the
# LayerNorm forward capped at 160 registers so that 12 programs fit per SM; backward grids of as many
# one-warp programs as fit per SM (8 at ~240 registers; _splits keeps the grid within that, so no program
# waits for a second wave), their fp32 partials summed by a PDL dependent (see _dependent_launch). Row
# tiles are interleaved across splits where that measured faster (modulate, LayerNorm and RMSNorm
# forwards, LayerNorm backward: 0.5-1.5%); for the other backwards it was slower or no different.
# The Triton 3.x pipeliner leaves these dot-free loops alone, so num_stages is 1. Re-tune on another GPU
# and copy the suggestion here.
LAUNCH = LaunchParams(
    modulate_fwd=PassLaunch(tile=8192, block_c=128, warp_elems=1024, num_stages=1, programs_per_sm=64, interleave=True),
    modulate_bwd=PassLaunch(tile=2048, block_c=128, warp_elems=512, num_stages=1, programs_per_sm=6),
    layernorm_modulate_fwd=PassLaunch(
        tile=1024,
        block_c=4096,
        warp_elems=1024,
        num_stages=1,
        programs_per_sm=12,
        prefetch=True,
        max_registers=160,
        interleave=True,
    ),
    layernorm_modulate_bwd=PassLaunch(
        tile=1024, block_c=4096, warp_elems=1024, num_stages=1, programs_per_sm=8, prefetch=True, interleave=True
    ),
    rms_norm_fwd=PassLaunch(
        tile=2048, block_c=4096, warp_elems=2048, num_stages=1, programs_per_sm=24, prefetch=True, interleave=True
    ),
    rms_norm_bwd=PassLaunch(tile=1024, block_c=4096, warp_elems=1024, num_stages=1, programs_per_sm=8, prefetch=True),
    gate_residual_fwd=PassLaunch(tile=4096, block_c=128, warp_elems=1024, num_stages=1, programs_per_sm=64),
    gate_residual_bwd=PassLaunch(tile=2048, block_c=128, warp_elems=512, num_stages=1, programs_per_sm=6),
)


# ----------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------
# Layout everywhere: the token rows of x are the rows of a contiguous (R, C) matrix, R = B * M; a modulation
# tensor is a contiguous (B * G, C) matrix whose row g belongs to the L = M // G consecutive rows
# [g * L, (g + 1) * L) of x. Every kernel runs programs over (group g, split of the group's rows[, column
# block]): a program loads group g's vectors (modulation, norm weight and bias) once into registers, then
# walks its split BLOCK_M rows at a time. Offsets are int64: R * C can pass 2^31.


@triton.jit
def _split_rows(split, n_splits, rows_per_split, group_len, BLOCK_M: tl.constexpr, INTERLEAVE: tl.constexpr):
    """(start, end, step) of the group rows this split walks, one BLOCK_M tile at a time: a run of
    rows_per_split rows, or with INTERLEAVE every n_splits-th tile of the group (see PassLaunch.interleave)."""
    if INTERLEAVE:
        return split * BLOCK_M, group_len, n_splits * BLOCK_M
    start = split * rows_per_split
    return start, tl.minimum(start + rows_per_split, group_len), BLOCK_M


@triton.jit
def _fold_rows(t, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, ACC_ROWS: tl.constexpr):
    """t [BLOCK_M, BLOCK_C] summed down to [ACC_ROWS, BLOCK_C] (row i into row i % ACC_ROWS). With ACC_ROWS
    the rows of one layout repetition this stays in each thread's registers, and a column accumulator of
    that size costs a few registers instead of a whole tile's."""
    return tl.sum(tl.reshape(t, [BLOCK_M // ACC_ROWS, ACC_ROWS, BLOCK_C]), axis=0)


@triton.jit
def _last_of_group(count_ptr, slot, n_splits):
    """Whether this program is the last of the n_splits of its (group, column block) to have stored its
    partial sums: each takes a ticket from the slot's counter once its stores are done (the barrier orders
    every thread's stores before the release of the atomic), and the last ticket's holder sums the partials."""
    tl.debug_barrier()
    return tl.atomic_add(count_ptr + slot, 1, sem="acq_rel") == n_splits - 1


@triton.jit
def _sum_splits(part_ptr, first, n_splits, C, cols, cmask):
    """Sum over the splits of one group's fp32 partials part[first + split * C + cols], in split order (so the
    result does not depend on which program finished last). Read from L2 (.cg): other SMs wrote them."""
    acc = tl.zeros(cols.shape, dtype=tl.float32)
    for split in range(n_splits):
        acc += tl.load(part_ptr + first + split * C + cols, mask=cmask, other=0.0, cache_modifier=".cg")
    return acc


@triton.jit
def _vector(ptr, cols, cmask, default: tl.constexpr, PRESENT: tl.constexpr):
    """ptr[cols] as fp32, or `default` everywhere when the tensor is absent."""
    v = tl.full(cols.shape, default, tl.float32)
    if PRESENT:
        v = tl.load(ptr + cols, mask=cmask, other=default).to(tl.float32)
    return v


@triton.jit
def _scale_add_fwd_kernel(
    x_ptr,
    m_ptr,
    add_ptr,
    out_ptr,
    C,
    group_len,
    rows_per_split,
    ONE_PLUS: tl.constexpr,
    ADD_PER_GROUP: tl.constexpr,
    INTERLEAVE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """out = x * (1 + m) + add (modulate: add = shift, per group) or x * m + add (gate: add = residual, per
    row) for program (group g, split, column block)."""
    g = tl.program_id(0).to(tl.int64)
    start, end, step = _split_rows(tl.program_id(1), tl.num_programs(1), rows_per_split, group_len, BLOCK_M, INTERLEAVE)
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    m = tl.load(m_ptr + g * C + cols, mask=cmask, other=0.0).to(tl.float32)
    if ONE_PLUS:
        m = 1.0 + m
    a = tl.zeros([BLOCK_C], dtype=tl.float32)
    if ADD_PER_GROUP:
        a = tl.load(add_ptr + g * C + cols, mask=cmask, other=0.0).to(tl.float32)
    base = g * group_len
    for r0 in range(start, end, step):
        local = r0 + tl.arange(0, BLOCK_M)
        mask = (local < end)[:, None] & cmask[None, :]
        offs = (base + local)[:, None] * C + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if ADD_PER_GROUP:
            add = tl.broadcast_to(a[None, :], [BLOCK_M, BLOCK_C])
        else:
            add = tl.load(add_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = tl.fma(x, tl.broadcast_to(m[None, :], [BLOCK_M, BLOCK_C]), add)
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scale_add_bwd_kernel(
    dy_ptr,
    x_ptr,
    m_ptr,
    dx_ptr,
    part_ptr,
    dm_ptr,
    dadd_ptr,
    count_ptr,
    C,
    group_len,
    rows_per_split,
    n_splits,
    n_groups,
    ONE_PLUS: tl.constexpr,
    SUM_DY: tl.constexpr,
    INTERLEAVE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ACC_ROWS: tl.constexpr,
    DEPENDENT: tl.constexpr,
):
    """Backward of out = x * (1 + m) + add for program (group g, split, column block): writes
    dx = dy * (1 + m) for its rows and the fp32 partial column sums part[0, g, split] = sum(dy * x) (the
    gradient of m) and, with SUM_DY, part[1, g, split] = sum(dy) (the gradient of a per-group add). The last
    program of (g, column block) to finish sums the group's partials into dm[g] and dadd[g] (fp32 (G, C)).
    DEPENDENT: launched as a programmatic dependent of the memset that zeroes `count` (see _dependent_launch):
    everything before the ticket overlaps that kernel, which is waited for only to take the ticket."""
    g = tl.program_id(0)
    split = tl.program_id(1)
    start, end, step = _split_rows(split, n_splits, rows_per_split, group_len, BLOCK_M, INTERLEAVE)
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    m = tl.load(m_ptr + g.to(tl.int64) * C + cols, mask=cmask, other=0.0).to(tl.float32)
    if ONE_PLUS:
        m = 1.0 + m
    base = g.to(tl.int64) * group_len
    # Folded accumulators: the cross-thread reduction happens once, after the loop.
    acc_m = tl.zeros([ACC_ROWS, BLOCK_C], dtype=tl.float32)
    acc_dy = tl.zeros([ACC_ROWS, BLOCK_C], dtype=tl.float32)
    for r0 in range(start, end, step):
        local = r0 + tl.arange(0, BLOCK_M)
        mask = (local < end)[:, None] & cmask[None, :]
        offs = (base + local)[:, None] * C + cols[None, :]
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + offs, (dy * m[None, :]).to(dx_ptr.dtype.element_ty), mask=mask)
        acc_m += _fold_rows(dy * x, BLOCK_M, BLOCK_C, ACC_ROWS)
        if SUM_DY:
            acc_dy += _fold_rows(dy, BLOCK_M, BLOCK_C, ACC_ROWS)
    plane = n_groups * n_splits * C
    out = (g * n_splits + split).to(tl.int64) * C + cols
    tl.store(part_ptr + out, tl.sum(acc_m, axis=0), mask=cmask)
    if SUM_DY:
        tl.store(part_ptr + plane + out, tl.sum(acc_dy, axis=0), mask=cmask)
    if DEPENDENT:
        gdc_wait()
    if _last_of_group(count_ptr, g * tl.num_programs(2) + tl.program_id(2), n_splits):
        group_first = g.to(tl.int64) * n_splits * C
        dm = _sum_splits(part_ptr, group_first, n_splits, C, cols, cmask)
        tl.store(dm_ptr + g.to(tl.int64) * C + cols, dm, mask=cmask)
        if SUM_DY:
            dadd = _sum_splits(part_ptr + plane, group_first, n_splits, C, cols, cmask)
            tl.store(dadd_ptr + g.to(tl.int64) * C + cols, dadd, mask=cmask)


@triton.jit
def _pow2_row_scale(absmax):
    """Per row, 2^-k with k = clamp(exponent of absmax, 0, 126): exact to apply, it brings a max |x| >= 1
    into [1, 2) ([2, 4) at the very top of the fp32 range) and leaves smaller rows alone (s = 1; an all-zero
    row included), so sums of squares of the scaled row can neither overflow nor underflow needlessly."""
    exponent = (absmax.to(tl.int32, bitcast=True) >> 23) & 0xFF
    k = tl.minimum(tl.maximum(exponent - 127, 0), 126)
    return ((127 - k) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _col(v, SCALAR: tl.constexpr):
    """A per-row value broadcast over a tile's columns: v[:, None], or v itself when it is a scalar."""
    if SCALAR:
        return v
    else:
        return v[:, None]


@triton.jit
def _row_sum(t, SCALAR: tl.constexpr):
    """Row sums of a [BLOCK_M, N] tile; with SCALAR (BLOCK_M = 1) a scalar. A scalar has no layout: the head's
    and the tail's sums (tiles of different layouts) then meet, and broadcast back into each tile, without
    Triton converting a whole tile to the other's layout."""
    r = tl.sum(t, axis=1)
    if SCALAR:
        r = tl.sum(r, axis=0)  # one element: exact
    return r


@triton.jit
def _row_max(t, SCALAR: tl.constexpr):
    """Row maxima, as _row_sum."""
    r = tl.max(t, axis=1)
    if SCALAR:
        r = tl.max(r, axis=0)
    return r


@triton.jit
def _as_rows(v, SCALAR: tl.constexpr):
    """A loaded [BLOCK_M] vector of per-row values as _row_sum returns them (a scalar with SCALAR)."""
    if SCALAR:
        v = tl.sum(v, axis=0)  # one element: exact
    return v


@triton.jit
def _centred(x, s, pivot, md, SCALAR: tl.constexpr):
    """(x * s - pivot) - md: the scaled row relative to its mean; the same expression forward and backward
    (xhat = _centred(...) * r_s). SCALAR: the row values are scalars (see _row_sum)."""
    return (x * _col(s, SCALAR) - _col(pivot, SCALAR)) - _col(md, SCALAR)


@triton.jit
def _affine_modulate(xhat, w, b, one_plus_scale, shift, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                     HAS_MOD: tl.constexpr):  # fmt: skip
    """(xhat * w + b) * (1 + scale) + shift, each factor only where present."""
    z = xhat
    if HAS_WEIGHT:
        z = z * w[None, :]
    if HAS_BIAS:
        z = z + b[None, :]
    if HAS_MOD:
        z = tl.fma(z, tl.broadcast_to(one_plus_scale[None, :], z.shape), tl.broadcast_to(shift[None, :], z.shape))
    return z


@triton.jit
def _row_stats(var, s, eps, inv_sqrt_eps):
    """r_s = rsqrt(var + eps * s^2) (0 where that is 0: a constant row with eps underflowed) and the unscaled
    rstd = 1 / sqrt(var / s^2 + eps) that dx needs."""
    denom = var + eps * s * s
    r_s = tl.where(denom > 0.0, tl.rsqrt(tl.where(denom > 0.0, denom, 1.0)), 0.0)
    # var > 0 means var >= ~1e-14 / C in the scaled domain, where s * r_s is accurate; a zero variance
    # (eps * s^2 may have underflowed) is rstd = 1 / sqrt(eps) exactly.
    rstd = tl.where(var > 0.0, s * r_s, inv_sqrt_eps)
    return r_s, rstd


@triton.jit
def _row_moments(x_h, x_t, x0, mask_t, s, C, CENTER: tl.constexpr, HAS_TAIL: tl.constexpr,
                 SCALAR: tl.constexpr):  # fmt: skip
    """Of a row held as head and tail (fp32, masked tail lanes zero), scaled by s: pivot (s * x[0] for
    LayerNorm, 0 for RMSNorm), md = mean(s*x - pivot) (0 for RMSNorm), var = mean((s*x - pivot - md)^2)
    (RMSNorm: mean((s*x)^2)), and the centred head and tail (tail lanes outside the row zero)."""
    pivot = s * 0.0  # exact zeros (s > 0), shaped like the row values
    md = pivot
    if CENTER:
        pivot = x0.to(tl.float32) * s
        acc = _row_sum(x_h * _col(s, SCALAR) - _col(pivot, SCALAR), SCALAR)
        if HAS_TAIL:
            acc += _row_sum(tl.where(mask_t, x_t * _col(s, SCALAR) - _col(pivot, SCALAR), 0.0), SCALAR)
        md = acc / C
    d_h = _centred(x_h, s, pivot, md, SCALAR)
    acc = _row_sum(d_h * d_h, SCALAR)
    d_t = tl.where(mask_t, _centred(x_t, s, pivot, md, SCALAR), 0.0)
    if HAS_TAIL:
        acc += _row_sum(d_t * d_t, SCALAR)
    return pivot, md, acc / C, d_h, d_t


@triton.jit
def _any_out_of_range(var, rmask, SCALAR: tl.constexpr):
    """Whether a row of the tile (rows outside rmask aside) has a variance that is inf or nan (something
    overflowed) or below 1e-18, where squares of the row's deviations may have lost bits to underflow
    (a constant row included). Scaled by _pow2_row_scale first, such a row has neither problem. Above
    1e-18 the unscaled row gives the scaled result: scaling by a power of two is exact."""
    bad = (var < 1e-18) | (var > 1e38) | (var != var)
    if not SCALAR:  # (SCALAR: the tile's one row is always valid, so no mask and no reduction)
        bad = tl.max((bad & rmask).to(tl.int32), axis=0) > 0
    return bad


@triton.jit
def _row_tile(base, r0, end, BLOCK_M: tl.constexpr):
    """Rows (int64) of the tile of group rows [r0, r0 + BLOCK_M) starting at row `base`, and which are < end."""
    local = r0 + tl.arange(0, BLOCK_M)
    return base + local, local < end


@triton.jit
def _load_norm_rows(x_ptr, row_offs, rmask, head, tail, tmask, CENTER: tl.constexpr, HAS_TAIL: tl.constexpr,
                    TAIL_C: tl.constexpr, SCALAR: tl.constexpr):  # fmt: skip
    """A row tile of x as loaded (x's dtype, converted at use so a prefetched tile costs half the registers
    in 16-bit): head, tail (zeros without HAS_TAIL) and, for LayerNorm, each row's first element (a scalar
    with SCALAR, see _row_sum)."""
    x_h = tl.load(x_ptr + row_offs[:, None] + head[None, :], mask=rmask[:, None], other=0.0)
    x_t = tl.zeros([row_offs.shape[0], TAIL_C], dtype=x_ptr.dtype.element_ty)
    if HAS_TAIL:
        x_t = tl.load(x_ptr + row_offs[:, None] + tail[None, :], mask=rmask[:, None] & tmask[None, :], other=0.0)
    x0 = tl.zeros(row_offs.shape, dtype=x_ptr.dtype.element_ty)
    if CENTER:
        x0 = tl.load(x_ptr + row_offs, mask=rmask, other=0.0)
    return x_h, x_t, _as_rows(x0, SCALAR)


@triton.jit
def _norm_fwd_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    shift_ptr,
    scale_ptr,
    y_ptr,
    stats_ptr,
    C,
    group_len,
    rows_per_split,
    eps,
    inv_sqrt_eps,
    CENTER: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_MOD: tl.constexpr,
    CHUNKED: tl.constexpr,
    HAS_TAIL: tl.constexpr,
    PREFETCH: tl.constexpr,
    INTERLEAVE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    TAIL_C: tl.constexpr,
):
    """LayerNorm (CENTER) or RMSNorm, then optional affine and modulate, for program (group g, split).

    Per row (s: a power-of-two row scale, _pow2_row_scale; rows held in registers use s = 1 unless the
    unscaled row over- or underflows, see _any_out_of_range; pivot = s * x[0] for LayerNorm, 0 for RMSNorm):
      md = mean(s*x - pivot), var = mean((s*x - pivot - md)^2)  (for RMSNorm: mean((s*x)^2)),
      r_s = rsqrt(var + eps * s^2), rstd = 1 / sqrt(var / s^2 + eps) (see _row_stats).
    stats (R, STATS_WIDTH) fp32, a record (s, pivot, md, r_s, rstd, 0...) per row, is saved for the backward.
    Unless CHUNKED a row is held in registers as a head of BLOCK_C columns (all < C: no column mask) and,
    with HAS_TAIL, a masked tail of TAIL_C columns from BLOCK_C on; the group's vectors are loaded once.
    CHUNKED: the passes loop over chunks of BLOCK_C columns, reloading x (and the vectors, from cache).
    PREFETCH (not with CHUNKED): the next row tile is loaded before the current one is reduced and stored.
    """
    SCALAR: tl.constexpr = BLOCK_M == 1  # one row per tile: its values as scalars (see _row_sum)
    g = tl.program_id(0).to(tl.int64)
    start, end, step = _split_rows(tl.program_id(1), tl.num_programs(1), rows_per_split, group_len, BLOCK_M, INTERLEAVE)
    base = g * group_len
    mod_row = g * C
    head = tl.arange(0, BLOCK_C)
    tail = BLOCK_C + tl.arange(0, TAIL_C)
    tmask = tail < C
    everywhere = head < BLOCK_C
    w_h = _vector(w_ptr, head, everywhere, 1.0, HAS_WEIGHT and not CHUNKED)
    b_h = _vector(b_ptr, head, everywhere, 0.0, HAS_BIAS and not CHUNKED)
    sc_h = 1.0 + _vector(scale_ptr + mod_row, head, everywhere, 0.0, HAS_MOD and not CHUNKED)
    sh_h = _vector(shift_ptr + mod_row, head, everywhere, 0.0, HAS_MOD and not CHUNKED)
    w_t = _vector(w_ptr, tail, tmask, 1.0, HAS_WEIGHT and HAS_TAIL)
    b_t = _vector(b_ptr, tail, tmask, 0.0, HAS_BIAS and HAS_TAIL)
    sc_t = 1.0 + _vector(scale_ptr + mod_row, tail, tmask, 0.0, HAS_MOD and HAS_TAIL)
    sh_t = _vector(shift_ptr + mod_row, tail, tmask, 0.0, HAS_MOD and HAS_TAIL)
    if PREFETCH:
        first, first_mask = _row_tile(base, start, end, BLOCK_M)
        nx_h, nx_t, nx0 = _load_norm_rows(
            x_ptr, first * C, first_mask, head, tail, tmask, CENTER, HAS_TAIL, TAIL_C, SCALAR
        )
    for r0 in range(start, end, step):
        rows, rmask = _row_tile(base, r0, end, BLOCK_M)
        row_offs = rows * C
        zero = tl.zeros([BLOCK_M], dtype=tl.float32)
        if CHUNKED:
            # Pass 1: max |x| per row.
            absmax = zero
            for c0 in range(0, C, BLOCK_C):
                cols = c0 + head
                mask = rmask[:, None] & (cols < C)[None, :]
                xc = tl.load(x_ptr + row_offs[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                absmax = tl.maximum(absmax, tl.max(tl.abs(xc), axis=1))
            s = _pow2_row_scale(absmax)
            # Pass 2 (LayerNorm): mean relative to the first element, exact zero for a constant row.
            pivot = zero
            md = zero
            if CENTER:
                pivot = tl.load(x_ptr + row_offs, mask=rmask, other=0.0).to(tl.float32) * s
                acc = zero
                for c0 in range(0, C, BLOCK_C):
                    cols = c0 + head
                    mask = rmask[:, None] & (cols < C)[None, :]
                    xc = tl.load(x_ptr + row_offs[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                    acc += tl.sum(tl.where(mask, xc * s[:, None] - pivot[:, None], 0.0), axis=1)
                md = acc / C
            # Pass 3: variance (LayerNorm) or mean square (RMSNorm) of the scaled, centred row.
            acc = zero
            for c0 in range(0, C, BLOCK_C):
                cols = c0 + head
                mask = rmask[:, None] & (cols < C)[None, :]
                xc = tl.load(x_ptr + row_offs[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                d = tl.where(mask, _centred(xc, s, pivot, md, False), 0.0)
                acc += tl.sum(d * d, axis=1)
            r_s, rstd = _row_stats(acc / C, s, eps, inv_sqrt_eps)
            # Pass 4: normalise, affine, modulate, store.
            for c0 in range(0, C, BLOCK_C):
                cols = c0 + head
                cmask = cols < C
                mask = rmask[:, None] & cmask[None, :]
                xc = tl.load(x_ptr + row_offs[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                w = _vector(w_ptr, cols, cmask, 1.0, HAS_WEIGHT)
                b = _vector(b_ptr, cols, cmask, 0.0, HAS_BIAS)
                sc = 1.0 + _vector(scale_ptr + mod_row, cols, cmask, 0.0, HAS_MOD)
                sh = _vector(shift_ptr + mod_row, cols, cmask, 0.0, HAS_MOD)
                z = _affine_modulate(_centred(xc, s, pivot, md, False) * r_s[:, None], w, b, sc, sh,
                                     HAS_WEIGHT, HAS_BIAS, HAS_MOD)  # fmt: skip
                tl.store(y_ptr + row_offs[:, None] + cols[None, :], z.to(y_ptr.dtype.element_ty), mask=mask)
        else:
            mask_h = rmask[:, None]  # broadcast over the head's columns, all < C
            mask_t = rmask[:, None] & tmask[None, :]
            if PREFETCH:
                x_h, x_t, x0 = nx_h, nx_t, nx0
                next_rows, next_rmask = _row_tile(base, r0 + step, end, BLOCK_M)
                nx_h, nx_t, nx0 = _load_norm_rows(
                    x_ptr, next_rows * C, next_rmask, head, tail, tmask, CENTER, HAS_TAIL, TAIL_C, SCALAR
                )
            else:
                x_h, x_t, x0 = _load_norm_rows(
                    x_ptr, row_offs, rmask, head, tail, tmask, CENTER, HAS_TAIL, TAIL_C, SCALAR
                )
            x_h = x_h.to(tl.float32)
            x_t = x_t.to(tl.float32)
            # First the row as it is (s = 1): one row reduction fewer than scaling it first. Only a tile
            # with a row whose variance says that something overflowed or underflowed is redone scaled.
            s = _as_rows(tl.full([BLOCK_M], 1.0, tl.float32), SCALAR)
            pivot, md, var, d_h, d_t = _row_moments(x_h, x_t, x0, mask_t, s, C, CENTER, HAS_TAIL, SCALAR)
            if _any_out_of_range(var, rmask, SCALAR):
                # Reloaded (from cache) rather than kept: registers held across the row are occupancy lost.
                x_h, x_t, x0 = _load_norm_rows(
                    x_ptr, row_offs, rmask, head, tail, tmask, CENTER, HAS_TAIL, TAIL_C, SCALAR
                )
                x_h = x_h.to(tl.float32)
                x_t = x_t.to(tl.float32)
                absmax = _row_max(tl.abs(x_h), SCALAR)
                if HAS_TAIL:
                    absmax = tl.maximum(absmax, _row_max(tl.abs(x_t), SCALAR))
                s = _pow2_row_scale(absmax)
                pivot, md, var, d_h, d_t = _row_moments(x_h, x_t, x0, mask_t, s, C, CENTER, HAS_TAIL, SCALAR)
            r_s, rstd = _row_stats(var, s, eps, inv_sqrt_eps)
            z_h = _affine_modulate(d_h * _col(r_s, SCALAR), w_h, b_h, sc_h, sh_h, HAS_WEIGHT, HAS_BIAS, HAS_MOD)
            tl.store(y_ptr + row_offs[:, None] + head[None, :], z_h.to(y_ptr.dtype.element_ty), mask=mask_h)
            if HAS_TAIL:
                z_t = _affine_modulate(d_t * _col(r_s, SCALAR), w_t, b_t, sc_t, sh_t, HAS_WEIGHT, HAS_BIAS, HAS_MOD)
                tl.store(y_ptr + row_offs[:, None] + tail[None, :], z_t.to(y_ptr.dtype.element_ty), mask=mask_t)
        _store_stats(stats_ptr, rows, rmask, s, pivot, md, r_s, rstd, SCALAR)


@triton.jit
def _store_stats(stats_ptr, rows, rmask, s, pivot, md, r_s, rstd, SCALAR: tl.constexpr):
    """A row's statistics as one STATS_WIDTH-float record (s, pivot, md, r_s, rstd, then zeros), written
    whole. 32 bytes are a whole DRAM sector: a partial one (4-byte stores into planes of per-row values)
    that leaves the L2 before its neighbours arrive costs a read-modify-write, which on an H200 made the
    stores of the LayerNorm forward cost ~3.5 us of its ~66 (the same forward without them)."""
    k = tl.arange(0, STATS_WIDTH)[None, :]
    record = tl.where(k == 4, _col(rstd, SCALAR), 0.0)
    record = tl.where(k == 3, _col(r_s, SCALAR), record)
    record = tl.where(k == 2, _col(md, SCALAR), record)
    record = tl.where(k == 1, _col(pivot, SCALAR), record)
    record = tl.where(k == 0, _col(s, SCALAR), record)
    tl.store(stats_ptr + rows[:, None] * STATS_WIDTH + k, record, mask=rmask[:, None])


@triton.jit
def _load_stats(stats_ptr, rows, rmask):
    """The per-row values of _store_stats' records, each [BLOCK_M]."""
    record = stats_ptr + rows * STATS_WIDTH
    s = tl.load(record, mask=rmask, other=1.0)
    pivot = tl.load(record + 1, mask=rmask, other=0.0)
    md = tl.load(record + 2, mask=rmask, other=0.0)
    r_s = tl.load(record + 3, mask=rmask, other=0.0)
    rstd = tl.load(record + 4, mask=rmask, other=0.0)
    return s, pivot, md, r_s, rstd


@triton.jit
def _norm_bwd_tile(x_ptr, dy_ptr, offs, mask, s, pivot, md, r_s, w, one_plus_scale, HAS_WEIGHT: tl.constexpr,
                   HAS_MOD: tl.constexpr, MASKED: tl.constexpr):  # fmt: skip
    """(dy, xhat, dz, dxhat) of a tile: z = xhat * w + b is the affine output, dz = dy * (1 + scale) its
    gradient and dxhat = dz * w the gradient of the normalised row. MASKED: xhat is zeroed outside `mask`
    (dy, and so dz and dxhat, load as zero there), so masked lanes add nothing to the row sums."""
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0)
    return _norm_bwd_terms(x, dy, mask, s, pivot, md, r_s, w, one_plus_scale, HAS_WEIGHT, HAS_MOD, MASKED, False)


@triton.jit
def _norm_bwd_terms(x, dy, mask, s, pivot, md, r_s, w, one_plus_scale, HAS_WEIGHT: tl.constexpr,
                    HAS_MOD: tl.constexpr, MASKED: tl.constexpr, SCALAR: tl.constexpr):  # fmt: skip
    """_norm_bwd_tile on tiles already loaded (masked lanes zero); SCALAR: scalar row stats (see _row_sum)."""
    x = x.to(tl.float32)
    dy = dy.to(tl.float32)
    xhat = _centred(x, s, pivot, md, SCALAR) * _col(r_s, SCALAR)
    if MASKED:
        xhat = tl.where(mask, xhat, 0.0)
    dz = dy
    if HAS_MOD:
        dz = dy * one_plus_scale[None, :]
    dxhat = dz
    if HAS_WEIGHT:
        dxhat = dz * w[None, :]
    return dy, xhat, dz, dxhat


@triton.jit
def _load_norm_bwd_rows(x_ptr, dy_ptr, stats_ptr, rows, rmask, cols, tail, tmask, C,
                        HAS_TAIL: tl.constexpr, TAIL_C: tl.constexpr, SCALAR: tl.constexpr):  # fmt: skip
    """Everything a one-chunk row tile of the backward reads (x and dy as loaded, head and tail (zeros
    without HAS_TAIL), and the row stats, scalars with SCALAR), as one group of loads that a prefetch can
    issue early."""
    offs_h = rows[:, None] * C + cols[None, :]
    x_h = tl.load(x_ptr + offs_h, mask=rmask[:, None], other=0.0)
    dy_h = tl.load(dy_ptr + offs_h, mask=rmask[:, None], other=0.0)
    x_t = tl.zeros([rows.shape[0], TAIL_C], dtype=x_ptr.dtype.element_ty)
    dy_t = tl.zeros([rows.shape[0], TAIL_C], dtype=dy_ptr.dtype.element_ty)
    if HAS_TAIL:
        mask_t = rmask[:, None] & tmask[None, :]
        offs_t = rows[:, None] * C + tail[None, :]
        x_t = tl.load(x_ptr + offs_t, mask=mask_t, other=0.0)
        dy_t = tl.load(dy_ptr + offs_t, mask=mask_t, other=0.0)
    s, pivot, md, r_s, rstd = _load_stats(stats_ptr, rows, rmask)
    s, pivot, md = _as_rows(s, SCALAR), _as_rows(pivot, SCALAR), _as_rows(md, SCALAR)
    r_s, rstd = _as_rows(r_s, SCALAR), _as_rows(rstd, SCALAR)
    return x_h, dy_h, x_t, dy_t, s, pivot, md, r_s, rstd


@triton.jit
def _norm_bwd_dx(xhat, dxhat, rstd, c1, c2, CENTER: tl.constexpr, SCALAR: tl.constexpr):
    """dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), no mean(dxhat) term for RMSNorm."""
    if CENTER:
        dx = _col(rstd, SCALAR) * (dxhat - _col(c1, SCALAR) - xhat * _col(c2, SCALAR))
    else:
        dx = _col(rstd, SCALAR) * (dxhat - xhat * _col(c2, SCALAR))
    return dx


@triton.jit
def _norm_bwd_accumulate(acc_shift, acc_scale, acc_w, acc_b, dy, xhat, dz, w, b, HAS_WEIGHT: tl.constexpr,
                         HAS_BIAS: tl.constexpr, HAS_MOD: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_C: tl.constexpr, ACC_ROWS: tl.constexpr):  # fmt: skip
    """The column sums a tile adds: dy (d shift), dy * z (d scale), dz * xhat (d weight), dz (d bias); only
    those the flags need are computed (the others stay as they are)."""
    if HAS_MOD:
        z = xhat
        if HAS_WEIGHT:
            z = z * w[None, :]
        if HAS_BIAS:
            z = z + b[None, :]
        acc_shift += _fold_rows(dy, BLOCK_M, BLOCK_C, ACC_ROWS)
        acc_scale += _fold_rows(dy * z, BLOCK_M, BLOCK_C, ACC_ROWS)
    if HAS_WEIGHT:
        acc_w += _fold_rows(dz * xhat, BLOCK_M, BLOCK_C, ACC_ROWS)
    if HAS_BIAS:
        acc_b += _fold_rows(dz, BLOCK_M, BLOCK_C, ACC_ROWS)
    return acc_shift, acc_scale, acc_w, acc_b


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
    rows_per_split,
    HAS_WEIGHT: tl.constexpr,
    HAS_MOD: tl.constexpr,
    INTERLEAVE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Rows wider than one register tile, program (group g, split): the row means mean(dxhat) and
    mean(dxhat * xhat) that dx needs, into rowsum (2, R) fp32, chunk by chunk."""
    g = tl.program_id(0).to(tl.int64)
    start, end, step = _split_rows(tl.program_id(1), tl.num_programs(1), rows_per_split, group_len, BLOCK_M, INTERLEAVE)
    base = g * group_len
    for r0 in range(start, end, step):
        local = r0 + tl.arange(0, BLOCK_M)
        rmask = local < end
        rows = base + local
        s, pivot, md, r_s, rstd = _load_stats(stats_ptr, rows, rmask)
        c1 = tl.zeros([BLOCK_M], dtype=tl.float32)
        c2 = tl.zeros([BLOCK_M], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            cmask = cols < C
            mask = rmask[:, None] & cmask[None, :]
            w = _vector(w_ptr, cols, cmask, 1.0, HAS_WEIGHT)
            sc = 1.0 + _vector(scale_ptr + g * C, cols, cmask, 0.0, HAS_MOD)
            offs = rows[:, None] * C + cols[None, :]
            dy, xhat, dz, dxhat = _norm_bwd_tile(
                x_ptr, dy_ptr, offs, mask, s, pivot, md, r_s, w, sc, HAS_WEIGHT, HAS_MOD, True
            )
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
    CHUNKED: tl.constexpr,
    HAS_TAIL: tl.constexpr,
    PREFETCH: tl.constexpr,
    INTERLEAVE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    TAIL_C: tl.constexpr,
    ACC_ROWS: tl.constexpr,
    TAIL_ACC_ROWS: tl.constexpr,
    LAUNCH_DEPENDENTS: tl.constexpr,
):
    """Backward of the norm kernel for program (group g, split, column block), one pass over x and dy:
      dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))   (no mean(dxhat) term for RMSNorm)
    and the fp32 partial column sums over its rows, part (4, n_groups, n_splits, C):
      [0] sum dy (d shift), [1] sum dy * z (d scale), [2] sum dz * xhat (d weight), [3] sum dz (d bias).
    Unless CHUNKED a row is a head of BLOCK_C columns plus, with HAS_TAIL, a masked tail of TAIL_C (as in
    the forward) and the row means are computed here; CHUNKED: the column block is a chunk of BLOCK_C and
    rowsum holds the row means. PREFETCH (not with CHUNKED): the next row tile's x, dy and stats are loaded
    before the current tile's row sums, dx and column sums. LAUNCH_DEPENDENTS: let the partials' sum, a
    programmatic dependent (see _dependent_launch), launch now; it waits for this kernel to finish."""
    SCALAR: tl.constexpr = BLOCK_M == 1 and not CHUNKED  # one row per tile: its values as scalars (see _row_sum)
    if LAUNCH_DEPENDENTS:
        gdc_launch_dependents()
    g = tl.program_id(0)
    split = tl.program_id(1)
    start, end, step = _split_rows(split, n_splits, rows_per_split, group_len, BLOCK_M, INTERLEAVE)
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    tail = BLOCK_C + tl.arange(0, TAIL_C)
    tmask = tail < C
    mod_row = g.to(tl.int64) * C
    # Loaded once: every row of this program belongs to group g.
    w_h = _vector(w_ptr, cols, cmask, 1.0, HAS_WEIGHT)
    b_h = _vector(b_ptr, cols, cmask, 0.0, HAS_BIAS)
    sc_h = 1.0 + _vector(scale_ptr + mod_row, cols, cmask, 0.0, HAS_MOD)
    w_t = _vector(w_ptr, tail, tmask, 1.0, HAS_WEIGHT and HAS_TAIL)
    b_t = _vector(b_ptr, tail, tmask, 0.0, HAS_BIAS and HAS_TAIL)
    sc_t = 1.0 + _vector(scale_ptr + mod_row, tail, tmask, 0.0, HAS_MOD and HAS_TAIL)
    base = g.to(tl.int64) * group_len
    # Only the accumulators the flags need are used; the others are never touched after this.
    acc_shift = tl.zeros([ACC_ROWS, BLOCK_C], dtype=tl.float32)
    acc_scale = tl.zeros([ACC_ROWS, BLOCK_C], dtype=tl.float32)
    acc_w = tl.zeros([ACC_ROWS, BLOCK_C], dtype=tl.float32)
    acc_b = tl.zeros([ACC_ROWS, BLOCK_C], dtype=tl.float32)
    tacc_shift = tl.zeros([TAIL_ACC_ROWS, TAIL_C], dtype=tl.float32)
    tacc_scale = tl.zeros([TAIL_ACC_ROWS, TAIL_C], dtype=tl.float32)
    tacc_w = tl.zeros([TAIL_ACC_ROWS, TAIL_C], dtype=tl.float32)
    tacc_b = tl.zeros([TAIL_ACC_ROWS, TAIL_C], dtype=tl.float32)
    if PREFETCH:
        first, first_mask = _row_tile(base, start, end, BLOCK_M)
        # Loop-carried as separate values (n* = the next tile), not one tuple.
        nx_h, ndy_h, nx_t, ndy_t, ns, npivot, nmd, nr_s, nrstd = _load_norm_bwd_rows(
            x_ptr, dy_ptr, stats_ptr, first, first_mask, cols, tail, tmask, C, HAS_TAIL, TAIL_C, SCALAR
        )
    for r0 in range(start, end, step):
        rows, rmask = _row_tile(base, r0, end, BLOCK_M)
        mask_h = rmask[:, None]  # broadcast over the head's columns, all < C unless chunked
        if CHUNKED:
            mask_h = mask_h & cmask[None, :]
        offs_h = rows[:, None] * C + cols[None, :]
        mask_t = rmask[:, None] & tmask[None, :]
        offs_t = rows[:, None] * C + tail[None, :]
        if CHUNKED:
            s, pivot, md, r_s, rstd = _load_stats(stats_ptr, rows, rmask)
            dy, xhat, dz, dxhat = _norm_bwd_tile(
                x_ptr, dy_ptr, offs_h, mask_h, s, pivot, md, r_s, w_h, sc_h, HAS_WEIGHT, HAS_MOD, True
            )
        else:
            if PREFETCH:
                x_h, dy_h, x_t, dy_t, s, pivot, md, r_s, rstd = nx_h, ndy_h, nx_t, ndy_t, ns, npivot, nmd, nr_s, nrstd
                next_rows, next_mask = _row_tile(base, r0 + step, end, BLOCK_M)
                nx_h, ndy_h, nx_t, ndy_t, ns, npivot, nmd, nr_s, nrstd = _load_norm_bwd_rows(
                    x_ptr,
                    dy_ptr,
                    stats_ptr,
                    next_rows,
                    next_mask,
                    cols,
                    tail,
                    tmask,
                    C,
                    HAS_TAIL,
                    TAIL_C,
                    SCALAR,
                )
            else:
                x_h, dy_h, x_t, dy_t, s, pivot, md, r_s, rstd = _load_norm_bwd_rows(
                    x_ptr, dy_ptr, stats_ptr, rows, rmask, cols, tail, tmask, C, HAS_TAIL, TAIL_C, SCALAR
                )
            dy, xhat, dz, dxhat = _norm_bwd_terms(
                x_h, dy_h, mask_h, s, pivot, md, r_s, w_h, sc_h, HAS_WEIGHT, HAS_MOD, False, SCALAR
            )
            if HAS_TAIL:
                dy_t, xhat_t, dz_t, dxhat_t = _norm_bwd_terms(
                    x_t, dy_t, mask_t, s, pivot, md, r_s, w_t, sc_t, HAS_WEIGHT, HAS_MOD, True, SCALAR
                )
        if CHUNKED:
            c1 = tl.load(rowsum_ptr + rows, mask=rmask, other=0.0)
            c2 = tl.load(rowsum_ptr + n_rows + rows, mask=rmask, other=0.0)
        else:
            c2 = _row_sum(dxhat * xhat, SCALAR)
            c1 = _row_sum(dxhat, SCALAR)
            if HAS_TAIL:
                c2 += _row_sum(dxhat_t * xhat_t, SCALAR)
                c1 += _row_sum(dxhat_t, SCALAR)
            c2 = c2 / C
            c1 = c1 / C
        dx = _norm_bwd_dx(xhat, dxhat, rstd, c1, c2, CENTER, SCALAR)
        tl.store(dx_ptr + offs_h, dx.to(dx_ptr.dtype.element_ty), mask=mask_h)
        acc_shift, acc_scale, acc_w, acc_b = _norm_bwd_accumulate(
            acc_shift, acc_scale, acc_w, acc_b, dy, xhat, dz, w_h, b_h,
            HAS_WEIGHT, HAS_BIAS, HAS_MOD, BLOCK_M, BLOCK_C, ACC_ROWS,
        )  # fmt: skip
        if HAS_TAIL:
            dx_t = _norm_bwd_dx(xhat_t, dxhat_t, rstd, c1, c2, CENTER, SCALAR)
            tl.store(dx_ptr + offs_t, dx_t.to(dx_ptr.dtype.element_ty), mask=mask_t)
            tacc_shift, tacc_scale, tacc_w, tacc_b = _norm_bwd_accumulate(
                tacc_shift, tacc_scale, tacc_w, tacc_b, dy_t, xhat_t, dz_t, w_t, b_t,
                HAS_WEIGHT, HAS_BIAS, HAS_MOD, BLOCK_M, TAIL_C, TAIL_ACC_ROWS,
            )  # fmt: skip
    plane = n_groups * n_splits * C
    out = (g * n_splits + split).to(tl.int64) * C
    _store_partials(part_ptr, plane, out + cols, cmask, acc_shift, acc_scale, acc_w, acc_b,
                    HAS_WEIGHT, HAS_BIAS, HAS_MOD)  # fmt: skip
    if HAS_TAIL:
        _store_partials(part_ptr, plane, out + tail, tmask, tacc_shift, tacc_scale, tacc_w, tacc_b,
                        HAS_WEIGHT, HAS_BIAS, HAS_MOD)  # fmt: skip


@triton.jit
def _store_partials(part_ptr, plane, offs, cmask, acc_shift, acc_scale, acc_w, acc_b, HAS_WEIGHT: tl.constexpr,
                    HAS_BIAS: tl.constexpr, HAS_MOD: tl.constexpr):  # fmt: skip
    if HAS_MOD:
        tl.store(part_ptr + offs, tl.sum(acc_shift, axis=0), mask=cmask)
        tl.store(part_ptr + plane + offs, tl.sum(acc_scale, axis=0), mask=cmask)
    if HAS_WEIGHT:
        tl.store(part_ptr + 2 * plane + offs, tl.sum(acc_w, axis=0), mask=cmask)
    if HAS_BIAS:
        tl.store(part_ptr + 3 * plane + offs, tl.sum(acc_b, axis=0), mask=cmask)


@triton.jit
def _sum_partials_kernel(part_ptr, chunk_ptr, count_ptr, out_ptr, n_splits, rows_per_chunk, n_chunks, C,
                         TWO_LEVEL: tl.constexpr, SUB: tl.constexpr, BLOCK_C: tl.constexpr,
                         DEPENDENT: tl.constexpr):  # fmt: skip
    """out[r] = the sum over s of part[r, s] (part (R, n_splits, C) fp32 -> out (R, C)) for program (r, chunk k,
    column block): the chunk's splits [k * rows_per_chunk, ...) are summed SUB at a time as [SUB, BLOCK_C]
    tiles, so many programs share the reads. TWO_LEVEL (n_chunks > 1, at most SUB): each chunk's sum goes to
    chunk[r, k], and the last program of the (r, column block) to finish (see _last_of_group) sums those as
    one tile. Every sum has a fixed order: the result does not depend on which program finished last.
    DEPENDENT: launched as a programmatic dependent of the kernel that writes `part` (see _sum_partials): wait
    until that kernel has finished and its writes are visible."""
    if DEPENDENT:
        gdc_wait()
    r = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1)
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    start = k * rows_per_chunk
    end = tl.minimum(start + rows_per_chunk, n_splits)
    total = tl.zeros([BLOCK_C], dtype=tl.float32)
    for s0 in range(start, end, SUB):
        splits = s0 + tl.arange(0, SUB)
        offs = (r * n_splits + splits[:, None]) * C + cols[None, :]
        total += tl.sum(tl.load(part_ptr + offs, mask=(splits < end)[:, None] & cmask[None, :], other=0.0), axis=0)
    if TWO_LEVEL:
        tl.store(chunk_ptr + (r * n_chunks + k) * C + cols, total, mask=cmask)
        if _last_of_group(count_ptr, r * tl.num_programs(2) + tl.program_id(2), n_chunks):
            chunks = tl.arange(0, SUB)
            offs = (r * n_chunks + chunks[:, None]) * C + cols[None, :]
            mask = (chunks < n_chunks)[:, None] & cmask[None, :]
            total = tl.sum(tl.load(chunk_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg"), axis=0)
            tl.store(out_ptr + r * C + cols, total, mask=cmask)
    else:
        tl.store(out_ptr + r * C + cols, total, mask=cmask)


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


def _prev_pow2(n: int) -> int:
    return 1 << max(0, n.bit_length() - 1)


@functools.cache
def _sm_count(device_type: str, index: int | None) -> int:
    """Streaming multiprocessors of a CUDA device; 1 elsewhere (the interpreter runs programs one by one)."""
    if device_type == "cuda":
        return torch.cuda.get_device_properties(index or 0).multi_processor_count
    return 1


@dataclass(frozen=True)
class _Blocks:
    """A pass's launch at one channel count (see PassLaunch): a [block_m, block_c] row tile (norms: the row's
    head, or a chunk when chunked) plus, for norms, a [block_m, tail_c] tail (tail_c 0: none)."""

    block_m: int
    block_c: int
    tail_c: int
    chunked: bool
    num_warps: int
    num_stages: int

    def acc_rows(self, columns: int, elem_size: int) -> int:
        """Rows of one repetition of Triton's default layout of a [block_m, columns] tile (16-byte vectors,
        then threads, then warps fill the columns first): folding a tile down to these rows stays in
        registers (see _fold_rows)."""
        vec = max(1, 16 // elem_size)
        return max(1, min(self.block_m, self.num_warps * 32 * vec // columns))


def _num_warps(params: PassLaunch, tile_elems: int) -> int:
    # At most 8: 16 warps cap a thread at 128 registers, which the chunked norm backward exceeds (spills).
    return max(1, min(8, _prev_pow2(max(1, tile_elems // params.warp_elems))))


def _check_pow2(params: PassLaunch) -> None:
    if params.block_c != _next_pow2(params.block_c) or params.tile != _next_pow2(params.tile):
        raise ValueError(f"tile and block_c must be powers of two, got {params}")


@functools.cache
def elementwise_blocks(params: PassLaunch, channels: int, group_len: int) -> _Blocks:
    """Column blocks of up to block_c; rows per tile from the tile size, no more than a group has."""
    _check_pow2(params)
    block_c = min(_next_pow2(channels), params.block_c)
    block_m = max(1, min(params.tile // block_c, _next_pow2(group_len)))
    return _Blocks(block_m, block_c, 0, False, _num_warps(params, block_m * block_c), params.num_stages)


@functools.cache
def norm_blocks(params: PassLaunch, channels: int, group_len: int) -> _Blocks:
    """Rows up to block_c wide as a power-of-two head and tail in registers (1152 = 1024 + 128, 72 = 64 + 8);
    wider rows in chunks of block_c. Rows per tile from the tile size over the head."""
    _check_pow2(params)
    chunked = channels > params.block_c
    head = params.block_c if chunked else _prev_pow2(channels)
    tail = 0 if chunked or channels == head else _next_pow2(channels - head)
    block_m = max(1, min(params.tile // head, _next_pow2(group_len)))
    return _Blocks(block_m, head, tail, chunked, _num_warps(params, block_m * head), params.num_stages)


@functools.cache  # launch plans are recomputed for every call otherwise: host time that sampling waits on
def _splits(
    group_len: int, n_groups: int, n_col_blocks: int, blocks: _Blocks, params: PassLaunch, device: torch.device
) -> tuple[int, int]:
    """(n_splits, rows_per_split): each group's rows are cut into splits of whole BLOCK_M tiles, enough that
    the grid has up to programs_per_sm programs per SM (not more: where that is as many as fit, a few more
    would run as a second wave, after the rest), at least one split per group and one tile per split."""
    programs = params.programs_per_sm * _sm_count(device.type, device.index)
    want = max(1, min(programs // (n_groups * n_col_blocks), 65535))  # a grid's second dim is < 2^16
    splits = max(1, min(triton.cdiv(group_len, blocks.block_m), want))
    rows_per_split = triton.cdiv(triton.cdiv(group_len, splits), blocks.block_m) * blocks.block_m
    return triton.cdiv(group_len, rows_per_split), rows_per_split


def _launch_scale_add(
    x: Tensor, m: Tensor, add: Tensor, one_plus: bool, add_per_group: bool, out_dtype, params: PassLaunch
) -> Tensor:
    """x (B, M, C), m (B, G, C), add (B, G, C) or (B, M, C) -> x * (1 + m) + add or x * m + add."""
    x, m, add = x.contiguous(), m.contiguous(), add.contiguous()
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    if out.numel() == 0:
        return out
    batch, tokens, channels = x.shape
    n_groups, group_len = batch * m.shape[1], tokens // m.shape[1]
    blocks = elementwise_blocks(params, channels, group_len)
    n_col_blocks = triton.cdiv(channels, blocks.block_c)
    n_splits, rows_per_split = _splits(group_len, n_groups, n_col_blocks, blocks, params, x.device)
    _launch(_scale_add_fwd_kernel, x)[(n_groups, n_splits, n_col_blocks)](
        x, m, add, out, channels, group_len, rows_per_split,
        ONE_PLUS=one_plus, ADD_PER_GROUP=add_per_group, INTERLEAVE=params.interleave, BLOCK_M=blocks.block_m,
        BLOCK_C=blocks.block_c, num_warps=blocks.num_warps, num_stages=blocks.num_stages,
    )  # fmt: skip
    return out


def _planes(sums: Tensor) -> list[Tensor]:
    """The planes of one stacked reduction as tensors that share no memory: the outputs of a custom op may
    not alias each other (torch checks it whenever the op runs through the dispatcher)."""
    return [sums[0], *(plane.clone() for plane in sums[1:])]


def _launch_scale_bwd(
    dy: Tensor, x: Tensor, m: Tensor, one_plus: bool, sum_dy: bool, params: PassLaunch
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
    blocks = elementwise_blocks(params, channels, group_len)
    n_col_blocks = triton.cdiv(channels, blocks.block_c)
    n_splits, rows_per_split = _splits(group_len, n_groups, n_col_blocks, blocks, params, x.device)
    part = torch.empty((2, n_groups, n_splits, channels), dtype=torch.float32, device=x.device)
    dm = torch.empty(m.shape, dtype=torch.float32, device=x.device)
    dadd = torch.empty(m.shape, dtype=torch.float32, device=x.device) if sum_dy else None
    counts = torch.zeros(n_groups * n_col_blocks, dtype=torch.int32, device=x.device)  # see _last_of_group
    _launch(_scale_add_bwd_kernel, x)[(n_groups, n_splits, n_col_blocks)](
        dy, x, m, dx, part, dm, dm if dadd is None else dadd, counts, channels, group_len, rows_per_split,
        n_splits, n_groups, ONE_PLUS=one_plus, SUM_DY=sum_dy, INTERLEAVE=params.interleave, BLOCK_M=blocks.block_m,
        BLOCK_C=blocks.block_c,
        ACC_ROWS=blocks.acc_rows(blocks.block_c, x.element_size()), **_dependent_args(x),
        num_warps=blocks.num_warps, num_stages=blocks.num_stages,
    )  # fmt: skip
    return dx, dm, dadd


def partial_chunks(n_splits: int, sub: int) -> tuple[int, int]:
    """(rows_per_chunk, n_chunks) of _sum_partials over n_splits: chunks of a multiple of `sub` splits, at
    most `sub` chunks (the second level sums them as one [sub, block_c] tile)."""
    rows_per_chunk = sub * max(1, triton.cdiv(triton.cdiv(n_splits, sub), sub))
    return rows_per_chunk, triton.cdiv(n_splits, rows_per_chunk)


def _sum_partials(part: Tensor, sub: int = 64, block_c: int = 32) -> Tensor:
    """(R, S, C) fp32 partial sums (contiguous) -> their (R, C) sums over S, in one launch (see
    _sum_partials_kernel and partial_chunks): on an H200 a torch reduction of the norm backwards' partials
    took 1.6-2.5 us more, and for S in the thousands also a memset launch."""
    rows, n_splits, channels = part.shape
    out = torch.empty((rows, channels), dtype=torch.float32, device=part.device)
    if out.numel() == 0 or n_splits == 0:
        return out.zero_()
    rows_per_chunk, n_chunks = partial_chunks(n_splits, sub)
    n_col_blocks = triton.cdiv(channels, block_c)
    two_level = n_chunks > 1
    chunks, counts = out, out  # placeholders, never touched with one level
    if two_level:
        chunks = torch.empty((rows, n_chunks, channels), dtype=torch.float32, device=part.device)
        counts = torch.zeros(rows * n_col_blocks, dtype=torch.int32, device=part.device)  # see _last_of_group
    _launch(_sum_partials_kernel, part)[(rows, n_chunks, n_col_blocks)](
        part, chunks, counts, out, n_splits, rows_per_chunk, n_chunks, channels,
        TWO_LEVEL=two_level, SUB=sub, BLOCK_C=block_c, **_dependent_args(part), num_warps=4,
    )  # fmt: skip
    return out


@functools.cache
def _pdl_capable(device_type: str, index: int | None) -> bool:
    """Compiled kernels (a Triton with grid dependency control; under TRITON_INTERPRET, Triton's jit makes
    interpreted functions, not JITFunctions) on a Hopper or newer GPU."""
    return (
        device_type == "cuda"
        and gdc_wait is not None
        and isinstance(_sum_partials_kernel, triton.runtime.JITFunction)
        and torch.cuda.get_device_capability(index) >= (9, 0)
    )


def _dependent_launch(probe: Tensor) -> bool:
    """Whether a kernel may be launched as a programmatic dependent of the previous kernel on probe's stream
    (CUDA's PDL: its programs start while that kernel's last ones still run, and wait in gdc_wait before
    they touch what it writes): where _pdl_capable, and not while torch.compile traces (it launches the
    kernels itself). It saves the ~2 us launch gap between the two kernels."""
    return _pdl_capable(probe.device.type, probe.device.index) and not _tracing(probe)


def _dependent_args(probe: Tensor) -> dict:
    """The launch arguments of a kernel with a DEPENDENT flag (it calls gdc_wait when set): launched as a
    programmatic dependent where _dependent_launch allows, in order otherwise."""
    if _dependent_launch(probe):
        return {"DEPENDENT": True, "launch_pdl": True}
    return {"DEPENDENT": False}


def _tail_flags(blocks: _Blocks) -> dict:
    """HAS_TAIL and a TAIL_C that is a valid block size (1) where there is no tail."""
    return dict(HAS_TAIL=blocks.tail_c > 0, TAIL_C=max(1, blocks.tail_c))


def _launch_norm_fwd(
    x2d, weight, bias, shift, scale, group_len, eps, center, out_dtype, params: PassLaunch
) -> tuple[Tensor, Tensor]:
    """x2d (R, C); shift/scale (R // group_len, C) or None. Returns y (R, C) and the stats (R, STATS_WIDTH)."""
    n_rows, channels = x2d.shape
    y = torch.empty((n_rows, channels), dtype=out_dtype, device=x2d.device)
    stats = torch.empty((n_rows, STATS_WIDTH.value), dtype=torch.float32, device=x2d.device)
    if y.numel() == 0:
        return y, stats
    blocks = norm_blocks(params, channels, group_len)
    n_groups = n_rows // group_len
    n_splits, rows_per_split = _splits(group_len, n_groups, 1, blocks, params, x2d.device)
    inv_sqrt_eps = 1.0 / math.sqrt(eps) if eps > 0 else 0.0
    _launch(_norm_fwd_kernel, x2d)[(n_groups, n_splits)](
        x2d, x2d if weight is None else weight, x2d if bias is None else bias,
        x2d if shift is None else shift, x2d if scale is None else scale, y, stats,
        channels, group_len, rows_per_split, eps, inv_sqrt_eps,
        CENTER=center, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, HAS_MOD=scale is not None,
        CHUNKED=blocks.chunked, **_tail_flags(blocks), PREFETCH=params.prefetch and not blocks.chunked,
        INTERLEAVE=params.interleave, BLOCK_M=blocks.block_m, BLOCK_C=blocks.block_c, num_warps=blocks.num_warps,
        num_stages=blocks.num_stages, maxnreg=params.max_registers,
    )  # fmt: skip
    return y, stats


def _launch_norm_bwd(
    dy2d, x2d, weight, bias, scale, stats, group_len, center, params: PassLaunch
) -> tuple[Tensor, Tensor]:
    """dx (R, C) in x's dtype and the fp32 partial sums (4, n_groups, n_splits, C) (see _norm_bwd_kernel)."""
    n_rows, channels = x2d.shape
    n_groups = n_rows // group_len if group_len else 0
    dx = torch.empty_like(x2d)
    if x2d.numel() == 0:
        return dx, torch.zeros((4, n_groups, 1, channels), dtype=torch.float32, device=x2d.device)
    blocks = norm_blocks(params, channels, group_len)
    flags = dict(
        HAS_WEIGHT=weight is not None, HAS_MOD=scale is not None, INTERLEAVE=params.interleave, BLOCK_M=blocks.block_m
    )
    launch = dict(num_warps=blocks.num_warps, num_stages=blocks.num_stages, maxnreg=params.max_registers)
    w = x2d if weight is None else weight
    sc = x2d if scale is None else scale
    n_col_blocks = triton.cdiv(channels, blocks.block_c) if blocks.chunked else 1
    n_splits, rows_per_split = _splits(group_len, n_groups, n_col_blocks, blocks, params, x2d.device)
    rowsum = stats  # unused placeholder when a row fits in registers
    if blocks.chunked:
        rowsum = torch.empty((2, n_rows), dtype=torch.float32, device=x2d.device)
        _launch(_norm_bwd_rowsum_kernel, x2d)[(n_groups, n_splits)](
            dy2d, x2d, w, sc, stats, rowsum, n_rows, channels, group_len, rows_per_split,
            **flags, BLOCK_C=blocks.block_c, **launch,
        )  # fmt: skip
    # Planes that a configuration does not compute stay uninitialised and are never read.
    part = torch.empty((4, n_groups, n_splits, channels), dtype=torch.float32, device=x2d.device)
    esize = x2d.element_size()
    _launch(_norm_bwd_kernel, x2d)[(n_groups, n_splits, n_col_blocks)](
        dy2d, x2d, w, x2d if bias is None else bias, sc, stats, rowsum, dx, part,
        n_rows, channels, group_len, rows_per_split, n_splits, n_groups,
        CENTER=center, HAS_BIAS=bias is not None, CHUNKED=blocks.chunked, **_tail_flags(blocks),
        PREFETCH=params.prefetch and not blocks.chunked, **flags,
        BLOCK_C=blocks.block_c, ACC_ROWS=blocks.acc_rows(blocks.block_c, esize),
        TAIL_ACC_ROWS=blocks.acc_rows(max(1, blocks.tail_c), esize), LAUNCH_DEPENDENTS=_dependent_launch(x2d),
        **launch,
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
    return _launch_scale_add(x, scale, shift, True, True, x.dtype, LAUNCH.modulate_fwd)


_modulate_op = _custom_op("modulate", _modulate_impl)


def _modulate_backward_impl(dy: Tensor, x: Tensor, scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    dx, dscale, dshift = _launch_scale_bwd(dy, x, scale, True, True, LAUNCH.modulate_bwd)
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
    return _launch_scale_add(h, gate, residual, False, False, residual.dtype, LAUNCH.gate_residual_fwd)


_gate_residual_op = _custom_op("gate_residual", _gate_residual_impl)


def _gate_residual_backward_impl(dout: Tensor, gate: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
    dh, dgate, _ = _launch_scale_bwd(dout, h, gate, False, False, LAUNCH.gate_residual_bwd)
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
        LAUNCH.layernorm_modulate_fwd,
    )
    return y.reshape(batch, tokens, channels), stats


_layernorm_modulate_op = _custom_op("layernorm_modulate", _layernorm_modulate_impl)


def _layernorm_modulate_backward_impl(
    dy: Tensor, x: Tensor, scale: Tensor, weight: Tensor | None, bias: Tensor | None, stats: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dx, the fp32 (dshift, dscale) stacked as (2, B, G, C) (one output: split into two, they would need a
    copy, since the outputs of a custom op may not alias), and fp32 dweight, dbias (C,) (empty where weight /
    bias is None)."""
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
        LAUNCH.layernorm_modulate_bwd,
    )
    # One reduction launch for the modulation planes (over each group's splits) and one for the affine planes
    # present (over every group's splits).
    mod_sums = _sum_partials(part[:2].reshape(-1, *part.shape[2:]))  # (2 * n_groups, C)
    affine = [i for i, t in ((2, weight), (3, bias)) if t is not None]
    if affine:
        affine_part = part[affine[0] : affine[-1] + 1]
        affine_sums = _planes(_sum_partials(affine_part.reshape(len(affine_part), -1, channels)))
    # An absent weight or bias gets its own empty tensor: outputs of a custom op may not alias each other.
    dw = affine_sums[0] if weight is not None else x.new_empty(0, dtype=torch.float32)
    db = affine_sums[-1] if bias is not None else x.new_empty(0, dtype=torch.float32)
    return dx.reshape(x.shape), mod_sums.reshape(2, *scale.shape), dw, db


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
    dx, dmod, dw, db = _traced_or_eager(_layernorm_modulate_backward_op, _layernorm_modulate_backward_impl, dy)(
        dy, x, scale, weight, bias, stats
    )
    return (
        dx,
        dmod[0].to(ctx.shift_dtype),
        dmod[1].to(scale.dtype),
        None if weight is None else dw.to(weight.dtype),
        None if bias is None else db.to(bias.dtype),
        None,
        None,
    )


_layernorm_modulate_op.register_autograd(_layernorm_modulate_backward, setup_context=_layernorm_modulate_setup)


def _rms_norm_impl(x: Tensor, weight: Tensor, eps: float, out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """x (R, C)."""
    return _launch_norm_fwd(
        x.contiguous(), weight.contiguous(), None, None, None, max(1, x.shape[0]), eps, False, out_dtype,
        LAUNCH.rms_norm_fwd,
    )  # fmt: skip


_rms_norm_op = _custom_op("rms_norm", _rms_norm_impl)


def _rms_norm_backward_impl(dy: Tensor, x: Tensor, weight: Tensor, stats: Tensor) -> tuple[Tensor, Tensor]:
    # One group of all rows: the splits alone spread the weight-gradient reduction over the device.
    dx, part = _launch_norm_bwd(
        dy.contiguous(), x.contiguous(), weight.contiguous(), None, None, stats, x.shape[0], False,
        LAUNCH.rms_norm_bwd,
    )  # fmt: skip
    return dx, _sum_partials(part[2].reshape(1, -1, part.shape[-1]))[0]


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
    if not torch.is_grad_enabled():  # sampling: nothing to record, skip autograd's CPU cost
        return spec.impl(*inputs)
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
