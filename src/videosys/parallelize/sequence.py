"""Sequence-parallel plans: how a model's tokens are split over the sequence-parallel ranks and
what each attention does about it.

A model marks two points in its forward: `self.sequence.scatter(h, dim)` right after the token
embedding (every rank keeps one chunk of axis `dim`) and `self.sequence.gather(h, dim)` right after
the final layer. Everything between runs on the local chunk; `attend` (in `models.blocks`) hands
each self-attention to the plan, which knows what that attention needs:

- image tokens (B, N, C) split along N: every attention is over the whole split sequence
  (Ulysses, Ring or USP);
- video tokens (B, T, S, C) split along space S:
  - temporal attention (each spatial position across frames) is local: no communication;
  - spatial attention: DSP switches the split from space to time with one all-to-all of the
    block input and switches back with one of its output (2 all-to-alls per spatial block);
    Ulysses / Ring / USP run the attention over each frame's split tokens;
  - full 3D attention: Ulysses / Ring / USP over all T x S tokens (DSP does not apply);
- joint [text; video] tokens (CogVideoX) split along the video tokens N and, separately, along the text
  tokens L (`scatter(context, 1, "text")`): each rank holds a chunk of both streams, and Ulysses runs the
  joint attention over every rank's [text chunk; video chunk], padded rows of either masked out.
Cross-attention and MLPs act per token and stay local.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from videosys.distributed.collectives import (
    CommGroup,
    chunk_length,
    gather_sequence,
    pad_dim,
    scatter_sequence,
    switch_split,
)
from videosys.models.blocks import Attention, Rotary, attend_locally
from videosys.ops.sequence_parallel import ring_attention, ulysses_attention, usp_attention


class SequenceParallel:
    """One model's sequence-parallel plan over the `sp` group (ring-major, Ulysses-minor ranks)."""

    def __init__(
        self,
        mode: str,
        sp: CommGroup,
        ulysses: CommGroup,
        ring: CommGroup,
        local_attention: Callable[..., torch.Tensor],
    ):
        self.mode, self.sp, self.ulysses, self.ring = mode, sp, ulysses, ring
        self.local_attention = local_attention
        self.lengths: dict[int, int] = {}  # full length of each split axis, set by `scatter`

    # ---- hooks the models call ----------------------------------------------------------------

    def scatter(self, x: torch.Tensor, dim: int, name: str | None = None) -> torch.Tensor:
        """This rank's chunk of axis `dim`; `name` tells apart two streams split along the same axis."""
        self.lengths[name or dim] = x.shape[dim]
        return scatter_sequence(x, dim, self.sp)

    def gather(self, x: torch.Tensor, dim: int, name: str | None = None) -> torch.Tensor:
        return gather_sequence(x, dim, self.sp, self.lengths[name or dim])

    def local_rotary(self, rope: Rotary, dim: int) -> Rotary:
        """A rotary table over the whole of axis `dim` cut to this rank's (padded) chunk of it."""
        chunk = chunk_length(self.lengths[dim], self.sp.size)

        def local(table: torch.Tensor) -> torch.Tensor:
            return pad_dim(table, 0, chunk * self.sp.size).narrow(0, self.sp.rank * chunk, chunk)

        return Rotary(local(rope.cos), local(rope.sin), rope.interleaved, rope.start)

    # ---- attention ----------------------------------------------------------------------------

    def _valid(self, length: int, inner: int = 1) -> torch.Tensor:
        """Which rows of the group's concatenated chunks (rank-major) are real: each rank holds
        `inner` consecutive runs of its chunk of an axis of `length` (inner = frames for full 3D)."""
        chunk = chunk_length(length, self.sp.size)
        positions = torch.arange(self.sp.size * chunk).view(self.sp.size, 1, chunk)
        return (positions < length).expand(self.sp.size, inner, chunk).reshape(-1)

    def joint_attention_fn(self, text: str = "text", video: int = 1) -> Callable[..., torch.Tensor]:
        """Ulysses attention over joint rows [text chunk; video chunk] on every rank (the streams scattered
        as `text` and along axis `video`). The all-to-all lays the group's rows out rank by rank, which
        attention does not mind; the mask marks each rank's real text and video rows."""
        if self.mode != "ulysses":
            raise ValueError(f"joint text-video attention runs under Ulysses, not sp_mode={self.mode}")

        def fn(q, k, v, mask=None):
            n = self.sp.size
            rows = [self._valid(self.lengths[key]).view(n, -1) for key in (text, video)]  # (rank, chunk) each
            return ulysses_attention(q, k, v, self.sp, self.local_attention, torch.cat(rows, dim=1).reshape(-1))

        return fn

    def attention_fn(self, valid: torch.Tensor) -> Callable[..., torch.Tensor]:
        """An `attention_fn(q, k, v, mask)` over the whole split sequence, `valid` marking real rows."""
        if self.mode == "ulysses":
            return lambda q, k, v, mask=None: ulysses_attention(q, k, v, self.sp, self.local_attention, valid)
        if self.mode == "ring":
            return lambda q, k, v, mask=None: ring_attention(q, k, v, self.sp, valid)
        if self.mode == "usp":
            return lambda q, k, v, mask=None: usp_attention(q, k, v, self.ulysses, self.ring, valid)
        raise ValueError(f"sequence-parallel mode {self.mode!r} has no whole-sequence attention")

    def image_attention_fn(self, dim: int) -> Callable[..., torch.Tensor]:
        """For (B, N, C) models: attention over all N tokens, split along `dim`."""

        def fn(q, k, v, mask=None):
            return self.attention_fn(self._valid(self.lengths[dim]))(q, k, v, mask)

        return fn

    def attend(self, attn: Attention, x: torch.Tensor, layout: str, rope: Rotary | None) -> torch.Tensor:
        """Self-attention over (B, T, S_local, C) video tokens split along S."""
        spatial = self.lengths[2]
        if layout == "temporal":
            return attend_locally(attn, x, layout, rope)
        if layout == "spatial" and self.mode == "dsp":
            return self._switched_spatial(attn, x, rope, spatial)
        if layout == "spatial":
            return attend_locally(attn, x, layout, rope, self.attention_fn(self._valid(spatial)))
        if layout == "full":
            frames = x.shape[1]
            if rope is not None:
                rope = self._local_rope(rope, frames, spatial)
            return attend_locally(attn, x, layout, rope, self.attention_fn(self._valid(spatial, inner=frames)))
        raise ValueError(f"attention layout {layout!r} is not spatial, temporal or full")

    def _switched_spatial(self, attn: Attention, x: torch.Tensor, rope: Rotary | None, spatial: int) -> torch.Tensor:
        """DSP: (B, T, S/n, C) -> (B, T/n, S, C), attention within each frame, and back."""
        h = switch_split(x, 1, 2, spatial, self.sp)
        h = attend_locally(attn, h, "spatial", rope)
        return switch_split(h, 2, 1, x.shape[1], self.sp)

    def _local_rope(self, rope: Rotary, frames: int, spatial: int) -> Rotary:
        """The rows of a full-3D rotary table (T * S rows, t-major) for this rank's (T, S/n) tokens."""
        if rope.start or rope.cos.shape[0] != frames * spatial:
            raise ValueError("sequence-parallel full attention supports rotary tables over exactly the video tokens")
        chunk = chunk_length(spatial, self.sp.size)

        def local(table: torch.Tensor) -> torch.Tensor:
            table = pad_dim(table.view(frames, spatial, -1), 1, chunk * self.sp.size)
            return table.narrow(1, self.sp.rank * chunk, chunk).reshape(frames * chunk, -1)

        return Rotary(local(rope.cos), local(rope.sin), rope.interleaved, 0)


