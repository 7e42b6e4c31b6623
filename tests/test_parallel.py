"""Every parallel mode equals one process: gloo groups of 2 and 4 CPU ranks, debug flavors of DiT,
Latte, Open-Sora and Open-Sora-Plan (full 3D), fp32, token counts the degrees do not divide."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from multiprocess import run_ranks
from videosys.distributed import CommCounter, ParallelConfig, init_distributed
from videosys.errors import ConfigError
from videosys.models.cogvideox import CogVideoX, CogVideoXConfig
from videosys.models.dit import DiT, DiTConfig
from videosys.models.latte import Latte, LatteConfig
from videosys.models.opensora import OpenSora, OpenSoraConfig
from videosys.models.opensora_plan import OpenSoraPlan, OpenSoraPlanConfig
from videosys.ops import KernelsConfig
from videosys.parallelize import model_comm_per_forward, parallelize
from videosys.precision import PrecisionConfig

TOLERANCE = 1e-5
# 5 x 5 image tokens; videos of 3 frames x (3 x 5) patches: neither 15 nor 3 divides by 2 or 4.
VIDEO = [3, 6, 10]
TEXT = dict(caption_channels=32, model_max_length=5)


def build(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, tuple]:
    """A debug model with every parameter random (no zero-initialised layer hides a gradient), and
    inputs, both built on the CPU from fixed seeds and then moved to `device` / `dtype`."""
    torch.manual_seed(0)
    if name == "dit":
        model = DiT(DiTConfig(flavor="debug", input_size=10, in_channels=1, num_classes=10))
        inputs = (torch.randn(2, 1, 10, 10), torch.tensor([10.0, 700.0]), torch.tensor([3, 10]))
    else:
        cls, cfg = {
            "latte": (Latte, LatteConfig),
            "opensora": (OpenSora, OpenSoraConfig),
            "opensora_plan": (OpenSoraPlan, OpenSoraPlanConfig),
            "cogvideox": (CogVideoX, CogVideoXConfig),
        }[name]
        fields = {"input_size": VIDEO, "in_channels": 4, **TEXT}
        fields = {k: v for k, v in fields.items() if k in cfg.__dataclass_fields__}
        if name in ("opensora_plan", "cogvideox"):
            fields["max_text_length"] = 5
        model = cls(cfg(flavor="debug", **fields))
        mask = torch.tensor([[True, True, True, False, False], [True] * 5])
        inputs = (torch.randn(2, 4, *VIDEO), torch.tensor([10.0, 700.0]), torch.randn(2, 5, 32), mask)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    inputs = tuple(t.to(device, dtype) if t.is_floating_point() and t.dim() > 1 else t.to(device) for t in inputs)
    return model.to(device, dtype).eval(), inputs


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    scale = b.norm()
    return (a - b).norm().item() / scale.item() if scale > 0 else (a - b).norm().item()


def _precision(dtype: torch.dtype) -> PrecisionConfig:
    name = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    return PrecisionConfig(name=name, dtype=name)


def _gradients(model: torch.nn.Module, sp_group=None, world: int = 1) -> list[torch.Tensor]:
    """fp32 copies of the parameter gradients; with `sp_group`, averaged over its ranks."""
    grads = [p.grad.float() for p in model.parameters()]
    if sp_group is not None:
        for grad in grads:
            dist.all_reduce(grad, group=sp_group)
            grad /= world
    return grads


def _worst(out, grads, ref_out, ref_grads) -> float:
    """The largest relative error over the output and every parameter's gradient."""
    errors = [relative_error(g, r) for g, r in zip(grads, ref_grads, strict=True)]
    return max([relative_error(out, ref_out), *errors])


