"""The `kernels` group on CPU: attention backend selection and its errors, head-dim padding,
measured `auto` choices (also under torch.compile), compiled blocks and fused block ops against
eager torch. Kernel-level checks of the Triton kernels are in test_fused_kernels.py."""

from __future__ import annotations

import copy
import dataclasses
import logging
import time

import pytest
import torch

from test_parallel import build, relative_error
from videosys.distributed import DistContext, ParallelConfig, init_distributed, shutdown_distributed
from videosys.errors import ConfigError
from videosys.models.blocks import Attention, HeadLayerNorm
from videosys.ops import ATTENTION_BACKENDS, KernelsConfig, build_attention, build_block_ops
from videosys.ops.attention import AttentionBackend, AttentionChoice, AttentionSelector, math_attention
from videosys.parallelize import compile_settings, parallelize
from videosys.precision import PrecisionConfig

CPU = DistContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
CUDA = torch.device("cuda")  # a device object only: the checks below refuse before touching a GPU
# Where the fused kernels run in these model tests: the GPU when there is one, else the CPU through the
# Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1 where there is no CUDA).
FUSED_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FUSED_CTX = DistContext(rank=0, local_rank=0, world_size=1, device=torch.device(FUSED_DEVICE))


def _qkv(batch=2, heads=3, tokens=11, keys=None, dim=72, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    shapes = [(batch, tokens, heads, dim), (batch, keys or tokens, heads, dim), (batch, keys or tokens, heads, dim)]
    # (B, N, H, D) memory viewed as (B, H, N, D): the layout the attention modules hand over
    return [torch.randn(s, generator=g).transpose(1, 2).requires_grad_(grad) for s in shapes]


def test_named_backends_that_cannot_run_stop_with_the_reason():
    cases = [
        (("cudnn", torch.device("cpu"), torch.float32, {64}, False, True), "runs on cuda, not cpu"),
        (("flash", CUDA, torch.float32, {64}, False, True), "does not support float32"),
        (("flash", CUDA, torch.bfloat16, {64}, True, True), "takes no attention mask"),
        (("cudnn", CUDA, torch.bfloat16, {200}, False, True), "head dim 200 is above its limit of 128"),
        (("cudnn", CUDA, torch.bfloat16, {36}, False, True), "head dim 36 is not a multiple of 8"),
        (("cudnn", CUDA, torch.bfloat16, {40}, False, True), None),
        (("flashy", CUDA, torch.bfloat16, {64}, False, True), "not a known attention backend"),
    ]
    if ATTENTION_BACKENDS["flash_attn"].missing() is not None:
        cases.append((("flash_attn", CUDA, torch.bfloat16, {64}, False, True), "flash-attn package is not installed"))
    for (name, device, dtype, head_dims, masked, training), message in cases:
        if message is None:
            build_attention(name, "off", device, dtype, head_dims, masked, training)
            continue
        with pytest.raises(ConfigError, match=message) as err:
            build_attention(name, "off", device, dtype, head_dims, masked, training)
        assert f"kernels.attention={name!r}" in str(err.value)
    no_backward = AttentionBackend(
        "fwd_only", math_attention, ("cpu",), (torch.float32,), "test", supports_backward=False
    )
    assert "no backward" in no_backward.unsupported_reason(torch.device("cpu"), torch.float32, 64, backward=True)
    assert no_backward.unsupported_reason(torch.device("cpu"), torch.float32, 64, backward=False) is None


def test_a_probed_backend_with_wrong_gradients_serves_inference_only(caplog, monkeypatch):
    """A backend declared probe=True (flash_attn: an external package) is checked against fp32 math on a
    small call at each head dim before use. One whose k gradient is wrong still runs inference; a named
    request for training stops with the reason, and auto leaves it out of training calls."""

    def no_k_grad(q, k, v, mask=None, scale=None):
        return math_attention(q, k.detach(), v, mask, scale)

    broken = AttentionBackend("no_k_grad", no_k_grad, ("cpu",), (torch.float32,), "test", probe=True)
    cpu = torch.device("cpu")
    reason = broken.unsupported_reason(cpu, torch.float32, 16, backward=True)
    assert reason == "its dk at head dim 16 differ from the fp32 reference on a probe call (relative error 1)"
    assert broken.unsupported_reason(cpu, torch.float32, 16, backward=False) is None
    monkeypatch.setitem(ATTENTION_BACKENDS, "no_k_grad", broken)
    build_attention("no_k_grad", "off", cpu, torch.float32, {16}, False, training=False)
    with pytest.raises(ConfigError, match="kernels.attention='no_k_grad' cannot run this model's attention: its dk"):
        build_attention("no_k_grad", "off", cpu, torch.float32, {16}, False, training=True)
    selector = AttentionSelector([broken, ATTENTION_BACKENDS["math"]], "off", measure_iters=1)
    q, k, v = _qkv(dim=16, grad=True)
    with caplog.at_level(logging.INFO, logger="videosys.ops.attention"):
        out = selector(q, k, v)
    ((_, choice),) = selector.choices.items()
    assert choice.backend.name == "math" and "not fitting: no_k_grad: its dk at head dim 16" in caplog.text
    expected = math_attention(q, k, v)
    got, want = (torch.autograd.grad(o, (q, k, v), torch.ones_like(o)) for o in (out, expected))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("head_dim", [64, 72, 128])
@pytest.mark.parametrize("name", [name for name in ATTENTION_BACKENDS if name != "math"])
def test_each_backend_equals_the_fp32_reference_on_gpu(name, head_dim, backward):
    """Every backend that declares it fits a bf16 call on this GPU (forward, or forward and backward),
    against fp32 math attention on the same rounded inputs (~1e-2 relative for bf16). A backend this
    install cannot run for the call (not installed, no backward, a failed probe) is skipped with its reason."""
    reason = ATTENTION_BACKENDS[name].unsupported_reason(CUDA, torch.bfloat16, head_dim, backward=backward)
    if reason is not None:
        pytest.skip(reason)
    torch.manual_seed(0)
    # (B, N, H, D) memory viewed as (B, H, N, D), as the attention modules hand it over
    inputs = [torch.randn(2, 300, 4, head_dim, device=CUDA).transpose(1, 2).to(torch.bfloat16) for _ in range(3)]
    low = [t.clone().requires_grad_(backward) for t in inputs]
    full = [t.float().requires_grad_(backward) for t in inputs]
    with torch.set_grad_enabled(backward):
        out = ATTENTION_BACKENDS[name].fn(*low)
        expected = math_attention(*full)
    assert out.dtype == torch.bfloat16 and out.shape == expected.shape
    assert relative_error(out.float(), expected) < 1e-2
    if backward:
        grad = torch.randn(expected.shape, device=CUDA)
        got = torch.autograd.grad(out, low, grad.to(torch.bfloat16))
        want = torch.autograd.grad(expected, full, grad)
        for g, w in zip(got, want, strict=True):
            assert relative_error(g.float(), w) < 2e-2


def test_head_dim_padding_settings_are_checked():
    with pytest.raises(ConfigError, match="kernels.pad_head_dim='wide' is not valid"):
        build_attention("sdpa", "wide", torch.device("cpu"), torch.float32, {72}, False, True)
    with pytest.raises(ConfigError, match="kernels.pad_head_dim=64 is below this model's head dim 72"):
        build_attention("sdpa", "64", torch.device("cpu"), torch.float32, {72}, False, True)
    # Padding fits a head dim that a kernel has no build for (36 runs as 64)...
    assert build_attention("cudnn", "auto", CUDA, torch.bfloat16, {36}, False, True).name == "cudnn"
    # ...but cannot shrink one above its limit.
    with pytest.raises(ConfigError, match="above its limit of 128"):
        build_attention("cudnn", "auto", CUDA, torch.bfloat16, {200}, False, True)


def test_auto_on_cpu_is_sdpa_and_says_why_once(caplog):
    with caplog.at_level(logging.INFO, logger="videosys.ops.attention"):
        selector = build_attention("auto", "auto", torch.device("cpu"), torch.float32, {72}, True, True)
    assert selector.name == "auto" and selector.fixed.backend.name == "sdpa"
    assert [r.getMessage() for r in caplog.records] == [
        "attention auto: sdpa (the only candidate on cpu torch.float32)"
    ]
    q, k, v = _qkv()
    torch.testing.assert_close(selector(q, k, v), math_attention(q, k, v), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("masked", [False, True])
def test_padding_the_head_dim_is_exact(masked):
    """Zero-padding 72 to 80, 96 or 128 with the softmax scale of 72 gives the same output and gradients."""
    mask = torch.rand(2, 1, 1, 7, generator=torch.Generator().manual_seed(1)) > 0.3 if masked else None
    if mask is not None:
        mask[..., 0] = True
    expected_inputs = _qkv(keys=7, grad=True)
    expected = math_attention(*expected_inputs, mask)
    expected.square().sum().backward()
    for padded in (80, 96, 128):
        for backend in ("sdpa", "math"):
            inputs = _qkv(keys=7, grad=True)
            out = AttentionChoice(ATTENTION_BACKENDS[backend], padded)(*inputs, mask)
            assert out.shape == expected.shape
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
            out.square().sum().backward()
            for t, ref in zip(inputs, expected_inputs, strict=True):
                torch.testing.assert_close(t.grad, ref.grad, rtol=1e-5, atol=1e-5)


def test_auto_measures_each_call_shape_once_logs_it_and_keeps_the_fastest(caplog):
    backends = [ATTENTION_BACKENDS["sdpa"], ATTENTION_BACKENDS["math"]]
    selector = AttentionSelector(backends, pad_head_dim="auto", measure_iters=2)
    q, k, v = _qkv(dim=72)
    with caplog.at_level(logging.INFO, logger="videosys.ops.attention"):
        first = selector(q, k, v)
        second = selector(q, k, v)
        selector(*_qkv(tokens=5, dim=72))  # a new shape is measured on its own
    assert len(selector.choices) == 2
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and all(line.count(" ms") == 8 for line in lines), lines  # 2 backends x (as is + 3 pads)
    assert "padded to 80" in lines[0] and "padded to 128" in lines[0]
    chosen = next(iter(selector.choices.values()))
    assert lines[0].split(": ", 1)[1].startswith(chosen.describe(72))
    torch.testing.assert_close(first, math_attention(q, k, v), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second, first, rtol=0, atol=0)


def test_auto_under_autocast_chooses_for_the_autocast_dtype():
    """An fp32 q/k/v under bf16 autocast runs in bf16 (SDPA casts it), so the choice is measured for
    bf16: a backend that runs only bf16 fits and, being faster, is chosen; the inputs reach it in bf16."""
    seen = []

    def bf16_only(q, k, v, mask=None, scale=None):
        seen.append({t.dtype for t in (q, k, v)})
        return math_attention(q, k, v, mask, scale)

    fast_bf16 = AttentionBackend("bf16_only", bf16_only, ("cpu",), (torch.bfloat16,), "runs bf16 only")
    slow_any = _slowed(ATTENTION_BACKENDS["math"], 0.02)
    selector = AttentionSelector([slow_any, fast_bf16], pad_head_dim="off", measure_iters=2)
    q, k, v = _qkv()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = selector(q, k, v)
        expected = math_attention(*(t.to(torch.bfloat16) for t in (q, k, v)))
    ((signature, choice),) = selector.choices.items()
    assert signature[2] == "bfloat16" and choice.backend.name == "bf16_only"
    assert out.dtype == torch.bfloat16 and seen[-1] == {torch.bfloat16}
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert selector(q, k, v).dtype == torch.float32  # without autocast: as given


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")],
        ),
    ],
)
def test_head_layer_norm_keeps_its_input_dtype_under_autocast(device):
    """The q/k LayerNorm (CogVideoX) returns bf16 for bf16 input under autocast, with LayerNorm's values, and
    the attention after it gets bf16 q and k. CUDA autocast runs a plain LayerNorm in fp32 (CPU autocast
    does not), so the GPU case is the one that guards the CogVideoX attention choice."""
    norm = HeadLayerNorm(64, eps=1e-6).to(device)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.1, 0.1)
    x = torch.randn(2, 7, 3, 64, generator=torch.Generator().manual_seed(0)).to(device, torch.bfloat16)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = norm(x)
    expected = torch.nn.functional.layer_norm(x.float(), (64,), norm.weight, norm.bias, 1e-6)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=1e-2)  # bf16 output rounding

    seen = []
    attention = Attention(64 * 3, 3, qk_norm="layernorm").to(device)
    attention.attention_fn = lambda q, k, v, mask=None: seen.append((q.dtype, k.dtype)) or v
    with torch.autocast(device, dtype=torch.bfloat16):
        attention(torch.randn(2, 5, 64 * 3, device=device))
    assert seen == [(torch.bfloat16, torch.bfloat16)]


