"""Rectified flow as trained and sampled by Open-Sora 1.2.

A clean latent x0 and noise n are joined on a straight line: x_t = (1 - s) x0 + s n with
s = t / T in [0, 1] (t = T is pure noise). The model predicts the velocity v = x0 - n, and the
sampler integrates dx = v ds with Euler steps from s = 1 down to 0.

Training draws s from a logit-normal (sigmoid of a standard normal: most samples near the middle)
or a uniform distribution. Larger videos keep more signal at a given noise level, so both training
and sampling shift s towards the noise end by ratio = sqrt(pixels / base_pixels) * sqrt(frames)
(latent frames) * scale:  s' = ratio * s / (1 + (ratio - 1) * s).
"""

from __future__ import annotations

import math

import torch

from videosys.diffusion.draws import SampleDraws, check_draws
from videosys.errors import ConfigError


def shift_timesteps(s: torch.Tensor, pixels: float, frames: int, base_pixels: float, scale: float) -> torch.Tensor:
    """Resolution- and length-dependent shift of noise levels s in [0, 1] (Open-Sora 1.2)."""
    ratio = math.sqrt(pixels / base_pixels) * math.sqrt(max(frames, 1)) * scale
    return ratio * s / (1 + (ratio - 1) * s)


class RectifiedFlow:
    """Training loss of rectified flow; timesteps are passed to the model on the 0..T scale."""

    def __init__(
        self,
        num_timesteps: int = 1000,
        t_sampling: str = "logit-normal",
        timestep_shift: bool = True,
        shift_scale: float = 1.0,
        base_pixels: float = 512 * 512,
    ):
        if t_sampling not in ("logit-normal", "uniform"):
            raise ConfigError(f"diffusion.flow_t_sampling={t_sampling!r} is not known; use logit-normal or uniform")
        self.num_timesteps = num_timesteps
        self.t_sampling = t_sampling
        self.timestep_shift = timestep_shift
        self.shift_scale = shift_scale
        self.base_pixels = base_pixels

    def sample_noise_levels(
        self, batch: int, device: torch.device, pixels: float, frames: int, draws: SampleDraws | None = None
    ) -> torch.Tensor:
        if self.t_sampling == "logit-normal":
            s = torch.sigmoid(torch.randn(batch, device=device) if draws is None else draws.normal())
        else:
            s = torch.rand(batch, device=device) if draws is None else draws.uniform()
        if self.timestep_shift:
            s = shift_timesteps(s, pixels, frames, self.base_pixels, self.shift_scale)
        return s

    def training_loss(
        self, model, x0: torch.Tensor, *, pixels: float, draws: SampleDraws | None = None, **model_kwargs
    ) -> torch.Tensor:
        """Per-sample velocity MSE. `pixels` is the clip's height x width in pixels (for the shift).
        Noise levels and noise come from `draws` (one generator per sample) or else the global RNG."""
        check_draws(draws, x0.shape[0])
        frames = x0.shape[2] if x0.ndim == 5 else 1
        s = self.sample_noise_levels(x0.shape[0], x0.device, pixels, frames, draws)
        noise = torch.randn_like(x0) if draws is None else draws.normal(x0.shape[1:], x0.dtype)
        s_b = s.view(-1, *([1] * (x0.ndim - 1)))
        x_t = (1 - s_b) * x0 + s_b * noise
        out = model(x_t, s * self.num_timesteps, **model_kwargs).float()
        velocity = out[:, : x0.shape[1]]  # a pred_sigma model's second half is unused
        return ((velocity - (x0.float() - noise.float())) ** 2).flatten(1).mean(dim=1)

    def sampling_timesteps(self, num_steps: int, pixels: float, frames: int, shift: bool | None = None) -> list[float]:
        """Noise levels s_0 = 1 > s_1 > ... > s_{n-1} (then 0), shifted as in training."""
        levels = torch.tensor([1.0 - i / num_steps for i in range(num_steps)], dtype=torch.float64)
        if self.timestep_shift if shift is None else shift:
            levels = shift_timesteps(levels, pixels, frames, self.base_pixels, self.shift_scale)
        return levels.tolist()
