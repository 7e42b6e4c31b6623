"""Training checkpoints: one file per saved step, written atomically, found again by `resume`."""

from __future__ import annotations

import logging
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from videosys.errors import ConfigError

log = logging.getLogger(__name__)

_NAME = re.compile(r"^step_(\d+)\.pt$")


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"step_{step:07d}.pt"


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints in `folder`, oldest first (temporary files of an interrupted save are ignored)."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
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


def prune(folder: Path, keep_last: int) -> None:
    if keep_last > 0:
        for old in list_checkpoints(folder)[:-keep_last]:
            old.unlink()


def resolve_resume(resume: str | None, run_dir: Path) -> Path | None:
    """`None`: fresh start; `auto`: newest checkpoint of this run dir (fresh start if none); else a path.

    A path may be a checkpoint file or a run directory (its newest checkpoint is taken).
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
    """A checkpoint file, or the newest checkpoint inside a run directory or checkpoints folder."""
    target = Path(path).expanduser()
    if target.is_file():
        return target
    if target.is_dir():
        for folder in (checkpoint_dir(target), target):
            found = list_checkpoints(folder)
            if found:
                return found[-1]
        raise FileNotFoundError(f"{key}={path} is a folder without checkpoints (step_*.pt); give a checkpoint file")
    raise FileNotFoundError(f"{key}={path} does not exist; give a checkpoint file or a run directory")


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:  # weights_only: a checkpoint is data, never code to run
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: say which one
        raise ConfigError(f"could not read checkpoint {path}: {type(err).__name__}: {err}") from err


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
        torch.cuda.set_rng_state_all(state["cuda"])
