"""Run a function on N spawned CPU processes joined in a gloo process group, and collect what
rank 0 returns. The function must live in an importable module (a test file is fine)."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, out: str, backend: str, fn, args) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    device = None
    if backend == "nccl":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=world_size, device_id=device)
    try:
        result = fn(rank, world_size, *args)
        if rank == 0:
            torch.save(result, out)
        finished = True
    except BaseException:
        finished = False
        raise
    finally:
        if dist.is_initialized():  # fn may have left the group itself
            if finished:
                dist.barrier()  # no rank tears gloo down while a peer still talks to it
            dist.destroy_process_group()


def run_ranks(world_size: int, fn, *args, backend: str = "gloo"):
    """`fn(rank, world_size, *args)` on every rank (gloo on CPUs, or nccl with one GPU per rank);
    returns rank 0's result."""
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.pt")
        mp.spawn(_worker, args=(world_size, free_port(), out, backend, fn, args), nprocs=world_size, join=True)
        return torch.load(out, weights_only=False)
