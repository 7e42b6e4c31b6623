"""Process groups and device placement.

`ParallelConfig` holds the degrees of every way of splitting work; `init_distributed` turns it into
a `DistContext` for this process. Only the single-process layout runs today; the degrees are
validated against the world size so that a wrong layout fails before any work.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from videosys.errors import ConfigError


@dataclass
class ParallelConfig:
    name: str = "none"
    dp_replicate: int = 1
    dp_shard: int = 1
    cfg: int = 1
    sp_ulysses: int = 1
    sp_ring: int = 1
    sp_mode: str = "none"

    def degrees(self) -> dict[str, int]:
        return {
            "dp_replicate": self.dp_replicate,
            "dp_shard": self.dp_shard,
            "cfg": self.cfg,
            "sp_ulysses": self.sp_ulysses,
            "sp_ring": self.sp_ring,
        }


@dataclass
class DistContext:
    """What a process needs to know about its place in the run."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(requested: str) -> torch.device:
    """`auto` picks CUDA when present; an explicit device that is not available is an error."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={requested!r} was requested but no CUDA GPU is visible; use device=cpu")
    return device


def validate_parallel(cfg: ParallelConfig, world_size: int) -> None:
    degrees = cfg.degrees()
    for key, value in degrees.items():
        if value < 1:
            raise ConfigError(f"parallel.{key}={value} must be >= 1")
    product = 1
    for value in degrees.values():
        product *= value
    if product != world_size:
        factors = " x ".join(f"{k}={v}" for k, v in degrees.items())
        raise ConfigError(
            f"parallel degrees multiply to {product} ({factors}) but the world size is {world_size}; "
            f"choose degrees whose product is {world_size}, e.g. parallel=none for one process"
        )
    if world_size > 1:
        raise ConfigError(
            f"world size {world_size}: multi-process parallel layouts are not available yet; "
            "run a single process with parallel=none"
        )


def init_distributed(cfg: ParallelConfig, device: str = "auto") -> DistContext:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    validate_parallel(cfg, world_size)
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return DistContext(rank=rank, local_rank=local_rank, world_size=world_size, device=resolve_device(device))
