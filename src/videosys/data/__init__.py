"""Datasets and loaders. `build_dataset` returns the dataset and a `DataSpec` describing its samples."""

from __future__ import annotations

from dataclasses import dataclass

from torch.utils.data import Dataset

from videosys.data.cached import CachedDataConfig, CachedDataset
from videosys.data.digits import DigitsDataConfig, DigitsDataset
from videosys.data.imagefolder import ImageFolderDataConfig, ImageFolderDataset
from videosys.data.loader import BadSample, Batch, build_loader
from videosys.data.moving_digits import MovingDigitsDataConfig, MovingDigitsDataset, MovingDigitsEvaluator, vocab
from videosys.data.synthetic import SyntheticDataConfig, SyntheticDataset
from videosys.data.video_folder import VideoFolderDataConfig, VideoFolderDataset
from videosys.errors import ConfigError


@dataclass(frozen=True)
class DataSpec:
    channels: int
    image_size: int  # height (and width, for square images)
    num_classes: int  # 0 for captioned data
    # "pixel": images / videos in [-1, 1] (a VAE, if configured, encodes them); "model": fed to the model as is.
    space: str
    num_frames: int | None = None  # None for images; video items are (C, T, H, W)
    width: int | None = None  # None: square
    fps: float | None = None  # frame rate of the clips (a conditioning input of Open-Sora)
    # For text_encoder=none: the words of the captions that map to label tokens (item["label_tokens"]).
    label_vocab: tuple[str, ...] = ()
    label_length: int = 0  # label tokens per item
    # Cached text embeddings (task=preprocess): their width and token count; 0 when not cached.
    text_dim: int = 0
    text_length: int = 0


DATA_CONFIGS = {
    "digits": DigitsDataConfig,
    "imagefolder": ImageFolderDataConfig,
    "synthetic": SyntheticDataConfig,
    "moving_digits": MovingDigitsDataConfig,
    "video_folder": VideoFolderDataConfig,
    "cached": CachedDataConfig,
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
    if isinstance(cfg, MovingDigitsDataConfig):
        dataset = MovingDigitsDataset(cfg)
        spec = DataSpec(
            channels=1,
            image_size=cfg.frame_size,
            num_classes=0,
            space="pixel",
            num_frames=cfg.num_frames,
            width=cfg.frame_size,
            fps=cfg.fps,
            label_vocab=vocab(cfg.directions),
            label_length=2,  # [digit, direction]
        )
        return dataset, spec
    if isinstance(cfg, VideoFolderDataConfig):
        dataset = VideoFolderDataset(cfg)
        spec = DataSpec(
            channels=3,
            image_size=cfg.height,
            num_classes=0,
            space="pixel",
            num_frames=cfg.num_frames,
            width=cfg.width,
            fps=dataset.fps,
        )
        return dataset, spec
    if isinstance(cfg, CachedDataConfig):
        dataset = CachedDataset(cfg)
        return dataset, DataSpec(**dataset.spec_fields())
    raise ConfigError(f"data.name={getattr(cfg, 'name', cfg)!r} is not known; choose one of {sorted(DATA_CONFIGS)}")


__all__ = [
    "Batch",
    "BadSample",
    "CachedDataConfig",
    "CachedDataset",
    "DataSpec",
    "DATA_CONFIGS",
    "MovingDigitsDataConfig",
    "MovingDigitsDataset",
    "MovingDigitsEvaluator",
    "VideoFolderDataConfig",
    "VideoFolderDataset",
    "build_dataset",
    "build_loader",
]
