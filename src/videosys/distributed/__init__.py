"""Process groups and device placement.

`ParallelConfig` holds the degrees of every way of splitting work; `init_distributed` validates
them against the world size, starts the process group (nccl on GPUs, gloo on CPUs, or the fake
backend for a dry run) and builds one named DeviceMesh (rank order in `videosys.distributed.mesh`).
The returned `DistContext` is owned by the run and hands out the groups the strategies need.
"""

from __future__ import annotations

import os
import re
import zlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from videosys.distributed.collectives import CommCounter, CommGroup
from videosys.distributed.mesh import (
    MESH_DIMS,
    SP_MODES,
    ParallelConfig,
    ParallelDims,
    resolve_dims,
    validate_for_model,
)
from videosys.errors import ConfigError

__all__ = [
    "MESH_DIMS",
    "SP_MODES",
    "CommCounter",
    "CommGroup",
    "DistContext",
    "ParallelConfig",
    "ParallelDims",
    "init_distributed",
    "resolve_device",
    "resolve_dims",
    "shutdown_distributed",
    "adopt_task_environment",
    "first_host",
    "validate_for_model",
]

# Flattened groups the strategies ask for, by name: the mesh dimensions each one spans.
GROUPS = {
    "sp": ("sp_ring", "sp_ulysses"),
    "dp": ("dp_replicate", "dp_shard"),
    "fsdp": ("dp_shard", "sp_ring", "sp_ulysses"),  # training: parameters shard over dp_shard and sp ranks
    "world": MESH_DIMS,  # every rank: work that all ranks share (VAE decode of identical latents)
}


@dataclass
class DistContext:
    """What a process needs to know about its place in the run."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    dims: ParallelDims = field(default_factory=ParallelDims)
    mesh: DeviceMesh | None = None
    counter: CommCounter | None = None
    _comms: dict = field(default_factory=dict, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def submesh(self, name: str) -> DeviceMesh:
        """The mesh over one dimension of `MESH_DIMS` or a flattened group of `GROUPS`."""
        if self.mesh is None:
            raise RuntimeError("a single-process run has no device mesh")
        if name in MESH_DIMS:
            return self.mesh[name]
        return self.mesh[GROUPS[name]]._flatten(name)

    def comm(self, name: str) -> CommGroup:
        """This rank's group along a mesh dimension or a flattened group (size 1 without a mesh)."""
        if name not in self._comms:
            if self.mesh is None:
                self._comms[name] = CommGroup(None, 1, 0, self.counter)
            else:
                self._comms[name] = CommGroup.of(self.submesh(name).get_group(), self.counter)
        return self._comms[name]


# Launchers that start one process per task without torchrun: the variables that give (world size,
# rank, local rank, job id, node list). A Slurm step task (srun, or submitit on Slurm) has the step's
# variables; a batch script itself does not, so `python -m videosys.run` inside one stays one process.
_TASK_LAUNCHERS = (
    ("SLURM_STEP_NUM_TASKS", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_JOB_ID", "SLURM_STEP_NODELIST"),
    ("SUBMITIT_LOCAL_NTASKS", "SUBMITIT_LOCAL_GLOBALID", "SUBMITIT_LOCAL_LOCALID", "SUBMITIT_LOCAL_JOB_ID", None),
)


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: "gpu[03-05,9],cpu1" -> "gpu03"."""
    prefix, ranges = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist).groups()
    return prefix + (re.split("[,-]", ranges)[0] if ranges else "")


def adopt_task_environment() -> None:
    """Give one task of a multi-task Slurm (or submitit-local) job torchrun's variables, so that it joins
    the same torch.distributed world the same way: RANK, WORLD_SIZE and LOCAL_RANK from the task, rank 0's
    host as MASTER_ADDR and a port derived from the job id (every task computes the same). Variables that
    torchrun (or the user) already set win."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    for world_var, rank_var, local_var, job_var, nodes_var in _TASK_LAUNCHERS:
        if int(os.environ.get(world_var, "1")) > 1 and rank_var in os.environ:
            master = first_host(os.environ[nodes_var]) if nodes_var else "127.0.0.1"
            port = 20000 + zlib.crc32(os.environ.get(job_var, "0").encode()) % 20000
            os.environ.setdefault("MASTER_ADDR", master)
            os.environ.setdefault("MASTER_PORT", str(port))
            os.environ["WORLD_SIZE"] = os.environ[world_var]
            os.environ["RANK"] = os.environ[rank_var]
            os.environ["LOCAL_RANK"] = os.environ.get(local_var, "0")
            return


def resolve_device(requested: str, local_rank: int = 0) -> torch.device:
    """`auto` picks this process's CUDA GPU when present; an unavailable explicit device is an error."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={requested!r} was requested but no CUDA GPU is visible; use device=cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
    return device


def init_distributed(cfg: ParallelConfig, device: str = "auto", fake_world_size: int | None = None) -> DistContext:
    """Validate the degrees against the world size, then start the process group and build the mesh.

    The world comes from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).
    `fake_world_size` instead pretends to be rank 0 of that many processes on the fake backend, so a
    dry run builds the real mesh and groups in one CPU process.
    """
    if fake_world_size is not None:
        world_size, rank, local_rank = fake_world_size, 0, 0
    else:
        adopt_task_environment()
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dims = resolve_dims(cfg, world_size)
    torch_device = torch.device("cpu") if fake_world_size is not None else resolve_device(device, local_rank)
    context = DistContext(rank, local_rank, world_size, torch_device, dims)
    if world_size == 1:
        return context
    if not dist.is_initialized():
        if fake_world_size is not None:
            from torch.testing._internal.distributed.fake_pg import FakeStore

            dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
        else:
            if torch_device.type == "cuda":
                torch.cuda.set_device(torch_device)
            backend = "nccl" if torch_device.type == "cuda" else "gloo"
            dist.init_process_group(backend, rank=rank, world_size=world_size, device_id=_device_id(torch_device))
    context.mesh = init_device_mesh(torch_device.type, dims.shape, mesh_dim_names=MESH_DIMS)
    return context


def _device_id(device: torch.device) -> torch.device | None:
    return device if device.type == "cuda" else None


def shutdown_distributed(wait_for_peers: bool = False) -> None:
    """Leave the process group. After a run that finished on every rank, `wait_for_peers` first: a
    rank that tears down while a peer still talks to it can abort in gloo's threads."""
    if dist.is_initialized():
        if wait_for_peers:
            dist.barrier()
        dist.destroy_process_group()
