"""Peer measurement: diffusers' DiTTransformer2DModel at DiT-XL/2 256px under VideoSys's training
step (same diffusion objective, `optimizer_step`, AdamW, bf16 autocast, synthetic latents), so the
only difference to `task=bench model.flavor=XL/2 data=synthetic precision=bf16` is the model code.

    python benchmarks/peer_diffusers_dit.py --batch-size 64 --mode train
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from diffusers import DiTTransformer2DModel
from torch import nn

from videosys.diffusion import DiffusionConfig, GaussianDiffusion
from videosys.precision import PrecisionConfig, autocast, make_grad_scaler
from videosys.tasks.bench import count_flops
from videosys.tasks.train import OptimizerConfig, make_optimizer, optimizer_step


class DiffusersDiT(nn.Module):
    """Gives diffusers' model VideoSys's call signature model(x, t, y) -> tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.model = DiTTransformer2DModel(
            num_attention_heads=16,
            attention_head_dim=72,
            in_channels=4,
            out_channels=8,
            num_layers=28,
            sample_size=32,
            patch_size=2,
            num_embeds_ada_norm=1000,
        )

    def forward(self, x, t, y):
        return self.model(x, t, y).sample


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--mode", choices=["train", "forward"], default="train")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = DiffusersDiT().to(device)
    bf16 = PrecisionConfig(name="bf16", dtype="bf16")
    b = args.batch_size
    x = torch.randn(b, 4, 32, 32, device=device)
    y = torch.randint(0, 1000, (b,), device=device)
    if args.mode == "train":
        model.train()
        diffusion = GaussianDiffusion(DiffusionConfig(), learn_sigma=True, device=device)
        optimizer = make_optimizer(model, OptimizerConfig(), device)
        scaler = make_grad_scaler(bf16, device)

        def step():
            optimizer_step(model, diffusion, [(x, y)], optimizer, scaler, bf16, 1.0)
    else:
        model.eval()
        t = torch.randint(0, 1000, (b,), device=device)

        @torch.no_grad()
        def step():
            with autocast(bf16, device):
                model(x, t, y)

    for _ in range(args.warmup):
        step()
    flops = count_flops(step)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    mean = statistics.fmean(times)
    result = {
        "peer": "diffusers.DiTTransformer2DModel",
        "mode": args.mode,
        "batch_size": b,
        "latency_ms_mean": mean * 1e3,
        "latency_ms_median": statistics.median(times) * 1e3,
        "samples_per_second": b / mean,
        "achieved_tflops": flops / mean / 1e12,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
