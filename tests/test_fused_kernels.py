"""The fused Triton kernels (videosys.ops.fused) against their torch references: outputs and the gradient of
every input, for per-sample and per-group modulation, ragged and wide rows, non-contiguous and expanded
inputs, fp32 / bf16 / fp16 and mixed dtypes; finite results on huge, constant and all-zero rows; shape errors.

On a CPU the kernels run through the Triton interpreter (conftest sets TRITON_INTERPRET=1 where there is no
CUDA), so the shapes stay small; the same bodies run on a GPU as the `gpu` cases."""

from __future__ import annotations

import contextlib
import dataclasses
import os

import pytest
import torch

from videosys.ops import fused
from videosys.ops.fused import (
    LaunchParams,
    PassLaunch,
    fused_gate_residual,
    fused_layernorm_modulate,
    fused_modulate,
    fused_rms_norm,
    gate_residual_reference,
    layernorm_modulate_reference,
    modulate_reference,
    rms_norm_reference,
)

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16

DEVICES = [
    pytest.param(
        "cpu",
        marks=pytest.mark.skipif(
            os.environ.get("TRITON_INTERPRET") != "1", reason="CPU tensors need the Triton interpreter"
        ),
    ),
    pytest.param(
        "cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")],
    ),
]

# Tolerances of a result stored in each dtype against the reference (fp32 compute, unrounded), as
# assert_close's rtol, and atol as a fraction of the largest |reference| entry of that tensor.
# - fp32: kernel and reference differ only in the order of fp32 operations (row sums over C <= 5000):
#   a few ulps, 1e-5 relative.
# - bf16 / fp16: the kernel computes in fp32 and rounds once to the stored dtype, so it is within half an
#   ulp of the exact value; rtol allows 2 ulps (bf16: 8 significant bits, ulp <= 2^-7 relative; fp16: 11
#   bits, ulp <= 2^-10).
# - atol (relative to the tensor's scale) covers entries near zero that come out of a cancellation (a
#   centred row, a gradient summed over tokens): their error is relative to the cancelled terms. In bf16 /
#   fp16 that is one ulp of the largest entry: autograd itself sums the (rounded) gradients of an expanded
#   input in that dtype.
TOL = {
    F32: dict(rtol=1e-5, atol=1e-6),
    BF16: dict(rtol=2 * 2**-7, atol=2**-7),
    F16: dict(rtol=2 * 2**-10, atol=2**-10),
}
# Gradients reduced over tokens (shift, scale, gate, weight, bias) are sums of up to a few hundred fp32
# terms, summed in a different order (blocks of rows, then partials) than the reference: allow that
# accumulation-order error on top, as a fraction of the tensor's scale.
REDUCED_ATOL = 2e-5
EPS = 1e-6


def _leaf(shape, dtype, layout: str, scale: float = 1.0):
    """A random leaf tensor, and the view of it with shape `shape` and the given memory layout that is
    handed to the function (gradients reach the leaf through the view)."""
    shape = tuple(shape)
    if layout == "contiguous":
        return (scale * torch.randn(shape)).to(dtype), lambda t: t
    if layout == "strided":  # every other element of the last dim
        return (scale * torch.randn(*shape[:-1], 2 * shape[-1])).to(dtype), lambda t: t[..., ::2]
    if layout == "transposed":  # stored with the last two dims swapped
        return (scale * torch.randn(*shape[:-2], shape[-1], shape[-2])).to(dtype), lambda t: t.transpose(-1, -2)
    if layout == "expanded":  # stride 0 over the first dim
        return (scale * torch.randn(1, *shape[1:])).to(dtype), lambda t: t.expand(shape)
    raise AssertionError(layout)


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, reduced: bool, what: str):
    tol = TOL[dtype]
    mag = expected.abs().max().item() if expected.numel() else 0.0
    atol = (tol["atol"] + (REDUCED_ATOL if reduced else 0.0)) * mag
    torch.testing.assert_close(
        actual.double(), expected.double(), rtol=tol["rtol"], atol=atol, msg=lambda m: f"{what}: {m}"
    )


