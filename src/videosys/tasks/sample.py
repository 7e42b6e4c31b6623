"""task=sample: load trained weights and generate the requested classes with a fixed seed."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass

from videosys.cache import PABConfig, build_cache
from videosys.data import DataSpec, build_dataset
from videosys.data.digits import DigitsDataConfig
from videosys.diffusion import DiffusionConfig, SamplingConfig
from videosys.distributed import ParallelConfig
from videosys.encoders import LabelConditioner, TextEncoderConfig, VAEConfig, encode_once_per_group
from videosys.errors import ConfigError, MissingGeometryError
from videosys.models import model_entry
from videosys.ops import KernelsConfig
from videosys.ops.kernels import check_cuda_graphs
from videosys.precision import PrecisionConfig
from videosys.tasks import checkpoint as ckpt_io
from videosys.tasks.common import (
    RunContext,
    load_checkpoint_weights,
    load_external_weights,
    make_codec,
    make_conditioning,
    make_text_conditioner,
    model_diffusion_defaults,
    prepare_model,
    resolve_model_config,
    resolve_prompts,
    sample_and_score,
    text_geometry,
)

log = logging.getLogger(__name__)


@dataclass
class SampleTaskConfig:
    name: str = "sample"
    # A VideoSys checkpoint folder or run directory (its newest checkpoint); or leave None and set
    # model.weights to sample from external weights.
    checkpoint: str | None = None
    use_ema: bool = True  # sample with the EMA weights stored in the checkpoint


def sample(
    ctx: RunContext,
    *,
    model_cfg,
    data_cfg,
    vae: VAEConfig,
    diffusion_cfg: DiffusionConfig,
    task: SampleTaskConfig,
    sampling: SamplingConfig,
    precision: PrecisionConfig,
    parallel: ParallelConfig,
    kernels: KernelsConfig,
    pab: PABConfig,
    text_encoder: TextEncoderConfig | None = None,
) -> dict:
    if ctx.dist.dims.cfg > 1 and sampling.cfg_scale == 1.0:
        raise ConfigError(
            f"parallel={parallel.name} runs the conditional and unconditional halves of guidance on "
            f"{ctx.dist.dims.cfg} ranks, but sampling.cfg_scale=1.0 has no unconditional half; set "
            "sampling.cfg_scale above 1 or use a preset without cfg"
        )
    dims = ctx.dist.dims
    check_cuda_graphs(kernels, ctx.device, dims.sp_mode if dims.sp > 1 else "none")
    cache = build_cache(pab, compiled_blocks=kernels.compile, num_steps=sampling.num_steps)
    text_encoder = text_encoder or TextEncoderConfig()
    dataset, spec = sample_data(data_cfg, model_entry(model_cfg.name).is_video)
    meta = path = None
    if task.checkpoint:
        path = ckpt_io.find_checkpoint(task.checkpoint, "task.checkpoint")
        meta = ckpt_io.read_meta(path)
        saved = meta["model_config"]
        model_cfg = model_entry(saved["name"]).config_cls(**{**saved, "weights": None}).resolved()
    entry = model_entry(model_cfg.name)
    conditioner = None
    if entry.is_video:
        if text_encoder.name == "none" and not (spec and spec.label_vocab):
            # Conditioning on the words of the prompts as labels lets untrained weights run end to end.
            prompts = resolve_prompts(sampling, dataset) if (sampling.prompts or sampling.prompts_file) else []
            words = tuple(sorted({w for p in prompts or ["a random sample"] for w in p.lower().split()}))
            conditioner = LabelConditioner(words, text_encoder.embedding_dim, text_encoder.seed, 8, ctx.device)
            log.warning("text_encoder=none: conditioning on prompt words as fixed labels (no text encoder)")
        else:
            conditioner = make_text_conditioner(text_encoder, spec, ctx.device)
        conditioner = encode_once_per_group(conditioner, ctx.dist.comm("world"), ctx.device)  # same prompts everywhere
    if meta is None:
        model_cfg = resolve_for_sampling(
            model_cfg, spec, vae, text_geometry(conditioner, spec) if entry.is_video else None, sampling
        )
    model = prepare_model(model_cfg, ctx, parallel, kernels, precision, training=False)
    if cache is not None:
        cache.check_model(model)  # before loading weights and sampling
    if meta is not None:
        load_checkpoint_weights(model, path, task.use_ema)
        log.info("sampling from %s (step %d, %s weights)", path, meta["step"], "EMA" if task.use_ema else "raw")
    elif model_cfg.weights:
        load_external_weights(model, model_cfg)
    else:
        log.warning(
            "task=sample without task.checkpoint or model.weights: sampling from RANDOM weights (%s/%s); the "
            "output is noise, useful only to exercise and time the pipeline",
            model_cfg.name,
            model_cfg.flavor,
        )
    codec = make_codec(vae, ctx.device, video=entry.is_video)
    diffusion_cfg = diffusion_cfg.resolved(model_diffusion_defaults(model))
    conditioning = make_conditioning(model, conditioner, spec, dataset, 0.0) if entry.is_video else None
    if not entry.is_video and not (
        isinstance(data_cfg, DigitsDataConfig)
        and (model_cfg.in_channels, model_cfg.input_size, model_cfg.num_classes) == (1, 8, 10)
    ):
        dataset = None  # the digit classifier scores only digit-shaped samples
    metrics = {"model_config": dataclasses.asdict(model_cfg)}
    # Every rank samples (the model splits its work over them); rank 0 writes.
    metrics.update(
        sample_and_score(
            model,
            dataset,
            sampling,
            diffusion_cfg,
            precision,
            ctx,
            codec,
            cache,
            0,
            conditioning,
            cuda_graphs=kernels.cuda_graphs,
        )
    )
    if ctx.dist.is_main:
        (ctx.run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        ctx.tracker.finish(metrics)
    return metrics


def sample_data(data_cfg, is_video: bool):
    """The dataset and its spec when they describe what the model generates (for geometry and scoring)."""
    dataset, spec = build_dataset(data_cfg)
    if is_video != (spec.num_frames is not None):
        return None, None
    return dataset, spec


def resolve_for_sampling(model_cfg, spec, vae: VAEConfig, text, sampling: SamplingConfig):
    try:  # self-describing weights (a diffusers folder) or explicit geometry
        return resolve_model_config(model_cfg, None, vae, text)
    except MissingGeometryError:  # take it from the data config
        if spec is None and model_entry(model_cfg.name).is_video:
            # No video data configured: generate RGB clips of the size sampling asks for.
            spec = DataSpec(3, sampling.height, 0, "pixel", num_frames=sampling.num_frames, width=sampling.width)
        if spec is None:
            raise
        return resolve_model_config(model_cfg, spec, vae, text)
