"""data=cached: train from the text embeddings and VAE latents that task=preprocess wrote to disk.

A cache folder holds

    meta.json                  written last: counts, shapes, fps, the configs it was made with, format version
    null.safetensors           `text` (1, L, D) float32 and `text_mask` (1, L) bool: the empty prompt (null token)
    shard_00000.safetensors    `x` (N, C, T, H, W), `text` (N, L, D) and `text_mask` (N, L) bool
    shard_00000.json           {"captions": [...], "indices": [...]}: the caption and source index of each row

`x` holds the VAE latents (the posterior mean, already normalised like VideoCodec.encode gives them) or,
when preprocessing ran without a VAE, the pixels in [-1, 1]; `x` and `text` are float32 or bf16
(meta.json `dtype`), and items always come back as float32. Shards are read lazily through safetensors'
memory map, one row at a time, keeping the last-used shard open; a shard that cannot be read gives
`BadSample`s (skipped and counted by the loader), never a crash mid-run.
"""

from __future__ import annotations

import bisect
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from videosys.data.loader import BadSample
from videosys.encoders.text import TextConditioner
from videosys.errors import ConfigError

log = logging.getLogger(__name__)

CACHE_FORMAT = "videosys-cache"
CACHE_VERSION = 1
META_FILE = "meta.json"
NULL_FILE = "null.safetensors"
SHARD_PATTERN = r"shard_\d{5}\.(safetensors|json)"
MAX_DEFAULT_PROMPTS = 64
STORAGE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def shard_names(index: int) -> tuple[str, str]:
    """(tensor file, caption sidecar) of shard `index`."""
    return f"shard_{index:05d}.safetensors", f"shard_{index:05d}.json"


@dataclass
class CachedDataConfig:
    name: str = "cached"
    path: str | None = None  # a folder written by task=preprocess (it holds meta.json)
    num_workers: int = 0


_FIX = "point data.path at a folder written by task=preprocess (python -m videosys.run task=preprocess ...)"


def read_meta(path: str | Path | None) -> dict:
    """meta.json of the cache at `path`, checked for format and version."""
    if not path:
        raise ConfigError(f"data.path is not set; {_FIX}")
    folder = Path(path).expanduser()
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        what = "does not exist" if not folder.exists() else f"has no {META_FILE} (an unfinished or foreign folder)"
        raise FileNotFoundError(f"data.path={path} {what}; {_FIX}")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"data.path={path}: {meta_path} is corrupt ({err}); rerun task=preprocess") from err
    if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT:
        raise ConfigError(f"data.path={path}: {meta_path} is not a VideoSys cache (format {CACHE_FORMAT!r}); {_FIX}")
    if meta.get("version") != CACHE_VERSION:
        raise ConfigError(
            f"data.path={path} holds cache format version {meta.get('version')!r}, but this VideoSys reads version "
            f"{CACHE_VERSION}; rerun task=preprocess with this version"
        )
    required = ("count", "shards", "channels", "frames", "height", "width", "text_dim", "text_length")
    missing = [key for key in required if key not in meta]
    if missing:
        raise ConfigError(f"data.path={path}: {meta_path} lacks {missing}; rerun task=preprocess")
    return meta