def _slowed(backend: AttentionBackend, seconds: float) -> AttentionBackend:
    def slow(q, k, v, mask=None, scale=None):
        time.sleep(seconds)
        return backend.fn(q, k, v, mask, scale=scale)

    return dataclasses.replace(backend, name=f"slow_{backend.name}", fn=slow)


def test_auto_keeps_the_fastest_backend_whatever_the_order():
    """The measured choice is the fastest candidate (one made 20 ms slower here), not the first listed."""
    slow_math, sdpa = _slowed(ATTENTION_BACKENDS["math"], 0.02), ATTENTION_BACKENDS["sdpa"]
    q, k, v = _qkv()
    for candidates in ([slow_math, sdpa], [sdpa, slow_math]):
        selector = AttentionSelector(candidates, pad_head_dim="off", measure_iters=2)
        torch.testing.assert_close(selector(q, k, v), math_attention(q, k, v), rtol=1e-5, atol=1e-5)
        assert [c.backend.name for c in selector.choices.values()] == ["sdpa"]
    slow_sdpa = _slowed(sdpa, 0.02)
    selector = AttentionSelector([slow_sdpa, ATTENTION_BACKENDS["math"]], pad_head_dim="off", measure_iters=2)
    selector(q, k, v)
    assert [c.backend.name for c in selector.choices.values()] == ["math"]


