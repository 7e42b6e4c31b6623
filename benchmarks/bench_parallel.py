"""Sequence-parallel denoising step on several GPUs: equality with one GPU (bf16) and speed.

    torchrun --nproc_per_node=4 benchmarks/bench_parallel.py --model opensora --out bench_parallel.json

For each sequence-parallel mode that fits the world size (dsp, ulysses, ring over all ranks; usp
as 2 x n/2), every rank builds the same random bf16 model (same seed), rank 0 times the plain model
alone (the one-GPU baseline), then all ranks run the parallel plan: the relative error of its output
against the one-GPU output, mean step latency (forward of batch 2 = 1 prompt + CFG), bytes each rank
sent per step (counted by the collectives) against `model_comm_per_forward`, and peak memory.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
import torch.distributed as dist

from videosys.distributed import CommCounter, ParallelConfig, init_distributed, shutdown_distributed
from videosys.models.latte import Latte, LatteConfig
from videosys.models.opensora import OpenSora, OpenSoraConfig
from videosys.ops import KernelsConfig
from videosys.parallelize import model_comm_per_forward, parallelize
from videosys.precision import PrecisionConfig

DTYPE = torch.bfloat16
CASES = {
    # Open-Sora 1.2 720p x 102 frames: 30 x 90 x 160 latents, 300 T5 tokens.
    "opensora": (OpenSora, lambda: OpenSoraConfig(flavor="STDiT3-XL/2", input_size=[30, 90, 160], in_channels=4), 300),
    # Latte 16 x 512 x 512: 16 x 64 x 64 latents, 120 T5 tokens.
    "latte": (Latte, lambda: LatteConfig(flavor="XL/2", input_size=[16, 64, 64], in_channels=4), 120),
}


def timed(fn, warmup: int, iters: int) -> float:
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters * 1e3


def modes_for(world: int) -> list[tuple[str, int, int]]:
    modes = [("dsp", world, 1), ("ulysses", world, 1), ("ring", 1, world)]
    if world >= 4:
        modes.append(("usp", 2, world // 2))
    return modes


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="opensora", choices=sorted(CASES))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--out", default="bench_parallel.json")
    args = parser.parse_args()
    probe = init_distributed(ParallelConfig(dp_replicate=-1), "auto")
    world, rank, device = probe.world_size, probe.rank, probe.device
    torch.backends.cuda.matmul.allow_tf32 = True
    cls, make_cfg, text_len = CASES[args.model]
    cfg = make_cfg()
    torch.manual_seed(0)
    with torch.device("meta"):
        reference = cls(cfg)
    reference.to_empty(device=device)
    reference.init_weights()
    with torch.no_grad():  # zero-initialised layers (e.g. Latte's output) would make the output all zeros
        for p in reference.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    reference = reference.to(DTYPE).eval()
    generator = torch.Generator(device).manual_seed(1)
    x = torch.randn(2, 4, *cfg.input_size, device=device, dtype=DTYPE, generator=generator)
    t = torch.full((2,), 500.0, device=device)
    text = torch.randn(2, text_len, 4096, device=device, dtype=DTYPE, generator=generator)
    inputs = (x, t, text, None)
    with torch.no_grad():
        expected = reference(*inputs).float()
    rows = []
    if rank == 0:
        torch.cuda.reset_peak_memory_stats()
        ms = timed(lambda: reference(*inputs), args.warmup, args.iters)
        rows.append({"mode": "none", "sp": 1, "ms": ms, "peak_gib": torch.cuda.max_memory_allocated() / 2**30})
    dist.barrier()
    for mode, ulysses, ring in modes_for(world):
        parallel = ParallelConfig(sp_mode=mode, sp_ulysses=ulysses, sp_ring=ring)
        ctx = init_distributed(parallel, "auto")
        ctx.counter = CommCounter()
        model = copy.deepcopy(reference)
        parallelize(model, ctx, parallel, KernelsConfig(), PrecisionConfig(dtype="bf16"))
        with torch.no_grad():
            out = model(*inputs).float()
        error = ((out - expected).norm() / expected.norm()).item()
        ctx.counter.reset()
        with torch.no_grad():
            model(*inputs)
        counted = {kind: [ctx.counter.calls[kind], ctx.counter.bytes_sent[kind]] for kind in ctx.counter.calls}
        formula = model_comm_per_forward(model, mode, ulysses, ring, 2, cfg.input_size, 2)
        torch.cuda.reset_peak_memory_stats()
        ms = timed(lambda model=model: model(*inputs), args.warmup, args.iters)
        peak = torch.tensor(torch.cuda.max_memory_allocated() / 2**30, device=device)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        latency = torch.tensor(ms, device=device)
        dist.all_reduce(latency, op=dist.ReduceOp.MAX)
        rows.append(
            {
                "mode": mode,
                "sp": world,
                "ulysses": ulysses,
                "ring": ring,
                "ms": latency.item(),
                "peak_gib": peak.item(),
                "bf16_relative_error": error,
                "bytes_counted": counted,
                "bytes_formula": {k: list(v) for k, v in formula.items()},
            }
        )
        del model
        torch.cuda.empty_cache()
    if rank == 0:
        base = rows[0]["ms"]
        for row in rows:
            row["speedup"] = base / row["ms"]
        meta = {"model": args.model, "world": world, "device": torch.cuda.get_device_name(), "torch": torch.__version__}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=2)
        print(f"{'mode':8} {'sp':>3} {'ms':>9} {'speedup':>8} {'GiB':>6} {'err':>8} {'MiB sent (counted/formula)':>28}")
        for r in rows:
            sent = sum(b for _, b in r.get("bytes_counted", {}).values()) / 2**20
            formula = sum(b for _, b in r.get("bytes_formula", {}).values()) / 2**20
            err = r.get("bf16_relative_error", 0.0)
            print(
                f"{r['mode']:8} {r['sp']:>3} {r['ms']:9.1f} {r['speedup']:8.2f} {r['peak_gib']:6.1f} {err:8.4f} "
                f"{sent:13.1f} / {formula:.1f}"
            )
    shutdown_distributed()


if __name__ == "__main__":
    main()
