"""task=preprocess: encode a video dataset once (VAE latents and text embeddings) into a cache folder that
data=cached trains from, so training runs neither the VAE nor the text encoder.

Items are read in index order with key `(index, 0)` (augment seed 0: the same clip every time), so a
cache is a deterministic function of the data, VAE and text encoder configs. Latents are the VAE
posterior's mean (`VideoCodec.encode(sample=False)`), normalised as the codec gives them, not a sample:
re-running gives identical files. Without vae.path the pixels are stored as they are. The text is
encoded with the configured text encoder, or (text_encoder=none on labelled data such as moving_digits)
from the item's label tokens.

The format is described in `videosys.data.cached`. Every file is written to a temporary file in the
output folder and renamed into place, and meta.json comes last, so a cache without meta.json is
unfinished and a crash never leaves one that looks complete.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from videosys.data import BadSample, DataSpec, build_dataset
from videosys.data.cached import (
    CACHE_FORMAT,
    CACHE_VERSION,
    META_FILE,
    NULL_FILE,
    SHARD_PATTERN,
    STORAGE_DTYPES,
    CachedDataConfig,
    shard_names,
)
from videosys.encoders import LabelConditioner, TextEncoderConfig, VAEConfig
from videosys.errors import ConfigError
from videosys.tasks.common import RunContext, make_codec, make_text_conditioner

log = logging.getLogger(__name__)

MAX_WARNINGS = 20


@dataclass
class PreprocessTaskConfig:
    name: str = "preprocess"
    output: str | None = None  # the cache folder; None: <run_dir>/cache
    shard_size: int = 256  # items per shard file
    max_items: int | None = None  # read only the first max_items items of the data (None: all)
    batch_size: int = 16  # items per VAE / text encoder call
    dtype: str = "fp32"  # storage of x and text: fp32 | bf16 (items load as float32 either way)


class _Keyed(Dataset):
    """Item i of `dataset` under key (i, 0), returned with its index."""

    def __init__(self, dataset: Dataset, count: int):
        self.dataset = dataset
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int):
        return index, self.dataset[(index, 0)]


def _as_list(items: list) -> list:
    return items


def _check_task(task: PreprocessTaskConfig) -> None:
    for key in ("shard_size", "batch_size"):
        if getattr(task, key) < 1:
            raise ConfigError(f"task.{key}={getattr(task, key)} must be at least 1")
    if task.max_items is not None and task.max_items < 1:
        raise ConfigError(f"task.max_items={task.max_items} must be at least 1, or null for every item")
    if task.dtype not in STORAGE_DTYPES:
        raise ConfigError(f"task.dtype={task.dtype!r} is not supported; use one of {sorted(STORAGE_DTYPES)}")


def prepare_output(task: PreprocessTaskConfig, run_dir: Path) -> Path:
    """The output folder, created; refuses a finished cache or a folder holding other files.

    A folder holding only the files of an unfinished preprocess (shards, null.safetensors, temporary
    files, but no meta.json) is cleared and written again.
    """
    folder = Path(task.output).expanduser() if task.output else run_dir / "cache"
    where = f"task.output={task.output}" if task.output else f"task.output=null (the run's {folder})"
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{where} is a file, not a folder; choose a new folder for task.output")
    if folder.is_dir():
        entries = list(folder.iterdir())
        if (folder / META_FILE).exists():
            raise ConfigError(
                f"{where} already holds a finished cache ({META_FILE}); choose a new folder for task.output, "
                "or delete that one to rebuild it"
            )
        ours = re.compile(rf"{SHARD_PATTERN}|{re.escape(NULL_FILE)}|\..*\.tmp")
        foreign = [e.name for e in entries if not (e.is_file() and ours.fullmatch(e.name))]
        if foreign:
            raise ConfigError(
                f"{where} is not empty (it holds {sorted(foreign)[:5]}); choose a new or empty folder for task.output"
            )
        if entries:
            log.warning("%s holds an unfinished cache (no %s); writing it again", folder, META_FILE)
            for entry in entries:
                entry.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _atomic_write(path: Path, write) -> None:
    """`write(tmp_path)`, flushed to disk, then renamed over `path` (a reader never sees a partial file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # safetensors creates files private to the owner; caches are shared
    os.replace(tmp, path)


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in tensors.items()}
    _atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": CACHE_FORMAT}))


