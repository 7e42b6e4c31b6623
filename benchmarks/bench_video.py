"""One denoising step of the video transformers at published sizes, ours against diffusers.

Random weights in bf16, batch 1 with classifier-free guidance (so a batch of 2), random latents
and text embeddings of the published token counts. Against diffusers both models hold the same
weights (the peer's, converted by our adapter), so they do identical math on identical values
(GPU power, and so clocks, depend on the values) and the bench reports how far their bf16
outputs differ. Timing alternates ours and the peer for `--rounds` rounds of `--iters` steps
after `--warmup`, and reports the median round: mean step latency, achieved TFLOP/s (FLOPs
counted once with torch's FLOP counter on our model) and peak allocated memory.

    python benchmarks/bench_video.py --out bench_video.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from videosys.models.cogvideox import CogVideoX, CogVideoXConfig
from videosys.models.cogvideox import convert_diffusers_state_dict as convert_cogvideox
from videosys.models.latte import Latte, LatteConfig
from videosys.models.latte import convert_diffusers_state_dict as convert_latte
from videosys.models.opensora import OpenSora, OpenSoraConfig

DTYPE = torch.bfloat16
BATCH = 2  # batch 1 plus its unconditional (CFG) half


def build(model_cls, cfg, device):
    with torch.device("meta"):
        model = model_cls(cfg)
    model.to_empty(device=device)
    model.init_weights()
    return model.to(DTYPE).eval()


def timed(fn, warmup: int, iters: int) -> tuple[float, float]:
    """Mean milliseconds per call and peak GiB allocated during the timed calls."""
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters * 1e3, torch.cuda.max_memory_allocated() / 2**30


def shared_weights(peer, model, convert, cfg, device) -> None:
    """Give the diffusers peer sane random weights (matrices N(0, 0.02), norm gains 1, biases and
    tables N(0, 0.02)) and load exactly those into our model through the adapter."""
    with torch.no_grad():
        for name, p in peer.named_parameters():
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02)
    peer.to(DTYPE).eval()
    state = {k: v for k, v in peer.state_dict().items()}
    model.load_state_dict(convert(state, cfg), strict=True)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def flops(fn) -> float:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def opensora_cases(device, args):
    cases = []
    for label, (frames, height, width) in {
        "480p 51f": (15, 60, 106),  # 51 frames -> 15 latent frames (17 -> 5), 480x854 / 8
        "480p 102f": (30, 60, 106),
        "720p 51f": (15, 90, 160),
        "720p 102f": (30, 90, 160),
    }.items():
        cfg = OpenSoraConfig(flavor="STDiT3-XL/2", input_size=[frames, height, width], in_channels=4)
        cases.append(("opensora STDiT3-XL/2", label, cfg, frames, height, width))
    return cases


def run_opensora(device, args, results):
    for name, label, cfg, frames, height, width in opensora_cases(device, args):
        model = build(OpenSora, cfg, device)
        x = torch.randn(BATCH, 4, frames, height, width, device=device, dtype=DTYPE)
        t = torch.full((BATCH,), 500.0, device=device)
        text = torch.randn(BATCH, 300, 4096, device=device, dtype=DTYPE)

        def ours(model=model, x=x, t=t, text=text, height=height, width=width):
            model(x, t, text, None, fps=24.0, height=height * 8, width=width * 8)

        record(results, name, label, ours, None, args)
        torch.cuda.empty_cache()


def run_latte(device, args, results):
    from diffusers import LatteTransformer3DModel

    cfg = LatteConfig(flavor="XL/2", input_size=[16, 64, 64], in_channels=4)
    model = build(Latte, cfg, device)
    x = torch.randn(BATCH, 4, 16, 64, 64, device=device, dtype=DTYPE)
    t = torch.full((BATCH,), 500.0, device=device)
    text = torch.randn(BATCH, 120, 4096, device=device, dtype=DTYPE)
    with torch.device(device):  # not meta: the peer computes its position buffers at init
        peer = LatteTransformer3DModel(
            num_attention_heads=16,
            attention_head_dim=72,
            in_channels=4,
            out_channels=8,
            num_layers=28,
            cross_attention_dim=1152,
            attention_bias=True,
            sample_size=64,
            patch_size=2,
            activation_fn="gelu-approximate",
            num_embeds_ada_norm=1000,
            norm_type="ada_norm_single",
            norm_elementwise_affine=False,
            norm_eps=1e-6,
            caption_channels=4096,
            video_length=16,
        )
    shared_weights(peer, model, convert_latte, cfg, device)

    def ours():
        return model(x, t, text, None)

    def theirs():
        return peer(x, encoder_hidden_states=text, timestep=t, return_dict=False)[0]

    record(results, "latte XL/2", "16x512x512", ours, theirs, args)


def run_cogvideox(device, args, results):
    from diffusers import CogVideoXTransformer3DModel
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    cfg = CogVideoXConfig(flavor="5B", input_size=[13, 60, 90], in_channels=16)
    model = build(CogVideoX, cfg, device)
    x = torch.randn(BATCH, 16, 13, 60, 90, device=device, dtype=DTYPE)
    t = torch.full((BATCH,), 500, device=device, dtype=torch.long)
    text = torch.randn(BATCH, 226, 4096, device=device, dtype=DTYPE)
    with torch.device(device):  # not meta: the peer computes its position buffers at init
        peer = CogVideoXTransformer3DModel(
            num_attention_heads=48,
            attention_head_dim=64,
            in_channels=16,
            out_channels=16,
            time_embed_dim=512,
            text_embed_dim=4096,
            num_layers=42,
            sample_width=90,
            sample_height=60,
            sample_frames=49,
            patch_size=2,
            temporal_compression_ratio=4,
            max_text_seq_length=226,
            use_rotary_positional_embeddings=True,
            use_learned_positional_embeddings=False,
        )
    shared_weights(peer, model, convert_cogvideox, cfg, device)
    # The pipeline's rotary tables for a 60x90 latent (30x45 patches) and 13 latent frames.
    cos, sin = get_3d_rotary_pos_embed(
        embed_dim=64,
        crops_coords=((0, 0), (30, 45)),
        grid_size=(30, 45),
        temporal_size=13,
        device=device,
    )
    x_peer = x.transpose(1, 2).contiguous()

    def ours():
        return model(x, t, text, None)

    def theirs():  # diffusers returns (B, T, C, H, W)
        out = peer(x_peer, encoder_hidden_states=text, timestep=t, image_rotary_emb=(cos, sin), return_dict=False)
        return out[0].transpose(1, 2)

    record(results, "cogvideox 5B", "49x480x720", ours, theirs, args)


def record(results, name, label, ours, theirs, args):
    step_flops = flops(ours)
    row = {"model": name, "config": label, "batch": BATCH, "tflop_per_step": step_flops / 1e12}
    contenders = {"ours": ours} if theirs is None else {"ours": ours, "diffusers": theirs}
    rounds = {name: [] for name in contenders}
    for _ in range(args.rounds):  # alternate, so that clock drift hits both alike
        for name, fn in contenders.items():
            rounds[name].append(timed(fn, args.warmup, args.iters))
    for name, measured in rounds.items():
        row[f"{name}_ms_rounds"] = [ms for ms, _ in measured]
        row[f"{name}_ms"] = statistics.median(row[f"{name}_ms_rounds"])
        row[f"{name}_peak_gib"] = max(gib for _, gib in measured)
        row[f"{name}_tflops"] = step_flops / (row[f"{name}_ms"] / 1e3) / 1e12
    if theirs is not None:
        row["speedup"] = row["diffusers_ms"] / row["ours_ms"]
        with torch.no_grad():
            row["bf16_relative_error"] = relative_error(ours(), theirs())
    results.append(row)
    print(json.dumps(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default="opensora,latte,cogvideox")
    parser.add_argument("--out", default="bench_video.json")
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    results = []
    runners = {"opensora": run_opensora, "latte": run_latte, "cogvideox": run_cogvideox}
    for name in args.only.split(","):
        runners[name](device, args, results)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": "bf16"}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
    header = f"{'model':22} {'config':12} {'ours ms':>9} {'TFLOP/s':>8} {'GiB':>6}"
    print(f"\n{header} {'diffusers ms':>13} {'GiB':>6} {'speedup':>8}")
    for r in results:
        peer = (
            f"{r['diffusers_ms']:13.1f} {r['diffusers_peak_gib']:6.1f} {r['speedup']:8.3f}"
            if "diffusers_ms" in r
            else f"{'-':>13} {'-':>6} {'-':>8}"
        )
        ours = f"{r['model']:22} {r['config']:12} {r['ours_ms']:9.1f} {r['ours_tflops']:8.1f} {r['ours_peak_gib']:6.1f}"
        print(f"{ours} {peer}")


if __name__ == "__main__":
    main()
