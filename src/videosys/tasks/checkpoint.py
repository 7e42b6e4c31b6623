"""Training checkpoints: one folder per saved step, written with torch.distributed.checkpoint (DCP).

Every rank writes its own shards of the model, optimizer and EMA (sharded under FSDP2, whole in
one process), so a checkpoint saved at one world size loads at any other: DCP reshards on load.
Rank 0 adds `meta.pt` (step, configs, loss scaler, RNG): small plain data, loaded with
weights_only=True. A save goes to a hidden temporary folder that is renamed into place only when
every shard and the metadata are on disk, so an interrupted save never looks like a checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from videosys.errors import ConfigError

log = logging.getLogger(__name__)

_NAME = re.compile(r"^step_(\d+)$")
META = "meta.pt"


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"step_{step:07d}"


def is_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / META).is_file() and (path / ".metadata").is_file()


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints in `folder`, oldest first (temporary folders of an interrupted save are ignored)."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name)) and is_checkpoint(p)]
    return [p for _, p in sorted(found)]


def atomic_save(obj: Any, path: Path) -> None:
    """Write to a temporary file in the same folder, fsync it, then rename over the target."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns that it assumes one process when no process group exists; that is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_checkpoint(path: Path, tensors: dict[str, Any], meta: dict[str, Any], is_main: bool) -> None:
    """Collective: every rank calls it with its own (sharded) `tensors`; rank 0 also writes `meta`."""
    tmp = path.with_name(f".{path.name}.tmp")
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted save
        tmp.mkdir(parents=True)
    _barrier()
    with _quiet_single_process():
        dcp.save(tensors, checkpoint_id=str(tmp))
    if is_main:
        atomic_save(meta, tmp / META)
        if path.exists():  # the same step saved again: swap the old folder out, then drop it
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    _barrier()


def load_tensors(path: Path, tensors: dict[str, Any]) -> None:
    """Fill `tensors` (shaped and sharded as this run holds them) in place from the checkpoint."""
    try:
        with _quiet_single_process():
            dcp.load(tensors, checkpoint_id=str(path))
    except Exception as err:  # a missing key or a foreign folder: say which checkpoint
        raise ConfigError(f"could not load checkpoint {path}: {type(err).__name__}: {err}") from err


def read_meta(path: Path) -> dict[str, Any]:
    if not is_checkpoint(path):
        raise ConfigError(
            f"{path} is not a VideoSys checkpoint (a step_* folder with {META} and .metadata); "
            "give a checkpoint folder or the run directory that holds checkpoints/"
        )
    try:  # weights_only: a checkpoint is data, never code to run
        return torch.load(path / META, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: say which one
        raise ConfigError(f"could not read checkpoint {path / META}: {type(err).__name__}: {err}") from err


def prune(folder: Path, keep_last: int) -> None:
    if keep_last > 0:
        for old in list_checkpoints(folder)[:-keep_last]:
            shutil.rmtree(old)


def resolve_resume(resume: str | None, run_dir: Path) -> Path | None:
    """`None`: fresh start; `auto`: newest checkpoint of this run dir (fresh start if none); else a path.

    A path may be a checkpoint folder or a run directory (its newest checkpoint is taken).
    """
    if resume is None:
        return None
    if resume == "auto":
        found = list_checkpoints(checkpoint_dir(run_dir))
        if not found:
            log.info("resume=auto: no checkpoint in %s yet, starting from scratch", checkpoint_dir(run_dir))
            return None
        return found[-1]
    return find_checkpoint(resume, "resume")


def find_checkpoint(path: str, key: str) -> Path:
    """A checkpoint folder, or the newest checkpoint inside a run directory or checkpoints folder."""
    target = Path(path).expanduser()
    if is_checkpoint(target):
        return target
    if target.is_dir():
        for folder in (checkpoint_dir(target), target):
            found = list_checkpoints(folder)
            if found:
                return found[-1]
        raise FileNotFoundError(
            f"{key}={path} is a folder without checkpoints (step_* folders); give a checkpoint folder or run directory"
        )
    if target.is_file():
        raise ConfigError(
            f"{key}={path} is a file; VideoSys checkpoints are step_* folders (torch.distributed.checkpoint), "
            "give one of those or a run directory"
        )
    raise FileNotFoundError(f"{key}={path} does not exist; give a checkpoint folder or a run directory")


def rng_state() -> dict[str, Any]:
    """Every RNG the run draws from, as tensors and plain values (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos}
    numpy_state.update(has_gauss=has_gauss, cached_gaussian=cached)
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        state_all = state["cuda"]
        if len(state_all) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state_all)