def _write_json(path: Path, value) -> None:
    _atomic_write(path, lambda tmp: tmp.write_text(json.dumps(value, indent=2) + "\n"))


class _ShardWriter:
    """Collects encoded rows and writes them `shard_size` at a time."""

    def __init__(self, folder: Path, shard_size: int, dtype: torch.dtype):
        self.folder = folder
        self.shard_size = shard_size
        self.dtype = dtype
        self.pending: dict[str, list[torch.Tensor]] = {"x": [], "text": [], "text_mask": []}
        self.captions: list[str] = []
        self.indices: list[int] = []
        self.shards: list[dict] = []
        self.count = 0

    def add(self, x, text, mask, captions: list[str], indices: list[int]) -> None:
        self.pending["x"].append(x.to(self.dtype).cpu())
        self.pending["text"].append(text.to(self.dtype).cpu())
        self.pending["text_mask"].append(mask.bool().cpu())
        self.captions.extend(captions)
        self.indices.extend(indices)
        while len(self.captions) >= self.shard_size:
            self._write(self.shard_size)

    def close(self) -> None:
        if self.captions:
            self._write(len(self.captions))

    def _write(self, count: int) -> None:
        rows = {k: torch.cat(v) for k, v in self.pending.items()}
        tensors_file, captions_file = shard_names(len(self.shards))
        _write_tensors(self.folder / tensors_file, {k: v[:count] for k, v in rows.items()})
        _write_json(self.folder / captions_file, {"captions": self.captions[:count], "indices": self.indices[:count]})
        self.pending = {k: [v[count:]] for k, v in rows.items()}
        self.captions, self.indices = self.captions[count:], self.indices[count:]
        self.shards.append({"file": tensors_file, "captions": captions_file, "count": count})
        self.count += count
        log.info("wrote %s (%d items, %d so far)", tensors_file, count, self.count)


def _check_data(data_cfg, spec: DataSpec) -> None:
    if isinstance(data_cfg, CachedDataConfig):
        raise ConfigError(
            "data=cached is already preprocessed; task=preprocess reads raw data (e.g. data=video_folder)"
        )
    if spec.num_frames is None:
        raise ConfigError(
            f"data={data_cfg.name} gives images; task=preprocess caches captioned videos "
            "(data=moving_digits or data=video_folder)"
        )


def _check_codec(codec, vae: VAEConfig, spec: DataSpec, data_name: str) -> None:
    """The VAE must take the data's channels, frame size and frame count; say so before encoding anything."""
    in_channels = getattr(getattr(codec.vae, "config", None), "in_channels", None)
    if in_channels is not None and in_channels != spec.channels:
        raise ConfigError(
            f"vae.path={vae.path} encodes {in_channels}-channel frames but data={data_name} gives "
            f"{spec.channels}-channel videos; use a VAE made for this data"
        )
    geometry = codec.geometry
    height, width = spec.image_size, spec.width or spec.image_size
    if height % geometry.spatial_downsample or width % geometry.spatial_downsample:
        raise ConfigError(
            f"video size {height}x{width} is not divisible by the VAE's downsampling factor "
            f"{geometry.spatial_downsample}; choose the data's height / width as multiples of it"
        )
    if geometry.kind == "cogvideox" and (spec.num_frames - 1) % geometry.temporal_downsample:
        raise ConfigError(
            f"the CogVideoX VAE encodes 1 + {geometry.temporal_downsample}k frames; data.num_frames="
            f"{spec.num_frames} is not one of those"
        )