def test_auto_choice_is_a_constant_of_the_compiled_graph():
    """Under torch.compile the measurement runs at trace time, with no graph break, once."""
    selector = AttentionSelector([ATTENTION_BACKENDS["sdpa"], ATTENTION_BACKENDS["math"]], "auto", measure_iters=1)

    def block(q, k, v, context):  # a self-attention, then a cross-attention of another shape
        x = selector(q, k, v)
        return selector(x, context, context) * 2

    compiled = torch.compile(block, fullgraph=True, dynamic=False, backend="eager")
    q, k, v = _qkv()
    context = _qkv(tokens=5, seed=1)[0]
    expected = 2 * math_attention(math_attention(q, k, v), context, context)
    torch.testing.assert_close(compiled(q, k, v, context), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled(q, k, v, context), expected, rtol=1e-5, atol=1e-5)
    assert len(selector.choices) == 2


def _grads(model, inputs, seed=3):
    out = model(*inputs)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device)
    (out * weight).sum().backward()
    # Parameter names as the unwrapped model has them (checkpoint_wrapper adds a level to the module names).
    return out.detach(), {
        n.replace("_checkpoint_wrapped_module.", ""): p.grad.clone() for n, p in model.named_parameters()
    }


def _assert_same_output_and_gradients(model, reference, inputs, tolerance=1e-5):
    """Output and every parameter gradient within `tolerance` relative (norm) error of the reference's."""
    expected, expected_grads = _grads(reference, inputs)
    out, grads = _grads(model, inputs)
    errors = {key: relative_error(grads[key], grad) for key, grad in expected_grads.items()}
    errors["output"] = relative_error(out, expected)
    assert max(errors.values()) <= tolerance, {k: e for k, e in errors.items() if e > tolerance}