def _sequence_parallel(
    rank: int, world: int, cases: list[tuple[str, str, int, int]], device: str = "cpu", dtype=torch.float32
) -> dict:
    """Output and gradient error of each (model, mode) against the same model in one process."""
    torch.backends.cudnn.allow_tf32 = False  # fp32 on GPU means fp32
    errors = {}
    for name, mode, ulysses, ring in cases:
        cfg = ParallelConfig(sp_mode=mode, sp_ulysses=ulysses, sp_ring=ring)
        ctx = init_distributed(cfg, device)
        reference, inputs = build(name, ctx.device, dtype)
        model = copy.deepcopy(reference)
        ctx.counter = CommCounter()
        plan = parallelize(model, ctx, cfg, KernelsConfig(), _precision(dtype))
        assert plan.sequence_parallel == mode
        torch.manual_seed(1)
        out = model(*inputs)
        counted = {kind: (ctx.counter.calls[kind], ctx.counter.bytes_sent[kind]) for kind in ctx.counter.calls}
        element_bytes = torch.finfo(dtype).bits // 8
        formula = model_comm_per_forward(model, mode, ulysses, ring, 2, model.config.input_size, element_bytes)
        # The formula counts padded, uncompacted blocks: exact for all-to-alls, an upper bound for ring.
        for kind, (calls, nbytes) in formula.items():
            assert counted[kind][0] == calls, (name, mode, kind, counted, formula)
            assert counted[kind][1] == nbytes or (kind == "p2p" and 0 < counted[kind][1] <= nbytes), (
                name,
                mode,
                kind,
                counted,
                formula,
            )
        assert set(counted) == set(formula), (counted, formula)
        expected = reference(*inputs)
        # A loss that weighs every output element differently.
        weight = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1)).to(ctx.device)
        (out * weight.to(dtype)).sum().backward()
        (expected * weight.to(dtype)).sum().backward()
        grads = _gradients(model, ctx.comm("sp").group, world)  # averaged over ranks, as data parallelism does
        ref_grads = _gradients(reference)
        result = {"vs_one_process": _worst(out, grads, expected, ref_grads)}
        if dtype != torch.float32:  # how much the parallel run adds to the rounding one process already has
            exact, exact_inputs = build(name, ctx.device, torch.float32)
            exact_out = exact(*exact_inputs)
            (exact_out * weight).sum().backward()
            exact_grads = _gradients(exact)
            result["vs_fp32"] = _worst(out, grads, exact_out, exact_grads)
            result["one_process_vs_fp32"] = _worst(expected, ref_grads, exact_out, exact_grads)
        errors[(name, mode, ulysses, ring)] = result
    return errors


SP_CASES = {
    2: [
        (model, mode, 2 if mode != "ring" else 1, 2 if mode == "ring" else 1)
        for model, modes in {
            "dit": ("ulysses", "ring"),
            "latte": ("dsp", "ulysses", "ring"),
            "opensora": ("dsp", "ulysses", "ring"),
            "opensora_plan": ("ulysses", "ring"),
            "cogvideox": ("ulysses",),
        }.items()
        for mode in modes
    ],
    4: [
        ("dit", "ulysses", 4, 1),
        ("dit", "usp", 2, 2),
        ("latte", "dsp", 4, 1),
        ("latte", "ring", 1, 4),
        ("opensora", "dsp", 4, 1),
        ("opensora", "ulysses", 4, 1),
        ("opensora", "usp", 2, 2),
        ("opensora_plan", "ring", 1, 4),
        ("opensora_plan", "usp", 2, 2),
        ("cogvideox", "ulysses", 4, 1),
    ],
}


@pytest.mark.parametrize("world", [2, 4])
def test_sequence_parallel_equals_one_process(world):
    errors = run_ranks(world, _sequence_parallel, SP_CASES[world])
    assert len(errors) == len(SP_CASES[world])
    bad = {case: err for case, err in errors.items() if not err["vs_one_process"] <= TOLERANCE}
    assert not bad, f"relative error above {TOLERANCE}: {bad}"


def test_unsupported_mode_is_refused_before_work():
    from videosys.distributed import resolve_dims, validate_for_model

    dims = resolve_dims(ParallelConfig(sp_mode="dsp", sp_ulysses=4), 4)
    with pytest.raises(ConfigError, match="sp_mode=dsp is not supported by model=opensora_plan"):
        validate_for_model(dims, "opensora_plan", OpenSoraPlan.sequence_parallel_modes, 4, "train")
    dims = resolve_dims(ParallelConfig(sp_mode="ulysses", sp_ulysses=4), 4)
    with pytest.raises(ConfigError, match="sp_ulysses=4 does not divide model=latte's 6 attention heads"):
        validate_for_model(dims, "latte", Latte.sequence_parallel_modes, 6, "train")


def _global_batch(model: torch.nn.Module, inputs: tuple) -> tuple[tuple, torch.Tensor]:
    """A batch of 4 built from the 2-sample inputs, and a regression target for the model's output."""
    doubled = tuple(torch.cat([t, t.flip(0)]) if t.dim() else t for t in inputs)
    noise = torch.randn(doubled[0].shape, generator=torch.Generator().manual_seed(5))
    batch = (doubled[0] + 0.1 * noise.to(doubled[0]), *doubled[1:])
    with torch.no_grad():
        out = model(*batch)
    return batch, torch.randn(out.shape, generator=torch.Generator().manual_seed(6)).to(out)


