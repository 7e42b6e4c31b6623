"""The real entrypoint in subprocesses: train -> sample -> bench, logging, bad input, the default job."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from conftest import TINY, read_losses, run_cli


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A short training run through the CLI with overrides from several groups."""
    root = tmp_path_factory.mktemp("cli")
    run_dir = root / "train"
    args = [*TINY, "task.steps=30", "task.batch_size=16", "task.ckpt_every=10", "sampling.num_steps=10"]
    args += ["sampling.num_per_class=3", "sampling.sampler=ddim", "optimizer.lr=2e-3", f"run_dir={run_dir}"]
    result = run_cli(args, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Outputs in {run_dir}" in result.stdout
    return run_dir


def test_train_writes_every_output(trained_run: Path):
    for name in ("samples.png", "samples.pt", "loss.png", "metrics.json", "metrics.jsonl", "videosys.log"):
        assert (trained_run / name).is_file(), name
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert 0.0 <= metrics["class_accuracy"] <= 1.0
    assert metrics["classifier_accuracy_on_real"] > 0.95
    assert Path(metrics["checkpoint"]).name == "step_0000030"
    assert len(read_losses(trained_run)) == 30
    losses = read_losses(trained_run)
    assert sum(losses[s] for s in range(26, 31)) < sum(losses[s] for s in range(1, 6))  # it learns
    samples = torch.load(trained_run / "samples.pt", weights_only=True)
    assert samples["images"].shape == (30, 1, 8, 8) and samples["labels"].tolist() == sorted(list(range(10)) * 3)
    log_text = (trained_run / "videosys.log").read_text()
    assert "step 30/30 loss" in log_text and "it/s" in log_text
    # Hydra records the composed config and the overrides in the run directory.
    assert "optimizer.lr=2e-3" in (trained_run / ".hydra" / "overrides.yaml").read_text()


def test_sample_task_is_reproducible_value_by_value(trained_run: Path, tmp_path: Path):
    def sample(name: str, *extra: str) -> dict:
        run_dir = tmp_path / name
        args = ["task=sample", f"task.checkpoint={trained_run}", f"run_dir={run_dir}", "sampling.num_steps=8"]
        args += ["sampling.classes=[3,7]", "sampling.num_per_class=2", *extra]
        result = run_cli(args, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        assert (run_dir / "samples.png").is_file()
        return torch.load(run_dir / "samples.pt", weights_only=True)

    first, again = sample("a", "sampling.seed=5"), sample("b", "sampling.seed=5")
    assert first["labels"].tolist() == [3, 3, 7, 7]
    assert torch.equal(first["images"], again["images"])
    other_seed = sample("c", "sampling.seed=6")
    assert not torch.allclose(first["images"], other_seed["images"])
    raw_weights = sample("d", "sampling.seed=5", "task.use_ema=false")
    assert not torch.allclose(first["images"], raw_weights["images"])


def test_bench_writes_timings_flops_and_memory(tmp_path: Path):
    # Forward FLOPs of the debug DiT (16 tokens, width 128, depth 4, batch 4), counted by hand.
    b, n, d = 4, 16, 128
    block = 2 * b * d * 6 * d + 2 * b * n * d * 3 * d + 4 * b * n * n * d + 2 * b * n * d * d + 16 * b * n * d * d
    forward = 2 * b * n * d * 4 + 2 * b * (256 * d + d * d) + 4 * block + 2 * b * d * 2 * d + 2 * b * n * d * 8
    # (mode, activation checkpointing) -> (model FLOPs, executed FLOPs): recomputation adds a forward.
    cases = {("train", False): (3, 3), ("train", True): (3, 4), ("forward", False): (1, 1)}
    for (mode, ac), (model_factor, executed_factor) in cases.items():
        run_dir = tmp_path / f"{mode}-{ac}"
        args = ["task=bench", f"task.mode={mode}", f"task.activation_checkpointing={ac}", "task.batch_size=4"]
        result = run_cli([*args, "task.warmup_steps=1", "task.steps=3", f"run_dir={run_dir}"], cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        bench = json.loads((run_dir / "bench.json").read_text())
        assert bench["mode"] == mode and bench["steps"] == 3
        assert bench["latency_ms"]["min"] <= bench["latency_ms"]["median"] <= bench["latency_ms"]["max"]
        assert bench["samples_per_second"] == pytest.approx(4 / (bench["latency_ms"]["mean"] / 1e3))
        assert bench["peak_memory_gib"] > 0 and bench["mfu"] is None  # no peak known for a CPU
        assert bench["tflop_per_step"] * 1e12 == pytest.approx(model_factor * forward, rel=1e-6)
        assert bench["executed_tflop_per_step"] * 1e12 == pytest.approx(executed_factor * forward, rel=0.02)


def _wandb_records(run_file: Path) -> list:
    """Decode a .wandb file: LevelDB-log chunks (32 KiB blocks, 7-byte headers) of protobuf Records."""
    from wandb.proto import wandb_internal_pb2

    data, records, pending, pos = run_file.read_bytes(), [], b"", 7  # 7-byte W&B file header
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # full record, or last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending + chunk)
            records.append(record)
            pending = b""
        elif kind in (2, 3):  # first or middle chunk
            pending += chunk
    return records


def test_wandb_offline_logs_config_metrics_and_images(tmp_path: Path):
    run_dir = tmp_path / "run"
    result = run_cli([*TINY, "logger=wandb", f"run_dir={run_dir}"], cwd=tmp_path, env={"WANDB_MODE": "offline"})
    assert result.returncode == 0, result.stderr[-3000:]
    run_files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1
    records = _wandb_records(run_files[0])
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert {"model", "data", "task", "optimizer", "precision"} <= {item.key for item in run.config.update}
    assert run.run_id == (run_dir / "wandb_run_id").read_text()
    history = [
        {(i.key or "/".join(i.nested_key)): i.value_json for i in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    logged = {int(h["_step"]): float(h["loss"]) for h in history if "loss" in h}
    assert logged == pytest.approx(read_losses(run_dir))
    assert any(h.get("samples/_type") == '"image-file"' for h in history)


def test_bad_input_stops_with_a_message_naming_it(tmp_path: Path):
    cases = [
        (["task.stepz=3"], "stepz"),
        (["model=nosuchmodel"], "nosuchmodel"),
        (["model.flavor=Huge/2"], "model.flavor='Huge/2'"),
        (["task=sample", f"task.checkpoint={tmp_path / 'gone'}"], "gone"),
    ]
    for i, (args, message) in enumerate(cases):
        run_dir = tmp_path / f"run{i}"
        result = run_cli([*args, f"run_dir={run_dir}"], cwd=tmp_path, timeout=120)
        assert result.returncode != 0, args
        assert message in result.stderr, (args, result.stderr[-2000:])
        assert not (run_dir / "checkpoints").exists()


@pytest.mark.slow
def test_default_job_learns_digits(tmp_path: Path):
    """The README's first command: no arguments, digits on the CPU, class accuracy >= 0.80."""
    result = run_cli(["run_dir=default"], cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "default"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["class_accuracy"] >= 0.80, metrics
    assert metrics["steps"] == 1500
    for name in ("samples.png", "loss.png", "samples.pt"):
        assert (run_dir / name).is_file()
    assert (Path(metrics["checkpoint"]) / "meta.pt").is_file()
    assert f"Outputs in {run_dir}" in result.stdout
