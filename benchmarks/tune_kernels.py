"""Sweep the fused kernels' launch parameters (videosys.ops.fused.LAUNCH) on a CUDA GPU.

For each shape, each kernel's forward and backward are tuned separately: every candidate PassLaunch of that
pass is swapped into fused.LAUNCH (dataclasses.replace; benchmark-only), its output is checked against the
default configuration's output (equal up to summation order: 1 ulp of the stored dtype for tensors written
per element, 1e-4 relative to the tensor's scale for the fp32 sums over tokens), and it is timed with
bench_kernels.bench_ms (GPU time between CUDA events, the L2 cache flushed before each call, median). The forward
is the implementation function, the backward the backward implementation called directly on the tensors
autograd would save -- as benchmarks/bench_kernels.py times them. Bytes are every input read once and every
output written once (bench_kernels.kernels()); the copy bandwidth is measured the same way.

At the end it prints one markdown table (per shape, kernel and pass: the best candidate, its time, GB/s and
fraction of copy bandwidth, and the default's) and the PassLaunch per pass that is fastest over all shapes
(geometric mean of time relative to the default), ready to paste into fused.LAUNCH.

    python benchmarks/tune_kernels.py                                  # ~5-8 minutes on an H100 / H200
    python benchmarks/tune_kernels.py --shapes 2x24180x1152:13 --rep 50 --out tune.json
    TRITON_INTERPRET=1 python benchmarks/tune_kernels.py --smoke       # CPU: 2-3 candidates, tiny shapes
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

# Where there is no GPU the kernels can only run through the Triton interpreter, chosen before the import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench_kernels import DTYPES, bench_ms, direct_passes, kernels, parse_shape  # noqa: E402

from videosys.ops import fused  # noqa: E402
from videosys.ops.fused import PassLaunch  # noqa: E402

DEFAULT_SHAPES = ["2x24180x1152:13", "32x256x1152"]
SMOKE_SHAPES = ["2x12x72:3", "2x8x100"]


def _grid(pairs, block_cs, programs, stages=(1,), **options) -> list[PassLaunch]:
    """Candidates: (tile, warp_elems) pairs x column blocks x programs per SM x pipelining depths, with the
    other PassLaunch fields in options (prefetch, max_registers)."""
    return [
        PassLaunch(tile=t, block_c=bc, warp_elems=we, num_stages=ns, programs_per_sm=pp, **options)
        for t, we in pairs
        for bc in block_cs
        for pp in programs
        for ns in stages
    ]


def candidates(family: str) -> list[PassLaunch]:
    """The grid of one kernel family and pass (~40-80 each; at C = 1152 the tile sizes and warp counts
    below cover 1-32 rows per tile and 1-8 warps), each with a group's row tiles in contiguous runs per
    split and interleaved across its splits. Norms also with the next row tile prefetched, for the tiles
    of at most a few rows where it fits in registers, and the forward with a register cap."""
    return [dataclasses.replace(p, interleave=i) for p in _family_grid(family) for i in (False, True)]


def _family_grid(family: str) -> list[PassLaunch]:
    if family == "elementwise_fwd":
        pairs = [(1024, 256), (2048, 512), (2048, 256), (4096, 1024), (4096, 512), (8192, 1024)]
        return _grid(pairs, (128, 256), (16, 64))
    if family == "elementwise_bwd":
        pairs = [(1024, 256), (2048, 512), (2048, 256), (4096, 1024), (4096, 512)]
        return _grid(pairs, (128, 256), (4, 8))
    if family == "norm_fwd":  # 1152 = 1024 + 128: tile 1024 is one row per tile, 8192 eight
        pairs = [(1024, 1024), (1024, 512), (1024, 256), (2048, 2048), (2048, 1024), (2048, 512), (2048, 256)]
        pairs += [(4096, 1024), (4096, 512)]
        prefetched = [(1024, 1024), (1024, 512), (2048, 2048), (2048, 512), (4096, 1024)]
        # One row per warp, capped so that 12-16 programs fit per SM (ptxas may otherwise take more).
        capped = _grid([(1024, 1024)], (4096,), (12, 16), prefetch=True, max_registers=160)
        return _grid(pairs, (4096,), (8, 16, 32)) + _grid(prefetched, (4096,), (8, 16, 24, 32), prefetch=True) + capped
    if family == "norm_bwd":
        pairs = [(1024, 1024), (1024, 512), (1024, 256), (1024, 128), (2048, 1024), (2048, 512), (2048, 256)]
        pairs += [(4096, 512)]
        prefetched = [(1024, 1024), (1024, 512), (1024, 256), (2048, 512), (2048, 256)]
        return _grid(pairs, (4096,), (3, 5, 8, 16)) + _grid(prefetched, (4096,), (3, 5, 7, 8, 16), prefetch=True)
    raise KeyError(family)


def family(field: str) -> str:
    kind = "norm" if field.startswith(("layernorm", "rms")) else "elementwise"
    return f"{kind}_{field.rsplit('_', 1)[1]}"


@contextmanager
def launch(field: str, params: PassLaunch):
    """fused.LAUNCH with one pass's entry replaced, restored afterwards."""
    saved = fused.LAUNCH
    fused.LAUNCH = dataclasses.replace(saved, **{field: params})
    try:
        yield
    finally:
        fused.LAUNCH = saved


