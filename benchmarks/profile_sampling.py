"""Where one sampling forward's time goes: GPU kernel time by family, wall time, and the host's time.

One model call as bench_pab.py makes it (its models, sizes and random weights; batch 2 = one prompt and its
CFG half; kernels preset `--kernels`), on one GPU or under torchrun with `--sp` / `--cfg` as bench_pab takes
them. Prints, on rank 0: wall ms per forward; host ms per forward (the time to issue the calls before waiting
for the GPU: meaningful when the GPU is not the bottleneck, e.g. with a tiny `--size`, since a full launch queue
blocks the host); the GPU kernel time of one profiled forward by family (GEMM, attention, NCCL, Triton,
copies, other; NCCL time includes waiting for the other ranks); and the top kernels.

    python benchmarks/profile_sampling.py --model opensora
    torchrun --nproc_per_node=4 benchmarks/profile_sampling.py --model opensora --sp 4
    torchrun --nproc_per_node=4 benchmarks/profile_sampling.py --model opensora --cfg 2 --sp 2
    python benchmarks/profile_sampling.py --model opensora --size 15,8,8   # host time: GPU work near zero
    python benchmarks/profile_sampling.py --model cogvideox --kernels none --iters 2
    torchrun --nproc_per_node=4 benchmarks/profile_sampling.py --model opensora --sp 4 --cuda-graphs
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_pab  # noqa: E402
from bench_video import BATCH  # noqa: E402
from profile_dit import kernel_family  # noqa: E402

from videosys.diffusion import StepGraphs  # noqa: E402
from videosys.distributed import init_distributed, shutdown_distributed  # noqa: E402
from videosys.precision import PrecisionConfig  # noqa: E402
from videosys.tasks.common import denoiser  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="opensora", choices=bench_pab.MODELS)
    parser.add_argument("--kernels", default="fused", help="a configs/kernels/ preset")
    parser.add_argument("--size", default=None, help="latent T,H,W instead of the model's (e.g. 15,8,8)")
    parser.add_argument("--iters", type=int, default=5, help="timed forwards")
    parser.add_argument("--sp", type=int, default=1)
    parser.add_argument("--sp-mode", default="dsp", choices=bench_pab.SP_MODES)
    parser.add_argument("--cfg", type=int, default=1, choices=[1, 2])
    parser.add_argument("--cuda-graphs", action="store_true", help="replay the forward from a CUDA graph")
    args = parser.parse_args()

    case = bench_pab.cases(False)[args.model]
    if args.size:
        case.config = dataclasses.replace(case.config, input_size=[int(v) for v in args.size.split(",")])
    kernels = bench_pab.kernels_preset(args.kernels)
    precision = PrecisionConfig("bf16", "bf16")
    ctx = init_distributed(bench_pab.parallel_config(args), "cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.set_grad_enabled(False)
    model = bench_pab.build_model(case, ctx, kernels, precision)
    device = ctx.device
    shape = (model.in_channels, *model.config.input_size)
    text = torch.randn(BATCH, case.text_tokens, case.text_dim, device=device).to(precision.torch_dtype)
    x = torch.randn((BATCH, *shape), device=device).to(precision.torch_dtype)
    t = torch.full((BATCH,), 500.0, device=device)
    run = bench_pab.cfg_parallel(denoiser(model, precision, device), ctx)
    if args.cuda_graphs:
        run = StepGraphs(run)  # the first call runs eagerly and captures, the later ones replay

    def forward():
        return run(x, t, text, None)

    for _ in range(2):  # attention choice, allocator
        forward()
    torch.cuda.synchronize(device)
    bench_pab.barrier()
    start = time.perf_counter()
    for _ in range(args.iters):
        forward()
    host = (time.perf_counter() - start) / args.iters * 1e3
    torch.cuda.synchronize(device)
    wall = (time.perf_counter() - start) / args.iters * 1e3
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        forward()
        torch.cuda.synchronize(device)
    families, kernels_ms = collections.Counter(), collections.Counter()
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            families[kernel_family(event.name)] += event.device_time / 1e3
            kernels_ms[event.name[:90]] += event.device_time / 1e3
    if ctx.is_main:
        print(
            f"{args.model} {case.config.input_size} kernels={args.kernels}, graphs {args.cuda_graphs}, "
            f"world {ctx.world_size} "
            f"(cfg {args.cfg} x sp {args.sp} {args.sp_mode}): wall {wall:.1f} ms/forward, host {host:.1f} ms, "
            f"GPU busy {sum(families.values()):.1f} ms: " + ", ".join(f"{k} {v:.1f}" for k, v in families.most_common())
        )
        for name, ms in kernels_ms.most_common(12):
            print(f"  {ms:8.2f} ms  {name}")
    shutdown_distributed(wait_for_peers=True)


if __name__ == "__main__":
    main()
