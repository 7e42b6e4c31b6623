"""Quality of Pyramid Attention Broadcast against full computation, on the debug Latte model trained on moving digits.

Trains `model=latte data=moving_digits` once (the CPU learning run of docs/benchmarks.md, ~4 minutes on 2 cores), or
takes the run directory of one (`--checkpoint`), then samples the same prompts with the same seed
(`task=sample`, sampling.seed fixed, every digit x direction prompt) with `pab=off` and with each PAB preset. Every
run is a separate `python -m videosys.run` process. For each preset it reports, against the `pab=off` videos:

- PSNR and SSIM, per clip over all its frames with pixels mapped from [-1, 1] to [0, 1], averaged over the clips
  (SSIM: 11x11 Gaussian window, sigma 1.5, per channel and frame, K1 = 0.01, K2 = 0.03, data range 1, valid region);
- the dataset evaluator's digit and direction accuracies;
- attention calls computed and reused (per kind, from metrics.json) and the fraction reused (MLP reuse, which the
  `fast` preset adds, is counted separately);
- the sampling seconds the run measured, and the process' wall time.

It prints a markdown table and writes the rows as JSON (`--out`).

    python benchmarks/pab_quality.py                                   # train, then sample 7 settings
    python benchmarks/pab_quality.py --checkpoint outputs/DATE/TIME     # reuse a trained run
    python benchmarks/pab_quality.py --checkpoint RUN --presets latte fast -- sampling.num_steps=50
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from videosys.cache import format_counts

PRESETS = ["latte", "opensora", "fast", "quality", "opensora_plan", "cogvideox"]
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


# --- Metrics ----------------------------------------------------------------------------------------


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio (dB) of one clip (or image) against another of the same shape, over all its
    elements: 10 log10(data_range^2 / MSE). Identical inputs give inf. Computed in float64."""
    if x.shape != y.shape:
        raise ValueError(f"psnr of tensors of different shapes: {tuple(x.shape)} and {tuple(y.shape)}")
    mse = (x.double() - y.double()).pow(2).mean().item()
    if mse == 0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / mse)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """The normalised 2-D Gaussian weights (size x size, float64) SSIM averages over."""
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(offsets**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    data_range: float = 1.0,
    window: int = SSIM_WINDOW,
    sigma: float = SSIM_SIGMA,
    k1: float = SSIM_K1,
    k2: float = SSIM_K2,
) -> float:
    """Structural similarity (Wang et al. 2004) of one clip (or image) against another of the same shape. The last
    two dimensions are height and width; every leading index (channel, frame, in any order) is one greyscale map.
    Local statistics are Gaussian-weighted over a window x window neighbourhood at every position where the window
    fits (no padding); the result is the mean SSIM over all those positions of all maps. Computed in float64."""
    if x.shape != y.shape:
        raise ValueError(f"ssim of tensors of different shapes: {tuple(x.shape)} and {tuple(y.shape)}")
    if x.dim() < 2 or x.shape[-1] < window or x.shape[-2] < window:
        raise ValueError(f"ssim needs maps of at least {window}x{window} pixels, got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    a = x.double().reshape(-1, 1, h, w)
    b = y.double().reshape(-1, 1, h, w)
    kernel = gaussian_window(window, sigma).to(a.device)[None, None]

    def local_mean(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel)

    mu_a, mu_b = local_mean(a), local_mean(b)
    var_a = local_mean(a * a) - mu_a**2
    var_b = local_mean(b * b) - mu_b**2
    cov = local_mean(a * b) - mu_a * mu_b
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return (num / den).mean().item()


def to_unit(videos: torch.Tensor) -> torch.Tensor:
    """Videos in [-1, 1] mapped to [0, 1] (clamped)."""
    return ((videos.double() + 1) / 2).clamp(0, 1)


def clip_scores(videos: torch.Tensor, reference: torch.Tensor) -> dict:
    """Per-clip PSNR and SSIM of `videos` against `reference` (both in [-1, 1], clips along dim 0), averaged."""
    if videos.shape != reference.shape:
        raise ValueError(f"videos {tuple(videos.shape)} and reference {tuple(reference.shape)} differ in shape")
    a, b = to_unit(videos), to_unit(reference)
    psnrs = [psnr(a[i], b[i]) for i in range(len(a))]
    ssims = [ssim(a[i], b[i]) for i in range(len(a))]
    return {
        "psnr": sum(psnrs) / len(psnrs),
        "psnr_min": min(psnrs),
        "ssim": sum(ssims) / len(ssims),
        "ssim_min": min(ssims),
        "max_abs_diff": (a - b).abs().max().item(),
    }


# --- Runs -------------------------------------------------------------------------------------------


def run_videosys(overrides: list[str], log_path: Path) -> float:
    """`python -m videosys.run OVERRIDES` in a child process, its output in log_path; returns its wall seconds."""
    cmd = [sys.executable, "-m", "videosys.run", *overrides]
    print("$", " ".join(cmd), flush=True)
    started = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-40:])
        raise SystemExit(f"videosys.run failed (exit {proc.returncode}); last lines of {log_path}:\n{tail}")
    return seconds


