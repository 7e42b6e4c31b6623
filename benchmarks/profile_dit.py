"""Profile one DiT-XL/2 bf16 training step (VideoSys vs diffusers): the top aten ops by GPU time, and the
step's GPU time by kernel family (GEMM, attention, Triton, copies, optimizer, other: `kernel_family`).

    python benchmarks/profile_dit.py              # VideoSys and diffusers, eager
    python benchmarks/profile_dit.py --compile    # VideoSys with every block compiled (kernels=compile)
    python benchmarks/profile_dit.py --compile --scope model --mode reduce-overhead   # the whole forward
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from videosys.diffusion import DiffusionConfig, GaussianDiffusion
from videosys.models.dit import DiT, DiTConfig
from videosys.parallelize import compile_blocks, compile_model, compile_settings
from videosys.precision import PrecisionConfig, make_grad_scaler
from videosys.tasks.train import OptimizerConfig, make_optimizer, optimizer_step


def run(name, model, batch=64, top_kernels=0):
    device = torch.device("cuda")
    bf16 = PrecisionConfig(name="bf16", dtype="bf16")
    x = torch.randn(batch, 4, 32, 32, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    diffusion = GaussianDiffusion(DiffusionConfig(), learn_sigma=True, device=device)

    def objective(m, x0, inputs, draws):
        return diffusion.training_loss(m, x0, draws, **inputs)

    optimizer = make_optimizer(model, OptimizerConfig(), device)
    scaler = make_grad_scaler(bf16, device)
    for _ in range(3):
        optimizer_step(model, objective, [(x, {"y": y}, None)], optimizer, scaler, bf16, 1.0)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(10):
        optimizer_step(model, objective, [(x, {"y": y}, None)], optimizer, scaler, bf16, 1.0)
    torch.cuda.synchronize()
    wall = (time.perf_counter() - started) / 10 * 1e3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        for _ in range(2):
            optimizer_step(model, objective, [(x, {"y": y}, None)], optimizer, scaler, bf16, 1.0)
        torch.cuda.synchronize()
    print(f"===== {name}")
    events = [e for e in prof.key_averages(group_by_input_shape=True) if e.key.startswith("aten::")]
    events.sort(key=lambda e: e.self_device_time_total, reverse=True)
    for e in events[:28]:
        print(f"{e.self_device_time_total / 1e3:8.2f} ms  {e.count:5d}  {e.key:36s} {str(e.input_shapes)[:110]}")
    # A CUDA-only profile for the split: with CPU activity on, some kernels are also listed under the op
    # that launched them, and a sum over events counts them twice.
    with profile(activities=[ProfilerActivity.CUDA]) as kernels_only:
        for _ in range(2):
            optimizer_step(model, objective, [(x, {"y": y}, None)], optimizer, scaler, bf16, 1.0)
        torch.cuda.synchronize()
    per_family, per_kernel = collections.Counter(), collections.Counter()
    for e in kernels_only.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per_family[kernel_family(e.name)] += e.device_time / 2 / 1e3  # two profiled steps
            per_kernel[e.name[:90]] += e.device_time / 2 / 1e3
    for kernel, ms in per_kernel.most_common(top_kernels):
        print(f"{ms:8.2f} ms  {kernel}")
    families = ", ".join(f"{k} {v:.1f}" for k, v in per_family.items())
    print(f"GPU busy {sum(per_family.values()):.1f} ms/step of {wall:.1f} ms wall: {families}")


def kernel_family(name: str) -> str:
    """A CUDA kernel's family by its name: GEMM (cuBLAS' nvjet, cutlass), attention (cuDNN, flash,
    memory-efficient), NCCL (includes waiting for other ranks), the project's Triton kernels, copies,
    the fused optimizer's multi-tensor kernels; everything else is other elementwise work or a reduction."""
    lowered = name.lower()
    if "nccl" in lowered:
        return "nccl"
    if any(k in lowered for k in ("fmha", "flash", "cudnn", "attention", "sdpa")):
        return "attention"
    if any(k in lowered for k in ("gemm", "nvjet", "xmma", "cutlass", "cublas", "matmul")):
        return "gemm"
    if any(k in lowered for k in ("multi_tensor", "adam", "foreach")):
        return "optimizer"
    if lowered.startswith("_") and "kernel" in lowered:  # _norm_fwd_kernel, _scale_add_bwd_kernel, ...
        return "triton"
    if any(k in lowered for k in ("cat", "copy", "stack", "nocast")):  # nocast: TensorIterator copies
        return "copies"
    return "other elementwise and reductions"


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--compile", action="store_true", help="VideoSys only, compiled (kernels.compile=true)")
    parser.add_argument("--scope", default="blocks", choices=["blocks", "model"], help="kernels.compile_scope")
    parser.add_argument("--mode", default="default", help="kernels.compile_mode")
    parser.add_argument("--top-kernels", type=int, default=0, help="also list the N kernels with most GPU time")
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = DiTConfig(flavor="XL/2", input_size=32, in_channels=4, num_classes=1000)
    if args.compile:
        model = DiT(cfg).cuda()
        settings = compile_settings(args.mode)
        if args.scope == "model":
            compile_model(model, settings)
        else:
            compile_blocks(model, settings, fullgraph=True)
        run(f"videosys, {args.scope} compiled, mode {args.mode}", model, top_kernels=args.top_kernels)
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from peer_diffusers_dit import DiffusersDiT  # the peer needs diffusers; importing kernel_family does not

        run("videosys", DiT(cfg).cuda(), top_kernels=args.top_kernels)
        run("diffusers", DiffusersDiT().cuda())
