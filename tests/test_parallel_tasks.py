"""The tasks on several processes (spawned gloo ranks on CPU, fp32).

Training gives the single-process losses at any world size and layout (each sample carries its
own noise, timestep and dropout draws); a checkpoint saved at world size 4 resumes at 2 and the
reverse; sampling under CFG and sequence parallelism gives the single-process samples; text is
encoded once per group and the VAE decode is split over ranks; torchrun runs through the
`launch/` helper with one run directory that rank 0 alone writes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY, read_checkpoint, read_losses, run_inprocess, save_tiny_vae
from multiprocess import run_ranks
from videosys.distributed import ParallelConfig, init_distributed
from videosys.encoders import (
    LatentCodec,
    SharedTextEncoder,
    TextConditioner,
    VAEConfig,
    build_video_codec,
    decode_across_ranks,
)

ROOT = Path(__file__).resolve().parents[1]
SHORT = ["task.log_every=5", "task.keep_last=0", "task.sample_at_end=false"]
DIT = ["task.steps=20", "task.batch_size=8", "task.ckpt_every=10", *SHORT]
VIDEO = ["data=moving_digits", "task.steps=20", "task.batch_size=4", "task.ckpt_every=10", *SHORT]
PROMPTS = "sampling.prompts=['a 3 moving left','a 7 moving up']"


def _train(rank: int, world: int, overrides: list[str], run_dir: str, device: str = "cpu"):
    run_inprocess(overrides, Path(run_dir), device)
    return read_losses(Path(run_dir)) if rank == 0 else None


def _assert_same_losses(actual: dict[int, float], expected: dict[int, float], steps) -> None:
    assert sorted(actual) == list(steps)
    for step in steps:
        assert actual[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-7), step


# (model overrides, parallel overrides, world size). Each trains 20 steps through the real task.
TRAIN_CASES = {
    "dit-ddp-2": (DIT, ["parallel=ddp"], 2),
    "latte-dsp-2": (["model=latte", *VIDEO], ["parallel=dsp2"], 2),
    "latte-dp2xdsp2-4": (["model=latte", *VIDEO], ["parallel=dsp2"], 4),
    "opensora-ulysses-2": (["model=opensora", *VIDEO], ["parallel=ulysses2"], 2),
    "opensora_plan-ring-2": (["model=opensora_plan", *VIDEO], ["parallel=ring2"], 2),
    "opensora_plan-usp-4": (["model=opensora_plan", *VIDEO], ["parallel=usp2x2"], 4),
}


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_training_on_several_ranks_gives_the_single_process_losses(case: str, tmp_path: Path):
    model, parallel, world = TRAIN_CASES[case]
    run_inprocess(model, tmp_path / "one")
    expected = read_losses(tmp_path / "one")
    actual = run_ranks(world, _train, [*model, *parallel], str(tmp_path / "many"))
    _assert_same_losses(actual, expected, range(1, 21))


def test_checkpoints_reshard_from_4_to_2_ranks_and_back(tmp_path: Path):
    steps = [*DIT, "task.steps=10", "task.ckpt_every=5"]
    run_inprocess(steps, tmp_path / "one")
    expected = read_losses(tmp_path / "one")
    four = run_ranks(4, _train, [*steps, "parallel=zero3"], str(tmp_path / "four"))
    two = run_ranks(2, _train, [*steps, "parallel=zero2"], str(tmp_path / "two"))
    resume_four = f"resume={tmp_path / 'four/checkpoints/step_0000005'}"
    resume_two = f"resume={tmp_path / 'two/checkpoints/step_0000005'}"
    four_to_two = run_ranks(2, _train, [*steps, "parallel=zero2", resume_four], str(tmp_path / "4to2"))
    two_to_four = run_ranks(4, _train, [*steps, "parallel=zero3", resume_two], str(tmp_path / "2to4"))
    _assert_same_losses(four, expected, range(1, 11))
    _assert_same_losses(two, expected, range(1, 11))
    _assert_same_losses(four_to_two, expected, range(6, 11))
    _assert_same_losses(two_to_four, expected, range(6, 11))
    # The resumed runs end with the single-process run's weights, EMA and Adam moments, up to float
    # summation order (Adam's normalisation lifts that to ~2e-5 of a tensor's norm after 10 steps,
    # the same for the uninterrupted 4- and 2-rank runs).
    final = read_checkpoint(tmp_path / "one/checkpoints/step_0000010")
    for name in ("4to2", "2to4"):
        resumed = read_checkpoint(tmp_path / name / "checkpoints/step_0000010")
        for part in ("model", "ema"):
            assert resumed[part].keys() == final[part].keys()
            for key, value in final[part].items():
                assert _relative(resumed[part][key], value) <= 1e-4, (name, part, key)
        for key, state in final["optimizer"]["state"].items():
            assert _relative(resumed["optimizer"]["state"][key]["exp_avg"], state["exp_avg"]) <= 1e-4, (name, key)
            assert resumed["optimizer"]["state"][key]["step"] == state["step"] == 10


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-12)).item()


def _sample(rank: int, world: int, overrides: list[str], run_dir: str, device: str = "cpu"):
    run_inprocess(overrides, Path(run_dir), device)
    return torch.load(Path(run_dir) / "samples.pt", weights_only=False) if rank == 0 else None


SAMPLE_CASES = {
    "cfg2": (["parallel=cfg2"], 2),
    "dsp2": (["parallel=dsp2"], 2),
    "cfg2xdsp2": (["parallel=cfg2", "parallel.sp_ulysses=2", "parallel.sp_mode=dsp"], 4),
}


def test_sampling_under_cfg_and_sequence_parallel_gives_the_single_process_samples(tmp_path: Path):
    trained = tmp_path / "trained"
    run_inprocess(["model=latte", "data=moving_digits", "task.steps=3", "task.batch_size=4", *SHORT], trained)
    sample = ["task=sample", "model=latte", "data=moving_digits", f"task.checkpoint={trained}"]
    sample += ["sampling.num_steps=4", "sampling.cfg_scale=3.0", PROMPTS]
    run_inprocess(sample, tmp_path / "one")
    expected = torch.load(tmp_path / "one/samples.pt", weights_only=False)
    for name, (parallel, world) in SAMPLE_CASES.items():
        actual = run_ranks(world, _sample, [*sample, *parallel], str(tmp_path / name))
        assert actual["prompts"] == expected["prompts"]
        torch.testing.assert_close(actual["latents"], expected["latents"], rtol=1e-5, atol=1e-5, msg=name)
        torch.testing.assert_close(actual["videos"], expected["videos"], rtol=1e-5, atol=1e-5, msg=name)


def _decode(rank: int, world: int, vae_dir: str):
    dist = init_distributed(ParallelConfig(dp_shard=-1), "cpu")
    torch.manual_seed(0)
    clips = torch.randn(3, 4, 5, 4, 4)  # 3 clips of 5 latent frames: neither divides over the ranks
    images = torch.randn(3, 4, 4, 4)
    video = build_video_codec(VAEConfig(path=vae_dir), "cpu")
    image = LatentCodec(VAEConfig(path=vae_dir), torch.device("cpu"))
    world_comm = dist.comm("world")
    return {
        "video": (decode_across_ranks(video, clips, world_comm), video.decode(clips)),
        "image": (decode_across_ranks(image, images, world_comm), image.decode(images)),
    }


@pytest.mark.parametrize("world", [2, 4])
def test_vae_decode_split_over_ranks_equals_one_decode(world: int, tmp_path: Path):
    out = run_ranks(world, _decode, str(save_tiny_vae(tmp_path / "vae")))
    for kind, (split, whole) in out.items():
        torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-5, msg=kind)


class _RankTaggedEncoder(TextConditioner):
    """Embeddings that say which rank computed them, and a count of calls."""

    dim, max_length, device = 4, 3, torch.device("cpu")

    def __init__(self, rank: int):
        self.rank, self.calls = rank, 0

    def encode(self, prompts, device=None):
        self.calls += 1
        text = torch.full((len(prompts), self.max_length, self.dim), 100.0 * self.rank)
        text += torch.tensor([float(len(p)) for p in prompts]).view(-1, 1, 1)
        return text, torch.tensor([[True, True, False]] * len(prompts))


def _encode(rank: int, world: int):
    dist = init_distributed(ParallelConfig(dp_shard=-1), "cpu")
    inner = _RankTaggedEncoder(rank)
    shared = SharedTextEncoder(inner, dist.comm("world"), torch.device("cpu"))
    text, mask = shared.encode(["a 3", "a 7 moving up"])
    null_text, _ = shared.null(2)
    calls = [None] * world
    torch.distributed.all_gather_object(calls, inner.calls)
    return text, mask, null_text, calls


def test_text_is_encoded_once_and_shared():
    text, mask, null_text, calls = run_ranks(2, _encode)
    assert calls == [2, 0]  # the prompts and the empty prompt, on rank 0 only
    assert torch.equal(text[:, 0, 0], torch.tensor([3.0, 13.0])) and mask.dtype == torch.bool
    assert torch.equal(mask, torch.tensor([[True, True, False]] * 2))
    assert torch.equal(null_text, torch.zeros(2, 3, 4))


def test_torchrun_helper_runs_one_job_in_one_run_directory(tmp_path: Path):
    # Each rank is given its own run_dir, as Hydra's clock does when ranks start in different
    # seconds: they must settle on rank 0's, and rank 1's must be gone.
    run_dir = f"run_dir={tmp_path}/run_" + "${oc.env:RANK}"
    env = {**os.environ, "NPROC": "2", "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    args = ["bash", str(ROOT / "launch/torchrun.sh"), "parallel=zero2", *TINY, "task.sample_at_end=false", run_dir]
    result = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run_0"]
    out = tmp_path / "run_0"
    assert (out / "metrics.json").is_file() and (out / "loss.png").is_file()
    assert sorted(p.name for p in (out / "checkpoints/step_0000004").glob("*.distcp")) == [
        "__0_0.distcp",
        "__1_0.distcp",
    ]
    log = (out / "videosys.log").read_text()
    assert log.count("step 4/4") == 1  # one rank logs
    assert result.stdout.count("videosys train finished") == 1


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_tasks_on_two_gpus_match_one_gpu(tmp_path: Path):
    """NCCL, fp32: training under ZeRO-2, ZeRO-3 with CPU offload and DSP gives the one-GPU losses,
    and CFG- and DSP-parallel sampling the one-GPU samples. Errors are printed for the docs."""
    cases = {
        "dit-zero2": (DIT, ["parallel=zero2"]),
        "dit-zero3-offload": (DIT, ["parallel=zero3", "parallel.offload=true"]),
        "latte-dsp2": (["model=latte", *VIDEO], ["parallel=dsp2"]),
    }
    for name, (model, parallel) in cases.items():
        run_inprocess(model, tmp_path / name / "one", "cuda")
        expected = read_losses(tmp_path / name / "one")
        actual = run_ranks(2, _train, [*model, *parallel], str(tmp_path / name / "two"), "cuda", backend="nccl")
        error = max(abs(actual[s] - expected[s]) / abs(expected[s]) for s in expected)
        print(f"2 GPUs {name}: 20-step losses, largest relative difference {error:.2e}")
        assert sorted(actual) == sorted(expected) and error <= 1e-4, name
    sample = ["task=sample", "model=latte", "data=moving_digits", f"task.checkpoint={tmp_path / 'latte-dsp2/one'}"]
    sample += ["sampling.num_steps=4", "sampling.cfg_scale=3.0", PROMPTS]
    run_inprocess(sample, tmp_path / "sample-one", "cuda")
    expected = torch.load(tmp_path / "sample-one/samples.pt", weights_only=False)
    for name in ("cfg2", "dsp2"):
        actual = run_ranks(2, _sample, [*sample, f"parallel={name}"], str(tmp_path / name), "cuda", backend="nccl")
        error = ((actual["latents"] - expected["latents"]).abs().max() / expected["latents"].abs().max()).item()
        print(f"2 GPUs sampling {name}: largest difference of the latents {error:.2e} (relative to their max)")
        assert error <= 1e-4, name
