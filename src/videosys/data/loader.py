"""Deterministic, resumable data loading.

The sampler yields `(index, augment_seed)` keys from a per-epoch permutation seeded by
(seed, epoch), so the stream depends only on how many samples were consumed: a resumed run
starts at the same position and sees the same samples and augmentations, whatever the number of
loader workers or ranks. With several data-parallel ranks every global micro-batch of the stream
is cut into one slice per rank (sequence-parallel ranks of one data-parallel rank get the same
slice). Each sample also carries a `draw_seed` for its training noise, so a sample is noised the
same way at any world size. A dataset returns `BadSample` for an item it cannot read; the collate
function drops those and reports them so the training loop can warn and count.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


@dataclass
class BadSample:
    """An item that could not be read; `path` and `reason` end up in the run log."""

    path: str
    reason: str


@dataclass
class Batch:
    x: torch.Tensor | None  # None when every item of the batch was unreadable
    y: torch.Tensor | None  # class labels (None for captioned data)
    bad: list[BadSample]
    captions: list[str] | None = None
    # Other per-item tensors: label_tokens, or cached text / text_mask embeddings.
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    # Per-item seeds for the training draws (noise, timestep, condition dropout); see `SampleDraws`.
    draw_seeds: list[int] | None = None

    def pin_memory(self) -> Batch:
        """Called by DataLoader(pin_memory=True), so that host-to-GPU copies can be asynchronous."""
        if self.x is None:
            return self
        y = self.y.pin_memory() if self.y is not None else None
        tensors = {k: v.pin_memory() for k, v in self.tensors.items()}
        return Batch(self.x.pin_memory(), y, self.bad, self.captions, tensors, self.draw_seeds)


class ResumableSampler(Sampler):
    """Endless stream of (index, augment_seed) keys starting at sample position `start`.

    With `shard=(rank, ranks, micro_batch)` it yields only this rank's part of the global stream:
    of each run of `ranks x micro_batch` positions, the `rank`-th block of `micro_batch`.
    """

    def __init__(
        self, size: int, seed: int, start: int = 0, shuffle: bool = True, shard: tuple[int, int, int] | None = None
    ):
        if size <= 0:
            raise ValueError("cannot sample from an empty dataset")
        self.size = size
        self.seed = seed
        self.start = start
        self.shuffle = shuffle
        self.rank, self.ranks, self.micro_batch = shard or (0, 1, 1)
        if not 0 <= self.rank < self.ranks:
            raise ValueError(f"shard rank {self.rank} is outside 0..{self.ranks - 1}")
        if start % (self.ranks * self.micro_batch):
            raise ValueError(
                f"start {start} is not at a global micro-batch boundary ({self.ranks} x {self.micro_batch})"
            )

    def _epoch_order(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.size, generator=gen) if self.shuffle else torch.arange(self.size)
        augment_seeds = torch.randint(0, 2**31 - 1, (self.size,), generator=gen)
        return order, augment_seeds

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, offset = divmod(self.start, self.size)
        position = self.start
        while True:
            order, augment_seeds = self._epoch_order(epoch)
            for i in range(offset, self.size):
                if (position % (self.ranks * self.micro_batch)) // self.micro_batch == self.rank:
                    yield int(order[i]), int(augment_seeds[i])
                position += 1
            epoch, offset = epoch + 1, 0


class _WithDrawSeed(Dataset):
    """Tags each item with the seed of its training draws: derived from its augmentation seed, which
    is unique per (epoch, position) of the stream, and offset so that the two streams differ."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        item = self.dataset[key]
        return item if isinstance(item, BadSample) else (item, key[1] + 2**31)


def collate_skipping_bad(items: list) -> Batch:
    """Items are (item, draw_seed) pairs whose item is an (x, label) tuple (image datasets) or a dict
    with "x" and any of "label", "caption" and further tensors (video datasets)."""
    bad = [item for item in items if isinstance(item, BadSample)]
    pairs = [pair for pair in items if not isinstance(pair, BadSample)]
    good, seeds = [item for item, _ in pairs], [seed for _, seed in pairs]
    if not good:
        return Batch(None, None, bad)
    if not isinstance(good[0], dict):
        x = torch.stack([item[0] for item in good])
        y = torch.tensor([int(item[1]) for item in good], dtype=torch.long)
        return Batch(x, y, bad, draw_seeds=seeds)
    x = torch.stack([item["x"] for item in good])
    y = torch.tensor([int(item["label"]) for item in good], dtype=torch.long) if "label" in good[0] else None
    captions = [item["caption"] for item in good] if "caption" in good[0] else None
    reserved = {"x", "label", "caption"}
    tensors = {key: torch.stack([item[key] for item in good]) for key in good[0] if key not in reserved}
    return Batch(x, y, bad, captions, tensors, seeds)


def build_loader(
    dataset: Dataset,
    batch_size: int,
    seed: int,
    start: int,
    num_workers: int,
    pin_memory: bool,
    dp_rank: int = 0,
    dp_size: int = 1,
) -> DataLoader:
    """A loader of `Batch`es of (at most) `batch_size` items, starting at (global) sample position
    `start`; with `dp_size` > 1, this data-parallel rank's slice of each global micro-batch."""
    return DataLoader(
        _WithDrawSeed(dataset),
        batch_size=batch_size,
        sampler=ResumableSampler(len(dataset), seed, start, shard=(dp_rank, dp_size, batch_size)),
        collate_fn=collate_skipping_bad,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=True,
        persistent_workers=num_workers > 0,
        # Its own generator: the loader would otherwise draw its worker base seed from the global
        # RNG when iteration starts, shifting a resumed run's random stream.
        generator=torch.Generator().manual_seed(seed),
    )
