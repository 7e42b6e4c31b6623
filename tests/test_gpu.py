"""The same paths on a CUDA GPU: training in every precision, sampling, bench, diffusers parity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import TINY, read_losses, run_inprocess

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_gpu_tracks_fp32(tmp_path: Path, precision):
    common = [*TINY, "task.log_every=1", "task.sample_at_end=false"]
    run_inprocess(common, tmp_path / "fp32", device="cuda")
    run_inprocess([*common, f"precision={precision}"], tmp_path / precision, device="cuda")
    reference, losses = read_losses(tmp_path / "fp32"), read_losses(tmp_path / precision)
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    # Same device, seed, data and noise draws: the first step differs only by rounding.
    assert losses[1] == pytest.approx(reference[1], rel=0.03)


def test_sampling_and_bench_on_gpu(tmp_path: Path):
    metrics = run_inprocess([*TINY, "precision=bf16"], tmp_path / "train", device="cuda")
    samples = torch.load(metrics["samples_pt"], weights_only=False)
    assert torch.isfinite(samples["images"]).all()
    bench_args = ["task=bench", "task.batch_size=8", "task.steps=3", "task.warmup_steps=1", "precision=bf16"]
    result = run_inprocess(bench_args, tmp_path / "bench", device="cuda")
    bench = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert bench["peak_memory_kind"] == "cuda max allocated" and bench["peak_memory_gib"] > 0
    assert bench["tflop_per_step"] > 0 and result["achieved_tflops"] > 0


def test_diffusers_parity_on_gpu(tmp_path: Path):
    from test_dit import tiny_diffusers_dit
    from videosys.models.dit import DiT, DiTConfig, load_weights

    reference, folder = tiny_diffusers_dit(tmp_path)
    ours = DiT(DiTConfig(depth=3, hidden_size=32, num_heads=2, patch_size=2, weights=str(folder)))
    load_weights(ours, str(folder))
    reference, ours = reference.cuda().eval(), ours.cuda().eval()
    x = torch.randn(4, 3, 8, 8, device="cuda")
    t, y = torch.tensor([0, 17, 500, 999], device="cuda"), torch.tensor([0, 1, 4, 5], device="cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    with torch.no_grad():
        expected, actual = reference(x, t, y).sample, ours(x, t, y)
    assert ((actual - expected).norm() / expected.norm()) < 1e-5