class CachedDataset(Dataset):
    """Items {"x": (C, T, H, W), "caption": str, "text": (L, D) float32, "text_mask": (L,) bool} of a cache.

    `null_text` is the empty prompt's (embedding (1, L, D), mask (1, L)), for caption dropout and guidance.
    Keys are `(index, augment_seed)` like every dataset here (the seed is unused) or plain indices.
    """

    num_classes = 0

    def __init__(self, cfg: CachedDataConfig):
        self.cfg = cfg
        self.meta = read_meta(cfg.path)
        self.folder = Path(cfg.path).expanduser()
        self.shards: list[tuple[str, str, int]] = []
        self.offsets: list[int] = []  # first index of each shard
        total = 0
        for entry in self.meta["shards"]:
            tensors, captions, count = entry["file"], entry["captions"], int(entry["count"])
            for name in (tensors, captions):
                if not (self.folder / name).is_file():
                    raise FileNotFoundError(
                        f"data.path={cfg.path} lists {name} in {META_FILE} but the file is missing; "
                        "rerun task=preprocess"
                    )
            self.offsets.append(total)
            self.shards.append((tensors, captions, count))
            total += count
        if total != self.meta["count"] or total == 0:
            raise ConfigError(
                f"data.path={cfg.path}: {META_FILE} says {self.meta['count']} items but its shards hold {total}; "
                "rerun task=preprocess"
            )
        self.null_text = self._read_null()
        self._open: tuple[int, object, list[str]] | None = None  # the last-used shard
        self._evaluator = None
        self._conditioner = None

    # -- geometry -----------------------------------------------------------------------------------

    def spec_fields(self) -> dict:
        """The DataSpec of the cached items: model space (fed to the model as is), text of width D and length L."""
        m = self.meta
        return {
            "channels": int(m["channels"]),
            "image_size": int(m["height"]),
            "num_classes": 0,
            "space": "model",
            "num_frames": int(m["frames"]),
            "width": int(m["width"]),
            "fps": m.get("fps"),
            "text_dim": int(m["text_dim"]),
            "text_length": int(m["text_length"]),
        }

    def _read_null(self) -> tuple[torch.Tensor, torch.Tensor]:
        from safetensors.torch import load_file

        path = self.folder / NULL_FILE
        if not path.is_file():
            raise FileNotFoundError(f"data.path={self.cfg.path} has no {NULL_FILE}; rerun task=preprocess")
        try:
            tensors = load_file(path)
            text, mask = tensors["text"].float(), tensors["text_mask"].bool()
        except Exception as err:  # safetensors raises its own error type for damaged files
            raise ConfigError(f"data.path={self.cfg.path}: {path} is corrupt ({err}); rerun task=preprocess") from err
        expected = (1, self.meta["text_length"], self.meta["text_dim"])
        if tuple(text.shape) != expected or tuple(mask.shape) != expected[:2]:
            raise ConfigError(
                f"data.path={self.cfg.path}: {NULL_FILE} holds a {tuple(text.shape)} embedding, not {expected}; "
                "rerun task=preprocess"
            )
        return text, mask

    # -- items --------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self.meta["count"])

    def locate(self, index: int) -> tuple[int, int]:
        """(shard, row) of item `index`."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} is outside the {len(self)} cached items")
        shard = bisect.bisect_right(self.offsets, index) - 1
        return shard, index - self.offsets[shard]

    def _shard(self, shard: int):
        if self._open is not None and self._open[0] == shard:
            return self._open[1], self._open[2]
        from safetensors import safe_open

        tensors, captions_file, count = self.shards[shard]
        handle = safe_open(str(self.folder / tensors), framework="pt")
        captions = json.loads((self.folder / captions_file).read_text())["captions"]
        length, dim = self.meta["text_length"], self.meta["text_dim"]
        x_shape = [count, self.meta["channels"], self.meta["frames"], self.meta["height"], self.meta["width"]]
        expected = {"x": x_shape, "text": [count, length, dim], "text_mask": [count, length]}
        for key, shape in expected.items():
            found = handle.get_slice(key).get_shape()
            if list(found) != shape:
                raise ValueError(f"{key} has shape {list(found)}, expected {shape}")
        if len(captions) != count:
            raise ValueError(f"{captions_file} has {len(captions)} captions for {count} rows")
        self._open = (shard, handle, captions)
        return handle, captions

    def __getitem__(self, key):
        index = int(key[0] if isinstance(key, tuple) else key)
        shard, row = self.locate(index)
        try:
            handle, captions = self._shard(shard)
            x = handle.get_slice("x")[row : row + 1][0]
            text = handle.get_slice("text")[row : row + 1][0]
            mask = handle.get_slice("text_mask")[row : row + 1][0]
        except Exception as err:  # a damaged shard: safetensors, json and OS errors alike must not stop a run
            return BadSample(str(self.folder / self.shards[shard][0]), f"unreadable cache shard: {err}")
        return {"x": x.float(), "caption": captions[row], "text": text.float(), "text_mask": mask.bool()}

    def __getstate__(self) -> dict:
        # Loader workers reopen shards themselves; open file handles do not travel.
        return {**self.__dict__, "_open": None, "_evaluator": None, "_conditioner": None}

    # -- prompts and scoring ------------------------------------------------------------------------

    def _captions(self):
        """(shard, row, caption) of every item, in index order, reading the caption sidecars only."""
        for shard, (_, captions_file, _) in enumerate(self.shards):
            captions = json.loads((self.folder / captions_file).read_text())["captions"]
            for row, text in enumerate(captions):
                yield shard, row, text

    def default_prompts(self) -> list[str]:
        """The distinct captions of the cache in index order, the first 64: what sampling generates by default."""
        prompts: list[str] = []
        seen = set()
        for _, _, text in self._captions():
            if text not in seen:
                seen.add(text)
                prompts.append(text)
                if len(prompts) == MAX_DEFAULT_PROMPTS:
                    break
        return prompts

    def text_conditioner(self, device: torch.device | str = "cpu") -> CachedTextConditioner:
        """A conditioner that encodes the cached captions by lookup (no text encoder needed to sample them)."""
        if self._conditioner is None:
            self._conditioner = CachedTextConditioner(self, device)
        return self._conditioner

    @property
    def evaluator(self):
        """The moving-digits scorer for a pixel-space cache of data=moving_digits; None for any other cache."""
        source = self.meta.get("data") or {}
        vae = self.meta.get("vae") or {}
        if source.get("name") != "moving_digits" or vae.get("path"):
            return None
        if self._evaluator is None:
            from videosys.data.moving_digits import MovingDigitsEvaluator

            self._evaluator = MovingDigitsEvaluator(
                source.get("split_seed", 0), self.meta["height"], self.meta["frames"], source["directions"]
            )
        return self._evaluator


class CachedTextConditioner(TextConditioner):
    """Prompts -> the cached (embedding, mask) of the first item with that caption; `null` from null.safetensors.

    Follows the TextConditioner interface (encode / null / dim / max_length), so that prompts seen in the
    cache can be sampled without loading the text encoder that made it. Unknown prompts are a ConfigError.
    """

    def __init__(self, dataset: CachedDataset, device: torch.device | str = "cpu"):
        self.dataset = dataset
        self.device = torch.device(device)
        self.dim = int(dataset.meta["text_dim"])
        self.max_length = int(dataset.meta["text_length"])
        self._where: dict[str, tuple[int, int]] = {}
        for shard, row, text in dataset._captions():
            self._where.setdefault(text, (shard, row))

    def encode(self, prompts: list[str], device: torch.device | str | None = None):
        target = self.device if device is None else torch.device(device)
        texts, masks = [], []
        for prompt in prompts:
            if prompt not in self._where:
                known = list(self._where)[:5]
                raise ConfigError(
                    f"prompt {prompt!r} is not a caption of the cache at data.path={self.dataset.cfg.path} (e.g. "
                    f"{known}); sample cached captions, or set text_encoder to the encoder the cache was made with"
                )
            shard, row = self._where[prompt]
            item = self.dataset[self.dataset.offsets[shard] + row]
            if isinstance(item, BadSample):
                raise ConfigError(f"cannot read the cached embedding of {prompt!r}: {item.reason}")
            texts.append(item["text"])
            masks.append(item["text_mask"])
        return torch.stack(texts).to(target), torch.stack(masks).to(target)

    def null(self, batch: int, device: torch.device | str | None = None, length: int | None = None):
        if length is not None and length != self.max_length:
            raise ValueError(f"the cached empty prompt has {self.max_length} tokens, not {length}")
        target = self.device if device is None else torch.device(device)
        text, mask = self.dataset.null_text
        return text.expand(batch, -1, -1).clone().to(target), mask.expand(batch, -1).clone().to(target)
