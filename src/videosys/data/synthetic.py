"""Random tensors of a fixed shape, for benchmarks: fed to the model as they are (no VAE)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from videosys.errors import ConfigError


@dataclass
class SyntheticDataConfig:
    name: str = "synthetic"
    # Defaults are the ImageNet 256x256 latent of DiT: 4 x 32 x 32 with 1000 classes.
    channels: int = 4
    image_size: int = 32
    num_classes: int = 1000
    num_samples: int = 100_000
    num_workers: int = 0


class SyntheticDataset(Dataset):
    def __init__(self, cfg: SyntheticDataConfig):
        if cfg.num_samples <= 0:
            raise ConfigError(f"data.num_samples={cfg.num_samples} must be positive")
        self.cfg = cfg
        self.num_classes = cfg.num_classes

    def __len__(self) -> int:
        return self.cfg.num_samples

    def __getitem__(self, key: tuple[int, int]):
        index, _ = key
        gen = torch.Generator().manual_seed(index)
        shape = (self.cfg.channels, self.cfg.image_size, self.cfg.image_size)
        return torch.randn(shape, generator=gen), index % self.cfg.num_classes
