"""The single entrypoint: `python -m videosys.run [group=option ...] [key=value ...]` (or `videosys`).

Hydra composes `configs/` (groups model, parallel, kernels, pab, data, precision, task, logger)
into one config, validated against the typed schemas below; this module turns it into one
`RunConfig` of dataclasses and hands each task only the sub-configs it needs. It is the only
module that sees the whole config, and the only one that imports Hydra or OmegaConf.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import logging
import os
import random
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import MISSING, DictConfig, OmegaConf

from videosys.cache import PABConfig
from videosys.data import DATA_CONFIGS
from videosys.diffusion import DiffusionConfig, SamplingConfig
from videosys.distributed import ParallelConfig, adopt_task_environment, init_distributed, shutdown_distributed
from videosys.encoders import TextEncoderConfig, VAEConfig
from videosys.errors import ConfigError
from videosys.models import MODELS
from videosys.ops import KernelsConfig
from videosys.precision import PrecisionConfig
from videosys.tasks import (
    BenchTaskConfig,
    ConsoleLoggerConfig,
    OptimizerConfig,
    PreprocessTaskConfig,
    RunContext,
    SampleTaskConfig,
    TrainTaskConfig,
    WandbLoggerConfig,
    bench,
    build_tracker,
    preprocess,
    sample,
    train,
)
from videosys.tasks.dry_run import dry_run, resolve_for_plan

log = logging.getLogger("videosys")


@dataclass
class RunConfig:
    # Config groups. Groups whose options have different shapes (model, data, task, logger) are
    # typed per option through the schemas registered below.
    model: Any = MISSING
    parallel: ParallelConfig = MISSING
    kernels: KernelsConfig = MISSING
    pab: PABConfig = MISSING
    data: Any = MISSING
    precision: PrecisionConfig = MISSING
    task: Any = MISSING
    logger: Any = MISSING
    text_encoder: TextEncoderConfig = MISSING
    # Plain sections.
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    run_dir: str = MISSING  # where outputs go (Hydra's run directory)
    resume: str | None = None  # None | auto | <checkpoint folder or run dir>
    # Print the parallel plan for `world_size` ranks (one CPU process, fake backend) instead of running.
    dry_run: bool = False
    world_size: int | None = None


# Schemas of the options of the untyped groups; `configs/<group>/<option>.yaml` extends one.
# (parallel, kernels, pab and precision have one shape each and are typed by RunConfig itself.)
GROUP_SCHEMAS: dict[str, dict[str, type]] = {
    "model": {name: entry.config_cls for name, entry in MODELS.items()},
    "data": dict(DATA_CONFIGS),
    "task": {
        "train": TrainTaskConfig,
        "sample": SampleTaskConfig,
        "bench": BenchTaskConfig,
        "preprocess": PreprocessTaskConfig,
    },
    "logger": {"console": ConsoleLoggerConfig, "wandb": WandbLoggerConfig},
}


def register_schemas(store: ConfigStore) -> None:
    store.store(name="videosys_schema", node=RunConfig)
    for group, schemas in GROUP_SCHEMAS.items():
        for name, schema in schemas.items():
            store.store(group=f"schema/{group}", name=name, node=schema)


def config_dir() -> str:
    """The configs shipped inside the wheel, or the repository's `configs/` for a source checkout."""
    packaged = Path(__file__).resolve().parent / "configs"
    if packaged.is_dir():
        return str(packaged)
    return str(Path(__file__).resolve().parents[2] / "configs")


def compose_config(overrides: list[str]) -> DictConfig:
    """The shipped configs composed with `overrides`, as `python -m videosys.run` composes them, outside a
    run (scripts that build models themselves, tests); `to_run_config` validates the result."""
    with hydra.initialize_config_dir(config_dir=config_dir(), version_base=None):
        return hydra.compose(config_name="config", overrides=overrides)


