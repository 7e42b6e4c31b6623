"""task=train: the training loop, checkpoints and resume, then a guided sample grid and its score."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from videosys.cache import PABConfig, build_cache
from videosys.data import build_dataset, build_loader
from videosys.diffusion import DiffusionConfig, SampleDraws, SamplingConfig
from videosys.distributed import CommGroup, ParallelConfig
from videosys.encoders import TextEncoderConfig, VAEConfig, encode_once_per_group
from videosys.errors import ConfigError
from videosys.models import model_entry
from videosys.ops import KernelsConfig
from videosys.parallelize import shard_parameters
from videosys.precision import PrecisionConfig, autocast, make_grad_scaler
from videosys.tasks import checkpoint as ckpt_io
from videosys.tasks.common import (
    EMA,
    RunContext,
    load_external_weights,
    make_codec,
    make_conditioning,
    make_objective,
    make_text_conditioner,
    model_diffusion_defaults,
    pixel_area,
    prepare_model,
    resolve_model_config,
    sample_and_score,
    text_geometry,
)
from videosys.tasks.media import save_loss_curve
from videosys.tasks.preemption import StopRequest
from videosys.tasks.tracking import read_metrics, truncate_metrics

log = logging.getLogger(__name__)


@dataclass
class OptimizerConfig:
    name: str = "adamw"
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    warmup_steps: int = 0  # linear learning-rate warm-up


@dataclass
class TrainTaskConfig:
    name: str = "train"
    steps: int = 1500  # optimizer steps
    batch_size: int = 64  # samples per optimizer step, over all micro-batches and data-parallel ranks
    grad_accum: int = 1  # micro-batches per optimizer step
    ema_decay: float = 0.9999
    ema_warmup: bool = True
    activation_checkpointing: bool = False
    log_every: int = 50
    ckpt_every: int = 500
    keep_last: int = 2  # checkpoints kept in run_dir/checkpoints (0 keeps all)
    sample_at_end: bool = True  # sample a grid with the EMA weights (and score it where data allows)
    # Text models: fraction of captions replaced by the empty prompt, so that the model also learns
    # the unconditional prediction for guidance (models with their own null caption, like
    # Open-Sora, drop inside the model with model.class_dropout_prob instead).
    caption_dropout: float = 0.1


def validate_train_config(task: TrainTaskConfig, data_parallel: int) -> int:
    """Check the batch arithmetic up front; returns the per-rank micro-batch size. Sequence-parallel
    ranks share their samples, so only the data-parallel ranks divide the batch."""
    for key in ("steps", "batch_size", "grad_accum", "log_every", "ckpt_every"):
        if getattr(task, key) < 1:
            raise ConfigError(f"task.{key}={getattr(task, key)} must be at least 1")
    per_step = task.grad_accum * data_parallel
    if task.batch_size % per_step:
        raise ConfigError(
            f"task.batch_size={task.batch_size} is not divisible by task.grad_accum={task.grad_accum} x "
            f"{data_parallel} data-parallel ranks = {per_step}; use a multiple of {per_step}"
        )
    return task.batch_size // per_step


def make_optimizer(model: nn.Module, cfg: OptimizerConfig, device: torch.device) -> torch.optim.Optimizer:
    if cfg.name != "adamw":
        raise ConfigError(f"optimizer.name={cfg.name!r} is not supported; use adamw")
    if len(cfg.betas) != 2:
        raise ConfigError(f"optimizer.betas={list(cfg.betas)} must have two values")
    return torch.optim.AdamW(
        model.parameters(),
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        fused=device.type == "cuda",
    )


def optimizer_step(
    model: nn.Module,
    objective,
    micro_batches: list[tuple[torch.Tensor, dict, SampleDraws | None]],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    precision: PrecisionConfig,
    grad_clip: float,
    shard_group: CommGroup | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over gradient-accumulation micro-batches of (x, model inputs, draws);
    returns this rank's mean loss and the global gradient norm as device tensors, so that the
    caller decides when to synchronise. `shard_group`: the ranks the gradients are sharded over."""
    device = micro_batches[0][0].device
    optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), device=device)
    for x, inputs, draws in micro_batches:
        with autocast(precision, device):
            loss = objective(model, x, inputs, draws).mean()
        scaler.scale(loss / len(micro_batches)).backward()
        total += loss.detach()
    scaler.unscale_(optimizer)
    grad_norm = clip_gradients(list(model.parameters()), grad_clip, device, shard_group)
    scaler.step(optimizer)
    scaler.update()
    return total / len(micro_batches), grad_norm


