"""Text-to-video training and sampling end to end: every video model on moving digits, the
objectives and samplers they use, random-weight sampling, and the test-size learning run."""

from __future__ import annotations

import json
from pathlib import Path

import av
import pytest
import torch

from conftest import run_inprocess
from videosys.diffusion import DiffusionConfig, GaussianDiffusion, RectifiedFlow, SamplingConfig, make_sampler
from videosys.diffusion.flow import shift_timesteps
from videosys.diffusion.gaussian import make_betas

VIDEO_MODELS = ["latte", "opensora", "opensora_plan", "cogvideox"]
QUICK = ["task.steps=2", "task.batch_size=4", "task.log_every=1", "sampling.num_steps=2"]
PROMPTS = "sampling.prompts=['a 3 moving left','a 7 moving up']"


@pytest.mark.parametrize("model", VIDEO_MODELS)
def test_every_video_model_trains_and_samples_moving_digits(model: str, tmp_path: Path):
    metrics = run_inprocess([f"model={model}", "data=moving_digits", *QUICK, PROMPTS], tmp_path)
    assert torch.isfinite(torch.tensor(metrics["final_loss"]))
    samples = torch.load(tmp_path / "samples.pt", weights_only=False)
    videos = samples["videos"]
    assert samples["prompts"] == ["a 3 moving left", "a 7 moving up"]
    assert videos.shape == (2, 1, 8, 16, 16) and videos.min() >= -1 and videos.max() <= 1
    assert 0.0 <= metrics["digit_accuracy"] <= 1.0 and 0.0 <= metrics["direction_accuracy"] <= 1.0
    with av.open(str(tmp_path / "samples.mp4")) as container:
        assert sum(1 for _ in container.decode(video=0)) == 8
    assert (tmp_path / "samples.gif").stat().st_size > 0
    assert json.loads((tmp_path / "metrics.json").read_text())["digit_accuracy"] == metrics["digit_accuracy"]


def test_sampling_a_video_model_without_weights_warns_and_runs(tmp_path: Path, caplog):
    overrides = ["task=sample", "model=opensora", "sampling.num_steps=2", "sampling.num_frames=4"]
    overrides += ["sampling.height=16", "sampling.width=24", "sampling.prompts=['a cat on a boat']"]
    with caplog.at_level("WARNING"):
        metrics = run_inprocess(overrides, tmp_path)
    assert "RANDOM weights" in caplog.text
    videos = torch.load(metrics["samples_pt"], weights_only=False)["videos"]
    assert videos.shape == (1, 3, 4, 16, 24)


def test_prompts_come_from_a_file(tmp_path: Path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a 1 moving right\n\na 2 moving down\n")
    run_inprocess(["model=latte", "data=moving_digits", *QUICK, f"sampling.prompts_file={prompts}"], tmp_path / "run")
    assert torch.load(tmp_path / "run" / "samples.pt", weights_only=False)["prompts"] == [
        "a 1 moving right",
        "a 2 moving down",
    ]


def test_rectified_flow_loss_is_the_velocity_error():
    flow = RectifiedFlow(t_sampling="uniform", timestep_shift=False)
    x0 = torch.randn(4, 2, 3, 4, 4)
    torch.manual_seed(0)
    seen = {}

    def model(x_t, t, **_):
        seen["x_t"], seen["t"] = x_t, t
        return torch.zeros_like(x_t)

    loss = flow.training_loss(model, x0, pixels=64.0)
    torch.manual_seed(0)
    s = torch.rand(4)
    noise = torch.randn_like(x0)
    torch.testing.assert_close(seen["t"], s * 1000)
    torch.testing.assert_close(seen["x_t"], (1 - s.view(-1, 1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1, 1) * noise)
    torch.testing.assert_close(loss, (x0 - noise).square().flatten(1).mean(1))


def test_flow_timestep_shift_grows_with_resolution_and_length():
    s = torch.tensor([0.25, 0.5, 0.75])
    torch.testing.assert_close(shift_timesteps(s, 512 * 512, 1, 512 * 512, 1.0), s)
    shifted = shift_timesteps(s, 1024 * 1024, 4, 512 * 512, 1.0)  # ratio 2 * 2 = 4
    torch.testing.assert_close(shifted, 4 * s / (1 + 3 * s))
    assert (shifted > s).all()


def test_euler_sampler_transports_noise_to_a_point_mass_exactly():
    # For data that is a point mass c the exact velocity is c - noise = (c - x_t) / s.
    target = 0.4
    diffusion = DiffusionConfig(objective="flow").resolved()
    sampler = make_sampler(SamplingConfig(num_steps=7), diffusion, False, False, pixels=128 * 128, frames=3)
    x = torch.randn(2, 1, 3, 4, 4)
    for i, t in enumerate(sampler.timesteps):
        s = t / 1000
        x = sampler.step((target - x) / s, i, x, None)
    torch.testing.assert_close(x, torch.full_like(x, target))


def test_v_prediction_loss_equals_weighted_x0_error():
    cfg = DiffusionConfig(objective="v", beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    diffusion = GaussianDiffusion(cfg.resolved(), learn_sigma=False)
    x0 = torch.randn(3, 2, 4, 4)
    torch.manual_seed(1)
    captured = {}

    def model(x_t, t, **_):
        captured["x_t"], captured["t"] = x_t, t
        return torch.zeros_like(x_t)

    loss = diffusion.training_loss(model, x0)
    a = diffusion.alpha_bar[captured["t"]].float().view(-1, 1, 1, 1)
    # v = 0 predicts x0_hat = sqrt(a) x_t; the loss is |x0_hat - x0|^2 / (1 - a).
    x0_hat = a.sqrt() * captured["x_t"]
    torch.testing.assert_close(loss, ((x0_hat - x0).square() / (1 - a)).flatten(1).mean(1), rtol=1e-4, atol=1e-5)


def test_cogvideox_schedule_matches_the_cogvideox_scheduler():
    from diffusers import CogVideoXDDIMScheduler

    cfg = DiffusionConfig(
        objective="v",
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        zero_terminal_snr=True,
        snr_shift_scale=3.0,
    ).resolved()
    reference = CogVideoXDDIMScheduler(snr_shift_scale=3.0, rescale_betas_zero_snr=True)
    ours = torch.cumprod(1 - make_betas(cfg), 0)
    torch.testing.assert_close(ours.float(), reference.alphas_cumprod.float(), rtol=1e-4, atol=1e-6)
    assert ours[-1] == 0  # zero terminal SNR: the last step is pure noise
    sampler = make_sampler(SamplingConfig(sampler="cogvideox_ddim", num_steps=5), cfg, False, False)
    assert sampler.timesteps[0] == 999  # trailing spacing starts from pure noise


def test_moving_digits_learning_run(tmp_path: Path):
    """The test-size run of docs/benchmarks.md: Latte (debug) on moving digits, 2 CPU cores."""
    metrics = run_inprocess(["model=latte", "data=moving_digits"], tmp_path)
    assert metrics["digit_accuracy"] >= 0.70, metrics
    assert metrics["direction_accuracy"] >= 0.70, metrics
    assert metrics["real_digit_accuracy"] >= 0.9
