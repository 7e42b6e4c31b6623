"""Metric tracking for the `logger` config group.

Every tracker appends metrics to `metrics.jsonl` in the run directory (one JSON object per
line, keyed by step) and forwards them to a service where configured. Only rank 0 tracks.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from videosys.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class ConsoleLoggerConfig:
    name: str = "console"


@dataclass
class WandbLoggerConfig:
    name: str = "wandb"
    project: str = "videosys"
    entity: str | None = None
    # online | offline | disabled; None follows WANDB_MODE (online when unset).
    mode: str | None = None
    tags: list[str] = field(default_factory=list)
    group: str | None = None


class Tracker:
    """Writes metrics.jsonl; subclasses forward to external services."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.enabled = enabled
        self.metrics_file = run_dir / "metrics.jsonl"

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self.enabled:
            with self.metrics_file.open("a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")

    def log_image(self, name: str, path: Path, step: int) -> None:
        pass

    def finish(self, summary: dict[str, Any]) -> None:
        pass


class WandbTracker(Tracker):
    def __init__(self, cfg: WandbLoggerConfig, run_dir: Path, config: dict, enabled: bool = True):
        super().__init__(run_dir, enabled)
        if not enabled:
            return
        try:
            import wandb
        except ImportError as err:
            raise ImportError("logger=wandb needs the wandb package: pip install 'videosys[wandb]'") from err
        self._wandb = wandb
        # The run id lives in the run directory, so a resumed or requeued job continues the same run.
        id_file = run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            mode=cfg.mode or os.environ.get("WANDB_MODE", "online"),
            tags=list(cfg.tags),
            group=cfg.group,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            config=config,
            name=run_dir.name,
        )

    def log(self, metrics: dict[str, Any], step: int) -> None:
        super().log(metrics, step)
        if self.enabled:
            self.run.log(metrics, step=step)

    def log_image(self, name: str, path: Path, step: int) -> None:
        if self.enabled:
            self.run.log({name: self._wandb.Image(str(path))}, step=step)

    def finish(self, summary: dict[str, Any]) -> None:
        if self.enabled:
            self.run.summary.update(summary)
            self.run.finish()


def build_tracker(cfg, run_dir: Path, config: dict, enabled: bool) -> Tracker:
    if isinstance(cfg, WandbLoggerConfig):
        return WandbTracker(cfg, run_dir, config, enabled)
    if isinstance(cfg, ConsoleLoggerConfig):
        return Tracker(run_dir, enabled)
    raise ConfigError(f"logger.name={getattr(cfg, 'name', cfg)!r} is not known; use logger=console or logger=wandb")


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Per-step records of metrics.jsonl; for a step written twice (a resumed run) the last wins."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    by_step: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by_step.setdefault(record["step"], {}).update(record)
    return [by_step[s] for s in sorted(by_step)]


def truncate_metrics(run_dir: Path, last_step: int) -> None:
    """Drop records after `last_step` (written by a run that stopped after its last checkpoint)."""
    path = run_dir / "metrics.jsonl"
    if path.exists():
        kept = [
            line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step
        ]
        path.write_text("".join(line + "\n" for line in kept))
