"""Autograd-aware collectives for sequence parallelism, over a `CommGroup`.

Sequence-parallel gradients follow one rule: every rank of a sequence group computes the same
loss, and backward through these collectives leaves on each rank its own tokens' contribution to
the parameter gradients, scaled by the group size, so that averaging gradients over all ranks,
data- and sequence-parallel alike (what FSDP does), gives the exact gradient. Hence
`scatter_sequence`'s backward puts the local gradient back in place without communication, and
`gather_sequence`'s backward takes the local slice times the group size.

Any sequence length works: `scatter_sequence` pads the split dimension to a multiple of the
group size (padding sits at the end of the last ranks' chunks) and `gather_sequence` removes it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class CommCounter:
    """Bytes this rank sends to other ranks, per collective kind (all-to-all: the chunks for the
    other ranks; all-gather: its chunk once per other rank; point-to-point: the whole tensor)."""

    bytes_sent: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, kind: str, nbytes: int) -> None:
        self.bytes_sent[kind] += nbytes
        self.calls[kind] += 1

    def reset(self) -> None:
        self.bytes_sent.clear()
        self.calls.clear()

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_sent.values())


@dataclass
class CommGroup:
    """A process group with its size and this process's rank in it, and an optional byte counter."""

    group: dist.ProcessGroup | None
    size: int
    rank: int
    counter: CommCounter | None = None

    @classmethod
    def of(cls, group: dist.ProcessGroup, counter: CommCounter | None = None) -> CommGroup:
        return cls(group, dist.get_world_size(group), dist.get_rank(group), counter)

    def count(self, kind: str, tensor: torch.Tensor) -> None:
        if self.counter is not None:
            nbytes = tensor.numel() * tensor.element_size()
            off_rank = {"all_to_all": nbytes * (self.size - 1) // self.size, "all_gather": nbytes * (self.size - 1)}
            self.counter.add(kind, off_rank.get(kind, nbytes))


def chunk_length(length: int, parts: int) -> int:
    """Per-rank chunk length when `length` is split in `parts` (the last chunks carry the padding)."""
    return -(-length // parts)


def pad_dim(x: torch.Tensor, dim: int, length: int) -> torch.Tensor:
    """Zero-pad `x` along `dim` to `length`."""
    missing = length - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def _local_chunk(x: torch.Tensor, dim: int, comm: CommGroup) -> torch.Tensor:
    chunk = chunk_length(x.shape[dim], comm.size)
    return pad_dim(x, dim, chunk * comm.size).narrow(dim, comm.rank * chunk, chunk).contiguous()


def _all_gather(x: torch.Tensor, dim: int, comm: CommGroup) -> torch.Tensor:
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(comm.size)]
    comm.count("all_gather", x)
    dist.all_gather(parts, x, group=comm.group)
    return torch.cat(parts, dim=dim)


class _Scatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, comm):
        ctx.dim, ctx.comm, ctx.length = dim, comm, x.shape[dim]
        return _local_chunk(x, dim, comm)

    @staticmethod
    def backward(ctx, grad):
        dim, comm = ctx.dim, ctx.comm
        chunk = grad.shape[dim]
        shape = list(grad.shape)
        shape[dim] = chunk * comm.size
        full = grad.new_zeros(shape)
        full.narrow(dim, comm.rank * chunk, chunk).copy_(grad)
        return full.narrow(dim, 0, ctx.length), None, None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, comm, length):
        ctx.dim, ctx.comm = dim, comm
        return _all_gather(x, dim, comm).narrow(dim, 0, length)

    @staticmethod
    def backward(ctx, grad):
        return _local_chunk(grad, ctx.dim, ctx.comm) * ctx.comm.size, None, None, None


def scatter_sequence(x: torch.Tensor, dim: int, comm: CommGroup) -> torch.Tensor:
    """This rank's chunk of `x` (the same on every rank) along `dim`, zero-padded to equal chunks."""
    return _Scatter.apply(x, dim, comm)


def gather_sequence(x: torch.Tensor, dim: int, comm: CommGroup, length: int) -> torch.Tensor:
    """Concatenate every rank's chunk along `dim` and cut the padding: the inverse of `scatter_sequence`."""
    return _Gather.apply(x, dim, comm, length)


