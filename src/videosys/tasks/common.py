"""Pieces every task shares: the run context, model preparation, EMA weights, class-conditional
sample generation and writing its outputs."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from videosys.data import DataSpec
from videosys.diffusion import (
    DiffusionConfig,
    GaussianDiffusion,
    RectifiedFlow,
    SamplingConfig,
    denoise_loop,
    guided,
    make_sampler,
    sample_class_conditional,
    step_graphs,
)
from videosys.distributed import DistContext, ParallelConfig
from videosys.encoders import (
    LatentCodec,
    TextConditioner,
    TextEncoderConfig,
    VAEConfig,
    build_text_conditioner,
    build_video_codec,
    decode_across_ranks,
    latent_geometry,
    video_latent_geometry,
)
from videosys.errors import ConfigError
from videosys.models import build_model, model_entry
from videosys.ops import KernelsConfig
from videosys.parallelize import cfg_parallel, parallelize
from videosys.precision import PrecisionConfig, autocast
from videosys.tasks import checkpoint as ckpt_io
from videosys.tasks.conditioning import ClassConditioning, TextConditioning, model_accepts
from videosys.tasks.media import save_image_grid, save_video_grid
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


def resolve_model_config(model_cfg, spec: DataSpec | None, vae: VAEConfig, text: TextGeometry | None = None):
    """Fill the model's input geometry from the data (through the VAE for pixel data) and, for text
    models, its caption width and length from the text encoder; then resolve it."""
    entry = model_entry(model_cfg.name)
    filled: dict = {}
    if spec is not None and not entry.is_video:
        channels, size = spec.channels, spec.image_size
        if spec.num_frames is not None:
            raise ConfigError(
                f"model={model_cfg.name} is an image model but the data gives {spec.num_frames}-frame videos; "
                "use a video model (model=latte, opensora, opensora_plan or cogvideox)"
            )
        if spec.space == "pixel" and vae.path:
            geometry = latent_geometry(vae)
            if spec.image_size % geometry.downsample:
                raise ConfigError(
                    f"image size {spec.image_size} is not divisible by the VAE's downsampling factor "
                    f"{geometry.downsample}; choose data.image_size as a multiple of it"
                )
            channels, size = geometry.channels, spec.image_size // geometry.downsample
        filled = {"input_size": size, "in_channels": channels, "num_classes": spec.num_classes}
    elif spec is not None:
        if spec.num_frames is None:
            raise ConfigError(
                f"model={model_cfg.name} is a video model but data={type(spec).__name__} gives images; use "
                "data=moving_digits or data=video_folder (or task=sample with sampling.num_frames)"
            )
        frames, height, width = spec.num_frames, spec.image_size, spec.width or spec.image_size
        channels, downsample = spec.channels, 1
        if spec.space == "pixel" and vae.path:
            geometry = video_latent_geometry(vae)
            downsample = geometry.spatial_downsample
            if height % downsample or width % downsample:
                raise ConfigError(
                    f"video size {height}x{width} is not divisible by the VAE's downsampling factor {downsample}; "
                    "choose data.height / data.width as multiples of it"
                )
            channels, frames = geometry.channels, geometry.latent_frames(frames)
            height, width = height // downsample, width // downsample
        filled = {"input_size": [frames, height, width], "in_channels": channels, "vae_downsample": downsample}
    if text is not None:
        filled.update(caption_channels=text.dim, model_max_length=text.length)
    fields = {f.name for f in dataclasses.fields(model_cfg)}
    updates = {k: v for k, v in filled.items() if k in fields and getattr(model_cfg, k) is None}
    return dataclasses.replace(model_cfg, **updates).resolved()


@dataclass(frozen=True)
class TextGeometry:
    dim: int  # embedding width
    length: int  # tokens per prompt


def make_codec(vae: VAEConfig, device: torch.device, video: bool = False):
    """The VAE as an encode/decode pair (a per-frame or video codec for video data); None in pixel space."""
    if not vae.path:
        return None
    return build_video_codec(vae, device) if video else LatentCodec(vae, device)


def prepare_model(
    model_cfg,
    ctx: RunContext,
    parallel: ParallelConfig,
    kernels: KernelsConfig,
    precision: PrecisionConfig,
    activation_checkpointing: bool = False,
    training: bool = True,
) -> nn.Module:
    """Build on the meta device, apply the execution plan, then materialise and initialise.

    Building on meta first means no full-size copy of the weights is ever allocated before the
    strategies (and later sharding) are in place.
    """
    with torch.device("meta"):
        model = build_model(model_cfg)
    plan = parallelize(model, ctx.dist, parallel, kernels, precision, activation_checkpointing, training)
    model.to_empty(device=ctx.device)
    model.init_weights()
    params = sum(p.numel() for p in model.parameters())
    log.info(
        "model %s/%s: %.2fM parameters, attention=%s, fused ops=%s, compiled=%s, checkpointed blocks=%d, device=%s",
        model_cfg.name,
        model_cfg.flavor,
        params / 1e6,
        plan.attention_backend,
        plan.fused_ops,
        plan.compiled,
        plan.checkpointed_blocks,
        ctx.device,
    )
    return model


def load_external_weights(model: nn.Module, model_cfg) -> None:
    """model.weights: a VideoSys checkpoint folder (its EMA weights), or the model's published formats."""
    if not model_cfg.weights:
        return
    path = Path(model_cfg.weights).expanduser()
    if ckpt_io.is_checkpoint(path):
        load_checkpoint_weights(model, path, use_ema=True)
    else:
        model_entry(model_cfg.name).load_weights(model, model_cfg.weights)
    log.info("loaded weights from %s", model_cfg.weights)