def _prepare(name: str, degrees: dict, device: str, dtype: torch.dtype, kernels: KernelsConfig | None = None):
    """The run context, the one-process model, a parallelized copy, and a batch of 4 with its target."""
    cfg = ParallelConfig(**degrees)
    ctx = init_distributed(cfg, device)
    reference, inputs = build(name, ctx.device, dtype)
    batch, target = _global_batch(reference, inputs)
    model = copy.deepcopy(reference)
    parallelize(model, ctx, cfg, kernels or KernelsConfig(), _precision(dtype))
    return ctx, cfg, reference, model, batch, target


def _data_parallel(
    rank: int, world: int, cases: list[tuple[str, dict]], device: str = "cpu", dtype=torch.float32, kernels=None
) -> dict:
    """Gradients of one step and the losses of 20 AdamW steps, FSDP2 (+ sequence parallel) against one process."""
    torch.backends.cudnn.allow_tf32 = False  # fp32 on GPU means fp32
    from videosys.parallelize import shard_parameters

    results = {}
    for name, degrees in cases:
        ctx, cfg, reference, model, batch, target = _prepare(name, degrees, device, dtype, kernels)
        shard_parameters(model, ctx, cfg)
        dp_rank = ctx.dims.dp_rank(rank)
        local = tuple(t.chunk(ctx.dims.dp)[dp_rank] if t.dim() else t for t in batch)
        local_target = target.chunk(ctx.dims.dp)[dp_rank]
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-3)
        grad_error, losses, ref_losses = 0.0, [], []
        for step in range(20):
            loss = (model(*local) - local_target).square().mean()
            loss.backward()
            ref_loss = (reference(*batch) - target).square().mean()
            ref_loss.backward()
            if step == 0:
                for p, ref in zip(model.parameters(), reference.parameters(), strict=True):
                    grad_error = max(grad_error, relative_error(p.grad.full_tensor(), ref.grad))
            reported = loss.detach().float()
            dist.all_reduce(reported)  # every rank's mean; sp ranks repeat their dp rank's value
            losses.append(reported.item() / world)
            ref_losses.append(ref_loss.item())
            for optimizer in (opt, ref_opt):
                optimizer.step()
                optimizer.zero_grad()
        results[name, tuple(sorted(degrees.items()))] = (grad_error, losses, ref_losses)
    return results


DP_CASES = {
    2: [
        ("dit", dict(dp_replicate=2)),  # ddp
        ("dit", dict(dp_shard=2, zero_stage=2)),
        ("dit", dict(dp_shard=2, zero_stage=3)),
    ],
    4: [
        ("dit", dict(dp_replicate=2, dp_shard=2, zero_stage=3)),  # HSDP
        ("latte", dict(dp_shard=2, sp_ulysses=2, sp_mode="dsp")),  # dp x sp
        ("opensora_plan", dict(dp_replicate=2, sp_ring=2, sp_mode="ring")),
    ],
}


@pytest.mark.parametrize("world", [2, 4])
def test_data_parallel_training_equals_one_process(world):
    results = run_ranks(world, _data_parallel, DP_CASES[world])
    assert len(results) == len(DP_CASES[world])
    for case, (grad_error, losses, ref_losses) in results.items():
        assert grad_error <= TOLERANCE, (case, grad_error)
        assert ref_losses[-1] < 0.9 * ref_losses[0], (case, ref_losses)  # the steps do train
        for step, (loss, ref) in enumerate(zip(losses, ref_losses, strict=True)):
            assert abs(loss - ref) <= TOLERANCE * abs(ref), (case, step, loss, ref)


# Compiled blocks under ZeRO-2 (FSDP2 hooks stay eager around each compiled block) and under DSP
# (the blocks compile in pieces around the sequence-parallel attention).
COMPILE_CASES = [("dit", dict(dp_shard=2, zero_stage=2)), ("latte", dict(sp_ulysses=2, sp_mode="dsp"))]


def test_compiled_blocks_compose_with_parallel_modes():
    """kernels.compile=true on 2 ranks: gradients and 20 AdamW losses equal one eager process."""
    results = run_ranks(2, _data_parallel, COMPILE_CASES, "cpu", torch.float32, KernelsConfig(compile=True))
    assert len(results) == len(COMPILE_CASES)
    for case, (grad_error, losses, ref_losses) in results.items():
        assert grad_error <= TOLERANCE, (case, grad_error)
        for step, (loss, ref) in enumerate(zip(losses, ref_losses, strict=True)):
            assert abs(loss - ref) <= TOLERANCE * abs(ref), (case, step, loss, ref)