def sequence_comm_per_forward(
    mode: str,
    ulysses: int,
    ring: int,
    attention_layouts: dict[str, int],
    batch: int,
    frames: int,
    spatial: int,
    hidden: int,
    out_features: int,
    element_bytes: int,
    text_tokens: int = 0,
) -> dict[str, tuple[int, int]]:
    """Collectives and bytes one rank sends in one forward pass under a plan: kind -> (calls, bytes).
    `text_tokens`: a joint [text; video] model's text length (its text is split and attended with the video).

    `attention_layouts` counts self-attentions per layout ("spatial", "temporal", "full", or
    "image" for (B, N, C) models, where N = `spatial` and `frames` = 1). Activations are split
    along the spatial tokens into chunks of ceil(S / n); the formula counts padded chunks and
    uncompacted ring blocks (exact when n divides the token counts).
    """
    n = ulysses * ring
    chunk = chunk_length(spatial, n)
    local = batch * frames * chunk * hidden * element_bytes  # one rank's activations of one layer
    text_local = batch * chunk_length(text_tokens, n) * hidden * element_bytes
    calls: dict[str, list[int]] = {}

    def add(kind: str, count: int, nbytes: int) -> None:
        entry = calls.setdefault(kind, [0, 0])
        entry[0] += count
        entry[1] += count * nbytes

    for layout, count in attention_layouts.items():
        if layout == "temporal" or count == 0:
            continue
        tokens_local = local + text_local
        if mode == "dsp":
            if layout != "spatial":
                raise ValueError(f"DSP does not apply to {layout} attention")
            padded = batch * chunk_length(frames, n) * n * chunk * hidden * element_bytes
            add("all_to_all", 2 * count, padded * (n - 1) // n)
            continue
        if mode in ("ulysses", "usp"):
            add("all_to_all", 4 * count, tokens_local * (ulysses - 1) // ulysses)
        if mode in ("ring", "usp"):
            add("p2p", 2 * (ring - 1) * count, tokens_local)
    # The final layer's output is gathered once.
    add("all_gather", 1, batch * frames * chunk * out_features * element_bytes * (n - 1))
    return {kind: (c, b) for kind, (c, b) in calls.items()}