def load_checkpoint_weights(model, path, use_ema: bool) -> None:
    """The model weights of a training checkpoint, at any world size: the raw weights (parameters and
    buffers), then the EMA averages over the parameters when `use_ema`."""
    tensors = {"model": model.state_dict()}
    if use_ema:
        tensors["ema"] = {parameter_name(n): p.detach().clone() for n, p in model.named_parameters()}
    ckpt_io.load_tensors(path, tensors)
    model.load_state_dict(tensors["model"])
    if use_ema:
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(tensors["ema"][parameter_name(name)])


def parameter_name(name: str) -> str:
    """A parameter's state-dict name (activation-checkpoint wrappers keep state-dict names unchanged)."""
    return name.replace("_checkpoint_wrapped_module.", "")


class EMA:
    """Exponential moving average of the parameters, in fp32, held exactly as the parameters are held:
    whole in one process, as the same DTensor shards under FSDP2 (so ZeRO shards it too).

    With `warmup`, the decay ramps as (1 + n) / (10 + n) towards `decay`, so short runs are not
    dominated by the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"task.ema_decay={decay} must be in [0, 1)")
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        with torch.no_grad():
            self.shadow = {parameter_name(n): p.detach().float().clone() for n, p in model.named_parameters()}

    def current_decay(self) -> float:
        if self.warmup:
            return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        return self.decay

    @staticmethod
    def _local(tensors):
        # The local shards of DTensors: the update is elementwise, so each rank updates its own.
        return [t.to_local() if isinstance(t, DTensor) else t for t in tensors]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        weight = 1.0 - self.current_decay()
        current = [p.detach().float() for p in self._local(model.parameters())]
        torch._foreach_lerp_(self._local(self.shadow.values()), current, weight)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's parameters with the averages (to sample with the EMA weights)."""
        for name, p in model.named_parameters():
            target, source = self._local([p, self.shadow[parameter_name(name)]])
            target.copy_(source)