@pytest.mark.parametrize("name", ["dit", "latte", "opensora", "opensora_plan"])
def test_compiled_blocks_equal_eager_without_graph_breaks(name):
    """kernels.compile=true: every block compiled with fullgraph=True (a graph break is an error),
    one compiled graph shared by the blocks of a layout; output and gradients equal eager."""
    torch._dynamo.reset()
    reference, inputs = build(name)
    model = copy.deepcopy(reference)
    parallelize(reference, CPU, ParallelConfig(), KernelsConfig(), PrecisionConfig())
    plan = parallelize(model, CPU, ParallelConfig(), KernelsConfig(compile=True), PrecisionConfig())
    assert plan.compiled_blocks == sum(len(getattr(model, n)) for n in model.block_lists)
    _assert_same_output_and_gradients(model, reference, inputs)  # training: forward and backward graphs
    with torch.no_grad():  # sampling: an inference graph
        assert relative_error(model(*inputs), reference(*inputs)) <= 1e-5


@pytest.mark.parametrize("name,checkpointing", [("dit", False), ("dit", True), ("opensora", False)])
def test_compiled_model_equals_eager_without_graph_breaks(name, checkpointing):
    """kernels.compile_scope=model: the whole forward is one graph (fullgraph=True: a graph break is an
    error), with or without checkpointed blocks inside it; output and gradients equal eager."""
    torch._dynamo.reset()
    reference, inputs = build(name)
    model = copy.deepcopy(reference)
    parallelize(reference, CPU, ParallelConfig(), KernelsConfig(), PrecisionConfig())
    kernels = KernelsConfig(compile=True, compile_scope="model")
    plan = parallelize(model, CPU, ParallelConfig(), kernels, PrecisionConfig(), activation_checkpointing=checkpointing)
    assert plan.compiled_model and plan.compiled_blocks == 0 and plan.compiled == "whole model"
    assert plan.checkpointed_blocks == (sum(len(getattr(model, n)) for n in model.block_lists) if checkpointing else 0)
    _assert_same_output_and_gradients(model, reference, inputs)
    with torch.no_grad():
        assert relative_error(model(*inputs), reference(*inputs)) <= 1e-5


