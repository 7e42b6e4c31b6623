"""Parallel degrees, their validation, and the one named DeviceMesh built from them.

Rank order (row-major over `MESH_DIMS`, the last dimension varies fastest):

    dp_replicate x dp_shard x cfg x sp_ring x sp_ulysses

so the ranks of one sequence-parallel group are adjacent (on one host, on NVLink), Ulysses
innermost (its all-to-alls are the most bandwidth-hungry), then Ring, then the CFG pair; data
parallel ranks are the outermost, where only gradients cross. With 8 ranks and `dsp4` x `dp_shard=2`,
ranks 0-3 are one sequence group and ranks 4-7 the other.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from videosys.errors import ConfigError

MESH_DIMS = ("dp_replicate", "dp_shard", "cfg", "sp_ring", "sp_ulysses")
SP_MODES = ("none", "dsp", "ulysses", "ring", "usp")


@dataclass
class ParallelConfig:
    name: str = "none"
    # Replicated data parallelism (gradients all-reduced). -1: the ranks the other degrees leave over.
    dp_replicate: int = 1
    # Sharded data parallelism (ZeRO through FSDP2). -1: the ranks the other degrees leave over.
    dp_shard: int = 1
    # 1 or 2: the conditional and unconditional halves of classifier-free guidance on two ranks.
    cfg: int = 1
    # Sequence parallelism: the all-to-all degree (Ulysses, and DSP's degree) and the ring degree.
    sp_ulysses: int = 1
    sp_ring: int = 1
    # none | dsp | ulysses | ring | usp (Ulysses x Ring).
    sp_mode: str = "none"
    # ZeRO stage of the sharded ranks: 1 and 2 keep parameters gathered between forward and backward
    # (FSDP2 reshard_after_forward=False), 3 reshards them after forward.
    zero_stage: int = 2
    # Keep sharded parameters, gradients and optimizer state in CPU memory (FSDP2 CPUOffloadPolicy).
    offload: bool = False


@dataclass(frozen=True)
class ParallelDims:
    """Resolved degrees (no -1 left) whose product is the world size."""

    dp_replicate: int = 1
    dp_shard: int = 1
    cfg: int = 1
    sp_ring: int = 1
    sp_ulysses: int = 1
    sp_mode: str = "none"

    @property
    def world_size(self) -> int:
        return math.prod(self.shape)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(getattr(self, name) for name in MESH_DIMS)

    @property
    def sp(self) -> int:
        return self.sp_ring * self.sp_ulysses

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    def dp_rank(self, rank: int) -> int:
        """`rank`'s index among the data-parallel ranks (which batch shard it reads)."""
        coords = self.coordinates(rank)
        return coords["dp_replicate"] * self.dp_shard + coords["dp_shard"]

    def sp_rank(self, rank: int) -> int:
        """`rank`'s index in its sequence-parallel group (which token chunk it holds)."""
        coords = self.coordinates(rank)
        return coords["sp_ring"] * self.sp_ulysses + coords["sp_ulysses"]

    def coordinates(self, rank: int) -> dict[str, int]:
        """This rank's index along every mesh dimension (row-major, `MESH_DIMS` order)."""
        coords = {}
        for name, size in reversed(list(zip(MESH_DIMS, self.shape, strict=True))):
            coords[name] = rank % size
            rank //= size
        return {name: coords[name] for name in MESH_DIMS}

    def group_ranks(self, rank: int, dims: tuple[str, ...]) -> list[int]:
        """The ranks that share every coordinate with `rank` except along `dims`."""
        mine = self.coordinates(rank)
        return [
            r
            for r in range(self.world_size)
            if all(c == mine[d] for d, c in self.coordinates(r).items() if d not in dims)
        ]


def _factors(cfg: ParallelConfig) -> str:
    keys = ("dp_replicate", "dp_shard", "cfg", "sp_ring", "sp_ulysses")
    return " x ".join(f"{k}={getattr(cfg, k)}" for k in keys)