def denoiser(model: nn.Module, precision: PrecisionConfig, device: torch.device):
    """The model under the run's autocast. The autocast is entered per call, so a CUDA-graph capture of the
    call makes its own weight casts rather than reading ones cached (and freed) outside the graph."""

    def run(x: torch.Tensor, t: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        with autocast(precision, device):
            return model(x, t, *args, **kwargs)

    return run


@torch.no_grad()
def generate_class_samples(
    model: nn.Module,
    sampling: SamplingConfig,
    diffusion: DiffusionConfig,
    precision: PrecisionConfig,
    dist: DistContext,
    codec: LatentCodec | None,
    cache=None,
    cuda_graphs: bool = False,
) -> dict[str, torch.Tensor]:
    """Sample `num_per_class` images of each requested class; returns images in [-1, 1] (decoded
    through the VAE when there is one), their labels, and the raw model-space samples.

    Every rank runs the same loop on the same noise: the model splits its own work over sequence
    ranks, the conditional and unconditional halves go to the two cfg ranks, and the decode is
    split over all ranks, so every rank ends with the same samples."""
    device = dist.device
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
    chunks = []
    run_model = cfg_parallel(denoiser(model, precision, device), dist)
    with attached(cache, model), step_graphs(run_model, cache, cuda_graphs) as run:
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
    images = decode_across_ranks(codec, latents, dist.comm("world")) if codec is not None else latents.clamp(-1, 1)
    return {"images": images.cpu(), "labels": labels.cpu(), "latents": latents.cpu()}


def attached(cache, model: nn.Module):
    """The step-reuse policy attached to `model`'s blocks for a sampling call (nothing without one)."""
    return contextlib.nullcontext() if cache is None else cache.attached(model)


def write_samples(samples: dict[str, torch.Tensor], sampling: SamplingConfig, run_dir: Path) -> tuple[Path, Path]:
    """samples.png (one row per class) and samples.pt (raw tensors for value-by-value comparison)."""
    rows = len(torch.unique(samples["labels"]))
    grid_path, tensor_path = run_dir / "samples.png", run_dir / "samples.pt"
    save_image_grid(samples["images"], rows, grid_path)
    torch.save({**samples, "sampling": dataclasses.asdict(sampling)}, tensor_path)
    return grid_path, tensor_path


def sample_and_score(
    model,
    dataset,
    sampling,
    diffusion_cfg,
    precision,
    ctx: RunContext,
    codec,
    cache,
    step: int,
    conditioning=None,
    cuda_graphs: bool = False,
) -> dict:
    """Guided samples of every requested class (or prompt), written out, and scored when the dataset can.
    Collective: every rank generates; rank 0 writes, scores and returns the metrics. `cuda_graphs`: replay
    the model calls from CUDA graphs (videosys.diffusion.graphs)."""
    started = time.perf_counter()
    out = _sample_and_score(
        model, dataset, sampling, diffusion_cfg, precision, ctx, codec, cache, step, conditioning, cuda_graphs
    )
    if cache is not None:
        cache.log_report()
        if ctx.dist.is_main:
            out.update(cache.report())
    if ctx.dist.is_main:
        out["sample_seconds"] = round(time.perf_counter() - started, 2)
    return out


def _sample_and_score(
    model, dataset, sampling, diffusion_cfg, precision, ctx: RunContext, codec, cache, step: int, conditioning, graphs
) -> dict:
    evaluator = getattr(dataset, "evaluator", None)
    if isinstance(conditioning, TextConditioning):
        prompts = resolve_prompts(sampling, dataset)
        samples = generate_text_samples(
            model, conditioning, prompts, sampling, diffusion_cfg, precision, ctx, codec, cache, graphs
        )
        if not ctx.dist.is_main:
            return {}
        fps = getattr(dataset, "fps", None) or getattr(getattr(dataset, "cfg", None), "fps", None) or 8
        paths = write_video_samples(samples, sampling, ctx.run_dir, fps)
        out = {f"samples_{suffix}": str(path) for suffix, path in paths.items()}
        if evaluator is not None and hasattr(evaluator, "evaluate"):
            scores = evaluator.evaluate(samples["videos"], samples["prompts"])
            out.update({k: float(v) for k, v in scores.items()})
            for key in ("real_digit_accuracy", "real_direction_accuracy"):
                if hasattr(evaluator, key):
                    out[key] = float(getattr(evaluator, key))
            log.info("scores of generated samples: %s", ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
        return out
    samples = generate_class_samples(model, sampling, diffusion_cfg, precision, ctx.dist, codec, cache, graphs)
    if not ctx.dist.is_main:
        return {}
    grid, tensors = write_samples(samples, sampling, ctx.run_dir)
    ctx.tracker.log_image("samples", grid, step=step)
    out = {"samples_png": str(grid), "samples_pt": str(tensors)}
    if evaluator is not None:
        out["class_accuracy"] = evaluator.accuracy(samples["images"], samples["labels"])
        out["classifier_accuracy_on_real"] = evaluator.real_accuracy
        log.info("class accuracy of generated samples: %.3f", out["class_accuracy"])
    return out


# --- Text-to-video ----------------------------------------------------------------------------------


def make_text_conditioner(cfg: TextEncoderConfig, spec: DataSpec | None, device: torch.device):
    """The text encoder for a text model: T5 / CLIP from a local path, label tokens for text_encoder=none
    on labelled data (e.g. moving_digits), or None when the data carries cached embeddings and no
    encoder is configured."""
    if cfg.name == "none":
        if spec is not None and spec.text_dim:
            return None
        vocab = spec.label_vocab if spec is not None else ()
        length = (spec.label_length if spec is not None else 0) or cfg.max_length
        return build_text_conditioner(dataclasses.replace(cfg, max_length=length), device, vocab)
    return build_text_conditioner(cfg, device)


def text_geometry(conditioner: TextConditioner | None, spec: DataSpec | None) -> TextGeometry | None:
    if spec is not None and spec.text_dim:
        if conditioner is not None and conditioner.dim != spec.text_dim:
            raise ConfigError(
                f"the cached text embeddings are {spec.text_dim}-d but text_encoder gives {conditioner.dim}-d; "
                "use the text encoder the cache was made with"
            )
        return TextGeometry(spec.text_dim, spec.text_length)
    if conditioner is None:
        return None
    return TextGeometry(conditioner.dim, conditioner.max_length)


def make_conditioning(model: nn.Module, conditioner, spec: DataSpec | None, dataset, caption_dropout: float):
    """Class labels for class-conditional models, text for the others."""
    if model_entry(model.config.name).conditioning == "class":
        dropout_prob = model.config.class_dropout_prob
        return ClassConditioning(model.null_label if dropout_prob > 0 else None, dropout_prob)
    extra = {}
    if spec is not None and spec.fps and model_accepts(model, "fps"):
        extra["fps"] = float(spec.fps)
    cached_null = getattr(dataset, "null_text", None)
    if conditioner is None and hasattr(dataset, "text_conditioner"):
        conditioner = dataset.text_conditioner()  # cached data: prompts are looked up by caption
    return TextConditioning(model, conditioner, caption_dropout, cached_null, extra)


def model_diffusion_defaults(model: nn.Module) -> dict:
    """The objective a model was published with: its own `diffusion_defaults`, or one implied by
    what it predicts."""
    defaults = getattr(model, "diffusion_defaults", None)
    if defaults is not None:
        return dict(defaults)
    objective = {"epsilon": "eps", "v_prediction": "v", "flow": "flow"}[getattr(model, "prediction_type", "epsilon")]
    return {"objective": objective}


def make_objective(diffusion_cfg: DiffusionConfig, model: nn.Module, device: torch.device, pixels: float):
    """loss(model, x0, inputs, draws) -> per-sample loss, for the (resolved) objective."""
    if diffusion_cfg.objective == "flow":
        flow = RectifiedFlow(
            diffusion_cfg.num_train_timesteps,
            diffusion_cfg.flow_t_sampling,
            diffusion_cfg.flow_timestep_shift,
            diffusion_cfg.flow_shift_scale,
            diffusion_cfg.flow_base_pixels,
        )
        return lambda m, x, inputs, draws=None: flow.training_loss(m, x, pixels=pixels, draws=draws, **inputs)
    diffusion = GaussianDiffusion(diffusion_cfg, model.learn_sigma, device)
    return lambda m, x, inputs, draws=None: diffusion.training_loss(m, x, draws, **inputs)


def pixel_area(model_cfg) -> float:
    """Height x width in pixels of the model's input (latent size times the VAE's downsampling)."""
    size = model_cfg.input_size
    if isinstance(size, int):
        return float(size * size)
    scale = getattr(model_cfg, "vae_downsample", None) or 1
    return float(size[1] * size[2] * scale * scale)


def resolve_prompts(sampling: SamplingConfig, dataset) -> list[str]:
    if sampling.prompts:
        prompts = list(sampling.prompts)
    elif sampling.prompts_file:
        path = Path(sampling.prompts_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"sampling.prompts_file={sampling.prompts_file} does not exist; "
                "give a text file with one prompt per line"
            )
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise ConfigError(f"sampling.prompts_file={sampling.prompts_file} has no prompts (one per line)")
    elif dataset is not None and hasattr(dataset, "default_prompts"):
        prompts = list(dataset.default_prompts())
    else:
        raise ConfigError("no prompts to sample: set sampling.prompts=[...] or sampling.prompts_file=<file>")
    if sampling.num_per_prompt < 1:
        raise ConfigError(f"sampling.num_per_prompt={sampling.num_per_prompt} must be at least 1")
    return prompts


@torch.no_grad()
def generate_text_samples(
    model: nn.Module,
    conditioning: TextConditioning,
    prompts: list[str],
    sampling: SamplingConfig,
    diffusion: DiffusionConfig,
    precision: PrecisionConfig,
    ctx: RunContext,
    codec,
    cache=None,
    cuda_graphs: bool = False,
) -> dict:
    """`num_per_prompt` clips per prompt; returns videos in [-1, 1] (decoded through the VAE), the
    prompt of each clip, and the raw model-space samples."""
    device = ctx.device
    all_prompts = [p for p in prompts for _ in range(sampling.num_per_prompt)]
    shape = (model.in_channels, *model.config.input_size)
    clip = sampling.clip_denoised if sampling.clip_denoised is not None else codec is None
    generator = torch.Generator(device).manual_seed(sampling.seed)
    guided_run = sampling.cfg_scale != 1.0
    model.eval()
    chunks = []
    # The [conditional; unconditional] halves on the cfg ranks; one CUDA graph per kind of step if asked.
    guided_model = cfg_parallel(denoiser(model, precision, device), ctx.dist)
    with attached(cache, model), step_graphs(guided_model, cache, cuda_graphs) as run_model:
        for start in range(0, len(all_prompts), sampling.batch_size):
            chunk = all_prompts[start : start + sampling.batch_size]
            sampler = make_sampler(
                sampling,
                diffusion,
                model.learn_sigma,
                clip,
                getattr(model, "default_sampler", None),
                pixels=pixel_area(model.config),
                frames=shape[1],
            )
            inputs = conditioning.prompt_inputs(chunk, device, guided_run)
            noise = torch.randn((len(chunk), *shape), generator=generator, device=device)

            def predict(x, t, inputs=inputs, sampler=sampler):
                if not guided_run:  # (cfg-parallel runs refuse cfg_scale=1)
                    return run_model(x, t, **inputs)
                out = run_model(torch.cat([x, x]), torch.cat([t, t]), **inputs).float()
                return guided(out, shape[0], sampling.cfg_scale, sampler.wants_variance)

            chunks.append(denoise_loop(predict, noise, sampler, generator, cache))
    latents = torch.cat(chunks)
    videos = decode_across_ranks(codec, latents, ctx.dist.comm("world")) if codec is not None else latents.clamp(-1, 1)
    return {"videos": videos.float().cpu(), "prompts": all_prompts, "latents": latents.cpu()}


def write_video_samples(samples: dict, sampling: SamplingConfig, run_dir: Path, fps: float) -> dict[str, Path]:
    """samples.mp4 and samples.gif (one row per prompt) and samples.pt (raw tensors and prompts)."""
    videos = samples["videos"]
    rows = len(videos) // sampling.num_per_prompt if sampling.num_per_prompt > 1 else max(1, round(len(videos) ** 0.5))
    paths = save_video_grid(videos, rows, run_dir / "samples", fps)
    tensor_path = run_dir / "samples.pt"
    torch.save({**samples, "sampling": dataclasses.asdict(sampling)}, tensor_path)
    return {**{suffix.lstrip("."): path for suffix, path in paths.items()}, "pt": tensor_path}
