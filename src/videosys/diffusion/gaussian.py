"""Gaussian diffusion training objective of DDPM / improved DDPM, as used by DiT.

The network predicts the noise epsilon and, with a learned variance, an interpolation v in [-1, 1]
between the posterior variance (beta-tilde) and beta in log space (Nichol & Dhariwal 2021). The
loss is the epsilon MSE plus the variational bound term for the variance only: the mean is
detached inside the bound so that it is trained by the MSE alone.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from videosys.diffusion.draws import SampleDraws, check_draws
from videosys.errors import ConfigError

OBJECTIVES = ("eps", "v", "flow")

# What a field left at None means, unless the model states its own default (`diffusion_defaults`).
_BASE_DEFAULTS = dict(
    objective="eps",
    beta_schedule="linear",
    beta_start=1e-4,
    beta_end=0.02,
    zero_terminal_snr=False,
    snr_shift_scale=1.0,
    flow_t_sampling="logit-normal",
    flow_timestep_shift=True,
)


@dataclass
class DiffusionConfig:
    """The training objective. Fields left at None take the model's published choice (each model
    class states them in `diffusion_defaults`), then the DDPM defaults."""

    # eps: DDPM / improved DDPM (epsilon, plus the VLB when the model learns the variance);
    # v: v-prediction (CogVideoX, Open-Sora-Plan); flow: rectified flow (Open-Sora).
    objective: str | None = None
    num_train_timesteps: int = 1000
    beta_schedule: str | None = None  # linear | scaled_linear | cosine
    beta_start: float | None = None  # schedule ends for 1000 steps (linear ones are scaled for other lengths)
    beta_end: float | None = None
    zero_terminal_snr: bool | None = None  # rescale so the last step is pure noise (Lin et al. 2024)
    snr_shift_scale: float | None = None  # divide the SNR by this (CogVideoX-2B uses 3.0)
    # Rectified flow: how training draws noise levels, and the resolution/length-dependent shift.
    flow_t_sampling: str | None = None  # logit-normal | uniform
    flow_timestep_shift: bool | None = None
    flow_shift_scale: float = 1.0
    flow_base_pixels: int = 512 * 512  # height x width (pixels) at which the shift is 1 for one frame

    def resolved(self, model_defaults: dict | None = None) -> DiffusionConfig:
        cfg = dataclasses.replace(self)
        for key, value in {**_BASE_DEFAULTS, **(model_defaults or {})}.items():
            if getattr(cfg, key) is None:
                setattr(cfg, key, value)
        if cfg.objective not in OBJECTIVES:
            raise ConfigError(f"diffusion.objective={cfg.objective!r} is not known; use one of {OBJECTIVES}")
        if cfg.snr_shift_scale <= 0:
            raise ConfigError(f"diffusion.snr_shift_scale={cfg.snr_shift_scale} must be positive")
        return cfg


def make_betas(cfg: DiffusionConfig) -> torch.Tensor:
    """Noise schedule in float64, with the SNR shift and zero-terminal-SNR rescaling applied."""
    cfg = cfg.resolved() if cfg.beta_schedule is None or cfg.beta_start is None else cfg
    steps = cfg.num_train_timesteps
    if steps < 2:
        raise ConfigError(f"diffusion.num_train_timesteps={steps} must be at least 2")
    if cfg.beta_schedule == "linear":
        scale = 1000 / steps
        betas = torch.linspace(scale * cfg.beta_start, scale * cfg.beta_end, steps, dtype=torch.float64)
    elif cfg.beta_schedule == "scaled_linear":
        betas = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, steps, dtype=torch.float64) ** 2
    elif cfg.beta_schedule == "cosine":
        s = 0.008
        t = torch.linspace(0, steps, steps + 1, dtype=torch.float64) / steps
        alpha_bar = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
        betas = (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    else:
        raise ConfigError(
            f"diffusion.beta_schedule={cfg.beta_schedule!r} is not known; use linear, scaled_linear or cosine"
        )
    shift, zero_snr = cfg.snr_shift_scale or 1.0, bool(cfg.zero_terminal_snr)
    if shift == 1.0 and not zero_snr:
        return betas
    alpha_bar = torch.cumprod(1.0 - betas, dim=0)
    alpha_bar = alpha_bar / (shift + (1 - shift) * alpha_bar)  # SNR / shift
    if zero_snr:
        root = alpha_bar.sqrt()
        first, last = root[0].clone(), root[-1].clone()
        alpha_bar = ((root - last) * first / (first - last)) ** 2
    previous = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
    return 1.0 - alpha_bar / previous


def _gather(table: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """table[t], shaped to broadcast over a (B, ...) tensor of rank ndim."""
    return table[t].reshape(-1, *([1] * (ndim - 1)))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    # tanh approximation of the Gaussian CDF (accurate to ~1e-3, as in the DDPM reference).
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Log-likelihood of data in [-1, 1] quantised to 256 bins under N(mean, exp(log_scale)^2)."""
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = _standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_probs = torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log((cdf_plus - cdf_min).clamp(min=1e-12))),
    )
    return log_probs


