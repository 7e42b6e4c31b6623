"""Sequence-parallel collectives and attention (Ulysses, Ring, USP) equal single-process attention,
outputs and gradients, on 2 and 4 gloo ranks, including sequence lengths the degree does not divide."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from multiprocess import run_ranks
from videosys.distributed import CommCounter, CommGroup
from videosys.distributed.collectives import chunk_length, gather_sequence, scatter_sequence, switch_split
from videosys.ops.attention import sdpa_attention
from videosys.ops.sequence_parallel import ring_attention, ulysses_attention, usp_attention

HEADS, HEAD_DIM = 4, 8


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _reference(tokens: int):
    torch.manual_seed(tokens)
    q, k, v = (torch.randn(2, HEADS, tokens, HEAD_DIM, requires_grad=True) for _ in range(3))
    weight = torch.randn(2, HEADS, tokens, HEAD_DIM)  # a loss that weighs every output element
    out = F.scaled_dot_product_attention(q, k, v)
    (out * weight).sum().backward()
    return q, k, v, weight, out.detach()


def _sharded(q, k, v, comm: CommGroup, tokens: int):
    parts = [scatter_sequence(t.detach().clone().requires_grad_(True), 2, comm) for t in (q, k, v)]
    leaves = [p.detach().requires_grad_(True) for p in parts]
    chunk = chunk_length(tokens, comm.size)
    valid = torch.arange(chunk * comm.size) < tokens
    return leaves, valid


def _check_modes(rank: int, world: int) -> dict:
    """For each mode and length: max relative error of the gathered output and of q/k/v gradients."""
    group = dist.group.WORLD
    counter = CommCounter()
    comm = CommGroup.of(group, counter)
    results = {}
    modes = ["ulysses", "ring"] + (["usp"] if world == 4 else [])
    if world == 4:  # USP: ring across pairs {0,1} / {2,3}, Ulysses within each pair
        pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        rings = [dist.new_group([0, 2]), dist.new_group([1, 3])]
        ulysses_comm = CommGroup.of(pairs[rank // 2])
        ring_comm = CommGroup.of(rings[rank % 2])
    for tokens in (4 * world, 4 * world + 1, 4 * world - 3):
        q, k, v, weight, expected = _reference(tokens)
        for mode in modes:
            (ql, kl, vl), valid = _sharded(q, k, v, comm, tokens)
            if mode == "ulysses":
                out = ulysses_attention(ql, kl, vl, comm, sdpa_attention, valid)
            elif mode == "ring":
                out = ring_attention(ql, kl, vl, comm, valid)
            else:
                out = usp_attention(ql, kl, vl, ulysses_comm, ring_comm, valid)
            full = gather_sequence(out, 2, comm, tokens)
            (full * weight).sum().backward()
            # gather_sequence's backward scales by the group size (gradients are later averaged over ranks)
            grads = [gather_sequence(t.grad, 2, comm, tokens) / comm.size for t in (ql, kl, vl)]
            errors = [relative_error(full, expected)]
            errors += [relative_error(g, ref.grad) for g, ref in zip(grads, (q, k, v), strict=True)]
            results[(mode, tokens)] = max(errors)
    results["bytes"] = dict(counter.bytes_sent)
    return results


@pytest.mark.parametrize("world", [2, 4])
def test_sequence_parallel_attention_equals_single_process(world):
    results = run_ranks(world, _check_modes)
    assert results.pop("bytes")["all_to_all"] > 0
    assert len(results) == 3 * (3 if world == 4 else 2)
    for key, error in results.items():
        assert error < 1e-5, (key, error)


def _check_switch_split(rank: int, world: int) -> list:
    """DSP's switch from a split over space to one over frames and back, for lengths the degree divides,
    does not divide, and (3 frames on 4 ranks) leaves a rank with padding only: the values and the
    gradients must be exactly the sliced full tensors'. Returns the cases where some rank differed."""
    comm = CommGroup.of(dist.group.WORLD)
    failures = []
    for frames, spatial in ((2 * world, 3 * world), (5, 7), (3, 2 * world + 1)):
        torch.manual_seed(frames * 100 + spatial)
        video, weight = torch.randn(2, frames, spatial, 3), torch.randn(2, frames, spatial, 3)
        local = scatter_sequence(video, 2, comm).detach().requires_grad_(True)  # (B, T, S/n, C)
        by_frames = switch_split(local, 1, 2, spatial, comm)  # (B, T/n, S, C)
        chunk_t = chunk_length(frames, world)
        expected = F.pad(video, (0, 0, 0, 0, 0, chunk_t * world - frames)).narrow(1, rank * chunk_t, chunk_t)
        back = switch_split(by_frames * 2, 2, 1, frames, comm)
        (back * scatter_sequence(weight, 2, comm)).sum().backward()
        ok = [
            torch.equal(by_frames, expected),
            torch.equal(back, 2 * scatter_sequence(video, 2, comm)),
            torch.equal(local.grad, 2 * scatter_sequence(weight, 2, comm)),
        ]
        flags = torch.tensor([0 if good else 1 for good in ok])
        dist.all_reduce(flags)
        if flags.any():
            failures.append(((frames, spatial), flags.tolist()))
    return failures


@pytest.mark.parametrize("world", [2, 4])
def test_dsp_switch_moves_the_split_exactly(world):
    assert run_ranks(world, _check_switch_split) == []