def _encode_text(conditioner, items: list[dict], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(conditioner, LabelConditioner) and all("label_tokens" in item for item in items):
        tokens = torch.stack([item["label_tokens"] for item in items]).to(device)
        return conditioner.encode_tokens(tokens)
    return conditioner.encode([item["caption"] for item in items], device)


def _null_text(conditioner, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(conditioner, LabelConditioner):
        return conditioner.null(1, device, length=length)
    return conditioner.null(1, device)


def _config_dict(cfg) -> dict | None:
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else None


def preprocess(
    ctx: RunContext,
    *,
    data_cfg,
    vae: VAEConfig,
    text_encoder: TextEncoderConfig | None = None,
    task: PreprocessTaskConfig,
    model_cfg=None,
    precision=None,
    **_unused,
) -> dict:
    """Write the cache; returns metrics (items, skipped, shards, seconds, output) and writes metrics.json."""
    _check_task(task)
    started = time.perf_counter()
    device = ctx.device
    text_encoder = text_encoder or TextEncoderConfig()
    dataset, spec = build_dataset(data_cfg)
    _check_data(data_cfg, spec)
    if not ctx.dist.is_main:  # one writer; the other ranks have nothing to do
        return {"items": 0, "skipped": 0, "shards": 0, "seconds": 0.0, "output": None}
    folder = prepare_output(task, ctx.run_dir)
    codec = make_codec(vae, device, video=True)
    if codec is not None:
        _check_codec(codec, vae, spec, data_cfg.name)
    conditioner = make_text_conditioner(text_encoder, spec, device)
    dtype = STORAGE_DTYPES[task.dtype]
    total = len(dataset) if task.max_items is None else min(len(dataset), task.max_items)
    log.info(
        "preprocessing %d items of data=%s into %s (vae %s, text_encoder=%s, %s)",
        total,
        data_cfg.name,
        folder,
        vae.path or "none: pixels",
        text_encoder.name,
        task.dtype,
    )
    loader = DataLoader(
        _Keyed(dataset, total),
        batch_size=task.batch_size,
        shuffle=False,
        num_workers=getattr(data_cfg, "num_workers", 0),
        collate_fn=_as_list,
    )
    writer = _ShardWriter(folder, task.shard_size, dtype)
    skipped = 0
    x_shape = text_shape = None
    for batch in loader:
        good = []
        for index, item in batch:
            if isinstance(item, BadSample):
                skipped += 1
                if skipped <= MAX_WARNINGS:
                    log.warning("skipped unreadable sample %d: %s (%s)", index, item.path, item.reason)
                elif skipped == MAX_WARNINGS + 1:
                    log.warning("more unreadable samples; counting them without further warnings")
                continue
            good.append((index, item))
        if not good:
            continue
        items = [item for _, item in good]
        with torch.no_grad():
            pixels = torch.stack([item["x"] for item in items]).to(device)
            x = codec.encode(pixels, sample=False) if codec is not None else pixels.float()
            text, mask = _encode_text(conditioner, items, device)
        x_shape, text_shape = list(x.shape[1:]), list(text.shape[1:])
        writer.add(x, text, mask, [item.get("caption", "") for item in items], [index for index, _ in good])
    writer.close()
    if writer.count == 0:
        raise ConfigError(
            f"every one of the {total} items of data={data_cfg.name} was unreadable ({skipped} skipped); "
            "nothing was cached: check the data files"
        )

    null_text, null_mask = _null_text(conditioner, text_shape[0], device)
    _write_tensors(folder / NULL_FILE, {"text": null_text.float().cpu(), "text_mask": null_mask.bool().cpu()})
    channels, frames, height, width = x_shape
    meta = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "count": writer.count,
        "skipped": skipped,
        "shards": writer.shards,
        "x_shape": x_shape,
        "text_shape": text_shape,
        "channels": channels,
        "frames": frames,
        "height": height,
        "width": width,
        "text_dim": text_shape[1],
        "text_length": text_shape[0],
        "fps": spec.fps,
        "dtype": task.dtype,
        "space": "latent" if codec is not None else "pixel",
        "latents": "posterior_mean" if codec is not None else None,
        "data": _config_dict(data_cfg),
        "vae": _config_dict(vae),
        "text_encoder": _config_dict(text_encoder),
    }
    _write_json(folder / META_FILE, meta)  # last: only now does the folder read as a cache

    seconds = time.perf_counter() - started
    metrics = {
        "items": writer.count,
        "skipped": skipped,
        "shards": len(writer.shards),
        "seconds": round(seconds, 2),
        "output": str(folder),
    }
    if skipped:
        log.warning("%d unreadable samples were skipped", skipped)
    log.info(
        "cached %d items in %d shards in %.1fs: train with data=cached data.path=%s",
        writer.count,
        len(writer.shards),
        seconds,
        folder,
    )
    (ctx.run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    ctx.tracker.finish(metrics)
    return metrics