def _check(fn, ref, args: list, kwargs: dict, device: str, reduced: set[int], sum_backward: bool = False):
    """fn(*args) and the gradients of its tensor args against ref(*fp32 copies). Each tensor arg is a
    (leaf, view) pair from _leaf; `reduced` holds the positions of the args whose gradient sums over tokens."""
    ours, theirs = [], []
    for arg in args:
        if isinstance(arg, tuple):
            leaf, view = arg
            theirs.append((leaf.to(device, F32, copy=True).requires_grad_(), view))
            ours.append((leaf.to(device, copy=True).requires_grad_(), view))
        else:
            ours.append(arg)
            theirs.append(arg)

    def call(f, inputs):
        return f(*[a[1](a[0]) if isinstance(a, tuple) else a for a in inputs], **kwargs)

    out, expected = call(fn, ours), call(ref, theirs)
    assert out.shape == expected.shape and out.device.type == device
    _assert_close(out, expected, out.dtype, False, "output")
    if sum_backward:  # the autograd engine then passes an expanded (stride 0) gradient
        out.sum().backward()
        expected.sum().backward()
    else:
        grad = torch.randn(out.shape).to(device, out.dtype)
        out.backward(grad)
        expected.backward(grad.to(expected.dtype))
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        if isinstance(a, tuple):
            assert a[0].grad is not None and a[0].grad.dtype == a[0].dtype, f"gradient of argument {i}"
            _assert_close(a[0].grad, b[0].grad, a[0].dtype, i in reduced, f"gradient of argument {i}")


# (x shape, G (None: (B, C) modulation), x dtype, dtype of the other tensors, layout of x, layout of the others)
CASES = {
    "fp32-ragged": ((2, 37, 72), None, F32, F32, "contiguous", "contiguous"),
    "bf16-frames": ((2, 3, 5, 100), 3, BF16, BF16, "contiguous", "contiguous"),
    "fp16-per-token": ((3, 7, 72), 7, F16, F16, "contiguous", "contiguous"),
    "bf16-x-fp32-mod-noncontiguous": ((2, 4, 9, 72), 4, BF16, F32, "transposed", "strided"),
    "fp32-x-bf16-mod-expanded": ((2, 37, 100), None, F32, BF16, "strided", "expanded"),
    "fp32-one-sample-many-rows": ((1, 300, 72), 2, F32, F32, "contiguous", "contiguous"),
    "fp32-wide": ((2, 3, 5000), None, F32, F32, "contiguous", "contiguous"),
    "bf16-wide-frames": ((1, 2, 2, 5000), 2, BF16, BF16, "transposed", "contiguous"),
    # Power-of-two rows (no tail); groups of 5 rows, fewer than a row tile.
    "fp32-pow2-short-groups": ((3, 40, 128), 8, F32, F32, "contiguous", "contiguous"),
    # 96 = 64 + 32: an exactly full tail; groups of 150 rows, split and not a multiple of a row tile.
    "bf16-exact-tail-long-groups": ((2, 2, 150, 96), 2, BF16, BF16, "contiguous", "contiguous"),
}