def test_compile_scope_errors_name_the_value_and_the_fix():
    model, _ = build("dit")
    layers = KernelsConfig(compile=True, compile_scope="layers")
    with pytest.raises(ConfigError, match="kernels.compile_scope='layers' is not known; use blocks or model"):
        parallelize(model, CPU, ParallelConfig(), layers, PrecisionConfig())
    typo = KernelsConfig(compile=True, compile_options={"coordinate_decent_tuning": True})
    with pytest.raises(ConfigError, match="compile_options has 'coordinate_decent_tuning', which is no torch._induc"):
        parallelize(model, CPU, ParallelConfig(), typo, PrecisionConfig())
    # Options go on top of the mode's own (torch takes either a mode or options).
    settings = compile_settings("reduce-overhead", {"coordinate_descent_tuning": True})
    assert settings == {"options": {"triton.cudagraphs": True, "coordinate_descent_tuning": True}}
    assert compile_settings("default") == {"mode": None}
    # Two ranks: a fake process group stands in (no collectives run before the check).
    two = init_distributed(ParallelConfig(dp_shard=2), device="cpu", fake_world_size=2)
    try:
        scope = KernelsConfig(compile=True, compile_scope="model")
        with pytest.raises(ConfigError, match="compile_scope=model trains in one process only; this run has 2 ranks"):
            parallelize(build("dit")[0], two, ParallelConfig(dp_shard=2), scope, PrecisionConfig())
        plan = parallelize(build("dit")[0], two, ParallelConfig(dp_shard=2), scope, PrecisionConfig(), training=False)
        assert plan.compiled_model  # sampling on several ranks shards nothing
    finally:
        shutdown_distributed(two)
    sp = init_distributed(ParallelConfig(sp_ulysses=2, sp_mode="ulysses"), device="cpu", fake_world_size=2)
    try:
        latte, ulysses = build("latte")[0], ParallelConfig(sp_ulysses=2, sp_mode="ulysses")
        scope = KernelsConfig(compile=True, compile_scope="model")
        with pytest.raises(ConfigError, match="sequence parallelism .parallel.sp_mode=ulysses over 2 ranks"):
            parallelize(latte, sp, ulysses, scope, PrecisionConfig(), training=False)
    finally:
        shutdown_distributed(sp)


