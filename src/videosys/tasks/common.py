"""Pieces every task shares: the run context, model preparation, EMA weights, class-conditional
sample generation and writing its outputs."""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from videosys.data import DataSpec
from videosys.diffusion import DiffusionConfig, SamplingConfig, make_sampler, sample_class_conditional
from videosys.distributed import DistContext, ParallelConfig
from videosys.encoders import LatentCodec, VAEConfig, latent_geometry
from videosys.errors import ConfigError
from videosys.models import build_model, model_entry
from videosys.ops import KernelsConfig
from videosys.parallelize import parallelize
from videosys.precision import PrecisionConfig, autocast
from videosys.tasks.media import save_image_grid
from videosys.tasks.tracking import Tracker

log = logging.getLogger(__name__)


@dataclass
class RunContext:
    dist: DistContext
    run_dir: Path
    seed: int
    tracker: Tracker

    @property
    def device(self) -> torch.device:
        return self.dist.device


def resolve_model_config(model_cfg, spec: DataSpec | None, vae: VAEConfig):
    """Fill the model's input geometry from the data (through the VAE for pixel data) and resolve it."""
    if spec is not None:
        channels, size = spec.channels, spec.image_size
        if spec.space == "pixel" and vae.path:
            geometry = latent_geometry(vae)
            if spec.image_size % geometry.downsample:
                raise ConfigError(
                    f"image size {spec.image_size} is not divisible by the VAE's downsampling factor "
                    f"{geometry.downsample}; choose data.image_size as a multiple of it"
                )
            channels, size = geometry.channels, spec.image_size // geometry.downsample
        filled = {"input_size": size, "in_channels": channels, "num_classes": spec.num_classes}
        model_cfg = dataclasses.replace(model_cfg, **{k: v for k, v in filled.items() if getattr(model_cfg, k) is None})
    return model_cfg.resolved()


def make_codec(vae: VAEConfig, device: torch.device) -> LatentCodec | None:
    return LatentCodec(vae, device) if vae.path else None


def prepare_model(
    model_cfg,
    ctx: RunContext,
    parallel: ParallelConfig,
    kernels: KernelsConfig,
    precision: PrecisionConfig,
    activation_checkpointing: bool = False,
) -> nn.Module:
    """Build on the meta device, apply the execution plan, then materialise and initialise.

    Building on meta first means no full-size copy of the weights is ever allocated before the
    strategies (and later sharding) are in place.
    """
    with torch.device("meta"):
        model = build_model(model_cfg)
    plan = parallelize(model, ctx.dist, parallel, kernels, precision, activation_checkpointing)
    model.to_empty(device=ctx.device)
    model.init_weights()
    params = sum(p.numel() for p in model.parameters())
    log.info(
        "model %s/%s: %.2fM parameters, attention=%s, checkpointed blocks=%d, device=%s",
        model_cfg.name,
        model_cfg.flavor,
        params / 1e6,
        plan.attention_backend,
        plan.checkpointed_blocks,
        ctx.device,
    )
    return model


def load_external_weights(model: nn.Module, model_cfg) -> None:
    if model_cfg.weights:
        model_entry(model_cfg.name).load_weights(model, model_cfg.weights)
        log.info("loaded weights from %s", model_cfg.weights)


class EMA:
    """Exponential moving average of the parameters, kept in fp32 in its own model copy.

    With `warmup`, the decay ramps as (1 + n) / (10 + n) towards `decay`, so short runs are not
    dominated by the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"task.ema_decay={decay} must be in [0, 1)")
        self.model = copy.deepcopy(model).float().requires_grad_(False).eval()
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self._ema_params = list(self.model.parameters())

    def current_decay(self) -> float:
        if self.warmup:
            return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        return self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        weight = 1.0 - self.current_decay()
        torch._foreach_lerp_(self._ema_params, [p.detach().float() for p in model.parameters()], weight)
        self.num_updates += 1

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "num_updates": self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.num_updates = state["num_updates"]


def denoiser(model: nn.Module, precision: PrecisionConfig, device: torch.device):
    def run(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with autocast(precision, device):
            return model(x, t, y)

    return run


@torch.no_grad()
def generate_class_samples(
    model: nn.Module,
    sampling: SamplingConfig,
    diffusion: DiffusionConfig,
    precision: PrecisionConfig,
    device: torch.device,
    codec: LatentCodec | None,
    cache=None,
) -> dict[str, torch.Tensor]:
    """Sample `num_per_class` images of each requested class; returns images in [-1, 1] (decoded
    through the VAE when there is one), their labels, and the raw model-space samples."""
    num_classes = model.config.num_classes
    classes = list(range(num_classes)) if sampling.classes is None else list(sampling.classes)
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ConfigError(f"sampling.classes has {bad}, outside 0..{num_classes - 1} of this model")
    if sampling.num_per_class < 1:
        raise ConfigError(f"sampling.num_per_class={sampling.num_per_class} must be at least 1")
    labels = torch.tensor(classes, device=device).repeat_interleave(sampling.num_per_class)
    clip = sampling.clip_denoised if sampling.clip_denoised is not None else codec is None
    generator = torch.Generator(device).manual_seed(sampling.seed)
    shape = (model.in_channels, model.input_size, model.input_size)
    model.eval()
    run = denoiser(model, precision, device)
    chunks = []
    for chunk in labels.split(sampling.batch_size):
        sampler = make_sampler(sampling, diffusion, model.learn_sigma, clip)
        chunks.append(
            sample_class_conditional(
                run,
                chunk,
                shape,
                sampler,
                null_label=model.null_label,
                cfg_scale=sampling.cfg_scale,
                generator=generator,
                cache=cache,
            )
        )
    latents = torch.cat(chunks)
    images = codec.decode(latents) if codec is not None else latents.clamp(-1, 1)
    return {"images": images.cpu(), "labels": labels.cpu(), "latents": latents.cpu()}


def write_samples(samples: dict[str, torch.Tensor], sampling: SamplingConfig, run_dir: Path) -> tuple[Path, Path]:
    """samples.png (one row per class) and samples.pt (raw tensors for value-by-value comparison)."""
    rows = len(torch.unique(samples["labels"]))
    grid_path, tensor_path = run_dir / "samples.png", run_dir / "samples.pt"
    save_image_grid(samples["images"], rows, grid_path)
    torch.save({**samples, "sampling": dataclasses.asdict(sampling)}, tensor_path)
    return grid_path, tensor_path


def sample_and_score(
    model, dataset, sampling, diffusion_cfg, precision, ctx: RunContext, codec, cache, step: int
) -> dict:
    """Guided samples of every requested class, written out, and scored when the dataset can."""
    started = time.perf_counter()
    samples = generate_class_samples(model, sampling, diffusion_cfg, precision, ctx.device, codec, cache)
    grid, tensors = write_samples(samples, sampling, ctx.run_dir)
    ctx.tracker.log_image("samples", grid, step=step)
    out = {
        "samples_png": str(grid),
        "samples_pt": str(tensors),
        "sample_seconds": round(time.perf_counter() - started, 2),
    }
    evaluator = getattr(dataset, "evaluator", None)
    if evaluator is not None:
        out["class_accuracy"] = evaluator.accuracy(samples["images"], samples["labels"])
        out["classifier_accuracy_on_real"] = evaluator.real_accuracy
        log.info("class accuracy of generated samples: %.3f", out["class_accuracy"])
    return out
