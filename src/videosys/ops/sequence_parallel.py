"""Sequence-parallel attention: Ulysses, Ring and USP (Ulysses x Ring).

Each rank holds a chunk of the tokens of q, k, v, laid out (batch, heads, tokens, head_dim). Chunks
are equal-sized; some rows may be padding (a sequence length the degree does not divide). `valid`
tells which rows are real tokens: a bool vector over the concatenation of the group's chunks in
rank order. Padded keys are removed before attention (so they get no weight); padded query rows
compute throw-away values that the caller drops.

- Ulysses: one all-to-all per q, k, v trades the sequence split for a head split, so each rank runs
  ordinary attention over the whole sequence for 1/n of the heads; one all-to-all returns the output.
- Ring: queries stay; key/value blocks travel around the ring; each step's partial result is merged
  with the log-sum-exp rule. Backward sends the blocks around again, carrying their gradients home.
- USP: Ulysses within the `ulysses` group, then Ring across the `ring` group.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from videosys.distributed.collectives import CommGroup, all_to_all

AttentionFn = Callable[..., torch.Tensor]


def _keep_rows(x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    if valid is None or bool(valid.all()):
        return x
    return x.index_select(2, valid.nonzero().squeeze(1).to(x.device))


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    comm: CommGroup,
    attention_fn: AttentionFn,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention over the group's whole sequence with each rank computing `heads / comm.size` heads."""
    q, k, v = (all_to_all(t, 1, 2, comm) for t in (q, k, v))
    out = attention_fn(q, _keep_rows(k, valid), _keep_rows(v, valid), None)
    return all_to_all(out, 2, 1, comm)


# ---- Ring attention -------------------------------------------------------------------------------


def _uses_flash(q: torch.Tensor) -> bool:
    return q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256


def _block_forward(q, k, v, scale):
    """(out, lse, aux) of attention of q to one key block; lse in fp32, shape (B, H, Nq); aux is
    what the CUDA flash kernel's backward needs back from its forward (None elsewhere)."""
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
        return out, lse.float(), None
    if _uses_flash(q):
        out, lse, *aux = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)
        return out, lse, aux[:6]  # cum_seq_q, cum_seq_k, max_q, max_k, philox seed, philox offset
    scores = torch.matmul(q.float(), k.float().transpose(-2, -1)) * scale
    lse = scores.logsumexp(dim=-1)
    return torch.matmul((scores - lse[..., None]).exp(), v.float()).to(q.dtype), lse, None


def _block_backward(dout, q, k, v, out, lse, scale, aux):
    """Gradients of one key block's share of attention, given the merged output and log-sum-exp."""
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, False, scale=scale
        )
    if _uses_flash(q):
        cum_q, cum_k, max_q, max_k, seed, offset = aux
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, False, seed, offset, scale=scale
        )
    qf, kf, vf, df = q.float(), k.float(), v.float(), dout.float()
    p = (torch.matmul(qf, kf.transpose(-2, -1)) * scale - lse[..., None]).exp()
    delta = (df * out.float()).sum(-1, keepdim=True)
    ds = p * (torch.matmul(df, vf.transpose(-2, -1)) - delta)
    dq = torch.matmul(ds, kf) * scale
    dk = torch.matmul(ds.transpose(-2, -1), qf) * scale
    dv = torch.matmul(p.transpose(-2, -1), df)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _Ring:
    """Passes tensors one step around the ring: send to the next rank, receive from the previous."""

    def __init__(self, comm: CommGroup):
        self.comm = comm
        self.next = dist.get_global_rank(comm.group, (comm.rank + 1) % comm.size)
        self.prev = dist.get_global_rank(comm.group, (comm.rank - 1) % comm.size)

    def shift(self, tensors: list[torch.Tensor], incoming_rows: int) -> list[torch.Tensor]:
        """Send `tensors` (rows on dim 2) to the next rank; receive the previous rank's, `incoming_rows` long."""
        received, ops = [], []
        for t in tensors:
            shape = list(t.shape)
            shape[2] = incoming_rows
            buffer = t.new_empty(shape)
            t = t.contiguous()
            self.comm.count("p2p", t)
            ops += [dist.P2POp(dist.isend, t, self.next, self.comm.group)]
            ops += [dist.P2POp(dist.irecv, buffer, self.prev, self.comm.group)]
            received.append(buffer)
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        return received