def _tensors(result) -> list[torch.Tensor]:
    items = result if isinstance(result, tuple | list) else (result,)
    return [t for t in items if isinstance(t, torch.Tensor) and t.numel()]


def same_result(got, want) -> bool:
    """Equal up to summation order: 1 ulp of a low-precision output, 1e-4 of the scale for fp32 sums."""
    for a, b in zip(_tensors(got), _tensors(want), strict=True):
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        scale = b.float().abs().max().item() or 1.0
        ulp = torch.finfo(b.dtype).eps
        rtol, atol = (ulp, ulp * scale) if b.dtype != torch.float32 else (1e-4, 1e-4 * scale)
        if not torch.allclose(a.float(), b.float(), rtol=rtol, atol=atol):
            return False
    return True


def timer(smoke: bool, rep: int):
    if not smoke:
        return lambda fn: bench_ms(fn, rep=rep)

    def cpu_ms(fn) -> float:  # the interpreter: proves the plumbing, the numbers mean nothing
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    return cpu_ms


def copy_ms_per_byte(dtype: torch.dtype, measure, smoke: bool) -> float:
    """Seconds per byte moved (read + written) by a device-to-device copy, timed like the kernels."""
    numel = (1 << 16 if smoke else 1 << 30) // torch.empty((), dtype=dtype).element_size()
    device = "cpu" if smoke else "cuda"
    src = torch.empty(numel, device=device, dtype=dtype).normal_()
    dst = torch.empty_like(src)
    ms = measure(lambda: dst.copy_(src))
    return ms * 1e-3 / (2 * src.numel() * src.element_size())


def tune(shapes: list[str], dtype: torch.dtype, rep: int, smoke: bool, only: list[str] | None = None) -> dict:
    measure = timer(smoke, rep)
    device = "cpu" if smoke else "cuda"
    copy_s_per_byte = copy_ms_per_byte(dtype, measure, smoke)
    copy_bw = 1 / copy_s_per_byte
    name = "cpu (Triton interpreter)" if smoke else torch.cuda.get_device_name()
    print(f"device: {name}  copy bandwidth {copy_bw / 1e9:.0f} GB/s ({dtype})", flush=True)
    rows, rejected = [], []
    for text in shapes:
        b, n, c, g = parse_shape(text)
        for kernel, (fn, _, _, build, fwd_bytes, bwd_bytes) in kernels(b, n, c, g, dtype, device).items():
            if only and kernel not in only:
                continue
            inputs = build()
            with torch.no_grad():
                grad = torch.randn_like(fn(*inputs))
            forward, backward, fwd_field, bwd_field = direct_passes(kernel, inputs, grad)
            for phase, call, field, nbytes in (
                ("fwd", forward, fwd_field, fwd_bytes),
                ("bwd", backward, bwd_field, bwd_bytes),
            ):
                start = time.perf_counter()
                default = getattr(fused.LAUNCH, field)
                reference = call()
                grid = candidates(family(field))
                grid = [default, *(p for p in grid if p != default)]
                if smoke:  # the default, one other and, for norms, one prefetching candidate
                    grid = grid[:2] + [p for p in grid[2:] if p.prefetch][:1]
                timings = []
                for params in grid:
                    with launch(field, params):
                        if not same_result(call(), reference):
                            rejected.append((text, kernel, phase, params))
                            continue
                        timings.append((measure(call), params))
                default_ms = timings[0][0]  # the default is the first candidate and always matches itself
                best_ms, best = min(timings, key=lambda tp: tp[0])
                rows.append(
                    {
                        "shape": text,
                        "kernel": kernel,
                        "pass": phase,
                        "field": field,
                        "bytes": nbytes,
                        "best": dataclasses.asdict(best),
                        "best_ms": best_ms,
                        "default": dataclasses.asdict(default),
                        "default_ms": default_ms,
                        "all": [(ms, dataclasses.asdict(p)) for ms, p in timings],
                    }
                )
                print(
                    f"{text:18s} {kernel:20s} {phase}: best {best_ms:.4f} ms, default {default_ms:.4f} ms "
                    f"({len(grid)} candidates, {time.perf_counter() - start:.1f} s)",
                    flush=True,
                )
            del inputs, grad
            if not smoke:
                torch.cuda.empty_cache()
    return {"device": name, "dtype": str(dtype), "copy_GBps": copy_bw / 1e9, "rows": rows, "rejected": rejected}


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(PassLaunch) if f.default is not dataclasses.MISSING}