def _cfg_parallel(rank: int, world: int, cases: list[tuple[str, dict]]) -> dict:
    """Denoiser output on a [conditional; unconditional] batch with CFG (x sequence) parallelism."""
    from videosys.parallelize import cfg_parallel

    errors = {}
    for name, degrees in cases:
        ctx, _, reference, model, batch, _ = _prepare(name, degrees, "cpu", torch.float32)
        denoise = cfg_parallel(model, ctx)
        with torch.no_grad():
            errors[name, tuple(sorted(degrees.items()))] = relative_error(denoise(*batch), reference(*batch))
    return errors


CFG_CASES = [
    ("dit", dict(cfg=2, dp_shard=2)),
    ("latte", dict(cfg=2, sp_ulysses=2, sp_mode="dsp")),
    ("opensora_plan", dict(cfg=2, sp_ulysses=2, sp_mode="ulysses")),
]


def test_cfg_parallel_sampling_equals_one_process():
    errors = run_ranks(4, _cfg_parallel, CFG_CASES)
    assert len(errors) == len(CFG_CASES)
    assert all(err <= TOLERANCE for err in errors.values()), errors


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_parallel_modes_on_gpus():
    """The same checks with NCCL on 2 or 4 GPUs. fp32 (TF32 off): equal to one GPU within 1e-5.
    bf16: the parallel run's error against fp32 is at most what one bf16 GPU already has (x 1.5,
    plus 1e-3), so parallelism adds nothing beyond rounding. Every error is printed for the docs."""
    world = 4 if torch.cuda.device_count() >= 4 else 2
    for dtype in (torch.float32, torch.bfloat16):
        sp = run_ranks(world, _sequence_parallel, SP_CASES[world], "cuda", dtype, backend="nccl")
        dp = run_ranks(world, _data_parallel, DP_CASES[world], "cuda", dtype, backend="nccl")
        for case, errors in sp.items():
            print(
                f"{dtype} {world} GPUs sequence parallel {case}: "
                + ", ".join(f"{k} {v:.2e}" for k, v in errors.items())
            )
        for case, (grad_error, losses, ref_losses) in dp.items():
            loss_error = max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses, strict=True))
            print(
                f"{dtype} {world} GPUs data parallel {case}: gradient {grad_error:.2e}, 20-step losses {loss_error:.2e}"
            )
        assert len(sp) == len(SP_CASES[world]) and len(dp) == len(DP_CASES[world])
        if dtype == torch.float32:
            assert all(e["vs_one_process"] <= TOLERANCE for e in sp.values()), sp
            assert all(g <= TOLERANCE for g, _, _ in dp.values()), dp
        else:
            worse = {c: e for c, e in sp.items() if e["vs_fp32"] > 1.5 * e["one_process_vs_fp32"] + 1e-3}
            assert not worse, worse
        tolerance = TOLERANCE if dtype == torch.float32 else 0.02
        for case, (_, losses, ref_losses) in dp.items():
            assert all(abs(a - b) <= tolerance * abs(b) for a, b in zip(losses, ref_losses, strict=True)), case


def test_parallelize_refuses_what_the_model_cannot_split():
    """The same checks as the dry run, applied by `parallelize` itself (fake backend, one process)."""
    from videosys.distributed import shutdown_distributed

    model, _ = build("latte")  # 4 heads, no full-3D attention
    cases = [
        (ParallelConfig(sp_mode="ulysses", sp_ulysses=8), "sp_ulysses=8 does not divide model=latte's 4"),
        (ParallelConfig(sp_mode="dsp", sp_ulysses=2), None),
    ]
    for cfg, message in cases:
        ctx = init_distributed(cfg, "cpu", fake_world_size=cfg.sp_ulysses)
        try:
            if message is None:
                assert parallelize(copy.deepcopy(model), ctx, cfg, KernelsConfig(), PrecisionConfig()).sequence_parallel
            else:
                with pytest.raises(ConfigError, match=message):
                    parallelize(copy.deepcopy(model), ctx, cfg, KernelsConfig(), PrecisionConfig())
        finally:
            shutdown_distributed()
    plan_model, _ = build("opensora_plan")
    ctx = init_distributed(ParallelConfig(sp_mode="dsp", sp_ulysses=2), "cpu", fake_world_size=2)
    try:
        with pytest.raises(ConfigError, match="sp_mode=dsp is not supported by model=opensora_plan"):
            parallelize(plan_model, ctx, ParallelConfig(), KernelsConfig(), PrecisionConfig())
    finally:
        shutdown_distributed()