def _block_rows(valid: torch.Tensor | None, comm: CommGroup, rows: int) -> list[int]:
    """How many real key rows each ring rank holds."""
    if valid is None:
        return [rows] * comm.size
    return [int(c.sum()) for c in valid.view(comm.size, rows).unbind(0)]


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, comm, valid):
        scale = 1.0 / math.sqrt(q.shape[-1])
        rows = _block_rows(valid, comm, k.shape[2])
        if valid is not None:
            mine = valid.view(comm.size, k.shape[2])[comm.rank].nonzero().squeeze(1).to(k.device)
            k, v = k.index_select(2, mine), v.index_select(2, mine)
        ring = _Ring(comm)
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        aux = [None] * comm.size
        lse = torch.full(q.shape[:3], float("-inf"), dtype=torch.float32, device=q.device)
        k_block, v_block = k, v
        for step in range(comm.size):
            owner = (comm.rank - step) % comm.size
            if step + 1 < comm.size:
                incoming = ring.shift([k_block, v_block], rows[(owner - 1) % comm.size])
            if rows[owner]:
                block_out, block_lse, aux[step] = _block_forward(q, k_block, v_block, scale)
                block_lse = block_lse.float()
                merged = torch.logaddexp(lse, block_lse)
                out = out * (lse - merged).exp()[..., None] + block_out.float() * (block_lse - merged).exp()[..., None]
                lse = merged
            if step + 1 < comm.size:
                k_block, v_block = incoming
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.comm, ctx.rows, ctx.scale, ctx.valid, ctx.aux = comm, rows, scale, valid, aux
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        comm, rows, scale = ctx.comm, ctx.rows, ctx.scale
        dout = dout.contiguous()
        ring = _Ring(comm)
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        k_block, v_block = k, v
        dk_block = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dv_block = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        for step in range(comm.size):
            owner = (comm.rank - step) % comm.size
            if rows[owner]:
                dq_i, dk_i, dv_i = _block_backward(dout, q, k_block, v_block, out, lse, scale, ctx.aux[step])
                dq += dq_i.float()
                dk_block += dk_i.float()
                dv_block += dv_i.float()
            incoming = rows[(owner - 1) % comm.size]
            # Every block, with the gradient it has gathered, moves on; after `size` moves it is home.
            if step + 1 < comm.size:
                k_block, v_block, dk_block, dv_block = ring.shift([k_block, v_block, dk_block, dv_block], incoming)
            else:
                dk_block, dv_block = ring.shift([dk_block, dv_block], incoming)
        dk, dv = dk_block.to(k.dtype), dv_block.to(v.dtype)
        if ctx.valid is not None:  # scatter the real rows' gradients back into the padded chunk
            chunk = ctx.valid.numel() // comm.size
            mine = ctx.valid.view(comm.size, chunk)[comm.rank].nonzero().squeeze(1).to(k.device)
            shape = list(k.shape)
            shape[2] = chunk
            dk = k.new_zeros(shape).index_copy(2, mine, dk)
            dv = v.new_zeros(shape).index_copy(2, mine, dv)
        return dq.to(q.dtype), dk, dv, None, None


def ring_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, comm: CommGroup, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Exact attention of the local queries to the keys of every rank in `comm`, passed around a ring."""
    if comm.size == 1:
        return F.scaled_dot_product_attention(q, _keep_rows(k, valid), _keep_rows(v, valid))
    return _RingAttention.apply(q, k, v, comm, valid)


def usp_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ulysses: CommGroup,
    ring: CommGroup,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Ulysses over `ulysses` (heads split), then Ring over `ring` for the sequence left split.

    `valid` covers the whole sequence-parallel group in rank order (ring-major, Ulysses-minor)."""
    q, k, v = (all_to_all(t, 1, 2, ulysses) for t in (q, k, v))
    out = ring_attention(q, k, v, ring, valid)
    return all_to_all(out, 2, 1, ulysses)