def sample_preset(checkpoint: Path, preset: str, work: Path, extra: list[str]) -> dict:
    out = work / f"sample_{preset}"
    out.mkdir(parents=True, exist_ok=True)
    overrides = [
        "task=sample",
        "model=latte",
        "data=moving_digits",
        f"task.checkpoint={checkpoint}",
        f"run_dir={out}",
        f"pab={preset}",
        *extra,
    ]
    wall = run_videosys(overrides, out / "run.log")
    metrics = json.loads((out / "metrics.json").read_text())
    samples = torch.load(out / "samples.pt", map_location="cpu", weights_only=False)
    return {"metrics": metrics, "samples": samples, "wall": wall, "run_dir": str(out)}


def summarize(preset: str, run: dict, reference: dict) -> dict:
    metrics, samples = run["metrics"], run["samples"]
    if list(samples["prompts"]) != list(reference["samples"]["prompts"]):
        raise SystemExit(f"pab={preset} sampled other prompts than pab=off")
    computed = metrics.get("pab_computed", {})
    reused = metrics.get("pab_reused", {})
    row = {
        "pab": preset,
        **clip_scores(samples["videos"], reference["samples"]["videos"]),
        "digit_accuracy": metrics.get("digit_accuracy"),
        "direction_accuracy": metrics.get("direction_accuracy"),
        "pab_computed": computed,
        "pab_reused": reused,
        "pab_attention_reused": metrics.get("pab_attention_reused", 0.0),
        "mlp_reused": reused.get("mlp", 0),
        "pab_cache_mib": metrics.get("pab_cache_mib", 0.0),
        "sample_seconds": metrics.get("sample_seconds"),
        "wall_seconds": round(run["wall"], 2),
        "num_clips": int(samples["videos"].shape[0]),
        "video_shape": list(samples["videos"].shape[1:]),
        "run_dir": run["run_dir"],
    }
    return row


def finite_json(value):
    """Rows as strict JSON: an infinite PSNR (identical videos) becomes the string "inf"."""
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_json(v) for v in value]
    return value


def fmt(value, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return format(value, spec)


def markdown(rows: list[dict]) -> str:
    head = (
        "| pab | PSNR dB (min) | SSIM (min) | digit acc | direction acc | computed | reused | attn reused "
        "| cache MiB | sample s |"
    )
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        lines.append(
            f"| {r['pab']} | {fmt(r['psnr'], '.2f')} ({fmt(r['psnr_min'], '.2f')}) "
            f"| {fmt(r['ssim'], '.4f')} ({fmt(r['ssim_min'], '.4f')}) "
            f"| {fmt(r['digit_accuracy'], '.3f')} | {fmt(r['direction_accuracy'], '.3f')} "
            f"| {format_counts(r['pab_computed'])} | {format_counts(r['pab_reused'])} "
            f"| {fmt(r['pab_attention_reused'], '.1%')} | {fmt(r['pab_cache_mib'], '.2f')} "
            f"| {fmt(r['sample_seconds'], '.1f')} |"
        )
    lines.append("")
    lines.append(
        "computed / reused: calls per kind (s spatial, t temporal, f full, c cross, m mlp); attn reused: reused "
        "fraction of attention calls (MLP excluded); PSNR / SSIM: against pab=off, per clip in [0, 1], mean (min)."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="run directory (or checkpoint) of a trained latte/moving_digits run")
    parser.add_argument("--work-dir", default="pab_quality_runs", help="where the training and sample runs go")
    parser.add_argument("--presets", nargs="+", default=PRESETS, help="PAB presets to compare with pab=off")
    parser.add_argument("--out", default="pab_quality.json", help="JSON file of the rows (the table goes next to it)")
    parser.add_argument("overrides", nargs="*", help="extra overrides for every sample run (after --)")
    args = parser.parse_args(argv)

    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = Path(args.checkpoint).resolve() if args.checkpoint else None
    train_seconds = None
    if checkpoint is None:
        checkpoint = work / "train"
        checkpoint.mkdir(parents=True, exist_ok=True)
        train_seconds = run_videosys(
            ["model=latte", "data=moving_digits", f"run_dir={checkpoint}"], checkpoint / "run.log"
        )
        print(f"trained in {train_seconds:.0f} s: {checkpoint}", flush=True)

    reference = sample_preset(checkpoint, "off", work, args.overrides)
    rows = [summarize("off", reference, reference)]
    for preset in args.presets:
        if preset == "off":
            continue
        rows.append(summarize(preset, sample_preset(checkpoint, preset, work, args.overrides), reference))
        r = rows[-1]
        print(
            f"pab={preset}: PSNR {fmt(r['psnr'], '.2f')} dB, SSIM {r['ssim']:.4f}, "
            f"{r['pab_attention_reused']:.1%} of attention reused",
            flush=True,
        )

    table = markdown(rows)
    print()
    print(table)
    out = Path(args.out)
    result = {
        "checkpoint": str(checkpoint),
        "train_seconds": train_seconds,
        "sample_overrides": args.overrides,
        "torch": torch.__version__,
        "rows": rows,
    }
    out.write_text(json.dumps(finite_json(result), indent=2, allow_nan=False) + "\n")
    out.with_suffix(".md").write_text(table + "\n")
    print(f"\nwrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
