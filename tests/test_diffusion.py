"""Diffusion objective and samplers, checked against closed-form values."""

from __future__ import annotations

import math

import pytest
import torch

from videosys.diffusion import DiffusionConfig, GaussianDiffusion, SamplingConfig, make_sampler
from videosys.diffusion.gaussian import discretized_gaussian_log_likelihood, make_betas
from videosys.diffusion.sampling import sample_class_conditional


def test_linear_schedule_is_the_ddpm_one():
    betas = make_betas(DiffusionConfig())
    assert len(betas) == 1000
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    cosine = make_betas(DiffusionConfig(beta_schedule="cosine"))
    assert (cosine > 0).all() and (cosine <= 0.999).all()


def test_discretized_likelihood_sums_to_one_over_the_256_bins():
    bins = torch.linspace(-1, 1, 256)
    for mean, log_scale in [(0.0, math.log(0.3)), (0.7, math.log(0.05)), (-0.95, math.log(1.0))]:
        log_p = discretized_gaussian_log_likelihood(bins, torch.full_like(bins, mean), torch.full_like(bins, log_scale))
        assert log_p.exp().sum().item() == pytest.approx(1.0, abs=2e-3)


def _state(diffusion, t_value, shape=(2, 1, 4, 4)):
    torch.manual_seed(0)
    x0 = torch.rand(shape) * 2 - 1
    noise = torch.randn(shape)
    t = torch.full((shape[0],), t_value, dtype=torch.long)
    return x0, noise, t, diffusion.q_sample(x0, t, noise)


def test_vb_is_zero_for_the_true_posterior_and_matches_the_closed_form_otherwise():
    diffusion = GaussianDiffusion(DiffusionConfig(), learn_sigma=True)
    t_value = 400
    x0, noise, t, x_t = _state(diffusion, t_value)
    # Exact epsilon and v = -1 (variance = posterior variance): p equals q, so the KL vanishes.
    vb = diffusion.vb_bits_per_dim(noise, -torch.ones_like(x0), x0, x_t, t)
    assert vb.abs().max().item() < 1e-5
    # v = +1 selects variance beta_t; with equal means KL = 0.5 (log(beta/post) + post/beta - 1) nats per dim.
    vb = diffusion.vb_bits_per_dim(noise, torch.ones_like(x0), x0, x_t, t)
    beta = diffusion.betas[t_value].item()
    post = math.exp(diffusion.posterior_log_variance[t_value].item())
    expected = 0.5 * (math.log(beta / post) + post / beta - 1) / math.log(2)
    torch.testing.assert_close(vb, torch.full_like(vb, expected), rtol=1e-4, atol=1e-7)


def test_learned_variance_loss_trains_the_mean_by_mse_only():
    diffusion = GaussianDiffusion(DiffusionConfig(), learn_sigma=True)
    x0 = torch.rand(3, 1, 4, 4) * 2 - 1
    prediction = torch.randn(3, 2, 4, 4, requires_grad=True)

    def model(x_t, t, y):  # returns a fixed prediction so that gradients are analytic
        return prediction * 1.0

    torch.manual_seed(0)
    loss = diffusion.training_loss(model, x0, y=None).sum()
    loss.backward()
    torch.manual_seed(0)
    t = diffusion.sample_timesteps(3, x0.device)
    noise = torch.randn_like(x0)
    # d/d eps of the per-sample mean of (noise - eps)^2 is -2 (noise - eps) / 16: the VLB adds nothing.
    expected_eps_grad = -2 * (noise - prediction[:, :1].detach()) / 16
    torch.testing.assert_close(prediction.grad[:, :1], expected_eps_grad)
    assert prediction.grad[:, 1:].abs().sum() > 0  # the variance output is trained by the VLB
    assert t.shape == (3,)


def perfect_denoiser(diffusion: GaussianDiffusion, targets: dict[int, float], learn_sigma: bool):
    """The exact epsilon for data that is a point mass at targets[label]."""
    alpha_bar = diffusion.alpha_bar.float()

    def denoise(x, t, y):
        a = alpha_bar[t.long()].view(-1, 1, 1, 1)
        c = torch.tensor([targets[int(label)] for label in y]).view(-1, 1, 1, 1)
        eps = (x - a.sqrt() * c) / (1 - a).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], dim=1) if learn_sigma else eps

    return denoise


@pytest.mark.parametrize("sampler,steps", [("ddpm", 1000), ("ddpm", 50), ("ddim", 25)])
@pytest.mark.parametrize("learn_sigma", [True, False])
def test_samplers_recover_a_point_mass(sampler, steps, learn_sigma):
    config = DiffusionConfig()
    diffusion = GaussianDiffusion(config, learn_sigma)
    sampling = SamplingConfig(sampler=sampler, num_steps=steps, cfg_scale=1.0)
    scheduler = make_sampler(sampling, config.resolved(), learn_sigma, clip=False)
    out = sample_class_conditional(
        perfect_denoiser(diffusion, {0: 0.3, 1: -0.6}, learn_sigma),
        torch.tensor([0, 1, 0]),
        (1, 4, 4),
        scheduler,
        null_label=2,
        cfg_scale=1.0,
        generator=torch.Generator().manual_seed(0),
    )
    expected = torch.tensor([0.3, -0.6, 0.3]).view(3, 1, 1, 1).expand_as(out)
    torch.testing.assert_close(out, expected, atol=2e-3, rtol=0)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_classifier_free_guidance_extrapolates_from_unconditional_to_conditional(sampler):
    # epsilon is affine in the target, so guided epsilon is exactly the epsilon of c0 + s (c1 - c0).
    config = DiffusionConfig()
    diffusion = GaussianDiffusion(config, learn_sigma=True)
    targets = {0: 0.3, 1: -0.2, 9: 0.1}  # label 9 is the null label: the unconditional target
    scheduler = make_sampler(SamplingConfig(sampler=sampler, num_steps=40), config.resolved(), True, clip=False)
    scale = 2.5
    out = sample_class_conditional(
        perfect_denoiser(diffusion, targets, learn_sigma=True),
        torch.tensor([0, 1]),
        (1, 2, 2),
        scheduler,
        null_label=9,
        cfg_scale=scale,
        generator=torch.Generator().manual_seed(0),
    )
    expected = [0.1 + scale * (targets[label] - 0.1) for label in (0, 1)]
    torch.testing.assert_close(out[:, 0, 0, 0], torch.tensor(expected), atol=3e-3, rtol=0)


def test_schedulers_use_the_training_schedule():
    config = DiffusionConfig(beta_schedule="cosine", num_train_timesteps=500)
    diffusion = GaussianDiffusion(config, learn_sigma=True)
    for sampler in ("ddpm", "ddim"):
        sampler_obj = make_sampler(SamplingConfig(sampler=sampler, num_steps=10), config.resolved(), True, clip=True)
        torch.testing.assert_close(sampler_obj.scheduler.alphas_cumprod, diffusion.alpha_bar.float())


def test_too_many_sampling_steps_is_a_clear_error():
    with pytest.raises(ValueError, match="sampling.num_steps=2000 exceeds"):
        make_sampler(SamplingConfig(num_steps=2000), DiffusionConfig().resolved(), True, clip=True)
