"""Benchmark the fused Triton kernels of videosys.ops.fused on a CUDA GPU.

For each shape and kernel it measures three passes, the achieved bandwidth over the minimal bytes that must
move, and the ratio to the measured device-to-device copy bandwidth (timed the same way as the kernels, on
1 GiB buffers; for fwd and bwd also the time of a copy that moves the pass's own bytes over the pass's):

- fwd: the public fused function under no_grad; torch eager and torch.compile of the model's natural
  expression for comparison.
- bwd: the backward implementation called directly on the tensors autograd would have saved (kernels and
  the partial-sum reductions only, no autograd engine) -- the same call benchmarks/tune_kernels.py times.
  The eager / compile columns stay empty: torch has no backward to call on its own without also timing the
  autograd engine, so a like-for-like comparison is the fwd+bwd row.
- fwd+bwd (autograd): forward then .backward() through autograd, for fused, eager and compile.

Every pass is timed by bench_ms: CUDA events around each call, the L2 cache flushed before it and the GPU
kept busy while the CPU queues it, so only GPU time is counted (see bench_ms for why neither triton's
do_bench nor CUDA graphs). Medians throughout. Prints a markdown table
and writes JSON.

    python benchmarks/bench_kernels.py --dtype bf16 --out results.json
    TRITON_INTERPRET=1 python benchmarks/bench_kernels.py --smoke    # CPU: tiny shapes, correctness only

Shapes are BxNxC[:G]: N tokens per sample, G modulation groups (default 1: per-sample shift/scale/gate).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

# Where there is no GPU the kernels can only run through the Triton interpreter, chosen before the import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from videosys.ops import fused  # noqa: E402  (after TRITON_INTERPRET is settled)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_SHAPES = [
    "32x256x1152",  # DiT-XL/2 at 256px: 16x16 patches, batch 32
    "2x24180x1152:13",  # Open-Sora 480p-ish: 13 latent frames x 1860 patches, per-frame modulation
    "4x4096x1152",  # Latte: 16 frames x 256 patches
]
EPS = 1e-6


def parse_shape(text: str) -> tuple[int, int, int, int]:
    dims, _, groups = text.partition(":")
    b, n, c = (int(v) for v in dims.split("x"))
    return b, n, c, int(groups or 1)


# The model's natural torch expressions in the working dtype (what the fused kernels replace).


def torch_modulate(x, shift, scale):
    b, g, c = scale.shape
    return (x.view(b, g, -1, c) * (1 + scale[:, :, None]) + shift[:, :, None]).view(x.shape)


def torch_layernorm_modulate(x, shift, scale):
    return torch_modulate(F.layer_norm(x, (x.shape[-1],), eps=EPS), shift, scale)


def torch_rms_norm(x, weight):
    return F.rms_norm(x, (x.shape[-1],), weight, EPS)


def torch_gate_residual(residual, gate, h):
    b, g, c = gate.shape
    return (residual.view(b, g, -1, c) + gate[:, :, None] * h.view(b, g, -1, c)).view(residual.shape)


def kernels(b: int, n: int, c: int, g: int, dtype: torch.dtype, device: str) -> dict:
    """Per kernel: (fused fn, torch fn, reference fn, input builder, bytes moved forward, bytes backward).

    Bytes counted: every input read once and every output written once, in its own dtype: forward reads
    the function's inputs and writes its output; backward reads the incoming gradient and what the
    gradients need (x or h, the modulation scale or gate, the weight) and writes each input's gradient (the
    residual's gradient is the incoming gradient itself, so it moves nothing). The per-row statistics the
    norms save (a 32-byte record per row) and the fp32 partial sums are not counted."""
    e = torch.empty((), dtype=dtype).element_size()
    big, mod, vec = b * n * c * e, b * g * c * e, c * e

    def make(*shapes):
        def build():
            return [torch.randn(s, device=device, dtype=dtype, requires_grad=True) for s in shapes]

        return build

    x, m = (b, n, c), (b, g, c)
    return {
        "modulate": (
            fused.fused_modulate,
            torch_modulate,
            fused.modulate_reference,
            make(x, m, m),
            2 * big + 2 * mod,  # x, shift, scale -> y
            3 * big + 3 * mod,  # dy, x, scale -> dx, dshift, dscale
        ),
        "layernorm_modulate": (
            lambda x, shift, scale: fused.fused_layernorm_modulate(x, shift, scale, EPS),
            torch_layernorm_modulate,
            lambda x, shift, scale: fused.layernorm_modulate_reference(x, shift, scale, EPS),
            make(x, m, m),
            2 * big + 2 * mod,  # x, shift, scale -> y
            3 * big + 3 * mod,  # dy, x, scale -> dx, dshift, dscale
        ),
        "rms_norm": (
            lambda x, w: fused.fused_rms_norm(x, w, EPS),
            torch_rms_norm,
            lambda x, w: fused.rms_norm_reference(x, w, EPS),
            make(x, (c,)),
            2 * big + vec,  # x, weight -> y
            3 * big + 2 * vec,  # dy, x, weight -> dx, dweight
        ),
        "gate_residual": (
            fused.fused_gate_residual,
            torch_gate_residual,
            fused.gate_residual_reference,
            make(x, m, x),
            3 * big + mod,  # residual, gate, h -> out
            3 * big + 2 * mod,  # dout, h, gate -> dh, dgate
        ),
    }


def direct_passes(name: str, inputs: list[torch.Tensor], grad: torch.Tensor) -> tuple:
    """(forward, backward, fwd field, bwd field) of kernel `name` on `inputs` (as kernels() builds them):
    forward / backward call the implementation functions directly (no autograd), the backward on the
    tensors that autograd would save (from one forward run now); the fields name its LaunchParams entries."""
    t = [v.detach() for v in inputs]
    dy = grad.detach()
    if name == "modulate":
        x, shift, scale = t
        return (
            lambda: fused._modulate_impl(x, shift, scale),
            lambda: fused._modulate_backward_impl(dy, x, scale),
            "modulate_fwd",
            "modulate_bwd",
        )
    if name == "layernorm_modulate":
        x, shift, scale = t
        _, stats = fused._layernorm_modulate_impl(x, shift, scale, None, None, EPS, x.dtype)
        return (
            lambda: fused._layernorm_modulate_impl(x, shift, scale, None, None, EPS, x.dtype),
            lambda: fused._layernorm_modulate_backward_impl(dy, x, scale, None, None, stats),
            "layernorm_modulate_fwd",
            "layernorm_modulate_bwd",
        )
    if name == "rms_norm":
        x, weight = t[0].reshape(-1, t[0].shape[-1]), t[1]
        dy2 = dy.reshape(x.shape)
        _, stats = fused._rms_norm_impl(x, weight, EPS, x.dtype)
        return (
            lambda: fused._rms_norm_impl(x, weight, EPS, x.dtype),
            lambda: fused._rms_norm_backward_impl(dy2, x, weight, stats),
            "rms_norm_fwd",
            "rms_norm_bwd",
        )
    if name == "gate_residual":
        residual, gate, h = t
        return (
            lambda: fused._gate_residual_impl(residual, gate, h),
            lambda: fused._gate_residual_backward_impl(dy, gate, h),
            "gate_residual_fwd",
            "gate_residual_bwd",
        )
    raise KeyError(name)


# GPU cycles of torch.cuda._sleep queued after each L2 flush (~0.25 ms on a 2 GHz GPU), longer than the CPU
# takes to queue the timed call (a public function through autograd: 50-150 us).
_QUEUE_CYCLES = 500_000
_FLUSH_BYTES = 256 << 20  # more than the L2 cache of an H100 / H200 (50-60 MB)


def bench_ms(fn, rep: int = 200, before=None) -> float:
    """Median GPU ms of fn between CUDA events, the L2 cache flushed before each call, over about `rep` ms
    of calls. After the flush the GPU sleeps while the CPU queues the call, so the events time the GPU work
    alone: with triton's do_bench the start event fires as soon as the flush ends, and a call whose Python
    and launch cost outlasts the flush (~60 us) is timed with the GPU waiting on the CPU. Not a CUDA graph:
    back-to-back graph replays keep part of the inputs in the L2, which overstates bandwidth, and a graphed
    tensor copy runs on the slower copy engines, which understates the copy the kernels are compared with.
    `before` runs ahead of each call, untimed (e.g. to drop gradients)."""
    flush = torch.empty(_FLUSH_BYTES, dtype=torch.int8, device="cuda")

    def timed(n: int) -> list[float]:
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for start, end in events:
            if before is not None:
                before()
            flush.zero_()
            torch.cuda._sleep(_QUEUE_CYCLES)
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) for start, end in events]

    fn()  # compile / autotune outside the timing
    estimate = statistics.median(timed(5))
    return statistics.median(timed(max(10, min(1000, round(rep / max(estimate, 1e-3))))))


def smoke() -> None:
    """Tiny shapes: each fused kernel's output and gradients against its reference (no timing)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for dtype in (torch.float32, torch.bfloat16):
        for b, n, c, g in [(2, 12, 72, 1), (2, 12, 100, 3)]:
            for name, (fn, _, ref, build, _, _) in kernels(b, n, c, g, dtype, device).items():
                inputs = build()
                out = fn(*inputs)
                grad = torch.randn_like(out)
                grads = torch.autograd.grad(out, inputs, grad)
                ref_inputs = [t.detach().float().requires_grad_() for t in inputs]
                expected = ref(*ref_inputs)
                ref_grads = torch.autograd.grad(expected, ref_inputs, grad.float())
                tol = dict(rtol=2e-2, atol=2e-2) if dtype != torch.float32 else dict(rtol=1e-4, atol=1e-4)
                torch.testing.assert_close(out.float(), expected, **tol)
                for got, want in zip(grads, ref_grads, strict=True):
                    torch.testing.assert_close(got.float(), want, **tol)
                # The backward implementation called directly (the timed bwd pass) gives autograd's gradient of
                # x (of h for the gated residual: its first output).
                _, backward, _, _ = direct_passes(name, inputs, grad)
                autograd_dx = grads[2 if name == "gate_residual" else 0]
                torch.testing.assert_close(backward()[0].reshape(autograd_dx.shape), autograd_dx)
                print(f"ok  {name:20s} {str(dtype):15s} {b}x{n}x{c}:{g}")
    print("smoke: all kernels match their references")