def _switch_split(x: torch.Tensor, scatter_dim: int, gather_dim: int, gather_length: int, comm: CommGroup):
    n, length, local = comm.size, x.shape[scatter_dim], x.shape[gather_dim]
    chunk = chunk_length(length, n)
    if chunk_length(gather_length, n) != local:
        raise ValueError(f"dimension {gather_dim} of {tuple(x.shape)} is not the chunk of {gather_length} rows")
    # Pack: one copy of the ranks' full chunks, one of a partial chunk, zeros for the padding. The
    # send buffer is written once, with no padded or stacked temporaries.
    piece = list(x.shape)
    piece[scatter_dim] = chunk
    send = x.new_empty((n, *piece))
    full, rest = divmod(length, chunk)
    if full:
        chunks = x.narrow(scatter_dim, 0, full * chunk).unflatten(scatter_dim, (full, chunk))
        send[:full].copy_(chunks.movedim(scatter_dim, 0))
    if full < n:
        padding = send[full:]
        if rest:
            padding[0].narrow(scatter_dim, 0, rest).copy_(x.narrow(scatter_dim, full * chunk, rest))
            padding[0].narrow(scatter_dim, rest, chunk - rest).zero_()
            padding = padding[1:]
        padding.zero_()
    received = torch.empty_like(send)
    comm.count("all_to_all", send)
    dist.all_to_all_single(received, send, group=comm.group)
    # Unpack: rank r's rows go to chunk r of `gather_dim`, their padding cut.
    shape = list(piece)
    shape[gather_dim] = gather_length
    out = x.new_empty(shape)
    full, rest = divmod(gather_length, local)
    if full:
        out.narrow(gather_dim, 0, full * local).unflatten(gather_dim, (full, local)).copy_(
            received[:full].movedim(0, gather_dim)
        )
    if rest:
        out.narrow(gather_dim, full * local, rest).copy_(received[full].narrow(gather_dim, 0, rest))
    return out


class _SwitchSplit(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scatter_dim, gather_dim, gather_length, comm):
        ctx.args = (gather_dim, scatter_dim, x.shape[scatter_dim], comm)
        return _switch_split(x, scatter_dim, gather_dim, gather_length, comm)

    @staticmethod
    def backward(ctx, grad):
        return _switch_split(grad, *ctx.args), None, None, None, None


def switch_split(x: torch.Tensor, scatter_dim: int, gather_dim: int, gather_length: int, comm: CommGroup):
    """Move the split of `x` from `gather_dim` to `scatter_dim` with one all-to-all (DSP's switch).

    `x` holds this rank's chunk of `gather_dim` (ceil(gather_length / n) rows, the last ones padding)
    and all of `scatter_dim`; the result holds this rank's chunk of `scatter_dim` (zero-padded the same
    way) and all `gather_length` rows of `gather_dim`. Any lengths work."""
    if comm.size == 1:
        return x
    return _SwitchSplit.apply(x, scatter_dim, gather_dim, gather_length, comm)


def all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, comm: CommGroup) -> torch.Tensor:
    """Split `x` along `scatter_dim` (which must divide evenly), send chunk i to rank i, and
    concatenate what arrives along `gather_dim` in rank order (Ulysses): `switch_split` with no padding."""
    if comm.size == 1:
        return x
    if x.shape[scatter_dim] % comm.size:
        raise ValueError(
            f"all-to-all over {comm.size} ranks needs dimension {scatter_dim} of {tuple(x.shape)} to divide evenly"
        )
    return switch_split(x, scatter_dim, gather_dim, x.shape[gather_dim] * comm.size, comm)


def all_gather_batch(x: torch.Tensor, comm: CommGroup) -> torch.Tensor:
    """Concatenate every rank's `x` along dim 0 (forward only: used by sampling)."""
    return _all_gather(x, 0, comm)


@torch.no_grad()
def split_work(x: torch.Tensor, dim: int, comm: CommGroup, work) -> torch.Tensor:
    """Run `work` on this rank's chunk of `x` along `dim` and concatenate every rank's result there
    (forward only). Every rank holds the same `x`; chunks are padded so any length works, and the
    padding is cut off the result, so the output equals `work(x)` for any `work` that treats the
    entries along `dim` independently (a VAE decode per clip or per frame)."""
    if comm.size == 1:
        return work(x)
    length = x.shape[dim]
    out = work(_local_chunk(x, dim, comm))
    return _all_gather(out, dim, comm).narrow(dim, 0, length)


def broadcast_tensors(
    tensors: dict[str, torch.Tensor] | None, comm: CommGroup, device: torch.device
) -> dict[str, torch.Tensor]:
    """Rank 0 of `comm` sends its dict of tensors to the other ranks of `comm` (which pass None), so
    that work like text encoding is done once per group. Shapes travel first, then the data."""
    if comm.size == 1:
        return tensors
    source = dist.get_global_rank(comm.group, 0)
    header = [None if tensors is None else {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}]
    dist.broadcast_object_list(header, src=source, group=comm.group, device=device)
    out = {}
    for key, (shape, dtype) in header[0].items():
        wire = torch.uint8 if dtype == torch.bool else dtype  # not every backend sends bool
        if comm.rank == 0:
            buffer = tensors[key].to(device=device, dtype=wire).contiguous()
        else:
            buffer = torch.empty(shape, dtype=wire, device=device)
        comm.count("broadcast", buffer)
        dist.broadcast(buffer, src=source, group=comm.group)
        out[key] = buffer.to(dtype)
    return out