def clip_gradients(
    parameters: list[nn.Parameter], max_norm: float, device: torch.device, shard_group: CommGroup | None
) -> torch.Tensor:
    """Scale gradients to a global norm of at most `max_norm` (0: no clipping); returns the norm.

    FSDP2 gradients are shards (DTensors, on the CPU under offload): the squared norms of the local
    shards are summed on the device and over the shard group, then each shard is scaled in place.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    if not local:
        return torch.zeros((), device=device)
    squares = torch.stack([n.to(device) for n in torch._foreach_norm(local)]).float().square().sum()
    if shard_group is not None and shard_group.size > 1 and isinstance(grads[0], DTensor):
        torch.distributed.all_reduce(squares, group=shard_group.group)
    total = squares.sqrt()
    if max_norm > 0:  # as torch.nn.utils.clip_grad_norm_: scale by min(1, max_norm / norm), no sync
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for where in {g.device for g in local}:
            torch._foreach_mul_([g for g in local if g.device == where], scale.to(where))
    return total


def learning_rate(cfg: OptimizerConfig, step: int) -> float:
    """Linear warm-up over `warmup_steps`, then constant; a function of the step alone, so resume needs no state."""
    if cfg.warmup_steps:
        return cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps)
    return cfg.lr


class _Progress:
    """Per-step metrics kept on the device and written out once per log interval (one sync), a
    progress bar on a terminal, and a log line per interval everywhere (CI, Slurm)."""

    def __init__(self, ctx: RunContext, total: int, start: int):
        self.ctx = ctx
        self.data_parallel = ctx.dist.comm("dp")
        self.total = total
        self.pending: list[tuple[int, torch.Tensor, torch.Tensor, float]] = []
        self.since = time.perf_counter()
        show_bar = ctx.dist.is_main and sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=start, desc="train", disable=not show_bar, dynamic_ncols=True)

    def record(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, lr: float) -> None:
        self.pending.append((step, loss, grad_norm, lr))
        self.bar.update(1)

    def flush(self) -> None:
        """Record each pending step; stop on a non-finite loss."""
        if not self.pending:
            return
        values = torch.stack([torch.stack([loss, norm.float()]) for _, loss, norm, _ in self.pending])
        if self.data_parallel.size > 1:  # each data-parallel rank holds the loss of its own samples
            losses = values[:, 0].contiguous()
            torch.distributed.all_reduce(losses, group=self.data_parallel.group)
            values[:, 0] = losses / self.data_parallel.size
        values = values.tolist()
        for (step, _, _, lr), (loss, norm) in zip(self.pending, values, strict=True):
            if not math.isfinite(loss):
                raise FloatingPointError(
                    f"training loss became {loss} at step {step}; lower optimizer.lr, keep "
                    "optimizer.grad_clip > 0, or use precision=bf16 instead of fp16"
                )
            if self.ctx.dist.is_main:
                self.ctx.tracker.log({"loss": loss, "grad_norm": norm, "lr": lr}, step)
        now = time.perf_counter()
        rate = len(self.pending) / max(now - self.since, 1e-9)
        self.since = now
        loss, norm = values[-1]
        self.bar.set_postfix(loss=f"{loss:.4f}")
        log.info("step %d/%d loss %.4f grad_norm %.3f %.2f it/s", self.pending[-1][0], self.total, loss, norm, rate)
        self.pending.clear()

    def close(self) -> None:
        self.flush()
        self.bar.close()


class _BatchStream:
    """Pulls batches, dropping unreadable items with a warning and counting them; returns the
    (VAE-encoded) inputs, the model's conditioning inputs and the batch's per-sample draws."""

    max_warnings = 20

    def __init__(self, loader, device: torch.device, codec, conditioning):
        self.iterator = iter(loader)
        self.device = device
        self.codec = codec
        self.conditioning = conditioning
        self.skipped = 0

    def next(self) -> tuple[torch.Tensor, dict]:
        while True:
            batch = next(self.iterator)
            for bad in batch.bad:
                self.skipped += 1
                if self.skipped <= self.max_warnings:
                    log.warning("skipped unreadable sample %s (%s)", bad.path, bad.reason)
                elif self.skipped == self.max_warnings + 1:
                    log.warning("more unreadable samples; counting them without further warnings")
            if batch.x is not None:
                x = batch.x.to(self.device, non_blocking=True)
                # Each sample's own generator, in a fixed order: VAE posterior, condition dropout,
                # then the objective's timestep and noise.
                draws = SampleDraws(batch.draw_seeds, self.device)
                if self.codec is not None:
                    x = torch.cat(
                        [self.codec.encode(x[i : i + 1], generator=g) for i, g in enumerate(draws.generators)]
                    )
                inputs = self.conditioning.training_inputs(batch, self.device, draws)
                return x, inputs, draws


def train(
    ctx: RunContext,
    *,
    model_cfg,
    data_cfg,
    vae: VAEConfig,
    diffusion_cfg: DiffusionConfig,
    optimizer_cfg: OptimizerConfig,
    task: TrainTaskConfig,
    sampling: SamplingConfig,
    precision: PrecisionConfig,
    parallel: ParallelConfig,
    kernels: KernelsConfig,
    pab: PABConfig,
    resume: str | None,
    run_config: dict,
    text_encoder: TextEncoderConfig | None = None,
) -> dict:
    device, run_dir, dist = ctx.device, ctx.run_dir, ctx.dist
    micro_batch = validate_train_config(task, dist.dims.dp)
    if not 0.0 <= task.caption_dropout < 1.0:
        raise ConfigError(f"task.caption_dropout={task.caption_dropout} must be in [0, 1)")
    if dist.world_size > 1 and precision.dtype == "fp16":
        raise ConfigError(
            f"precision=fp16 with {dist.world_size} processes: the fp16 loss scaler is not shared across "
            "sharded ranks; use precision=bf16 (no loss scaling needed)"
        )
    check_offload(parallel, dist)
    cache = build_cache(pab, compiled_blocks=kernels.compile, num_steps=sampling.num_steps)
    if kernels.cuda_graphs:  # the closing sample runs the sharded training model, whose hooks graphs cannot hold
        log.info("kernels.cuda_graphs=true applies to task=sample; training and its closing sample run eagerly")
    dataset, spec = build_dataset(data_cfg)
    is_video = model_entry(model_cfg.name).is_video
    conditioner = make_text_conditioner(text_encoder or TextEncoderConfig(), spec, device) if is_video else None
    conditioner = encode_once_per_group(conditioner, dist.comm("sp"), device)  # sp ranks share their captions
    model_cfg = resolve_model_config(model_cfg, spec, vae, text_geometry(conditioner, spec) if is_video else None)
    resume_from = ckpt_io.resolve_resume(resume, run_dir)
    meta = ckpt_io.read_meta(resume_from) if resume_from else None
    if meta is not None:
        _check_same_model(meta, model_cfg, resume_from)
    codec = make_codec(vae, device, video=spec.num_frames is not None) if spec.space == "pixel" else None

    model = prepare_model(model_cfg, ctx, parallel, kernels, precision, task.activation_checkpointing)
    if cache is not None:
        cache.check_model(model)  # before training: a policy the model cannot serve would fail at sampling
    if meta is None:
        load_external_weights(model, model_cfg)
    sharding = shard_parameters(model, dist, parallel)  # after the weights exist: every rank holds the same
    optimizer = make_optimizer(model, optimizer_cfg, device)
    scaler = make_grad_scaler(precision, device)
    ema = EMA(model, task.ema_decay, task.ema_warmup)  # after sharding: sharded the same way
    diffusion_cfg = diffusion_cfg.resolved(model_diffusion_defaults(model))
    objective = make_objective(diffusion_cfg, model, device, pixel_area(model_cfg))
    conditioning = make_conditioning(model, conditioner, spec, dataset, task.caption_dropout)
    step = 0
    if meta is not None:
        tensors = training_tensors(model, optimizer, ema)
        ckpt_io.load_tensors(resume_from, tensors)
        set_state_dict(model, optimizer, model_state_dict=tensors["model"], optim_state_dict=tensors["optimizer"])
        ema.num_updates = meta["ema_updates"]
        scaler.load_state_dict(meta["scaler"])
        ckpt_io.restore_rng_state(meta["rng"])
        step = meta["step"]
        if dist.is_main:
            truncate_metrics(run_dir, step)
        log.info("resumed from %s at step %d (saved by %d ranks)", resume_from, step, meta.get("world_size", 1))

    loader = build_loader(
        dataset,
        micro_batch,
        ctx.seed,
        step * task.batch_size,
        data_cfg.num_workers,
        device.type == "cuda",
        dist.dims.dp_rank(dist.rank),
        dist.dims.dp,
    )
    stream = _BatchStream(loader, device, codec, conditioning)
    log.info("objective %s, diffusion %s", diffusion_cfg.objective, diffusion_cfg)
    log.info(
        "training %d steps: batch %d (%d x %d micro-batches x %d data-parallel ranks), %d samples in %s, "
        "precision %s, parameters: %s",
        task.steps,
        task.batch_size,
        micro_batch,
        task.grad_accum,
        dist.dims.dp,
        len(dataset),
        data_cfg.name,
        precision.dtype,
        sharding,
    )

    def save(at_step: int) -> None:
        meta = {
            "step": at_step,
            "ema_updates": ema.num_updates,
            "scaler": scaler.state_dict(),
            "rng": ckpt_io.rng_state(),
            "world_size": dist.world_size,
            "model_config": dataclasses.asdict(model_cfg),
            "config": run_config,
        }
        path = ckpt_io.checkpoint_path(run_dir, at_step)
        ckpt_io.save_checkpoint(path, training_tensors(model, optimizer, ema), meta, dist.is_main)
        if dist.is_main:
            ckpt_io.prune(path.parent, task.keep_last)

    shard_group = dist.comm("fsdp") if dist.mesh is not None else None
    model.train()
    started = time.perf_counter()
    first_step = step
    progress = _Progress(ctx, task.steps, step)
    with StopRequest() as stop:
        while step < task.steps:
            lr = learning_rate(optimizer_cfg, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro_batches = [stream.next() for _ in range(task.grad_accum)]
            loss, grad_norm = optimizer_step(
                model, objective, micro_batches, optimizer, scaler, precision, optimizer_cfg.grad_clip, shard_group
            )
            ema.update(model)
            step += 1
            progress.record(step, loss, grad_norm, lr)
            stopping = stop.requested(dist.comm("world"), device)
            if stopping or step % task.log_every == 0 or step % task.ckpt_every == 0 or step == task.steps:
                progress.flush()
            if stopping or step % task.ckpt_every == 0 or step == task.steps:
                save(step)
            if stopping:  # a time limit or preemption: the checkpoint is written, let the launcher act
                log.warning("stopped at step %d on request; resume continues from %s", step, run_dir)
                progress.close()
                stop.hand_over()
    progress.close()
    train_seconds = time.perf_counter() - started
    if not ckpt_io.list_checkpoints(ckpt_io.checkpoint_dir(run_dir)):
        save(step)  # resumed from another run's final checkpoint: keep one here too

    skipped = _sum_over(stream.skipped, dist.comm("dp"), device)
    metrics = {
        "steps": task.steps,
        "resumed_from_step": first_step,
        "train_seconds": round(train_seconds, 2),
        "samples_per_second": round((task.steps - first_step) * task.batch_size / max(train_seconds, 1e-9), 2),
        "skipped_samples": skipped,
    }
    if skipped:
        log.warning("%d unreadable samples were skipped during training", skipped)
    if task.sample_at_end:  # every rank takes part: the model is sharded and split over sequence ranks
        ema.copy_to(model)
        metrics.update(
            sample_and_score(model, dataset, sampling, diffusion_cfg, precision, ctx, codec, cache, step, conditioning)
        )
    if not dist.is_main:
        return metrics
    history = read_metrics(run_dir)
    losses = [(r["step"], r["loss"]) for r in history if "loss" in r]
    if losses:
        tail = [v for _, v in losses[-50:]]
        metrics["final_loss"] = sum(tail) / len(tail)
        save_loss_curve([s for s, _ in losses], [v for _, v in losses], run_dir / "loss.png")
    metrics["checkpoint"] = str(ckpt_io.list_checkpoints(ckpt_io.checkpoint_dir(run_dir))[-1])
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    ctx.tracker.finish(metrics)
    return metrics


def check_offload(parallel: ParallelConfig, dist) -> None:
    """CPU offload moves FSDP2-sharded state off the GPUs: it needs GPUs and sharded ranks."""
    if not parallel.offload:
        return
    if dist.device.type != "cuda":
        raise ConfigError(
            f"parallel.offload=true on device={dist.device}: offload keeps GPU ranks' sharded state in CPU "
            "memory, and a CPU run holds everything there already; set parallel.offload=false"
        )
    if dist.mesh is None:
        raise ConfigError(
            "parallel.offload=true on one process: offload applies to FSDP2-sharded ranks; launch several "
            "processes (launch/torchrun.sh parallel=zero3 parallel.offload=true) or set parallel.offload=false"
        )


def training_tensors(model: nn.Module, optimizer: torch.optim.Optimizer, ema: EMA) -> dict:
    """What a checkpoint holds per rank: model, optimizer and EMA state, sharded as the run holds them."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optimizer_state, "ema": ema.shadow}


def _sum_over(count: int, comm, device: torch.device) -> int:
    if comm.size == 1:
        return count
    total = torch.tensor([count], device=device)
    torch.distributed.all_reduce(total, group=comm.group)
    return int(total.item())


def _check_same_model(meta: dict, model_cfg, path) -> None:
    saved = dict(meta.get("model_config", {}))
    current = dataclasses.asdict(model_cfg)
    saved.pop("weights", None)
    current.pop("weights", None)
    diff = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
    if diff:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs run {b!r}" for k, (a, b) in diff.items())
        raise ConfigError(f"checkpoint {path} was trained with a different model ({detail}); use the same model config")
