"""The same paths on a CUDA GPU: mixed-precision training, sampling and bench (diffusers parity on
GPU is a device parameter of tests/test_dit.py)."""

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
    samples = torch.load(metrics["samples_pt"], weights_only=True)
    assert samples["images"].shape == (10, 1, 8, 8) and samples["labels"].tolist() == list(range(10))
    assert torch.isfinite(samples["images"]).all() and samples["images"].abs().max() <= 1.0
    assert 0.0 <= metrics["class_accuracy"] <= 1.0
    bench_args = ["task=bench", "task.batch_size=8", "task.steps=3", "task.warmup_steps=1", "precision=bf16"]
    result = run_inprocess(bench_args, tmp_path / "bench", device="cuda")
    bench = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert bench["peak_memory_kind"] == "cuda max allocated" and bench["peak_memory_gib"] > 0
    assert bench["tflop_per_step"] > 0 and result["achieved_tflops"] > 0
