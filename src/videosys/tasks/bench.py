"""task=bench: time training or inference steps on random inputs of the model's shape.

Writes bench.json with per-step latency, samples/s, FLOPs (counted by torch's FLOP counter on
the real operations, so it covers any model), achieved TFLOP/s, MFU against a peak and peak
memory.
"""

from __future__ import annotations

import json
import logging
import platform
import resource
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from videosys.data import build_dataset
from videosys.diffusion import DiffusionConfig, GaussianDiffusion
from videosys.distributed import ParallelConfig
from videosys.encoders import VAEConfig
from videosys.errors import ConfigError
from videosys.models import model_entry
from videosys.ops import KernelsConfig
from videosys.parallelize import shard_parameters
from videosys.precision import PrecisionConfig, autocast, make_grad_scaler
from videosys.tasks.common import RunContext, prepare_model, resolve_model_config
from videosys.tasks.train import OptimizerConfig, make_optimizer, optimizer_step

log = logging.getLogger(__name__)

# Dense bf16/fp16 tensor-core peaks (TFLOP/s) by device-name fragment, most specific first.
PEAK_TFLOPS_16BIT = {
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H200": 989.4,
    "H100": 989.4,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 125.0,
}


@dataclass
class BenchTaskConfig:
    name: str = "bench"
    mode: str = "train"  # train: forward + backward + optimizer step; forward: one inference forward
    batch_size: int = 32  # per data-parallel rank
    warmup_steps: int = 5
    steps: int = 20
    peak_tflops: float | None = None  # None: known GPUs' dense 16-bit peak (bf16/fp16 only)
    activation_checkpointing: bool = False


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# torch's counter knows the CUDA attention kernels but not SDPA's CPU flash kernel.
_EXTRA_FLOP_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
}


def count_flops(step) -> int:
    """FLOPs of one call of `step`, counted on the real operations it runs."""
    # Compiled blocks run eagerly while counting: the counter sees the real operations, not graphs.
    with (
        torch.compiler.set_stance("force_eager"),
        FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS) as counter,
    ):
        step()
    return counter.get_total_flops()


def default_peak_tflops(device: torch.device, dtype: str) -> float | None:
    if device.type != "cuda" or dtype == "fp32":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS_16BIT.items() if key in name), None)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(
    ctx: RunContext,
    *,
    model_cfg,
    data_cfg,
    vae: VAEConfig,
    diffusion_cfg: DiffusionConfig,
    optimizer_cfg: OptimizerConfig,
    task: BenchTaskConfig,
    precision: PrecisionConfig,
    parallel: ParallelConfig,
    kernels: KernelsConfig,
    text_encoder=None,
) -> dict:
    del text_encoder  # video models are timed with benchmarks/bench_video.py for now
    if model_entry(model_cfg.name).is_video:
        raise ConfigError(
            f"task=bench times image models; for model={model_cfg.name} run benchmarks/bench_video.py "
            "(one denoising step at published sizes, against diffusers)"
        )
    if task.mode not in ("train", "forward"):
        raise ConfigError(f"task.mode={task.mode!r} is not known; use train or forward")
    for key in ("batch_size", "steps"):
        if getattr(task, key) < 1:
            raise ConfigError(f"task.{key}={getattr(task, key)} must be at least 1")
    device = ctx.device
    spec = build_dataset(data_cfg)[1]
    model_cfg = resolve_model_config(model_cfg, spec, vae)
    model = prepare_model(
        model_cfg, ctx, parallel, kernels, precision, task.activation_checkpointing, training=task.mode == "train"
    )
    diffusion = GaussianDiffusion(diffusion_cfg.resolved(), model.learn_sigma, device)
    shape = (task.batch_size, model.in_channels, model.input_size, model.input_size)
    x = torch.randn(shape, device=device)
    y = torch.randint(0, model_cfg.num_classes, (task.batch_size,), device=device)
    t = torch.randint(0, diffusion.num_timesteps, (task.batch_size,), device=device)

    @torch.no_grad()
    def forward() -> None:
        with autocast(precision, device):
            model(x, t, y)

    if task.mode == "train":
        model.train()
        shard_parameters(model, ctx.dist, parallel)
        optimizer = make_optimizer(model, optimizer_cfg, device)
        scaler = make_grad_scaler(precision, device)

        shards = ctx.dist.comm("fsdp") if ctx.dist.mesh is not None else None

        def step() -> None:
            objective = lambda m, x0, inputs, draws: diffusion.training_loss(m, x0, draws, **inputs)  # noqa: E731
            micro = [(x, {"y": y}, None)]
            optimizer_step(model, objective, micro, optimizer, scaler, precision, optimizer_cfg.grad_clip, shards)
    else:
        model.eval()
        step = forward

    for _ in range(task.warmup_steps):
        step()
    # Model FLOPs follow the usual MFU convention (training = 3x forward); executed FLOPs are what
    # actually ran, including the forward recomputed under activation checkpointing.
    model_flops = count_flops(forward) * (3 if task.mode == "train" else 1)
    executed_flops = count_flops(step)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    latencies = []
    for _ in range(task.steps):
        started = time.perf_counter()
        step()
        _sync(device)
        latencies.append(time.perf_counter() - started)

    mean = statistics.fmean(latencies)
    achieved = model_flops / mean / 1e12
    peak = task.peak_tflops or default_peak_tflops(device, precision.dtype)
    if device.type == "cuda":
        peak_memory = torch.cuda.max_memory_allocated(device) / 2**30
        device_name = torch.cuda.get_device_name(device)
    else:
        peak_memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (process RSS)
        device_name = platform.processor() or platform.machine()
    result = {
        "model": model_cfg.name,
        "flavor": model_cfg.flavor,
        "parameters": sum(p.numel() for p in model.parameters()),
        "input_shape": list(shape),
        "mode": task.mode,
        "precision": precision.dtype,
        "attention": kernels.attention,
        "kernels": asdict(kernels),
        "activation_checkpointing": task.activation_checkpointing,
        "device": device_name,
        "world_size": ctx.dist.world_size,
        "warmup_steps": task.warmup_steps,
        "steps": task.steps,
        "latency_ms": {
            "mean": mean * 1e3,
            "median": statistics.median(latencies) * 1e3,
            "min": min(latencies) * 1e3,
            "max": max(latencies) * 1e3,
        },
        # task.batch_size is per data-parallel rank; sequence-parallel ranks share their samples.
        "samples_per_second": task.batch_size * ctx.dist.dims.dp / mean,
        "tflop_per_step": model_flops / 1e12,
        "executed_tflop_per_step": executed_flops / 1e12,
        "achieved_tflops": achieved,
        "executed_tflops": executed_flops / mean / 1e12,
        "peak_tflops": peak,
        "mfu": achieved / peak if peak else None,
        "peak_memory_gib": peak_memory,
        "peak_memory_kind": "cuda max allocated" if device.type == "cuda" else "process max RSS",
        "torch": torch.__version__,
        "commit": _git_commit(),
    }
    if ctx.dist.is_main:
        (ctx.run_dir / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
        log.info(
            "bench %s %s bs=%d: %.2f ms/step, %.1f samples/s, %.1f TFLOP/s%s, peak memory %.2f GiB",
            task.mode,
            model_cfg.flavor,
            task.batch_size,
            mean * 1e3,
            result["samples_per_second"],
            achieved,
            f" (MFU {result['mfu']:.1%})" if result["mfu"] else "",
            peak_memory,
        )
    return result
