"""Shared helpers: run the entrypoint in-process (same compose -> validate -> execute path as the
CLI, minus the process start) or as a real subprocess, and build tiny local assets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

# Without CUDA, Triton kernels run through the interpreter, which must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from omegaconf import OmegaConf
from PIL import Image

from videosys.run import compose_config, execute, to_run_config

# A few optimizer steps and a short sampler: enough to exercise every stage in seconds.
TINY = [
    "task.steps=4",
    "task.batch_size=8",
    "task.log_every=2",
    "task.ckpt_every=2",
    "sampling.num_steps=3",
    "sampling.num_per_class=1",
]


def run_inprocess(overrides: list[str], run_dir: Path, device: str = "cpu") -> dict:
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = compose_config([*overrides, f"run_dir={run_dir}", f"device={device}"])
    run_cfg = to_run_config(cfg)
    return execute(run_cfg, run_dir, OmegaConf.to_container(cfg, resolve=True))


def run_cli(args: list[str], cwd: Path, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "videosys.run", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )


def read_checkpoint(path: Path) -> dict:
    """Every tensor of a (DCP) training checkpoint folder, whole, as nested dicts."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(str(path), f"{tmp}/whole.pt")
        return torch.load(f"{tmp}/whole.pt", weights_only=True)


def read_losses(run_dir: Path) -> dict[int, float]:
    losses = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            losses[record["step"]] = record["loss"]
    return losses


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.set_num_threads(2)


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Two classes of small random RGB images of mixed sizes."""
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for label, name in enumerate(["cats", "dogs"]):
        (root / name).mkdir(parents=True)
        for i in range(6):
            size = (24 + 4 * i, 20 + 2 * label)
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def save_tiny_vae(path: Path, channels: int = 3) -> Path:
    """A random diffusers AutoencoderKL (2x spatial downsampling, 4 latent channels) saved at `path`."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=channels,
        out_channels=channels,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    )
    vae.save_pretrained(path)
    return path


@pytest.fixture
def tiny_vae(tmp_path: Path) -> Path:
    return save_tiny_vae(tmp_path / "vae")


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A real single-node Slurm (tests/slurm_cluster.py), started once for the session. Where it cannot
    run the test skips with the reason; in CI (CI=true) that is a failure instead."""
    import slurm_cluster

    reason = slurm_cluster.missing()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the Slurm tests must run in CI: {reason}")
        pytest.skip(reason)
    cluster = slurm_cluster.SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    cluster.stop()
