"""Denoising loops for class-conditional models: DDPM (learned variance) and DDIM, with CFG.

The step rules come from diffusers' DDPMScheduler and DDIMScheduler, built on the exact beta
schedule the model was trained with. Classifier-free guidance runs the conditional and the
unconditional (null label) halves as one batch and mixes their epsilon predictions; the learned
variance is taken from the conditional half.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, DDPMScheduler

from videosys.diffusion.gaussian import DiffusionConfig, make_betas
from videosys.errors import ConfigError


@dataclass
class SamplingConfig:
    sampler: str = "ddpm"  # ddpm | ddim
    num_steps: int = 250
    cfg_scale: float = 4.0  # 1.0 turns guidance off
    ddim_eta: float = 0.0
    # Clip the predicted clean sample to [-1, 1]; None: on for pixel-space data, off for latents.
    clip_denoised: bool | None = None
    seed: int = 0
    classes: list[int] | None = None  # None: every class
    num_per_class: int = 8
    batch_size: int = 256  # samples per denoising batch (before CFG doubles it)

    def __post_init__(self) -> None:
        if self.sampler not in ("ddpm", "ddim"):
            raise ConfigError(f"sampling.sampler={self.sampler!r} is not known; use ddpm or ddim")
        if self.num_steps < 1:
            raise ConfigError(f"sampling.num_steps={self.num_steps} must be at least 1")


def make_scheduler(cfg: SamplingConfig, diffusion: DiffusionConfig, learn_sigma: bool, clip: bool):
    common = dict(
        num_train_timesteps=diffusion.num_train_timesteps,
        trained_betas=make_betas(diffusion).float().numpy(),
        clip_sample=clip,
        clip_sample_range=1.0,
        prediction_type="epsilon",
    )
    if cfg.sampler == "ddpm":
        variance = "learned_range" if learn_sigma else "fixed_small"
        scheduler = DDPMScheduler(variance_type=variance, **common)
    else:
        scheduler = DDIMScheduler(set_alpha_to_one=True, **common)
    if cfg.num_steps > diffusion.num_train_timesteps:
        raise ConfigError(
            f"sampling.num_steps={cfg.num_steps} exceeds diffusion.num_train_timesteps="
            f"{diffusion.num_train_timesteps}; use at most that many steps"
        )
    scheduler.set_timesteps(cfg.num_steps)
    return scheduler


DenoiseFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def sample_class_conditional(
    denoise: DenoiseFn,
    labels: torch.Tensor,
    shape: tuple[int, ...],
    scheduler,
    *,
    null_label: int,
    cfg_scale: float,
    learn_sigma: bool,
    generator: torch.Generator,
    eta: float = 0.0,
    cache=None,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Run the reverse process for `labels` from Gaussian noise; returns the final samples.

    `denoise(x, t, y)` is the model (under whatever autocast the caller wants); `cache` is the
    per-run step-reuse policy (None computes every step).
    """
    del cache  # no reuse policy exists yet; the loop computes every step
    device = labels.device
    channels = shape[0]
    x = torch.randn((labels.shape[0], *shape), generator=generator, device=device)
    guided = cfg_scale != 1.0
    if guided:
        labels = torch.cat([labels, torch.full_like(labels, null_label)])
    step_kwargs = {"eta": eta} if isinstance(scheduler, DDIMScheduler) else {}
    for i, t in enumerate(scheduler.timesteps):
        model_in = torch.cat([x, x]) if guided else x
        t_batch = torch.full((model_in.shape[0],), int(t), device=device, dtype=torch.long)
        out = denoise(model_in, t_batch, labels).float()
        eps, rest = out[:, :channels], out[:, channels:]
        if guided:
            eps_cond, eps_uncond = eps.chunk(2)
            eps = eps_uncond + cfg_scale * (eps_cond - eps_uncond)
            rest = rest.chunk(2)[0]
        model_output = torch.cat([eps, rest], dim=1) if (learn_sigma and isinstance(scheduler, DDPMScheduler)) else eps
        x = scheduler.step(model_output, t, x, generator=generator, **step_kwargs).prev_sample
        if progress is not None:
            progress(i)
    return x