def _mod_shape(x_shape, groups):
    return (x_shape[0], x_shape[-1]) if groups is None else (x_shape[0], groups, x_shape[-1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
def test_modulate(case, device):
    torch.manual_seed(0)
    shape, groups, x_dtype, m_dtype, x_layout, m_layout = CASES[case]
    mod = _mod_shape(shape, groups)
    args = [_leaf(shape, x_dtype, x_layout), _leaf(mod, m_dtype, m_layout), _leaf(mod, m_dtype, "contiguous", 0.5)]
    _check(fused_modulate, modulate_reference, args, {}, device, reduced={1, 2})


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
def test_gate_residual(case, device):
    torch.manual_seed(1)
    shape, groups, x_dtype, m_dtype, x_layout, m_layout = CASES[case]
    args = [
        _leaf(shape, x_dtype, x_layout),
        _leaf(_mod_shape(shape, groups), m_dtype, m_layout),
        _leaf(shape, m_dtype, "contiguous"),  # h in the other dtype: residual bf16 + fp32 branch, or the reverse
    ]
    _check(fused_gate_residual, gate_residual_reference, args, {}, device, reduced={1})


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
def test_layernorm_modulate(case, device):
    torch.manual_seed(2)
    shape, groups, x_dtype, m_dtype, x_layout, m_layout = CASES[case]
    mod, channels = _mod_shape(shape, groups), shape[-1]
    args = [
        _leaf(shape, x_dtype, x_layout, scale=3.0),
        _leaf(mod, m_dtype, m_layout),
        _leaf(mod, m_dtype, "contiguous", 0.5),
        EPS,
        _leaf((channels,), m_dtype, "strided"),
        _leaf((channels,), m_dtype, "contiguous"),
    ]
    _check(fused_layernorm_modulate, layernorm_modulate_reference, args, {}, device, reduced={1, 2, 4, 5})


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("affine", ["none", "weight"])
def test_layernorm_modulate_without_affine_and_out_dtype(affine, device):
    """No bias (and no weight); bf16 input with an fp32 output, and a gradient that arrives expanded."""
    torch.manual_seed(3)
    shape = (2, 3, 11, 72)
    weight = [_leaf((72,), F32, "contiguous")] if affine == "weight" else []
    args = [_leaf(shape, BF16, "contiguous"), _leaf((2, 3, 72), F32, "contiguous"), _leaf((2, 3, 72), F32, "strided")]
    args += [EPS, *weight]
    _check(
        fused_layernorm_modulate,
        layernorm_modulate_reference,
        args,
        {"out_dtype": F32},
        device,
        reduced={1, 2, 4},
        sum_backward=True,
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [*CASES, "2d"])
def test_rms_norm(case, device):
    torch.manual_seed(4)
    if case == "2d":
        shape, x_dtype, w_dtype, x_layout = (45, 100), F16, F32, "transposed"
    else:
        shape, _, x_dtype, w_dtype, x_layout, _ = CASES[case]
    args = [_leaf(shape, x_dtype, x_layout, scale=2.0), _leaf((shape[-1],), w_dtype, "strided"), EPS]
    _check(fused_rms_norm, rms_norm_reference, args, {}, device, reduced={1})


def test_modulate_grad_of_sum_is_expanded_and_out_dtype_follows_x():
    """An expanded incoming gradient (y.sum().backward()) on the CPU path, bf16 x with fp32 modulation."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU tensors need the Triton interpreter")
    torch.manual_seed(5)
    args = [_leaf((2, 37, 72), BF16, "contiguous"), _leaf((2, 72), F32, "expanded"), _leaf((2, 72), F32, "contiguous")]
    _check(fused_modulate, modulate_reference, args, {}, "cpu", reduced={1, 2}, sum_backward=True)


# ----------------------------------------------------------------------------------------------------------
# Launch choices change the tiling, never the results
# ----------------------------------------------------------------------------------------------------------

LAUNCH_VARIANTS = {
    # One-row tiles (norms: head 64 + tail 64) of one warp, many programs: most splits are a single tile.
    "tiny-tiles": PassLaunch(tile=32, block_c=128, warp_elems=32, num_stages=1, programs_per_sm=64),
    # Norm rows wider than 64 go through the chunked path; 2-row tiles, 16 column blocks of 4 per program.
    "chunked": PassLaunch(tile=128, block_c=64, warp_elems=64, num_stages=2, programs_per_sm=3),
    # Prefetching the next row tile: one-row tiles, 2-row tiles (the last of a group of 7 partial), and 8-row
    # tiles (longer than the group). One program per group on a CPU, so each walks several tiles.
    "prefetch-1row": PassLaunch(tile=32, block_c=128, warp_elems=32, num_stages=1, programs_per_sm=1, prefetch=True),
    "prefetch-2rows": PassLaunch(tile=128, block_c=128, warp_elems=64, num_stages=1, programs_per_sm=2, prefetch=True),
    "prefetch-8rows": PassLaunch(tile=512, block_c=128, warp_elems=128, num_stages=1, programs_per_sm=1, prefetch=True),
    # A register cap far below what the norms want (GPU: spills to local memory; the interpreter ignores it).
    "register-cap": PassLaunch(
        tile=64, block_c=128, warp_elems=64, num_stages=1, programs_per_sm=1, prefetch=True, max_registers=64
    ),
    # Prefetch is ignored where rows are chunked.
    "prefetch-chunked": PassLaunch(tile=128, block_c=64, warp_elems=64, num_stages=1, programs_per_sm=1, prefetch=True),
    # A group's tiles dealt to its splits in turn: 2 splits per group of 7 rows (norms: 2-row tiles with the
    # next one prefetched, the last tile partial; elementwise: 1-row tiles), and chunked norm rows.
    "interleaved": PassLaunch(
        tile=128, block_c=128, warp_elems=64, num_stages=1, programs_per_sm=16, prefetch=True, interleave=True
    ),
    "interleaved-chunked": PassLaunch(
        tile=128, block_c=64, warp_elems=64, num_stages=1, programs_per_sm=16, interleave=True
    ),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", list(LAUNCH_VARIANTS))
def test_launch_choices_keep_results(variant, device, monkeypatch):
    """Every pass under other launch parameters (as benchmarks/tune_kernels.py swaps them in): rows of 100
    (head 64 + masked tail, or chunks), groups of 7 rows (ragged tiles), B > 1, G > 1; the norms also with
    rows of 64 (no tail) and LayerNorm without an affine and with a weight only."""
    params = LAUNCH_VARIANTS[variant]
    monkeypatch.setattr(fused, "LAUNCH", LaunchParams(**dict.fromkeys(fused.LAUNCH.__dataclass_fields__, params)))
    if params.interleave and device == "cpu":  # (one SM in the interpreter; a GPU gives every tile its own split)
        # The norm forward deals its row tiles to fewer splits than there are tiles: interleaving is exercised.
        blocks = fused.norm_blocks(params, 100, 7)
        n_splits, _ = fused._splits(7, 6, 1, blocks, params, torch.device(device))
        assert 1 < n_splits < -(-7 // blocks.block_m), (n_splits, blocks.block_m)
    torch.manual_seed(8)
    shape, mod = (2, 3, 7, 100), (2, 3, 100)
    x, m1, m2, vec = (
        _leaf(shape, F32, "contiguous"),
        _leaf(mod, F32, "contiguous"),
        _leaf(mod, F32, "contiguous"),
        _leaf((100,), F32, "contiguous"),
    )
    _check(fused_modulate, modulate_reference, [x, m1, m2], {}, device, reduced={1, 2})
    _check(
        fused_gate_residual, gate_residual_reference, [x, m1, _leaf(shape, F32, "contiguous")], {}, device, reduced={1}
    )
    args = [x, m1, m2, EPS, vec, _leaf((100,), F32, "contiguous")]
    _check(fused_layernorm_modulate, layernorm_modulate_reference, args, {}, device, reduced={1, 2, 4, 5})
    _check(fused_rms_norm, rms_norm_reference, [x, vec, EPS], {}, device, reduced={1})
    _check(fused_layernorm_modulate, layernorm_modulate_reference, [x, m1, m2, EPS], {}, device, reduced={1, 2})
    x64, m64, vec64 = (
        _leaf((2, 3, 7, 64), F32, "contiguous"),
        _leaf((2, 3, 64), F32, "contiguous"),
        _leaf((64,), F32, "contiguous"),
    )
    args = [x64, m64, _leaf((2, 3, 64), F32, "contiguous"), EPS, vec64]
    _check(fused_layernorm_modulate, layernorm_modulate_reference, args, {}, device, reduced={1, 2, 4})
    _check(fused_rms_norm, rms_norm_reference, [x64, vec64, EPS], {}, device, reduced={1})


# ----------------------------------------------------------------------------------------------------------
# Huge, constant and all-zero rows: finite, and equal to a float64 reference wherever that is finite
# ----------------------------------------------------------------------------------------------------------

HUGE = {F32: 1e30, BF16: 1e30, F16: 6e4}
TOP = {F32: 3e38, BF16: 3e38, F16: 6e4}  # near the largest finite value of the dtype


def _hard_rows(shape, dtype):
    """Random rows, with: a row of huge varied values, a huge constant row, an all-zero row, a constant row of
    an ordinary value, a constant row near the top of the dtype's range and (given 6 rows or more) a row
    alternating between the top and its negative, whose differences from its first element overflow, and
    (given 7 or more) a row of tiny values, whose squares underflow fp32 (fp16: subnormal values)."""
    torch.manual_seed(6)
    x = torch.randn(shape)
    channels = shape[-1]
    flat = x.view(-1, channels)
    flat[0] = HUGE[dtype] * torch.rand(channels) * torch.randn(channels).sign()
    flat[1] = HUGE[dtype]
    flat[2] = 0.0
    flat[3] = 1.3
    if flat.shape[0] > 5:
        flat[4] = TOP[dtype] * (1 - 2 * (torch.arange(channels) % 2))
    if flat.shape[0] > 6:
        flat[5] = (1e-6 if dtype == F16 else 1e-25) * torch.randn(channels)
    flat[-1] = -TOP[dtype]
    return x.to(dtype)


def _check_robust(fn, ref, args: list, kwargs: dict, device: str, reduced: set[int]):
    """As _check, against a float64 reference, comparing only where the reference is finite in the stored
    dtype, and requiring the kernel's results to be finite there."""
    ours = [a.to(device, copy=True).requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
    theirs = [
        a.to(device, torch.float64, copy=True).requires_grad_() if isinstance(a, torch.Tensor) else a for a in args
    ]
    out, expected = fn(*ours, **kwargs), ref(*theirs, **kwargs)
    grad = torch.randn(out.shape).to(device, out.dtype)
    out.backward(grad)
    expected.backward(grad.double())
    pairs = [(out, expected, False, "output")]
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        if isinstance(a, torch.Tensor):
            assert a.grad is not None and a.grad.dtype == a.dtype, f"gradient of argument {i}"
            pairs.append((a.grad, b.grad, i in reduced, f"gradient of argument {i}"))
    for actual, exp, red, what in pairs:
        finite = exp.to(actual.dtype).isfinite()
        assert finite.any(), what
        assert actual[finite].isfinite().all(), f"{what}: non-finite where the float64 reference is finite"
        _assert_close(actual[finite], exp[finite], actual.dtype, red, what)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [F32, BF16, F16])
@pytest.mark.parametrize("shape", [(2, 6, 72), (1, 5, 5000)], ids=["one-tile", "chunked"])
@pytest.mark.parametrize("tiles", ["", "prefetch", "one-row"])
def test_norms_are_finite_on_hard_rows(shape, dtype, device, tiles, monkeypatch):
    """Rows that fit one register tile, and rows wider than one (the chunked path); with prefetch, 2-row
    tiles that each program walks in turn; one-row: tiles of a single row, whose statistics are scalars (the
    launch the H200 tuning chose for C = 1152)."""
    if tiles and shape[-1] > 4096:
        pytest.skip("prefetch and one-row tiles apply to rows that fit one register tile")
    if tiles:
        params = PassLaunch(tile=256, block_c=4096, warp_elems=64, num_stages=1, programs_per_sm=1, prefetch=True)
        if tiles == "one-row":  # 72 channels = a head of 64 and a tail of 8: one row per 64-element tile
            params = PassLaunch(tile=64, block_c=4096, warp_elems=64, num_stages=1, programs_per_sm=2)
        fields = ("layernorm_modulate_fwd", "layernorm_modulate_bwd", "rms_norm_fwd", "rms_norm_bwd")
        monkeypatch.setattr(fused, "LAUNCH", dataclasses.replace(fused.LAUNCH, **dict.fromkeys(fields, params)))
    batch, channels = shape[0], shape[-1]
    x = _hard_rows(shape, dtype)
    shift, scale = torch.randn(batch, channels).to(dtype), (0.5 * torch.randn(batch, channels)).to(dtype)
    weight, bias = torch.randn(channels).to(dtype), torch.randn(channels).to(dtype)
    _check_robust(
        fused_layernorm_modulate,
        layernorm_modulate_reference,
        [x, shift, scale, EPS, weight, bias],
        {},
        device,
        reduced={1, 2, 4, 5},
    )
    _check_robust(fused_rms_norm, rms_norm_reference, [x, weight, EPS], {}, device, reduced={1})


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [F32, BF16, F16])
def test_modulate_and_gate_are_finite_on_hard_rows(dtype, device):
    x = _hard_rows((2, 6, 72), dtype)
    # |scale| < 0.05 keeps the huge rows' results (mostly) in range; where the float64 result overflows the
    # dtype, the comparison skips it.
    shift, scale = torch.randn(2, 72).to(dtype), (0.02 * torch.randn(2, 72)).to(dtype)
    _check_robust(fused_modulate, modulate_reference, [x, shift, scale], {}, device, reduced={1, 2})
    residual, gate = _hard_rows((2, 6, 72), dtype).flip(-1), (0.02 * torch.randn(2, 72)).to(dtype)
    _check_robust(fused_gate_residual, gate_residual_reference, [residual, gate, x], {}, device, reduced={1})


@pytest.mark.parametrize("device", DEVICES)
def test_sums_over_tokens_are_deterministic_and_exact(device, monkeypatch):
    """The modulate backward sums the gradients of the per-group vectors over each group's splits inside the
    kernel, by whichever program finishes last, in split order: repeated calls give bit-identical sums,
    equal to the float64 sums over the tokens. Many splits per group (a few programs per SM on a GPU, two
    rows per split in the interpreter) so that programs finish in varying order. The LayerNorm backward's
    sums (its partials summed by _sum_partials; dscale against the float64 LayerNorm) are checked the same
    way."""
    shape, groups, repeats = ((2, 6144, 1152), 3, 20) if device == "cuda" else ((2, 24, 40), 3, 2)
    if device == "cpu":
        tiny = PassLaunch(tile=32, block_c=16, warp_elems=32, num_stages=1, programs_per_sm=128)
        monkeypatch.setattr(fused, "LAUNCH", dataclasses.replace(fused.LAUNCH, modulate_bwd=tiny))
    # The case exists for the sums across splits: each group must have several.
    params, group_len = fused.LAUNCH.modulate_bwd, shape[1] // groups
    blocks = fused.elementwise_blocks(params, shape[2], group_len)
    n_col_blocks = -(-shape[2] // blocks.block_c)
    n_splits, _ = fused._splits(group_len, shape[0] * groups, n_col_blocks, blocks, params, torch.device(device))
    assert n_splits >= 4, n_splits
    gen = torch.Generator().manual_seed(7)
    x, dy = (torch.randn(shape, generator=gen).to(device, BF16) for _ in range(2))
    scale = (0.1 * torch.randn(shape[0], groups, shape[2], generator=gen)).to(device, BF16)
    stats = fused._layernorm_modulate_impl(x, scale, scale, None, None, 1e-6, BF16)[1]
    ln_backward = fused._layernorm_modulate_backward_impl
    runs = {
        "modulate": lambda: fused._modulate_backward_impl(dy, x, scale)[1:],
        "layernorm_modulate": lambda: ln_backward(dy, x, scale, None, None, stats)[1].unbind(),  # (dshift, dscale)
    }
    grouped = lambda t: t.double().reshape(shape[0], groups, -1, shape[2])  # noqa: E731
    dshift_exact = grouped(dy).sum(2)
    normalised = torch.nn.functional.layer_norm(x.double(), (shape[2],), eps=1e-6)
    dscale_exact = {
        "modulate": (grouped(dy) * grouped(x)).sum(2),
        "layernorm_modulate": (grouped(dy) * grouped(normalised)).sum(2),
    }
    # On Hopper and newer the LayerNorm backward's partial sums run as a PDL dependent of the norm kernel, and
    # the modulate backward as one of the memset that zeroes its tickets (each must wait: reading partials
    # or tickets early would break both checks below); elsewhere in order.
    assert fused._dependent_launch(x) == (device == "cuda" and torch.cuda.get_device_capability() >= (9, 0))
    for name, run in runs.items():
        first = run()
        for _ in range(repeats):
            assert all(torch.equal(a, b) for a, b in zip(run(), first, strict=True)), name
        torch.testing.assert_close(first[0].double(), dshift_exact, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(first[1].double(), dscale_exact[name], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "shape, sub",
    [((3, 5, 50), 8), ((3, 37, 50), 8), ((1, 1000, 40), 4), ((2, 64, 33), 64)],
    ids=["one-chunk", "two-level", "long-chunks", "full-tile"],
)
def test_sum_of_partials_is_exact_and_deterministic(shape, sub, device):
    """The norms' sums over their fp32 partials (_sum_partials): equal to float64 sums; with several chunks
    (two-level, and chunks of many sub-tiles when the splits outnumber sub * sub) bit-identical on repeats,
    whichever program finishes last."""
    rows_per_chunk, n_chunks = fused.partial_chunks(shape[1], sub)
    # Each case takes the path its name says: two levels past sub splits, longer chunks past sub * sub.
    assert (n_chunks > 1) == (shape[1] > sub), n_chunks
    assert (rows_per_chunk > sub) == (shape[1] > sub * sub), rows_per_chunk
    part = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(device)
    first = fused._sum_partials(part, sub=sub, block_c=16)
    torch.testing.assert_close(first.double(), part.double().sum(1), rtol=1e-5, atol=1e-5)
    for _ in range(3):
        assert torch.equal(fused._sum_partials(part, sub=sub, block_c=16), first)


@pytest.mark.parametrize("device", DEVICES)
def test_ops_run_under_a_dispatch_mode_and_give_the_eager_gradients(device):
    """Under a dispatch mode (FlopCounterMode in task=bench, fake tensors and proxies when tracing) the
    kernels run as custom ops, where torch checks that no output aliases an input or another output."""
    from torch.utils.flop_counter import FlopCounterMode

    g = torch.Generator().manual_seed(0)
    x, residual = (torch.randn(2, 12, 72, generator=g).to(device) for _ in range(2))
    shift, scale, gate = (torch.randn(2, 3, 72, generator=g).to(device) for _ in range(3))
    weight, bias = (torch.randn(72, generator=g).to(device) for _ in range(2))
    calls = {
        "modulate": (fused_modulate, [x, shift, scale], {}),
        "layernorm_modulate": (fused_layernorm_modulate, [x, shift, scale, 1e-6], dict(weight=weight, bias=bias)),
        "layernorm_modulate without affine": (fused_layernorm_modulate, [x, shift, scale, 1e-6], {}),
        "layernorm_modulate with weight only": (fused_layernorm_modulate, [x, shift, scale, 1e-6], dict(weight=weight)),
        "rms_norm": (fused_rms_norm, [x, weight, 1e-6], {}),
        "gate_residual": (fused_gate_residual, [residual, gate, x], {}),
    }
    for name, (fn, args, kwargs) in calls.items():
        grads = []
        for mode in (contextlib.nullcontext(), FlopCounterMode(display=False)):
            leaves = [a.detach().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
            extra = {k: v.detach().requires_grad_() for k, v in kwargs.items()}
            with mode:
                out = fn(*leaves, **extra)
                inputs = [a for a in leaves if isinstance(a, torch.Tensor)] + list(extra.values())
                grads.append(torch.autograd.grad(out, inputs, torch.ones_like(out)))
        for eager, dispatched in zip(*grads, strict=True):
            torch.testing.assert_close(dispatched, eager, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_ops_without_grad_give_the_autograd_path_outputs(device):
    """Under no_grad (sampling) the launchers run without autograd's wrapper: the same outputs, bit for bit."""
    g = torch.Generator().manual_seed(1)
    x, residual = (torch.randn(2, 12, 72, generator=g).to(device) for _ in range(2))
    shift, scale, gate = (torch.randn(2, 3, 72, generator=g).to(device) for _ in range(3))
    weight, bias = (torch.randn(72, generator=g).to(device).requires_grad_() for _ in range(2))
    calls = {
        "modulate": lambda: fused_modulate(x, shift, scale),
        "layernorm_modulate": lambda: fused_layernorm_modulate(x, shift, scale, EPS, weight=weight, bias=bias),
        "rms_norm": lambda: fused_rms_norm(x, weight, EPS, out_dtype=BF16),
        "gate_residual": lambda: fused_gate_residual(residual, gate, x),
    }
    for name, call in calls.items():
        with_grad = call()
        with torch.no_grad():
            without = call()
        assert not without.requires_grad, name
        assert without.dtype == with_grad.dtype and torch.equal(without, with_grad.detach()), name


# ----------------------------------------------------------------------------------------------------------
# Shape errors
# ----------------------------------------------------------------------------------------------------------


def test_bad_shapes_raise_value_error_naming_them():
    x = torch.randn(2, 10, 8)
    good = torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"\(2, 3, 8\).*\(2, 10, 8\)"):
        fused_modulate(x, torch.randn(2, 3, 8), good)  # 3 groups do not divide 10 tokens
    with pytest.raises(ValueError, match=r"\(3, 8\)"):
        fused_modulate(x, good, torch.randn(3, 8))  # wrong batch
    with pytest.raises(ValueError, match=r"\(2, 10, 1, 8\)"):
        fused_layernorm_modulate(x, torch.randn(2, 10, 1, 8), good, EPS)
    with pytest.raises(ValueError, match=r"\(2, 8\)"):
        fused_modulate(torch.randn(2, 8), good, good)  # no token axis
    with pytest.raises(ValueError, match=r"\(7,\)"):
        fused_layernorm_modulate(x, good, good, EPS, weight=torch.randn(7))
    with pytest.raises(ValueError, match=r"\(8, 1\)"):
        fused_layernorm_modulate(x, good, good, EPS, bias=torch.randn(8, 1))
    with pytest.raises(ValueError, match=r"\(9,\)"):
        fused_rms_norm(x, torch.randn(9), EPS)
    with pytest.raises(ValueError, match=r"\(2, 10, 8\).*\(2, 5, 8\)"):
        fused_gate_residual(x, good, torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match=r"\(2, 4\)"):
        fused_gate_residual(x, torch.randn(2, 4), x)


# ----------------------------------------------------------------------------------------------------------
# torch.compile (GPU only: the interpreter does not run under compile)
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_ops_trace_into_torch_compile():
    """The four ops in one fullgraph torch.compile graph give the eager results, forward and backward."""
    torch.manual_seed(7)

    def block(x, shift, scale, gate, weight):
        h = fused_layernorm_modulate(x, shift, scale, EPS, weight=weight)
        h = fused_rms_norm(fused_modulate(h, shift, scale), weight, EPS)
        return fused_gate_residual(x, gate, h)

    inputs = [torch.randn(2, 3, 37, 72, device="cuda", dtype=BF16)]
    inputs += [torch.randn(2, 3, 72, device="cuda") for _ in range(3)] + [torch.randn(72, device="cuda")]
    eager_inputs = [t.clone().requires_grad_() for t in inputs]
    compiled_inputs = [t.clone().requires_grad_() for t in inputs]
    expected = block(*eager_inputs)
    out = torch.compile(block, fullgraph=True)(*compiled_inputs)
    grad = torch.randn_like(out)
    expected.backward(grad)
    out.backward(grad)
    # Same kernels, but the compiled graph may round an intermediate or sum a gradient in another order.
    _assert_close(out, expected, BF16, False, "output")
    for i, (a, b) in enumerate(zip(compiled_inputs, eager_inputs, strict=True)):
        _assert_close(a.grad, b.grad, a.dtype, True, f"gradient of argument {i}")
