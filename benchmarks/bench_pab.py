"""End-to-end denoising latency with Pyramid Attention Broadcast (PAB): pab=off against the PAB presets.

Every denoising step of a whole sampling call, at published sizes with random bf16 weights: one prompt with
classifier-free guidance (a batch of 2, conditional + unconditional), random text embeddings of the published
token counts, the model's real sampler (`videosys.diffusion.make_sampler` with the model's defaults, as
`generate_text_samples` builds it) and the real `denoise_loop`, with the policy attached as a run attaches it
(`build_cache`, `cache.attached(model)`):

- opensora: Open-Sora 1.2 STDiT3-XL/2, 480p x 51 frames (15 x 60 x 106 latents), 30 Euler steps of its
  rectified flow;
- latte: Latte XL/2, 16 frames x 512 x 512 (16 x 64 x 64 latents), 50 DDIM steps;
- cogvideox: CogVideoX-5B, 49 frames x 480 x 720 (13 x 60 x 90 latents), 50 steps of its default sampler
  (CogVideoX's DPM solver).

The models come from benchmarks/bench_video.py (its builders, configurations and `kernels` presets, composed by
Hydra from configs/kernels/); the PAB presets are composed the same way from configs/pab/. Zero-initialised
weights are drawn N(0, 0.02) as in benchmarks/bench_parallel.py: with the zero gates and output projections of a
fresh model, attention would not reach the output and reuse could not change it.

For each model and preset (`pab=off` always runs first and is the reference), after `--warmup` untimed model
calls: total seconds of the loop, ms per step, speedup over off, attention/MLP calls computed and reused per kind
(s spatial, t temporal, f full 3D, c cross, m MLP), the most memory the stored outputs took (`pab_cache_mib`),
peak GPU memory, and the relative difference (L2) of the final latents from the off run's (same noise, same
seed). A preset listed twice runs twice (`--presets off,latte,off` times off again at the end: timing drift, and
a difference of 0 shows the loop is deterministic). `--presets all` takes every configs/pab/ preset; one that
reuses no kind of call the model makes (latte's or opensora's on CogVideoX, which has only full attention and
MLPs) is skipped with a note, one that reuses some of them runs (opensora_plan on Latte reuses cross-attention).

Under torchrun, `--sp N` runs the models sequence parallel over N ranks (`--sp-mode` dsp, ulysses, ring, or usp as
2 x N/2, the degrees benchmarks/bench_parallel.py uses) through the project's `init_distributed` and
`parallelize`, and `--cfg 2` puts the guidance halves on two ranks (`cfg_parallel`, as sampling does); the
world size must be cfg x sp. Every rank runs; times, cache sizes and peak memory are the maximum over ranks;
rank 0 prints and writes. A model with no plan for `--sp-mode` is skipped with a note: CogVideoX (full attention over
joint text and video tokens) has Ulysses only, as DSP does not apply to full attention.

PAB decides per step, in Python, which calls run, so it refuses compiled blocks (`kernels.compile=true`, the
`compile` and `fused_compile` presets) with a ConfigError; `--kernels` defaults to `fused`.

One GPU (not yet timed; CogVideoX-5B's 50 steps per setting should take most of the run):

    python benchmarks/bench_pab.py --out bench_pab.json
    python benchmarks/bench_pab.py --only opensora --presets off,opensora,fast,quality,off --steps 30

Four GPUs, DSP over 4 ranks (Open-Sora and Latte; CogVideoX is skipped), and CFG x DSP on 4 ranks:

    torchrun --nproc_per_node=4 benchmarks/bench_pab.py --sp 4 --only opensora,latte --out bench_pab_sp4.json
    torchrun --nproc_per_node=4 benchmarks/bench_pab.py --cfg 2 --sp 2 --only opensora,latte --out pab_cfg2_sp2.json
    torchrun --nproc_per_node=4 benchmarks/bench_pab.py --sp 4 --sp-mode ulysses --only cogvideox --out pab_cog_u4.json

CPU smoke test (debug flavors, 6 steps, kernels=none; checks that PAB reuses, that a second pab=off run matches
the first exactly and that every difference is finite):

    python benchmarks/bench_pab.py --smoke --out /tmp/bench_pab_smoke.json
    torchrun --nproc_per_node=2 benchmarks/bench_pab.py --smoke --sp 2 --only opensora,latte --out /tmp/s.json
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

# Sibling benchmark modules (as benchmarks/tune_kernels.py imports bench_kernels).
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_parallel import modes_for  # noqa: E402
from bench_video import BATCH, build, kernels_preset, opensora_cases, relative_error  # noqa: E402

from videosys.cache import (  # noqa: E402
    MLPBroadcastRule,
    PABConfig,
    build_cache,
    format_counts,
    model_kinds,
)
from videosys.diffusion import (  # noqa: E402
    DiffusionConfig,
    SamplingConfig,
    denoise_loop,
    guided,
    make_sampler,
    step_graphs,
)
from videosys.distributed import ParallelConfig, init_distributed, shutdown_distributed  # noqa: E402
from videosys.errors import ConfigError  # noqa: E402
from videosys.models.cogvideox import CogVideoX, CogVideoXConfig  # noqa: E402
from videosys.models.latte import Latte, LatteConfig  # noqa: E402
from videosys.models.opensora import OpenSora, OpenSoraConfig  # noqa: E402
from videosys.parallelize import cfg_parallel, parallelize  # noqa: E402
from videosys.precision import PrecisionConfig  # noqa: E402
from videosys.run import compose_config, config_dir, to_run_config  # noqa: E402
from videosys.tasks.common import attached, denoiser, model_diffusion_defaults, pixel_area  # noqa: E402

MODELS = ("opensora", "latte", "cogvideox")
SMOKE_STEPS = 6
SP_MODES = ("dsp", "ulysses", "ring", "usp")


@dataclass
class Case:
    """One model at one size, and how it samples."""

    key: str  # --only name
    title: str  # table label
    model_cls: type
    config: object  # the model's config dataclass
    text_tokens: int
    text_dim: int
    steps: int
    sampler: str  # a SamplingConfig.sampler: "auto" takes the model's own
    own_preset: str  # configs/pab/ preset published for this model


def cases(smoke: bool) -> dict[str, Case]:
    if smoke:  # CPU-sized debug flavors with the same structure (block lists, attention kinds, samplers)
        return {
            "opensora": Case(
                "opensora",
                "opensora debug 3x8x8",
                OpenSora,
                OpenSoraConfig(
                    flavor="debug", input_size=[3, 8, 8], in_channels=4, caption_channels=32, model_max_length=8
                ),
                8,
                32,
                SMOKE_STEPS,
                "euler",
                "opensora",
            ),
            "latte": Case(
                "latte",
                "latte debug 4x8x8",
                Latte,
                LatteConfig(flavor="debug", input_size=[4, 8, 8], in_channels=4),
                8,
                32,
                SMOKE_STEPS,
                "ddim",
                "latte",
            ),
            "cogvideox": Case(
                "cogvideox",
                "cogvideox debug 3x8x16",
                CogVideoX,
                CogVideoXConfig(flavor="debug", input_size=[3, 8, 16], in_channels=16),
                8,
                32,
                SMOKE_STEPS,
                "auto",
                "cogvideox",
            ),
        }
    # bench_video's Open-Sora configuration at 480p x 51 frames.
    _, label, opensora_cfg, *_ = next(c for c in opensora_cases(None, None) if c[1] == "480p 51f")
    return {
        "opensora": Case(
            "opensora", f"opensora STDiT3-XL/2 {label}", OpenSora, opensora_cfg, 300, 4096, 30, "euler", "opensora"
        ),
        "latte": Case(
            "latte",
            "latte XL/2 16x512x512",
            Latte,
            LatteConfig(flavor="XL/2", input_size=[16, 64, 64], in_channels=4),
            120,
            4096,
            50,
            "ddim",
            "latte",
        ),
        "cogvideox": Case(
            "cogvideox",
            "cogvideox 5B 49x480x720",
            CogVideoX,
            CogVideoXConfig(flavor="5B", input_size=[13, 60, 90], in_channels=16),
            226,
            4096,
            50,
            "auto",
            "cogvideox",
        ),
    }


# --- configuration ----------------------------------------------------------------------------------------


@functools.cache
def pab_preset(name: str) -> PABConfig:
    """A configs/pab/ preset, composed by Hydra as a run composes it (as bench_video.kernels_preset does)."""
    return to_run_config(compose_config([f"pab={name}"])).pab


def all_pab_presets() -> list[str]:
    return sorted(p.stem for p in (Path(config_dir()) / "pab").glob("*.yaml"))


def parallel_config(args) -> ParallelConfig:
    """The degrees for `--cfg` and `--sp`: bench_parallel's split of an sp degree into Ulysses x Ring."""
    if args.sp == 1:
        return ParallelConfig(name="bench_pab", cfg=args.cfg)
    degrees = {mode: (ulysses, ring) for mode, ulysses, ring in modes_for(args.sp)}
    if args.sp_mode not in degrees:
        raise SystemExit(f"--sp-mode {args.sp_mode} needs --sp of at least 4 (usp is 2 x sp/2); got --sp {args.sp}")
    ulysses, ring = degrees[args.sp_mode]
    return ParallelConfig(name="bench_pab", cfg=args.cfg, sp_ulysses=ulysses, sp_ring=ring, sp_mode=args.sp_mode)