def resolve_dims(cfg: ParallelConfig, world_size: int) -> ParallelDims:
    """Turn the configured degrees into `ParallelDims` for `world_size`, or stop with what to change."""
    if cfg.sp_mode not in SP_MODES:
        raise ConfigError(f"parallel.sp_mode={cfg.sp_mode!r} is not one of {SP_MODES}")
    if cfg.zero_stage not in (1, 2, 3):
        raise ConfigError(f"parallel.zero_stage={cfg.zero_stage} must be 1, 2 or 3")
    for key in ("cfg", "sp_ulysses", "sp_ring"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"parallel.{key}={getattr(cfg, key)} must be >= 1")
    for key in ("dp_replicate", "dp_shard"):
        if getattr(cfg, key) < 1 and getattr(cfg, key) != -1:
            raise ConfigError(f"parallel.{key}={getattr(cfg, key)} must be >= 1, or -1 for the ranks left over")
    if cfg.dp_replicate == -1 and cfg.dp_shard == -1:
        raise ConfigError(
            "parallel.dp_replicate=-1 and parallel.dp_shard=-1: only one degree can take the ranks left over; "
            "set the other to a number"
        )
    if cfg.cfg > 2:
        raise ConfigError(
            f"parallel.cfg={cfg.cfg}: classifier-free guidance has two halves (conditional, unconditional); use 1 or 2"
        )
    _check_sp_mode(cfg)
    known = math.prod(max(getattr(cfg, k), 1) for k in ("dp_replicate", "dp_shard", "cfg", "sp_ring", "sp_ulysses"))
    degrees = dataclasses.asdict(cfg)
    for key in ("dp_replicate", "dp_shard"):
        if degrees[key] == -1:
            if world_size % known:
                raise ConfigError(
                    f"parallel.{key}=-1 takes the ranks left over, but the other degrees ({_factors(cfg)}) "
                    f"multiply to {known}, which does not divide the world size {world_size}; choose degrees "
                    f"whose product divides {world_size}"
                )
            degrees[key] = world_size // known
    dims = ParallelDims(**{k: degrees[k] for k in (*MESH_DIMS, "sp_mode")})
    if dims.world_size != world_size:
        factors = " x ".join(f"{k}={v}" for k, v in zip(MESH_DIMS, dims.shape, strict=True))
        raise ConfigError(
            f"parallel degrees multiply to {dims.world_size} ({factors}) but the world size is {world_size}; "
            f"choose degrees whose product is {world_size} (dp_shard=-1 fills the rest), or launch "
            f"{dims.world_size} processes"
        )
    return dims


def _check_sp_mode(cfg: ParallelConfig) -> None:
    mode, uly, ring = cfg.sp_mode, cfg.sp_ulysses, cfg.sp_ring
    degrees = f"parallel.sp_ulysses={uly}, parallel.sp_ring={ring}"
    if mode == "none" and (uly > 1 or ring > 1):
        raise ConfigError(f"{degrees} but parallel.sp_mode=none; set sp_mode to dsp, ulysses, ring or usp")
    if mode in ("dsp", "ulysses") and ring > 1:
        raise ConfigError(
            f"parallel.sp_mode={mode} splits the sequence with all-to-alls only, so its degree is "
            f"parallel.sp_ulysses; got {degrees}. Set sp_ring=1 (or sp_mode=usp for Ulysses x Ring)"
        )
    if mode == "ring" and uly > 1:
        raise ConfigError(f"parallel.sp_mode=ring uses parallel.sp_ring only; got {degrees}. Set sp_ulysses=1")
    if mode != "none" and uly * ring == 1:
        raise ConfigError(f"parallel.sp_mode={mode} with {degrees}: set the sequence-parallel degree above 1")


def validate_for_model(
    dims: ParallelDims, model_name: str, supported_modes: tuple[str, ...], num_heads: int, task: str | None = None
) -> None:
    """Checks that need the model (and, when given, the task); `parallelize` runs them on every run,
    the dry run before anything is built."""
    if dims.sp_mode != "none" and dims.sp_mode not in supported_modes:
        choices = ", ".join(supported_modes) if supported_modes else "no sequence-parallel mode yet"
        raise ConfigError(
            f"parallel.sp_mode={dims.sp_mode} is not supported by model={model_name} (it supports: {choices}); "
            "pick another parallel preset"
        )
    if dims.sp_mode in ("ulysses", "usp") and num_heads % dims.sp_ulysses:
        raise ConfigError(
            f"parallel.sp_ulysses={dims.sp_ulysses} does not divide model={model_name}'s {num_heads} attention "
            f"heads (Ulysses gives each rank whole heads); use an sp_ulysses that divides {num_heads}, "
            "sp_mode=dsp (no head constraint) or sp_mode=ring"
        )
    if dims.cfg > 1 and task is not None and task != "sample":
        raise ConfigError(
            f"parallel.cfg={dims.cfg} splits the two guidance halves of sampling, but task={task}; use cfg=1 "
            "(give the ranks to dp_shard instead)"
        )
