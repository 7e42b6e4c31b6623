"""Datasets and loaders. `build_dataset` returns the dataset and a `DataSpec` describing its samples."""

from __future__ import annotations

from dataclasses import dataclass

from torch.utils.data import Dataset

from videosys.data.digits import DigitsDataConfig, DigitsDataset
from videosys.data.imagefolder import ImageFolderDataConfig, ImageFolderDataset
from videosys.data.loader import BadSample, Batch, build_loader
from videosys.data.synthetic import SyntheticDataConfig, SyntheticDataset
from videosys.errors import ConfigError


@dataclass(frozen=True)
class DataSpec:
    channels: int
    image_size: int
    num_classes: int
    # "pixel": images in [-1, 1] (a VAE, if configured, encodes them); "model": fed to the model as is.
    space: str


DATA_CONFIGS = {
    "digits": DigitsDataConfig,
    "imagefolder": ImageFolderDataConfig,
    "synthetic": SyntheticDataConfig,
}


def build_dataset(cfg) -> tuple[Dataset, DataSpec]:
    if isinstance(cfg, DigitsDataConfig):
        dataset = DigitsDataset(cfg)
        return dataset, DataSpec(1, 8, dataset.num_classes, "pixel")
    if isinstance(cfg, ImageFolderDataConfig):
        dataset = ImageFolderDataset(cfg)
        return dataset, DataSpec(3, cfg.image_size, dataset.num_classes, "pixel")
    if isinstance(cfg, SyntheticDataConfig):
        return SyntheticDataset(cfg), DataSpec(cfg.channels, cfg.image_size, cfg.num_classes, "model")
    raise ConfigError(f"data.name={getattr(cfg, 'name', cfg)!r} is not known; choose one of {sorted(DATA_CONFIGS)}")


__all__ = ["Batch", "BadSample", "DataSpec", "DATA_CONFIGS", "build_dataset", "build_loader"]
