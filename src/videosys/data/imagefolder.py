"""Images in class sub-folders (root/<class>/<image>), resized and center-cropped to a square.

Class indices follow the sorted sub-folder names. A file that cannot be decoded is skipped, warned
about and counted by the training loop; it never stops a run.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from videosys.data.loader import BadSample
from videosys.errors import ConfigError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


@dataclass
class ImageFolderDataConfig:
    name: str = "imagefolder"
    path: str | None = None
    image_size: int = 256
    random_flip: bool = True
    num_workers: int = 4


def center_crop_resize(image: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is `size` (antialiased bicubic), then crop the center square."""
    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


class ImageFolderDataset(Dataset):
    channels = 3

    def __init__(self, cfg: ImageFolderDataConfig):
        if not cfg.path:
            raise ConfigError("data=imagefolder needs data.path=<folder with one sub-folder per class>")
        root = Path(cfg.path).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"data.path={cfg.path} does not exist or is not a folder")
        self.classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not self.classes:
            raise ConfigError(
                f"data.path={cfg.path} has no class sub-folders; data=imagefolder expects <path>/<class>/<image>"
            )
        self.files = [
            (path, label)
            for label, name in enumerate(self.classes)
            for path in sorted((root / name).rglob("*"))
            if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()
        ]
        if not self.files:
            raise ConfigError(
                f"data.path={cfg.path} has class sub-folders but no images ({', '.join(IMAGE_EXTENSIONS)})"
            )
        self.cfg = cfg

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: tuple[int, int]):
        index, augment_seed = key
        path, label = self.files[index]
        try:
            with Image.open(path) as raw:
                image = raw.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            return BadSample(str(path), f"{type(err).__name__}: {err}")
        image = center_crop_resize(image, self.cfg.image_size)
        if self.cfg.random_flip and random.Random(augment_seed).random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        array = np.asarray(image, dtype=np.float32)
        return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0, label
