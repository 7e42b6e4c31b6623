"""Per-sample random draws for training.

Each training sample carries its own seed (see `videosys.data.loader`), and every random number
that training draws for it (condition dropout, timestep, noise) comes from a generator seeded with
that seed, in a fixed order. A sample is therefore noised identically whichever rank holds it,
wherever it sits in a micro-batch and after a resume at another world size, which is what makes a
run's losses independent of its parallel layout.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class SampleDraws:
    def __init__(self, seeds: Sequence[int], device: torch.device):
        self.device = torch.device(device)
        self.generators = [torch.Generator(self.device).manual_seed(int(seed)) for seed in seeds]

    def __len__(self) -> int:
        return len(self.generators)

    def uniform(self) -> torch.Tensor:
        """(B,) in [0, 1)."""
        return torch.cat([torch.rand(1, generator=g, device=self.device) for g in self.generators])

    def normal(self, shape: Sequence[int] = (), dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(B, *shape) standard normal."""
        return torch.stack(
            [torch.randn(tuple(shape), generator=g, device=self.device, dtype=dtype) for g in self.generators]
        )

    def integers(self, high: int) -> torch.Tensor:
        """(B,) in [0, high)."""
        return torch.cat([torch.randint(0, high, (1,), generator=g, device=self.device) for g in self.generators])


def check_draws(draws: SampleDraws | None, batch: int) -> None:
    if draws is not None and len(draws) != batch:
        raise ValueError(f"{len(draws)} sample seeds for a batch of {batch}")
