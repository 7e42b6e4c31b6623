"""Denoising loops: one generic loop over a `Sampler`, for class-conditional and text-conditional models.

Samplers:
- ddpm / ddim: diffusers' DDPMScheduler (learned variance) and DDIMScheduler, built on the exact
  beta schedule the model was trained with, for epsilon- or v-prediction;
- cogvideox_ddim / cogvideox_dpm: diffusers' CogVideoX schedulers (v-prediction, SNR shift, zero
  terminal SNR, trailing timesteps), as the CogVideoX pipelines use them;
- euler: Euler integration of a rectified flow (Open-Sora), with the resolution/length shift.

Classifier-free guidance runs the conditional and unconditional halves as one batch and mixes the
predictions; a learned variance is taken from the conditional half.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler, DDIMScheduler, DDPMScheduler

from videosys.diffusion.flow import RectifiedFlow
from videosys.diffusion.gaussian import DiffusionConfig, make_betas
from videosys.errors import ConfigError

SAMPLERS = ("auto", "ddpm", "ddim", "cogvideox_ddim", "cogvideox_dpm", "euler")


@dataclass
class SamplingConfig:
    sampler: str = "auto"  # auto (the model's own) | ddpm | ddim | cogvideox_ddim | cogvideox_dpm | euler
    num_steps: int = 250
    cfg_scale: float = 4.0  # 1.0 turns guidance off
    ddim_eta: float = 0.0
    # Clip the predicted clean sample to [-1, 1]; None: on for pixel-space data, off for latents.
    clip_denoised: bool | None = None
    seed: int = 0
    classes: list[int] | None = None  # class-conditional models: None samples every class
    num_per_class: int = 8
    # Text-conditional models: prompts from here or from a text file (one per line); None for both
    # takes the dataset's own prompts (moving_digits: every digit x direction).
    prompts: list[str] | None = None
    prompts_file: str | None = None
    num_per_prompt: int = 1
    # Video size (pixels) to generate when neither a checkpoint, the weights nor the data give one.
    num_frames: int = 16
    height: int = 64
    width: int = 64
    batch_size: int = 256  # samples per denoising batch (before CFG doubles it)

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"sampling.sampler={self.sampler!r} is not known; use one of {SAMPLERS}")
        if self.num_steps < 1:
            raise ConfigError(f"sampling.num_steps={self.num_steps} must be at least 1")


class Sampler:
    """A step rule: `timesteps[i]` is passed to the model, `step` moves the sample one step."""

    timesteps: list[float]
    wants_variance: bool = False  # pass the learned-variance channels to `step`

    def step(self, model_output: torch.Tensor, i: int, x: torch.Tensor, generator) -> torch.Tensor:
        raise NotImplementedError


class DiffusersSampler(Sampler):
    def __init__(self, scheduler, num_steps: int, eta: float, wants_variance: bool):
        scheduler.set_timesteps(num_steps)
        self.scheduler = scheduler
        self.timesteps = [int(t) for t in scheduler.timesteps]
        self.wants_variance = wants_variance
        self.eta = eta
        self._previous_x0 = None  # CogVideoX's DPM solver is multistep

    def step(self, model_output, i, x, generator):
        t = self.timesteps[i]
        if isinstance(self.scheduler, CogVideoXDPMScheduler):
            back = self.timesteps[i - 1] if i > 0 else None
            x, self._previous_x0 = self.scheduler.step(
                model_output, self._previous_x0, t, back, x, generator=generator, return_dict=False
            )
            return x
        kwargs = {"eta": self.eta} if isinstance(self.scheduler, (DDIMScheduler, CogVideoXDDIMScheduler)) else {}
        return self.scheduler.step(model_output, t, x, generator=generator, **kwargs).prev_sample


class EulerFlowSampler(Sampler):
    """x <- x + v * (s_i - s_{i+1}), from s = 1 (noise) to 0; the model sees t = s * T."""

    def __init__(self, levels: list[float], num_train_timesteps: int):
        self.levels = levels
        self.timesteps = [s * num_train_timesteps for s in levels]

    def step(self, model_output, i, x, generator):
        following = self.levels[i + 1] if i + 1 < len(self.levels) else 0.0
        return x + model_output * (self.levels[i] - following)


def resolve_sampler_name(sampling: SamplingConfig, diffusion: DiffusionConfig, model_default: str | None) -> str:
    if sampling.sampler != "auto":
        return sampling.sampler
    if model_default:
        return model_default
    return {"eps": "ddpm", "v": "ddim", "flow": "euler"}[diffusion.objective]


def make_sampler(
    sampling: SamplingConfig,
    diffusion: DiffusionConfig,
    learn_sigma: bool,
    clip: bool,
    model_default: str | None = None,
    pixels: float = 512 * 512,
    frames: int = 1,
) -> Sampler:
    """The configured sampler for a model trained with `diffusion` (a resolved DiffusionConfig).

    `pixels` (height x width) and `frames` (latent frames) set the rectified-flow timestep shift."""
    name = resolve_sampler_name(sampling, diffusion, model_default)
    if sampling.num_steps > diffusion.num_train_timesteps:
        raise ConfigError(
            f"sampling.num_steps={sampling.num_steps} exceeds diffusion.num_train_timesteps="
            f"{diffusion.num_train_timesteps}; use at most that many steps"
        )
    if name == "euler":
        if diffusion.objective != "flow":
            raise ConfigError(
                f"sampling.sampler=euler needs a rectified-flow model, not diffusion.objective={diffusion.objective}"
            )
        flow = RectifiedFlow(
            diffusion.num_train_timesteps,
            diffusion.flow_t_sampling,
            diffusion.flow_timestep_shift,
            diffusion.flow_shift_scale,
            diffusion.flow_base_pixels,
        )
        return EulerFlowSampler(flow.sampling_timesteps(sampling.num_steps, pixels, frames), flow.num_timesteps)
    if diffusion.objective == "flow":
        raise ConfigError(f"sampling.sampler={name} cannot sample a rectified-flow model; use sampler=euler")
    prediction = "v_prediction" if diffusion.objective == "v" else "epsilon"
    if name.startswith("cogvideox"):
        if diffusion.beta_schedule != "scaled_linear":
            raise ConfigError(f"sampling.sampler={name} needs diffusion.beta_schedule=scaled_linear")
        cls = CogVideoXDDIMScheduler if name == "cogvideox_ddim" else CogVideoXDPMScheduler
        scheduler = cls(
            num_train_timesteps=diffusion.num_train_timesteps,
            beta_start=diffusion.beta_start,
            beta_end=diffusion.beta_end,
            beta_schedule="scaled_linear",
            snr_shift_scale=diffusion.snr_shift_scale,
            rescale_betas_zero_snr=diffusion.zero_terminal_snr,
            prediction_type=prediction,
            timestep_spacing="trailing",
            set_alpha_to_one=True,
            clip_sample=False,
        )
        return DiffusersSampler(scheduler, sampling.num_steps, sampling.ddim_eta, wants_variance=False)
    common = dict(
        num_train_timesteps=diffusion.num_train_timesteps,
        trained_betas=make_betas(diffusion).float().numpy(),
        clip_sample=clip,
        clip_sample_range=1.0,
        prediction_type=prediction,
        # Zero terminal SNR makes the first step pure noise; start sampling there.
        timestep_spacing="trailing" if diffusion.zero_terminal_snr else "leading",
    )
    if name == "ddpm":
        variance = "learned_range" if learn_sigma else "fixed_small"
        return DiffusersSampler(DDPMScheduler(variance_type=variance, **common), sampling.num_steps, 0.0, learn_sigma)
    if name == "ddim":
        scheduler = DDIMScheduler(set_alpha_to_one=True, **common)
        return DiffusersSampler(scheduler, sampling.num_steps, sampling.ddim_eta, wants_variance=False)
    raise ConfigError(f"sampling.sampler={name!r} is not known; use one of {SAMPLERS}")


def guided(out: torch.Tensor, channels: int, cfg_scale: float, keep_variance: bool) -> torch.Tensor:
    """Mix the [conditional; unconditional] halves of a CFG batch: u + s (c - u) on the prediction
    channels; learned-variance channels (kept only if `keep_variance`) come from the conditional half."""
    cond, uncond = out.chunk(2)
    mixed = uncond[:, :channels] + cfg_scale * (cond[:, :channels] - uncond[:, :channels])
    if keep_variance:
        return torch.cat([mixed, cond[:, channels:]], dim=1)
    return mixed


PredictFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def denoise_loop(
    predict: PredictFn,
    x: torch.Tensor,
    sampler: Sampler,
    generator: torch.Generator,
    cache=None,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Run `sampler` from `x` (noise). `predict(x, t)` returns the (guided) model output for the
    batch at model timestep t (a (B,) tensor); `cache` is the per-run step-reuse policy
    (videosys.cache; None computes every step), told the schedule and each step."""
    channels = x.shape[1]
    if cache is not None:
        cache.begin(sampler.timesteps)
    for i, t in enumerate(sampler.timesteps):
        if cache is not None:
            cache.at_step(i)
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)
        out = predict(x, t_batch).float()
        if not sampler.wants_variance:
            out = out[:, :channels]
        x = sampler.step(out, i, x, generator)
        if progress is not None:
            progress(i)
    if cache is not None:
        cache.finish()
    return x


DenoiseFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def sample_class_conditional(
    denoise: DenoiseFn,
    labels: torch.Tensor,
    shape: tuple[int, ...],
    sampler: Sampler,
    *,
    null_label: int,
    cfg_scale: float,
    generator: torch.Generator,
    cache=None,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Run the reverse process for `labels` from Gaussian noise; returns the final samples.

    `denoise(x, t, y)` is the model (under whatever autocast the caller wants)."""
    x = torch.randn((labels.shape[0], *shape), generator=generator, device=labels.device)
    channels = shape[0]
    if cfg_scale == 1.0:

        def predict(x_t, t):
            return denoise(x_t, t, labels)

    else:
        both = torch.cat([labels, torch.full_like(labels, null_label)])

        def predict(x_t, t):
            out = denoise(torch.cat([x_t, x_t]), torch.cat([t, t]), both).float()
            return guided(out, channels, cfg_scale, sampler.wants_variance)

    return denoise_loop(predict, x, sampler, generator, cache, progress)