def copy_bandwidth(dtype: torch.dtype) -> float:
    """Device-to-device copy, bytes read + written per second, on 1 GiB buffers, timed like the kernels."""
    nbytes = 2 << 30
    return nbytes / (same_size_copy_ms(nbytes, dtype, rep=500) * 1e-3)


def same_size_copy_ms(nbytes: int, dtype: torch.dtype, rep: int = 200) -> float:
    """GPU ms of a device-to-device copy that moves nbytes (nbytes / 2 read, as much written), timed like the
    kernels. Beside the 1 GiB copy's bandwidth: at a pass's own size the copy pays the same fixed costs
    (launch, ramp-up, tail of the last wave), which are a few percent of a ~0.1 ms pass."""
    numel = max(1, nbytes // 2 // torch.empty((), dtype=dtype).element_size())
    src = torch.empty(numel, device="cuda", dtype=dtype).normal_()
    dst = torch.empty_like(src)
    return bench_ms(lambda: dst.copy_(src), rep=rep)


def bench_one(fn, inputs, grad) -> tuple[float, float]:
    """(forward ms, forward + backward ms through autograd), medians."""

    def forward():
        with torch.no_grad():
            fn(*inputs)

    def forward_backward():
        fn(*inputs).backward(grad)

    fwd = bench_ms(forward)

    def drop_grads():
        for t in inputs:
            t.grad = None

    both = bench_ms(forward_backward, before=drop_grads)
    return fwd, both


PHASES = {"fwd": "fwd", "bwd": "bwd", "fwd_bwd": "fwd+bwd (autograd)"}


def run(shapes: list[str], dtype: torch.dtype) -> dict:
    copy_bw = copy_bandwidth(dtype)
    print(f"device: {torch.cuda.get_device_name()}  copy bandwidth {copy_bw / 1e9:.0f} GB/s ({dtype})")
    rows = []
    copy_ms: dict[int, float] = {}  # same-size copies by bytes moved: kernels of one shape share byte counts
    for text in shapes:
        b, n, c, g = parse_shape(text)
        for name, (fn, torch_fn, _, build, fwd_bytes, bwd_bytes) in kernels(b, n, c, g, dtype, "cuda").items():
            inputs = build()
            grad = torch.randn_like(fn(*inputs))
            compiled = torch.compile(torch_fn)
            times = {label: bench_one(f, inputs, grad) for label, f in (("fused", fn), ("eager", torch_fn))}
            times["compile"] = bench_one(compiled, inputs, grad)
            _, backward, _, _ = direct_passes(name, inputs, grad)
            bwd_ms = bench_ms(backward)
            for nbytes in (fwd_bytes, bwd_bytes):
                if nbytes not in copy_ms:
                    copy_ms[nbytes] = same_size_copy_ms(nbytes, dtype)
            row = {"shape": text, "kernel": name, "dtype": str(dtype).removeprefix("torch.")}
            for phase, nbytes, ms, eager_ms, compile_ms in (
                ("fwd", fwd_bytes, times["fused"][0], times["eager"][0], times["compile"][0]),
                ("bwd", bwd_bytes, bwd_ms, None, None),
                ("fwd_bwd", fwd_bytes + bwd_bytes, times["fused"][1], times["eager"][1], times["compile"][1]),
            ):
                bandwidth = nbytes / (ms * 1e-3)
                row[phase] = {
                    "bytes": nbytes,
                    "fused_ms": ms,
                    "eager_ms": eager_ms,
                    "compile_ms": compile_ms,
                    "fused_GBps": bandwidth / 1e9,
                    "fraction_of_copy": bandwidth / copy_bw,
                    "fraction_of_same_size_copy": copy_ms[nbytes] / ms if phase != "fwd_bwd" else None,
                    "speedup_vs_eager": None if eager_ms is None else eager_ms / ms,
                    "speedup_vs_compile": None if compile_ms is None else compile_ms / ms,
                }
            rows.append(row)
            del inputs, grad
            torch.cuda.empty_cache()
    return {"device": torch.cuda.get_device_name(), "copy_GBps": copy_bw / 1e9, "results": rows}


def _cell(value: float | None, fmt: str, suffix: str = "") -> str:
    return "" if value is None else format(value, fmt) + suffix


def table(report: dict) -> str:
    lines = [
        f"Copy bandwidth: {report['copy_GBps']:.0f} GB/s on {report['device']}",
        "",
        "| shape | kernel | pass | fused ms | GB/s | of copy | of same-size copy | eager ms | compile ms | vs eager | "
        "vs compile |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["results"]:
        for phase, label in PHASES.items():
            r = row[phase]
            lines.append(
                f"| {row['shape']} | {row['kernel']} | {label} | {r['fused_ms']:.3f} | {r['fused_GBps']:.0f} | "
                f"{r['fraction_of_copy']:.0%} | {_cell(r['fraction_of_same_size_copy'], '.0%')} | "
                f"{_cell(r['eager_ms'], '.3f')} | {_cell(r['compile_ms'], '.3f')} | "
                f"{_cell(r['speedup_vs_eager'], '.2f', 'x')} | {_cell(r['speedup_vs_compile'], '.2f', 'x')} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="BxNxC[:G] (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("results.json"))
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, correctness only (CPU or GPU)")
    args = parser.parse_args()
    if args.smoke:
        smoke()
        return
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py times CUDA kernels; without a GPU run it with --smoke")
    for text in args.shapes:
        b, n, c, g = parse_shape(text)
        if n % g or min(b, n, c, g) <= 0 or math.prod((b, n, c)) == 0:
            sys.exit(f"bad shape {text!r}: want BxNxC[:G] with G dividing N")
    report = run(args.shapes, DTYPES[args.dtype])
    print()
    print(table(report))
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