def reusing_kinds(cfg: PABConfig, kinds: set[str]) -> list[str]:
    """The kinds of `kinds` that the preset reuses at some step (interval above 1; MLPs only of listed blocks)."""
    out = []
    for kind, rule in cfg.rules().items():
        if kind not in kinds or rule.interval == 1:
            continue
        if isinstance(rule, MLPBroadcastRule) and not rule.blocks:
            continue
        out.append(kind)
    return out


# --- measuring ----------------------------------------------------------------------------------------------


def reduce_max(value: float) -> float:
    """The largest value over ranks (the value itself in one process)."""
    if not dist.is_initialized():
        return value
    t = torch.tensor(float(value), dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(case: Case, ctx, kernels, precision: PrecisionConfig) -> torch.nn.Module:
    """bench_video's random model (same seed on every rank), zero-initialised weights drawn N(0, 0.02) as in
    bench_parallel, then the run's execution plan (attention backend, fused kernels, sequence parallelism)."""
    torch.manual_seed(0)
    model = build(case.model_cls, case.config, ctx.device)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    model = model.to(precision.torch_dtype).eval()
    parallelize(model, ctx, ParallelConfig(), kernels, precision, training=False)
    return model


def run_once(model, case: Case, cfg: PABConfig, ctx, kernels, precision: PrecisionConfig, args) -> dict:
    """One sampling call with policy `cfg`: what it took, and its final latents. With --cuda-graphs, an untimed
    first loop captures the step graphs (its time is reported as `capture_loop_s`), and the timed loop replays."""
    device = ctx.device
    cache = build_cache(cfg, compiled_blocks=kernels.compile, num_steps=case.steps)
    sampling = SamplingConfig(sampler=case.sampler, num_steps=case.steps, cfg_scale=args.cfg_scale, seed=args.seed)
    diffusion = DiffusionConfig().resolved(model_diffusion_defaults(model))
    shape = (model.in_channels, *model.config.input_size)

    def new_sampler():  # a fresh one per loop: the multistep solvers keep state
        return make_sampler(
            sampling,
            diffusion,
            model.learn_sigma,
            False,  # latents: no clipping
            getattr(model, "default_sampler", None),
            pixels=pixel_area(model.config),
            frames=shape[1],
        )

    sampler = new_sampler()
    # Same text and noise on every rank and for every preset.
    text_generator = torch.Generator(device).manual_seed(args.seed + 1)
    text = torch.randn(BATCH, case.text_tokens, case.text_dim, generator=text_generator, device=device)
    text = text.to(precision.torch_dtype)
    noise = torch.randn((BATCH // 2, *shape), generator=torch.Generator(device).manual_seed(args.seed), device=device)
    # The [conditional; unconditional] halves on the cfg ranks, if any; autocast entered per call.
    run_guided = cfg_parallel(denoiser(model, precision, device), ctx)

    def predict_with(run):
        def predict(x, t):
            out = run(torch.cat([x, x]).to(precision.torch_dtype), torch.cat([t, t]), text, None).float()
            return guided(out, shape[0], sampling.cfg_scale, sampler.wants_variance)

        return predict

    with torch.no_grad():  # untimed: attention backend choice, allocator, clocks
        for _ in range(args.warmup):
            predict_with(run_guided)(noise, torch.full((noise.shape[0],), sampler.timesteps[0], device=device))
    synchronize(device)
    capture_s = None
    with attached(cache, model), step_graphs(run_guided, cache, args.cuda_graphs) as run_model:
        if args.cuda_graphs:
            barrier()
            start = time.perf_counter()
            denoise_loop(predict_with(run_model), noise, new_sampler(), torch.Generator(device), cache)
            synchronize(device)
            capture_s = reduce_max(time.perf_counter() - start)
            if cache is not None:  # report the timed loop's calls only
                cache.computed.clear()
                cache.reused.clear()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        barrier()
        start = time.perf_counter()
        generator = torch.Generator(device).manual_seed(args.seed)
        latents = denoise_loop(predict_with(run_model), noise, sampler, generator, cache)
        synchronize(device)
        seconds = reduce_max(time.perf_counter() - start)
    report = cache.report() if cache is not None else {
        "pab_computed": {}, "pab_reused": {}, "pab_cache_mib": 0.0, "pab_attention_reused": 0.0,
    }  # fmt: skip
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {
        "total_s": seconds,
        "ms_per_step": seconds / case.steps * 1e3,
        "capture_loop_s": capture_s,
        "pab_computed": report["pab_computed"],
        "pab_reused": report["pab_reused"],
        "pab_cache_mib": reduce_max(report["pab_cache_mib"]),
        "pab_attention_reused": report["pab_attention_reused"],
        "peak_gib": reduce_max(peak) if peak is not None else None,
        "latents": latents,
    }


def sampler_name(model, case: Case) -> str:
    return case.sampler if case.sampler != "auto" else getattr(model, "default_sampler", None) or "auto"


def bench_model(case: Case, presets: list[str], ctx, kernels, precision, args, results: list[dict], notes: list[str]):
    if ctx.dims.sp > 1 and ctx.dims.sp_mode not in case.model_cls.sequence_parallel_modes:
        notes.append(f"{case.title}: skipped, no sequence-parallel mode {ctx.dims.sp_mode} for this model")
        return
    model = build_model(case, ctx, kernels, precision)
    kinds = model_kinds(model)
    reference = None
    seen: dict[str, int] = {}
    for name in presets:
        cfg = pab_preset(name)
        if name != "off" and not reusing_kinds(cfg, kinds):
            notes.append(f"{case.title}: pab={name} skipped, it reuses none of the model's calls ({sorted(kinds)})")
            continue
        seen[name] = seen.get(name, 0) + 1
        label = name if seen[name] == 1 else f"{name}#{seen[name]}"
        measured = run_once(model, case, cfg, ctx, kernels, precision, args)
        latents = measured.pop("latents")
        if reference is None:  # the first run is pab=off (main puts it first)
            reference = {"latents": latents, "total_s": measured["total_s"]}
        row = {
            "model": case.key,
            "config": case.title,
            "pab": label,
            "steps": case.steps,
            **measured,
            "sampler": sampler_name(model, case),
            "speedup": reference["total_s"] / measured["total_s"],
            "relative_difference": relative_error(latents, reference["latents"]),
        }
        results.append(row)
        if ctx.is_main:
            print(json.dumps(row), flush=True)
    del model, reference
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()


# --- reporting ----------------------------------------------------------------------------------------------


def markdown(results: list[dict]) -> str:
    head = (
        "| model | pab | steps | total s | ms/step | speedup | computed | reused | attn reused | cache MiB "
        "| peak GiB | rel diff vs off | capture loop s |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        capture = f"{r['capture_loop_s']:.2f}" if r.get("capture_loop_s") is not None else "-"
        lines.append(
            f"| {r['config']} | {r['pab']} | {r['steps']} | {r['total_s']:.2f} | {r['ms_per_step']:.1f} "
            f"| {r['speedup']:.2f} | {format_counts(r['pab_computed'])} | {format_counts(r['pab_reused'])} "
            f"| {r['pab_attention_reused']:.1%} | {r['pab_cache_mib']:.2f} | {peak} "
            f"| {r['relative_difference']:.2e} | {capture} |"
        )
    lines.append("")
    lines.append(
        "computed / reused: calls per kind over the whole loop (s spatial, t temporal, f full 3D, c cross, m MLP); "
        "attn reused: reused fraction of attention calls; rel diff: ||x - x_off|| / ||x_off|| of the final latents; "
        "capture loop: the untimed first loop that captures the CUDA graphs (--cuda-graphs)."
    )
    return "\n".join(lines)


def smoke_failures(results: list[dict]) -> list[str]:
    failures = []
    for r in results:
        where = f"{r['config']} pab={r['pab']}"
        if not math.isfinite(r["relative_difference"]):
            failures.append(f"{where}: relative difference {r['relative_difference']} is not finite")
        if r["pab"].split("#")[0] == "off":
            if r["relative_difference"] != 0.0:
                failures.append(f"{where}: differs from the first pab=off run by {r['relative_difference']:.3e}")
        elif sum(r["pab_reused"].values()) == 0:
            failures.append(f"{where}: reused nothing")
    return failures


# --- main ---------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(MODELS), help=f"comma-separated models of {list(MODELS)}")
    parser.add_argument(
        "--presets",
        default="",
        help="comma-separated configs/pab/ presets (or 'all'); default: off, the model's own, fast, quality "
        "(smoke: and off again). pab=off always runs first",
    )
    parser.add_argument("--kernels", default=None, help="a configs/kernels/ preset (default fused; smoke: none)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps for every model (default: each one's)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed model calls before each timed loop")
    parser.add_argument("--cfg-scale", type=float, default=SamplingConfig.cfg_scale)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--sp", type=int, default=1, help="sequence-parallel degree (under torchrun)")
    parser.add_argument("--sp-mode", default="dsp", choices=SP_MODES)
    parser.add_argument("--cfg", type=int, default=1, choices=[1, 2], help="2: guidance halves on two ranks")
    parser.add_argument("--device", default="auto", help="auto | cuda | cpu (smoke: cpu)")
    parser.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="replay each kind of step from a CUDA graph (kernels.cuda_graphs): an untimed loop captures first",
    )
    parser.add_argument("--smoke", action="store_true", help="CPU check: debug flavors, 6 steps, kernels=none")
    parser.add_argument("--out", default="bench_pab.json")
    args = parser.parse_args()

    kernels_name = args.kernels or ("none" if args.smoke else "fused")
    kernels = kernels_preset(kernels_name)
    precision = PrecisionConfig(args.dtype, args.dtype)
    selected = cases(args.smoke)
    keys = [k for k in args.only.split(",") if k]
    unknown = [k for k in keys if k not in selected]
    if unknown:
        raise SystemExit(f"--only {unknown}: not a model here; choose from {list(MODELS)}")
    if args.steps is not None:
        for case in selected.values():
            case.steps = args.steps

    known = all_pab_presets()
    plans: dict[str, list[str]] = {}
    for key in keys:
        case = selected[key]
        if args.presets == "all":
            names = ["off", *(p for p in known if p != "off")]
        elif args.presets:
            names = [p for p in args.presets.split(",") if p]
        else:
            names = ["off", case.own_preset, "fast", "quality"] + (["off"] if args.smoke else [])
        bad = [p for p in names if p not in known]
        if bad:
            raise SystemExit(f"--presets {bad}: no such configs/pab/ preset; choose from {known}")
        if names[0] != "off":
            names = ["off", *names]
        plans[key] = names
        for name in names:  # fail before any model is built: compiled blocks, windows that select no step
            try:
                build_cache(pab_preset(name), compiled_blocks=kernels.compile, num_steps=case.steps)
            except ConfigError as err:
                raise SystemExit(f"{case.title}, pab={name}, kernels={kernels_name}: {err}") from err

    ctx = init_distributed(parallel_config(args), "cpu" if args.smoke and args.device == "auto" else args.device)
    if ctx.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    torch.set_grad_enabled(False)
    results: list[dict] = []
    notes: list[str] = []
    for key in keys:
        bench_model(selected[key], plans[key], ctx, kernels, precision, args, results, notes)

    if ctx.is_main:
        meta = {
            "device": torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "dtype": args.dtype,
            "kernels": kernels_name,
            "world_size": ctx.world_size,
            "cfg": ctx.dims.cfg,
            "sp": ctx.dims.sp,
            "sp_mode": ctx.dims.sp_mode,
            "batch": BATCH,
            "cfg_scale": args.cfg_scale,
            "warmup": args.warmup,
            "cuda_graphs": args.cuda_graphs,
            "smoke": args.smoke,
            "notes": notes,
        }
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)
        print()
        print(
            f"{meta['device']}, {args.dtype}, kernels={kernels_name}, world {ctx.world_size} "
            f"(cfg {ctx.dims.cfg} x sp {ctx.dims.sp} {ctx.dims.sp_mode})"
        )
        print(markdown(results))
        for note in notes:
            print(f"note: {note}")
        print(f"wrote {args.out}")
    failures = smoke_failures(results) if args.smoke and ctx.is_main else []
    shutdown_distributed(wait_for_peers=True)
    if failures:
        raise SystemExit("smoke check failed:\n" + "\n".join(failures))
    if args.smoke and ctx.is_main:
        print("smoke check passed: PAB reused calls, pab=off is deterministic, every difference is finite")


if __name__ == "__main__":
    main()