def unknown_keys(node: DictConfig, prefix: str = "") -> list[str]:
    """Keys that no schema declares. Hydra rejects `key=value` for those, but `+key=value` slips
    through and would otherwise be dropped silently."""
    found = []
    schema = OmegaConf.get_type(node)
    allowed = {f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
    for key in node:
        path = f"{prefix}{key}"
        if allowed is not None and key not in allowed:
            found.append(f"{path}={OmegaConf.select(node, str(key), throw_on_missing=False)!r}")
            continue
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            found.extend(unknown_keys(child, f"{path}."))
    return found


def to_run_config(cfg: DictConfig) -> RunConfig:
    """Validate the composed config and turn it into dataclasses; errors name the key and value."""
    extra = unknown_keys(cfg)
    if extra:
        raise ConfigError(
            f"unknown config key {extra[0]}: no such option in the schema; check the spelling "
            f"(python -m videosys.run --cfg job prints the full config)"
            + (f" (also unknown: {', '.join(extra[1:])})" if len(extra) > 1 else "")
        )
    for group in ("model", "data", "task", "logger"):
        node = cfg[group]
        if not dataclasses.is_dataclass(OmegaConf.get_type(node)):
            raise ConfigError(f"config group {group!r} is not typed: its yaml must extend a schema/{group}/* schema")
    try:
        run_cfg = OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except Exception as err:  # OmegaConf validation and interpolation errors name key and value
        cause = err.__cause__ if isinstance(err.__cause__, ConfigError) else err
        raise ConfigError(str(cause).strip()) from err
    return run_cfg


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def execute(cfg: RunConfig, run_dir: Path, resolved: dict) -> dict:
    """Build the process layout and run the selected task."""
    if cfg.dry_run:
        return plan_only(cfg)
    dist = init_distributed(cfg.parallel, cfg.device)
    if dist.world_size > 1:
        if isinstance(cfg.task, PreprocessTaskConfig):
            raise ConfigError(
                f"task=preprocess on {dist.world_size} processes: the cache is written by one process; "
                "run it without torchrun (parallel=none)"
            )
        run_dir = agree_on_run_dir(run_dir, dist.is_main)
    seed_everything(cfg.seed)  # the same on every rank: replicas must start from identical weights
    tracker = build_tracker(cfg.logger, run_dir, resolved, dist.is_main)
    ctx = RunContext(dist=dist, run_dir=run_dir, seed=cfg.seed, tracker=tracker)
    common = dict(
        model_cfg=cfg.model,
        data_cfg=cfg.data,
        vae=cfg.vae,
        diffusion_cfg=cfg.diffusion,
        precision=cfg.precision,
        parallel=cfg.parallel,
        kernels=cfg.kernels,
        text_encoder=cfg.text_encoder,
    )
    if isinstance(cfg.task, TrainTaskConfig):
        return train(
            ctx,
            **common,
            optimizer_cfg=cfg.optimizer,
            task=cfg.task,
            sampling=cfg.sampling,
            pab=cfg.pab,
            resume=cfg.resume,
            run_config=resolved,
        )
    if isinstance(cfg.task, SampleTaskConfig):
        return sample(ctx, **common, task=cfg.task, sampling=cfg.sampling, pab=cfg.pab)
    if isinstance(cfg.task, BenchTaskConfig):
        return bench(ctx, **common, optimizer_cfg=cfg.optimizer, task=cfg.task)
    if isinstance(cfg.task, PreprocessTaskConfig):
        return preprocess(ctx, **common, task=cfg.task)
    raise ConfigError(
        f"task.name={cfg.task.name!r} is not known; use task=train, task=sample, task=bench or task=preprocess"
    )


def quiet_other_ranks(rank: int) -> None:
    """Only rank 0 logs: other ranks drop the log file Hydra opened for them and report warnings only."""
    if rank == 0:
        return
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()
    root.setLevel(logging.WARNING)


def agree_on_run_dir(run_dir: Path, is_main: bool) -> Path:
    """Every rank takes rank 0's run directory. Hydra names it from the clock in each process, so a
    rank that started in another second made a directory of its own: remove what Hydra put there."""
    shared = [str(run_dir)]
    torch.distributed.broadcast_object_list(shared)
    agreed = Path(shared[0])
    if not is_main and agreed.resolve() != run_dir.resolve():
        shutil.rmtree(run_dir / ".hydra", ignore_errors=True)
        (run_dir / "videosys.log").unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            run_dir.rmdir()  # only if nothing else is there
    return agreed


def plan_only(cfg: RunConfig) -> dict:
    """dry_run=true: resolve the model as the task would, then print the plan for `world_size` ranks."""
    if cfg.world_size is None or cfg.world_size < 1:
        raise ConfigError(
            f"dry_run=true needs world_size=<number of ranks to plan for>, got world_size={cfg.world_size}"
        )
    model_cfg = resolve_for_plan(cfg.model, cfg.data, cfg.vae, cfg.text_encoder, cfg.sampling)
    batch = (
        2 if isinstance(cfg.task, SampleTaskConfig) else cfg.task.batch_size if hasattr(cfg.task, "batch_size") else 2
    )
    return dry_run(cfg.parallel, cfg.world_size, model_cfg, cfg.precision, cfg.task.name, batch)


def report(task: str, run_dir: Path, metrics: dict) -> None:
    lines = [f"\nvideosys {task} finished. Outputs in {run_dir}:"]
    names = ("samples.png", "samples.mp4", "samples.gif", "samples.pt", "loss.png", "metrics.json", "bench.json")
    for name in (*names, "videosys.log"):
        if (run_dir / name).exists():
            lines.append(f"  {run_dir / name}")
    if "checkpoint" in metrics:
        lines.append(f"  {metrics['checkpoint']}  (final checkpoint)")
    if metrics.get("output"):
        lines.append(f"  {metrics['output']}  (the cache: train with data=cached data.path=<this folder>)")
    for key in ("class_accuracy", "digit_accuracy", "direction_accuracy", "final_loss", "samples_per_second"):
        if key in metrics:
            lines.append(f"  {key}: {metrics[key]:.4g}")
    print("\n".join(lines), flush=True)


register_schemas(ConfigStore.instance())


def write_status(run_dir: Path, status: str, **details) -> None:
    """run_dir/status.json: how the job ended, read by the sweep summary."""
    record = {"status": status, "run_dir": str(run_dir), **details}
    (run_dir / "status.json").write_text(json.dumps(record, indent=2, default=str) + "\n")


class SweepSummary(Callback):
    """After a multirun: summary.md and summary.csv in the sweep directory, one row per job with its
    overrides, status and final metrics; a failed job's row names its log. Exits non-zero when a job failed
    (after writing the summary), so a script sees the failure. Registered in configs/config.yaml."""

    METRICS = ("final_loss", "class_accuracy", "digit_accuracy", "direction_accuracy", "samples_per_second")

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = [self.row(job) for job in sorted(sweep_dir.glob("*/.hydra/overrides.yaml"), key=_job_order)]
        if not rows:
            return
        columns = ["job", "overrides", "status", *self.METRICS, "log"]
        with open(sweep_dir / "summary.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
        (sweep_dir / "summary.md").write_text("\n".join(lines) + "\n")
        failed = [row for row in rows if row["status"] != "completed"]
        print(f"sweep summary: {sweep_dir / 'summary.md'} ({len(rows) - len(failed)} of {len(rows)} completed)")
        for row in failed:
            print(f"  job {row['job']} {row['status']}: see {row['log']}", file=sys.stderr)
        if failed:
            sys.exit(1)

    def row(self, overrides_file: Path) -> dict:
        job_dir = overrides_file.parent.parent
        overrides = OmegaConf.load(overrides_file)
        row = {"job": job_dir.name, "overrides": " ".join(str(o) for o in overrides), "log": job_dir / "videosys.log"}
        status_file = job_dir / "status.json"
        if not status_file.exists():  # killed (time limit, node failure) before it could say
            return {**row, "status": "did not finish"}
        status = json.loads(status_file.read_text())
        row["status"] = status["status"]
        metrics = status.get("metrics") or {}
        row.update({k: f"{metrics[k]:.4g}" for k in self.METRICS if isinstance(metrics.get(k), (int, float))})
        return row


def _job_order(overrides_file: Path):
    name = overrides_file.parent.parent.name
    return (0, int(name)) if name.isdigit() else (1, name)


@hydra.main(version_base=None, config_path=config_dir(), config_name="config")
def main(cfg: DictConfig) -> dict | None:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    adopt_task_environment()  # a Slurm / submitit task knows its rank only from the launcher's variables
    rank = int(os.environ.get("RANK", "0"))
    quiet_other_ranks(rank)
    finished = False
    try:
        run_cfg = to_run_config(cfg)
        if run_cfg.resume is None and os.environ.get("SUBMITIT_EXECUTOR"):
            # A submitit job (Slurm or local) may be a requeued one after a time limit or preemption: it
            # continues from the newest checkpoint of its run directory; a first start finds none.
            log.info("submitit job (restarts so far: %s): resume=auto", os.environ.get("SLURM_RESTART_COUNT", "n/a"))
            run_cfg.resume = "auto"
        resolved = OmegaConf.to_container(cfg, resolve=True)
        metrics = execute(run_cfg, run_dir, resolved)
        finished = True
    except Exception as err:
        known = isinstance(err, (ConfigError, FileNotFoundError))
        if known:
            log.error("%s", err)
        else:
            log.exception("run failed")
        if rank == 0:
            if multirun:  # one failed job of a sweep is recorded; the others go on
                write_status(run_dir, "failed", error=f"{type(err).__name__}: {err}", log=run_dir / "videosys.log")
            print(f"videosys: error: {err}", file=sys.stderr, flush=True)
        if multirun:
            return None
        if known:
            sys.exit(2)
        raise
    finally:
        shutdown_distributed(wait_for_peers=finished)
    if not run_cfg.dry_run and rank == 0:
        if multirun:
            write_status(run_dir, "completed", metrics=metrics)
        report(run_cfg.task.name, run_dir, metrics)
    return metrics


if __name__ == "__main__":
    main()