def _mean_per_sample(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(dim=1)


class GaussianDiffusion:
    """Holds the schedule tables and computes the DiT training loss.

    The tables are computed in float64 and kept as float32 on `device`, so that a training step
    indexes them without a host-to-device copy (which would synchronise the GPU).
    """

    def __init__(self, cfg: DiffusionConfig, learn_sigma: bool, device: torch.device | str = "cpu"):
        cfg = cfg.resolved() if cfg.objective is None else cfg
        if cfg.objective not in ("eps", "v"):
            raise ConfigError(f"GaussianDiffusion trains eps or v objectives, not {cfg.objective!r}")
        if cfg.objective == "v" and learn_sigma:
            raise ConfigError("diffusion.objective=v cannot train a learned variance; use a model without learn_sigma")
        self.prediction = cfg.objective
        self.num_timesteps = cfg.num_train_timesteps
        self.learn_sigma = learn_sigma
        # float64 schedule, kept for reference and for building samplers.
        self.betas = betas = make_betas(cfg)
        self.alpha_bar = alpha_bar = torch.cumprod(1.0 - betas, dim=0)
        alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
        posterior_variance = betas * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)

        def table(values: torch.Tensor) -> torch.Tensor:
            return values.to(device=device, dtype=torch.float32)

        self.sqrt_alpha_bar = table(alpha_bar.sqrt())
        self.sqrt_one_minus_alpha_bar = table((1.0 - alpha_bar).sqrt())
        self.sqrt_recip_alpha_bar = table((1.0 / alpha_bar).sqrt())
        self.sqrt_recipm1_alpha_bar = table((1.0 / alpha_bar - 1.0).sqrt())
        # The posterior variance is 0 at t=0; reuse t=1's value so its log stays finite.
        self.posterior_log_variance = table(torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]])))
        self.posterior_mean_coef1 = table(betas * alpha_bar_prev.sqrt() / (1.0 - alpha_bar))
        self.posterior_mean_coef2 = table((1.0 - alpha_bar_prev) * (1.0 - betas).sqrt() / (1.0 - alpha_bar))
        self.log_betas = table(torch.log(betas))

    def sample_timesteps(self, batch: int, device: torch.device, draws: SampleDraws | None = None) -> torch.Tensor:
        if draws is not None:
            return draws.integers(self.num_timesteps)
        return torch.randint(0, self.num_timesteps, (batch,), device=device)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Noise clean data x0 to step t."""
        n = x0.ndim
        return _gather(self.sqrt_alpha_bar, t, n) * x0 + _gather(self.sqrt_one_minus_alpha_bar, t, n) * noise

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean and log-variance of q(x_{t-1} | x_t, x0)."""
        n = x0.ndim
        mean = _gather(self.posterior_mean_coef1, t, n) * x0 + _gather(self.posterior_mean_coef2, t, n) * x_t
        return mean, _gather(self.posterior_log_variance, t, n)

    def p_mean_logvar(self, eps: torch.Tensor, var_interp: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean and log-variance of the model's p(x_{t-1} | x_t) from epsilon and the variance output."""
        n = x_t.ndim
        frac = (var_interp + 1.0) / 2.0
        log_var = frac * _gather(self.log_betas, t, n) + (1.0 - frac) * _gather(self.posterior_log_variance, t, n)
        x0_pred = _gather(self.sqrt_recip_alpha_bar, t, n) * x_t - _gather(self.sqrt_recipm1_alpha_bar, t, n) * eps
        mean, _ = self.q_posterior(x0_pred, x_t, t)
        return mean, log_var

    def vb_bits_per_dim(self, eps, var_interp, x0, x_t, t) -> torch.Tensor:
        """Variational-bound term per sample in bits per dimension (decoder NLL at t=0)."""
        true_mean, true_log_var = self.q_posterior(x0, x_t, t)
        mean, log_var = self.p_mean_logvar(eps, var_interp, x_t, t)
        kl = _mean_per_sample(normal_kl(true_mean, true_log_var, mean, log_var)) / math.log(2.0)
        nll = -_mean_per_sample(discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var)) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_loss(self, model, x0: torch.Tensor, draws: SampleDraws | None = None, **model_kwargs) -> torch.Tensor:
        """Per-sample loss for a batch of clean data: epsilon MSE (+ VLB for learned variance), or the
        v-prediction MSE (v = sqrt(a) noise - sqrt(1 - a) x0; equal to the x0 error weighted by 1 / (1 - a)).
        Timesteps and noise come from `draws` (one generator per sample) or else the global RNG."""
        check_draws(draws, x0.shape[0])
        t = self.sample_timesteps(x0.shape[0], x0.device, draws)
        noise = torch.randn_like(x0) if draws is None else draws.normal(x0.shape[1:], x0.dtype)
        x_t = self.q_sample(x0, t, noise)
        out = model(x_t, t, **model_kwargs).float()
        channels = x0.shape[1]
        if self.prediction == "v":
            n = x0.ndim
            target = (
                _gather(self.sqrt_alpha_bar, t, n) * noise.float()
                - _gather(self.sqrt_one_minus_alpha_bar, t, n) * x0.float()
            )
            return _mean_per_sample((out[:, :channels] - target) ** 2)
        if self.learn_sigma:
            if out.shape[1] != 2 * channels:
                raise ValueError(f"learned variance needs {2 * channels} output channels, model gave {out.shape[1]}")
            eps, var_interp = out[:, :channels], out[:, channels:]
            vb = self.vb_bits_per_dim(eps.detach(), var_interp, x0.float(), x_t.float(), t)
        else:
            eps, vb = out, torch.zeros(x0.shape[0], device=x0.device)
        return _mean_per_sample((noise.float() - eps) ** 2) + vb