@pytest.mark.parametrize("name", ["dit", "opensora", "latte"])
def test_fused_block_ops_equal_the_torch_path(name):
    """Every fused switch on: a model's output and gradients equal eager torch (fp32)."""
    reference, inputs = build(name, FUSED_DEVICE)
    model = copy.deepcopy(reference)
    parallelize(reference, FUSED_CTX, ParallelConfig(), KernelsConfig(), PrecisionConfig())
    fused = KernelsConfig(fused_modulate=True, fused_norm=True, fused_gate_residual=True)
    plan = parallelize(model, FUSED_CTX, ParallelConfig(), fused, PrecisionConfig())
    assert plan.fused_ops == "fused_modulate,fused_norm,fused_gate_residual"
    assert all(m.ops.fused_norm for m in model.modules() if hasattr(m, "ops"))
    _assert_same_output_and_gradients(model, reference, inputs)


def _bf16_errors(name: str, kernels: KernelsConfig, reference: tuple) -> float:
    """Largest relative error, over output and gradients, of a bf16-autocast run against fp32 `reference`."""
    model, inputs = build(name, FUSED_DEVICE)
    parallelize(model, FUSED_CTX, ParallelConfig(), kernels, PrecisionConfig())
    with torch.autocast(FUSED_DEVICE, dtype=torch.bfloat16):
        out = model(*inputs)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out.device)
    (out.float() * weight).sum().backward()
    ref_out, ref_grads = reference
    errors = [relative_error(p.grad, ref_grads[n]) for n, p in model.named_parameters()]
    return max([relative_error(out, ref_out), *errors])


@pytest.mark.parametrize("name", ["dit", "opensora"])
def test_fused_block_ops_under_bf16_autocast_are_as_close_to_fp32_as_torch(name):
    """Mixed dtypes as in training (fp32 residual stream, bf16 adaLN vectors and activations, bf16 norm
    outputs): the fused path's distance from fp32 is that of the torch path (both ~2e-2 here)."""
    model, inputs = build(name, FUSED_DEVICE)
    reference = _grads(model, inputs)
    torch_error = _bf16_errors(name, KernelsConfig(), reference)
    fused = KernelsConfig(fused_modulate=True, fused_norm=True, fused_gate_residual=True)
    fused_error = _bf16_errors(name, fused, reference)
    assert torch_error < 0.05, torch_error
    assert fused_error <= 1.5 * torch_error, (fused_error, torch_error)


def test_fused_kernels_need_a_gpu_or_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    kernels = KernelsConfig(fused_norm=True, fused_gate_residual=True)
    with pytest.raises(
        ConfigError, match="kernels.fused_norm=true runs a Triton kernel, which needs a CUDA GPU"
    ) as err:
        build_block_ops(kernels, torch.device("cpu"))
    assert "kernels.fused_norm=false, kernels.fused_gate_residual=false" in str(err.value)
    assert not build_block_ops(KernelsConfig(), torch.device("cpu")).fused_norm


def test_ring_attention_needs_a_backend_with_log_sum_exp():
    ctx = init_distributed(ParallelConfig(sp_mode="ring", sp_ring=2), "cpu", fake_world_size=2)
    try:
        model, _ = build("opensora_plan")
        with pytest.raises(ConfigError, match="kernels.attention='efficient' gives Ring attention no log-sum-exp"):
            parallelize(model, ctx, ParallelConfig(), KernelsConfig(attention="efficient"), PrecisionConfig())
    finally:
        shutdown_distributed()
