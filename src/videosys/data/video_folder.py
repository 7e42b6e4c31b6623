"""Video files with captions: <root>/<captions.csv> lists `path,caption` rows, paths relative to root.

Each item is a clip of `num_frames` frames taken every `frame_stride`-th frame from a start frame
drawn from the item's augmentation seed, resized to cover `height` x `width` and centre-cropped.
A file that is missing, cannot be decoded or is too short becomes a `BadSample` (skipped, warned
about and counted by the training loop); it never stops a run. Videos are decoded with PyAV, only
as far as the clip needs.
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from videosys.data.loader import BadSample
from videosys.errors import ConfigError

FPS_PROBE_FILES = 16  # with data.fps unset, the frame rate comes from the first readable of this many videos


@dataclass
class VideoFolderDataConfig:
    name: str = "video_folder"
    root: str | None = None  # required
    captions: str = "captions.csv"  # relative to root unless absolute; columns path,caption
    num_frames: int = 16
    frame_stride: int = 1  # take every stride-th frame
    height: int = 64
    width: int = 64
    random_flip: bool = False
    fps: float | None = None  # frame rate of the files; None: read from the first video
    num_workers: int = 0

    def __post_init__(self) -> None:
        for key in ("num_frames", "frame_stride", "height", "width"):
            value = getattr(self, key)
            if value < 1:
                raise ConfigError(f"data.{key}={value} must be at least 1")
        if self.fps is not None and not self.fps > 0:
            raise ConfigError(f"data.fps={self.fps} must be positive, or null to read it from the videos")


def read_video_frames(path: str | Path, max_frames: int | None = None) -> np.ndarray:
    """Decode the first video stream of `path` to (T, H, W, 3) uint8 RGB, stopping after `max_frames`.

    Raises what PyAV raises for an unreadable file (av.FFmpegError, OSError) and ValueError for a
    file without video or frames.
    """
    import av

    frames = []
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError(f"{path} has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        if max_frames is None or max_frames > 0:
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24"))
                if max_frames is not None and len(frames) >= max_frames:
                    break
    if not frames:
        if max_frames == 0:
            return np.zeros((0, 0, 0, 3), dtype=np.uint8)
        raise ValueError(f"{path} has no decodable frames")
    return np.stack(frames)


def video_info(path: str | Path) -> tuple[int, float | None]:
    """(frame count from the container, 0 if it does not say; frame rate or None), without decoding."""
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError(f"{path} has no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        return int(stream.frames or 0), (float(rate) if rate else None)


def resize_cover_crop(clip: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(T, 3, h, w) floats -> (T, 3, height, width): scale so the frame covers the target, crop the centre."""
    h, w = clip.shape[-2:]
    if (h, w) != (height, width):
        scale = max(height / h, width / w)
        new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
        clip = F.interpolate(clip, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
        top, left = (new_h - height) // 2, (new_w - width) // 2
        clip = clip[..., top : top + height, left : left + width]
    return clip


def read_captions(csv_path: Path, captions_key: str) -> list[tuple[str, str]]:
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = [name.strip() for name in reader.fieldnames or []]
        if "path" not in header or "caption" not in header:
            raise ConfigError(
                f"data.captions={captions_key} ({csv_path}) has header {header}; it needs the columns "
                f"'path' and 'caption' (first line: path,caption)"
            )
        rows = []
        for line, row in enumerate(reader, start=2):
            row = {(k or "").strip(): v for k, v in row.items()}
            path = (row.get("path") or "").strip()
            if not path:
                raise ConfigError(f"data.captions={captions_key} ({csv_path}) line {line} has an empty path")
            rows.append((path, row.get("caption") or ""))
    if not rows:
        raise ConfigError(f"data.captions={captions_key} ({csv_path}) lists no videos; add path,caption rows")
    return rows


class VideoFolderDataset(Dataset):
    num_classes = 0
    channels = 3

    def __init__(self, cfg: VideoFolderDataConfig):
        if not cfg.root:
            raise ConfigError("data=video_folder needs data.root=<folder with the videos and their captions CSV>")
        root = Path(cfg.root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(
                f"data.root={cfg.root} does not exist or is not a folder; point data.root at the video folder"
            )
        csv_path = Path(cfg.captions).expanduser()
        csv_path = csv_path if csv_path.is_absolute() else root / csv_path
        if not csv_path.is_file():
            raise FileNotFoundError(
                f"data.captions={cfg.captions} not found (looked for {csv_path}); give a CSV with columns "
                f"path,caption, relative to data.root or absolute"
            )
        self.cfg = cfg
        self.root = root
        self.items = [(self._resolve(path), text) for path, text in read_captions(csv_path, cfg.captions)]
        self.source_fps = cfg.fps if cfg.fps is not None else self._probe_fps()

    def _resolve(self, path: str) -> Path:
        path = Path(path).expanduser()
        return path if path.is_absolute() else self.root / path

    def _probe_fps(self) -> float:
        for path, _ in self.items[:FPS_PROBE_FILES]:
            try:
                _, rate = video_info(path)
            except Exception:  # unreadable files are reported per item later
                continue
            if rate:
                return rate
        raise ConfigError(
            f"data.fps=null but none of the first {FPS_PROBE_FILES} videos under data.root={self.cfg.root} "
            f"states a frame rate; set data.fps=<frames per second of the files>"
        )

    @property
    def fps(self) -> float:
        """Frame rate of the clips, after taking every frame_stride-th frame."""
        return self.source_fps / self.cfg.frame_stride

    @property
    def frames_needed(self) -> int:
        return (self.cfg.num_frames - 1) * self.cfg.frame_stride + 1

    def __len__(self) -> int:
        return len(self.items)

    def _too_short(self, count: int) -> str:
        return (
            f"has {count} frames, needs {self.frames_needed} for num_frames={self.cfg.num_frames} "
            f"frame_stride={self.cfg.frame_stride}"
        )

    def _read_clip(self, path: Path, rng: random.Random) -> np.ndarray | BadSample:
        """The clip's frames (T, h, w, 3) uint8, decoding only up to its last frame."""
        import av

        cfg, needed = self.cfg, self.frames_needed
        with av.open(str(path)) as container:
            if not container.streams.video:
                return BadSample(str(path), "has no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            total = int(stream.frames or 0)
            if total:
                if total < needed:
                    return BadSample(str(path), self._too_short(total))
                start = rng.randint(0, total - needed)
                frames = []
                for i, frame in enumerate(container.decode(stream)):
                    if i >= start and (i - start) % cfg.frame_stride == 0:
                        frames.append(frame.to_ndarray(format="rgb24"))
                    if i >= start + needed - 1:
                        return np.stack(frames)
        # The container does not state its length, or over-states it: decode everything and count.
        frames = read_video_frames(path)
        if len(frames) < needed:
            return BadSample(str(path), self._too_short(len(frames)))
        start = min(start, len(frames) - needed) if total else rng.randint(0, len(frames) - needed)
        return frames[start : start + needed : cfg.frame_stride]

    def __getitem__(self, key: tuple[int, int]):
        index, augment_seed = key
        path, text = self.items[index]
        cfg = self.cfg
        if not path.is_file():
            return BadSample(str(path), "file not found")
        rng = random.Random(augment_seed)
        try:
            clip = self._read_clip(path, rng)
        except Exception as err:  # PyAV raises many types for broken files; none may stop a run
            return BadSample(str(path), f"cannot decode: {type(err).__name__}: {err}")
        if isinstance(clip, BadSample):
            return clip
        x = torch.from_numpy(np.ascontiguousarray(clip)).permute(0, 3, 1, 2).float()  # (T, 3, h, w) 0..255
        x = resize_cover_crop(x, cfg.height, cfg.width)
        if cfg.random_flip and rng.random() < 0.5:
            x = x.flip(-1)
        x = (x / 127.5 - 1.0).clamp(-1.0, 1.0)
        return {"x": x.permute(1, 0, 2, 3).contiguous(), "caption": text}
