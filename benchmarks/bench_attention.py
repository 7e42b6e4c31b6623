"""Attention TFLOP/s per backend at the sequence lengths and head dims of the video models, with the
head dim as is and zero-padded, and what `kernels.attention=auto` picks for each shape.

FLOPs count the real head dim (4 * B * H * Nq * Nk * D forward; backward 2.5x forward), so a padded
run is charged only for useful work. Every backend's output is checked against the fp32 math
reference before it is timed; a backend that fits inference but not training (no backward, or
gradients that failed its probe, see attention.probe_failure) is timed forward only.

    python benchmarks/bench_attention.py --out bench_attention.json
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics

import torch

from videosys.ops.attention import ATTENTION_BACKENDS, AttentionChoice, build_attention, math_attention

# (model, attention, batch * groups, heads, query tokens, key tokens, head dim, masked): batch 2 (CFG).
SHAPES = [
    # Open-Sora 1.2 STDiT3-XL/2, 480p x 51 frames: 15 latent frames of 30 x 53 patches.
    ("opensora 480p", "spatial", 2 * 15, 16, 1590, 1590, 72, False),
    ("opensora 480p", "temporal", 2 * 1590, 16, 15, 15, 72, False),
    ("opensora 480p", "cross", 2, 16, 15 * 1590, 300, 72, True),
    # Latte XL/2, 16 frames x 512 x 512: 32 x 32 patches per frame.
    ("latte 512", "spatial", 2 * 16, 16, 1024, 1024, 72, False),
    ("latte 512", "temporal", 2 * 1024, 16, 16, 16, 72, False),
    # Full 3D attention at long sequence (CogVideoX-5B, 49 x 480 x 720: 17550 video + 226 text).
    ("cogvideox 5B", "full", 2, 48, 17776, 17776, 64, False),
]
BACKENDS = ("sdpa", "cudnn", "flash", "efficient", "flash_attn", "math")


def bench_ms(fn, reps: int) -> float:
    """Median milliseconds of `fn` over `reps` calls, each timed with CUDA events, after 3 warm-ups."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def inputs(shape, dtype, device, grad):
    _, _, batch, heads, nq, nk, dim, masked = shape
    g = torch.Generator(device).manual_seed(0)

    def make(tokens):  # the token-major layout the attention modules hand over
        return torch.randn(batch, tokens, heads, dim, device=device, dtype=dtype, generator=g).transpose(1, 2)

    q, k, v = make(nq), make(nk), make(nk)
    mask = None
    if masked:  # captions of different real lengths, padded
        lengths = torch.randint(nk // 4, nk + 1, (batch,), device=device, generator=g)
        mask = (torch.arange(nk, device=device)[None] < lengths[:, None])[:, None, None, :]
    return [t.requires_grad_(grad) for t in (q, k, v)], mask


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", default="bench_attention.json")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="a comma-separated subset of these")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    device = torch.device("cuda")
    rows = []
    for shape in SHAPES:
        model, kind, batch, heads, nq, nk, dim, masked = shape
        fwd_flops = 4 * batch * heads * nq * nk * dim
        (q, k, v), mask = inputs(shape, dtype, device, grad=False)
        reference = math_attention(q, k, v, mask).float() if nq * nk * batch * heads <= 2**31 else None
        for name in args.backends.split(","):
            backend = ATTENTION_BACKENDS[name]
            for padded in [None, *[d for d in (80, 96, 128) if d > dim and dim % 64]]:
                run_dim = padded or dim
                reason = backend.unsupported_reason(device, dtype, run_dim, masked, backward=False)
                row = {"model": model, "attention": kind, "backend": name, "head_dim": dim, "run_head_dim": run_dim}
                row.update(batch=batch, heads=heads, q_tokens=nq, k_tokens=nk, masked=masked)
                if reason is None and name == "math" and reference is None:
                    reason = "the fp32 score matrix does not fit in memory"
                if reason is not None:
                    rows.append({**row, "skipped": reason})
                    continue
                # A backend may fit inference but not training (no backward, or a probe's wrong gradients).
                no_backward = backend.unsupported_reason(device, dtype, run_dim, masked, backward=True)
                choice = AttentionChoice(backend, padded)
                try:
                    with torch.no_grad():
                        out = choice(q, k, v, mask)
                        if reference is not None:
                            row["relative_error"] = ((out.float() - reference).norm() / reference.norm()).item()
                        fwd_ms = bench_ms(lambda c=choice, q=q, k=k, v=v, mask=mask: c(q, k, v, mask), args.reps)
                    train_ms = float("nan")
                    if no_backward is None:
                        (qg, kg, vg), _ = inputs(shape, dtype, device, grad=True)
                        grad_out = torch.randn_like(out)

                        def step(c=choice, qg=qg, kg=kg, vg=vg, mask=mask, grad_out=grad_out):
                            c(qg, kg, vg, mask).backward(grad_out)

                        train_ms = bench_ms(step, args.reps)
                    else:
                        row["fwd_bwd_skipped"] = no_backward
                except RuntimeError as err:
                    rows.append({**row, "skipped": str(err).splitlines()[0]})
                    continue
                row.update(
                    fwd_ms=fwd_ms,
                    fwd_tflops=fwd_flops / fwd_ms / 1e9,
                    fwd_bwd_ms=train_ms,
                    fwd_bwd_tflops=3.5 * fwd_flops / train_ms / 1e9,
                )
                rows.append(row)
                print(json.dumps(row), flush=True)
        for training in (False, True):  # what auto picks for this call, measured like in a run
            selector = build_attention("auto", "auto", device, dtype, {dim}, masked, training)
            (qa, ka, va), _ = inputs(shape, dtype, device, grad=training)
            with torch.set_grad_enabled(training):
                selector(qa, ka, va, mask)
            choice = next(iter(selector.choices.values())) if selector.choices else selector.fixed
            key = "auto_fwd_bwd" if training else "auto_fwd"
            rows.append({"model": model, "attention": kind, key: choice.describe(dim)})
        torch.cuda.empty_cache()
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": args.dtype}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    print(f"\n{meta}")
    print(f"{'model':14} {'attn':9} {'backend':11} {'D':>4} {'fwd TF/s':>9} {'f+b TF/s':>9} {'rel err':>9}")
    for r in rows:
        if "fwd_tflops" in r:
            print(
                f"{r['model']:14} {r['attention']:9} {r['backend']:11} {r['run_head_dim']:4d} "
                f"{r['fwd_tflops']:9.1f} {r['fwd_bwd_tflops']:9.1f} {r.get('relative_error', float('nan')):9.1e}"
                + (f"  fwd+bwd skipped: {r['fwd_bwd_skipped']}" if "fwd_bwd_skipped" in r else "")
            )
        elif "skipped" in r and r["run_head_dim"] == r["head_dim"]:
            print(
                f"{r['model']:14} {r['attention']:9} {r['backend']:11} {r['run_head_dim']:4d} skipped: {r['skipped']}"
            )
        elif "auto_fwd" in r or "auto_fwd_bwd" in r:
            key = "auto_fwd" if "auto_fwd" in r else "auto_fwd_bwd"
            print(f"{r['model']:14} {r['attention']:9} {key:11} -> {r[key]}")


if __name__ == "__main__":
    main()
