"""task=sample: load trained weights and generate the requested classes with a fixed seed."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass

from videosys.cache import PABConfig, build_cache
from videosys.data import build_dataset
from videosys.diffusion import DiffusionConfig, SamplingConfig
from videosys.distributed import ParallelConfig
from videosys.encoders import VAEConfig
from videosys.errors import ConfigError, MissingGeometryError
from videosys.models import model_entry
from videosys.ops import KernelsConfig
from videosys.precision import PrecisionConfig
from videosys.tasks import checkpoint as ckpt_io
from videosys.tasks.common import (
    RunContext,
    load_external_weights,
    make_codec,
    prepare_model,
    resolve_model_config,
    sample_and_score,
)

log = logging.getLogger(__name__)


@dataclass
class SampleTaskConfig:
    name: str = "sample"
    # A VideoSys checkpoint file or run directory (its newest checkpoint); or leave None and set
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
) -> dict:
    cache = build_cache(pab)
    if task.checkpoint:
        path = ckpt_io.find_checkpoint(task.checkpoint, "task.checkpoint")
        state = ckpt_io.load_checkpoint(path)
        if "model_config" not in state:
            raise ConfigError(f"task.checkpoint={task.checkpoint}: {path} is not a VideoSys training checkpoint")
        saved = state["model_config"]
        model_cfg = model_entry(saved["name"]).config_cls(**{**saved, "weights": None}).resolved()
        model = prepare_model(model_cfg, ctx, parallel, kernels, precision)
        weights = state["ema"]["model"] if task.use_ema else state["model"]
        model.load_state_dict(weights)
        log.info("sampling from %s (step %d, %s weights)", path, state["step"], "EMA" if task.use_ema else "raw")
        del state
    elif model_cfg.weights:
        try:  # self-describing weights (a diffusers folder) carry their own geometry
            model_cfg = model_cfg.resolved()
        except MissingGeometryError:  # plain state dicts: take it from the data config
            model_cfg = resolve_model_config(model_cfg, build_dataset(data_cfg)[1], vae)
        model = prepare_model(model_cfg, ctx, parallel, kernels, precision)
        load_external_weights(model, model_cfg)
    else:
        raise ConfigError(
            "task=sample needs trained weights: task.checkpoint=<checkpoint file or run dir> "
            "or model.weights=<local weights>"
        )
    codec = make_codec(vae, ctx.device)
    dataset = None
    if data_cfg.name == "digits" and (model_cfg.in_channels, model_cfg.input_size, model_cfg.num_classes) == (
        1,
        8,
        10,
    ):
        dataset = build_dataset(data_cfg)[0]  # lets the digit classifier score the samples
    metrics = {"model_config": dataclasses.asdict(model_cfg)}
    if ctx.dist.is_main:
        metrics.update(sample_and_score(model, dataset, sampling, diffusion_cfg, precision, ctx, codec, cache, 0))
        (ctx.run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        ctx.tracker.finish(metrics)
    return metrics
