"""One denoising step of the video transformers at published sizes, ours against diffusers.

Random weights in bf16, batch 1 with classifier-free guidance (so a batch of 2), random latents
and text embeddings of the published token counts. Against diffusers both models hold the same
weights (the peer's, converted by our adapter), so they do identical math on identical values
(GPU power, and so clocks, depend on the values) and the bench reports how far their bf16
outputs differ. Timing alternates ours and the peer for `--rounds` rounds of `--iters` steps
after `--warmup`, and reports the median round: mean step latency, achieved TFLOP/s (FLOPs
counted once with torch's FLOP counter on our model) and peak allocated memory.

`--kernels none,fused,fused_compile` times our model once per `kernels` preset (the same weights,
parallelized with that preset's attention backend, fused Triton kernels and torch.compile) and
reports each one's speedup over the first and its output's difference from the first.

    python benchmarks/bench_video.py --out bench_video.json
    python benchmarks/bench_video.py --only opensora --configs "480p 51f" --kernels none,fused,compile,fused_compile
"""

from __future__ import annotations

import argparse
import copy
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
from videosys.ops import KernelsConfig
from videosys.parallelize import parallelize
from videosys.precision import PrecisionConfig

DTYPE = torch.bfloat16
BATCH = 2  # batch 1 plus its unconditional (CFG) half
KERNEL_PRESETS = ("none", "auto", "fused", "compile", "fused_compile")  # configs/kernels/


def kernels_preset(name: str) -> KernelsConfig:
    """A configs/kernels/ preset, composed by Hydra as a run composes it (this script builds models itself)."""
    from videosys.run import compose_config, to_run_config

    return to_run_config(compose_config([f"kernels={name}"])).kernels


def with_kernels(model, preset: str, device):
    """A copy of `model` with the `kernels` preset applied, as `videosys.parallelize` does in a run."""
    from videosys.distributed import DistContext, ParallelConfig

    model = copy.deepcopy(model)
    ctx = DistContext(rank=0, local_rank=0, world_size=1, device=device)
    parallelize(model, ctx, ParallelConfig(), kernels_preset(preset), PrecisionConfig("bf16", "bf16"), training=False)
    return model


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
    with torch.no_grad(), torch.compiler.set_stance("force_eager"), FlopCounterMode(display=False) as counter:
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
        if args.configs and label not in args.configs.split(","):
            continue
        base = build(OpenSora, cfg, device)
        x = torch.randn(BATCH, 4, frames, height, width, device=device, dtype=DTYPE)
        t = torch.full((BATCH,), 500.0, device=device)
        text = torch.randn(BATCH, 300, 4096, device=device, dtype=DTYPE)
        contenders = {}
        for preset in args.kernels.split(","):
            model = with_kernels(base, preset, device)

            def ours(model=model, x=x, t=t, text=text, height=height, width=width):
                return model(x, t, text, None, fps=24.0, height=height * 8, width=width * 8)

            contenders[f"ours[{preset}]"] = ours
        del base
        record(results, name, label, contenders, args)
        del contenders
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

    def theirs():
        return peer(x, encoder_hidden_states=text, timestep=t, return_dict=False)[0]

    contenders = {}
    for preset in args.kernels.split(","):
        prepared = with_kernels(model, preset, device)
        contenders[f"ours[{preset}]"] = lambda m=prepared: m(x, t, text, None)
    record(results, "latte XL/2", "16x512x512", {**contenders, "diffusers": theirs}, args)


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

    def theirs():  # diffusers returns (B, T, C, H, W)
        out = peer(x_peer, encoder_hidden_states=text, timestep=t, image_rotary_emb=(cos, sin), return_dict=False)
        return out[0].transpose(1, 2)

    contenders = {}
    for preset in args.kernels.split(","):
        prepared = with_kernels(model, preset, device)
        contenders[f"ours[{preset}]"] = lambda m=prepared: m(x, t, text, None)
    record(results, "cogvideox 5B", "49x480x720", {**contenders, "diffusers": theirs}, args)


def record(results, name, label, contenders, args):
    """Time every contender (the first is the baseline) and compare each one's output with the first's."""
    first = next(iter(contenders))
    step_flops = flops(contenders[first])
    row = {"model": name, "config": label, "batch": BATCH, "tflop_per_step": step_flops / 1e12}
    rounds = {name: [] for name in contenders}
    for _ in range(args.rounds):  # alternate, so that clock drift hits all alike
        for contender, fn in contenders.items():
            rounds[contender].append(timed(fn, args.warmup, args.iters))
    for contender, measured in rounds.items():
        row[f"{contender}_ms_rounds"] = [ms for ms, _ in measured]
        row[f"{contender}_ms"] = statistics.median(row[f"{contender}_ms_rounds"])
        row[f"{contender}_peak_gib"] = max(gib for _, gib in measured)
        row[f"{contender}_tflops"] = step_flops / (row[f"{contender}_ms"] / 1e3) / 1e12
    with torch.no_grad():
        baseline = contenders[first]()
        for contender, fn in contenders.items():
            if contender != first:
                row[f"{contender}_speedup_over_first"] = row[f"{first}_ms"] / row[f"{contender}_ms"]
                row[f"{contender}_bf16_relative_error"] = relative_error(fn(), baseline)
    results.append(row)
    print(json.dumps(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default="opensora,latte,cogvideox")
    parser.add_argument("--configs", default="", help="comma-separated Open-Sora configs, e.g. '480p 51f'")
    parser.add_argument("--kernels", default="none", help=f"comma-separated presets of {list(KERNEL_PRESETS)}")
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
    columns = f"{'ms':>9} {'TFLOP/s':>8} {'GiB':>6} {'speedup':>8} {'rel err':>9}"
    print(f"\n{'model':22} {'config':12} {'contender':22} {columns}")
    for r in results:
        names = [k.removesuffix("_ms") for k in r if k.endswith("_ms")]
        for n in names:
            speedup = r.get(f"{n}_speedup_over_first", 1.0)
            error = r.get(f"{n}_bf16_relative_error", 0.0)
            print(
                f"{r['model']:22} {r['config']:12} {n:22} {r[f'{n}_ms']:9.1f} {r[f'{n}_tflops']:8.1f} "
                f"{r[f'{n}_peak_gib']:6.1f} {speedup:8.3f} {error:9.2e}"
            )


if __name__ == "__main__":
    main()