def _params(p: dict) -> str:
    text = f"tile={p['tile']} c={p['block_c']} we={p['warp_elems']} st={p['num_stages']} pps={p['programs_per_sm']}"
    return text + "".join(f" {k}={v}" for k, v in p.items() if k in _DEFAULTS and v != _DEFAULTS[k])


def table(report: dict) -> str:
    copy_bw = report["copy_GBps"] * 1e9
    lines = [
        f"Copy bandwidth: {report['copy_GBps']:.0f} GB/s on {report['device']} ({report['dtype']})",
        "",
        "| shape | kernel | pass | best params | ms | GB/s | of copy | default params | default ms | default of copy |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        best_bw, default_bw = r["bytes"] / (r["best_ms"] * 1e-3), r["bytes"] / (r["default_ms"] * 1e-3)
        lines.append(
            f"| {r['shape']} | {r['kernel']} | {r['pass']} | {_params(r['best'])} | {r['best_ms']:.4f} | "
            f"{best_bw / 1e9:.0f} | {best_bw / copy_bw:.0%} | {_params(r['default'])} | {r['default_ms']:.4f} | "
            f"{default_bw / copy_bw:.0%} |"
        )
    return "\n".join(lines)


def suggestion(report: dict) -> str:
    """Per pass, the candidate with the lowest geometric mean over shapes of its time over the default's
    (only candidates that ran on every shape), as a LaunchParams to paste."""
    by_field: dict[str, dict[str, list[float]]] = {}
    shapes_of: dict[str, int] = {}
    for r in report["rows"]:
        shapes_of[r["field"]] = shapes_of.get(r["field"], 0) + 1
        for ms, p in r["all"]:
            by_field.setdefault(r["field"], {}).setdefault(json.dumps(p, sort_keys=True), []).append(
                ms / r["default_ms"]
            )
    lines = ["LAUNCH = LaunchParams("]
    for field, scores in by_field.items():
        complete = {k: v for k, v in scores.items() if len(v) == shapes_of[field]}
        key = min(complete, key=lambda k: math.fsum(math.log(v) for v in complete[k]))
        p = json.loads(key)
        gain = math.exp(math.fsum(math.log(v) for v in complete[key]) / len(complete[key]))
        args = ", ".join(f"{k}={v}" for k, v in p.items() if k not in _DEFAULTS or v != _DEFAULTS[k])
        lines.append(f"    {field}=PassLaunch({args}),  # {gain:.2f}x the default's time")
    lines.append(")")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--shapes", nargs="+", default=None, help=f"BxNxC[:G] (default: {DEFAULT_SHAPES})")
    parser.add_argument("--rep", type=int, default=20, help="ms of timed calls per candidate (bench_kernels.bench_ms)")
    parser.add_argument("--kernels", nargs="+", default=None, help="only these (names as bench_kernels.kernels())")
    parser.add_argument("--out", type=Path, default=None, help="also write the full sweep as JSON")
    parser.add_argument("--smoke", action="store_true", help="2-3 candidates per pass, tiny shapes (CPU interpreter)")
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("tune_kernels.py times CUDA kernels; without a GPU run it with --smoke")
    shapes = args.shapes or (SMOKE_SHAPES if args.smoke else DEFAULT_SHAPES)
    for text in shapes:
        b, n, c, g = parse_shape(text)
        if n % g or min(b, n, c, g) <= 0:
            sys.exit(f"bad shape {text!r}: want BxNxC[:G] with G dividing N")
    start = time.perf_counter()
    report = tune(shapes, DTYPES[args.dtype], args.rep, args.smoke, args.kernels)
    print()
    print(table(report))
    print()
    print(suggestion(report))
    for shape, kernel, phase, params in report["rejected"]:
        print(f"REJECTED (result differs from the default's): {shape} {kernel} {phase} {params}")
    print(f"\nswept in {time.perf_counter() - start:.0f} s")
    if args.out:
        args.out.write_text(json.dumps({**report, "rejected": [list(map(str, r)) for r in report["rejected"]]}))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
