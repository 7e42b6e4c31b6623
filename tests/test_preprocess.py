"""task=preprocess writes a cache of latents and text embeddings; data=cached trains from it."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import run_inprocess, save_tiny_vae
from videosys.data import BadSample, CachedDataConfig, CachedDataset, build_dataset
from videosys.data.cached import CACHE_VERSION, read_meta
from videosys.data.moving_digits import MovingDigitsDataConfig, MovingDigitsDataset, vocab
from videosys.encoders import LabelConditioner, VAEConfig, VideoCodec
from videosys.errors import ConfigError
from videosys.tasks import checkpoint as ckpt_io

PIXELS = ["task=preprocess", "data=moving_digits", "task.max_items=40", "task.shard_size=16", "task.batch_size=6"]
TRAIN = ["model=latte", "data=cached", "task.steps=2", "task.batch_size=4", "task.sample_at_end=false"]


@pytest.fixture(scope="module")
def pixel_cache(tmp_path_factory) -> tuple[dict, Path]:
    """40 moving-digits clips in pixel space with label-token text (text_encoder=none), in shards of 16."""
    run_dir = tmp_path_factory.mktemp("preprocess")
    metrics = run_inprocess(PIXELS, run_dir)
    return metrics, Path(metrics["output"])


@pytest.fixture(scope="module")
def moving() -> MovingDigitsDataset:
    return MovingDigitsDataset(MovingDigitsDataConfig())


@pytest.fixture
def grey_vae(tmp_path: Path) -> Path:
    """A random AutoencoderKL for one-channel frames."""
    return save_tiny_vae(tmp_path / "grey_vae", channels=1)


def test_pixel_cache_holds_the_clips_and_label_embeddings(pixel_cache, moving):
    metrics, cache = pixel_cache
    assert {k: metrics[k] for k in ("items", "skipped", "shards")} == {"items": 40, "skipped": 0, "shards": 3}
    assert json.loads((cache.parent / "metrics.json").read_text())["items"] == 40
    assert cache == cache.parent / "cache"  # task.output=null: inside the run directory
    meta = read_meta(cache)
    assert meta["version"] == CACHE_VERSION and meta["count"] == 40 and meta["skipped"] == 0
    assert [s["count"] for s in meta["shards"]] == [16, 16, 8]
    assert (meta["channels"], meta["frames"], meta["height"], meta["width"]) == (1, 8, 16, 16)
    assert (meta["text_length"], meta["text_dim"], meta["fps"], meta["space"]) == (2, 64, 8.0, "pixel")
    assert meta["data"]["name"] == "moving_digits" and meta["vae"]["path"] is None
    assert meta["text_encoder"]["name"] == "none"
    assert sorted(p.name for p in cache.iterdir()) == [
        "meta.json",
        "null.safetensors",
        *(f"shard_0000{i}.{ext}" for i in range(3) for ext in ("json", "safetensors")),
    ]  # no temporary files left behind
    with safe_open(str(cache / "shard_00000.safetensors"), framework="pt") as shard:
        assert shard.get_tensor("x").dtype == torch.float32
        assert shard.get_tensor("text_mask").dtype == torch.bool
        assert list(shard.get_slice("text").get_shape()) == [16, 2, 64]

    # Every cached item equals the dataset's clip under key (index, 0), and its label tokens' embedding.
    conditioner = LabelConditioner(vocab(), embedding_dim=64, seed=0, max_length=2)
    dataset = CachedDataset(CachedDataConfig(path=str(cache)))
    assert len(dataset) == 40
    for index in range(40):
        item, source = dataset[(index, 123)], moving[(index, 0)]
        assert torch.equal(item["x"], source["x"])
        assert item["caption"] == source["caption"]
        text, mask = conditioner.encode_tokens(source["label_tokens"][None])
        assert torch.equal(item["text"], text[0]) and torch.equal(item["text_mask"], mask[0])
        assert item["text"].dtype == torch.float32 and item["text_mask"].dtype == torch.bool
    null_text, null_mask = conditioner.null(1, length=2)
    assert torch.equal(dataset.null_text[0], null_text) and torch.equal(dataset.null_text[1], null_mask)
    captions = [moving[(i, 0)]["caption"] for i in range(40)]
    assert dataset.default_prompts() == list(dict.fromkeys(captions))
    assert json.loads((cache / "shard_00001.json").read_text())["indices"] == list(range(16, 32))

    _, spec = build_dataset(CachedDataConfig(path=str(cache)))
    assert (spec.channels, spec.image_size, spec.width, spec.num_frames, spec.space) == (1, 16, 16, 8, "model")
    assert (spec.num_classes, spec.fps, spec.text_dim, spec.text_length) == (0, 8.0, 64, 2)


def test_cached_text_conditioner_looks_captions_up(pixel_cache):
    dataset = CachedDataset(CachedDataConfig(path=str(pixel_cache[1])))
    conditioner = dataset.text_conditioner()
    assert (conditioner.dim, conditioner.max_length) == (64, 2)
    text, mask = conditioner.encode([dataset[5]["caption"], dataset[0]["caption"]])
    assert torch.equal(text[1], dataset[0]["text"]) and torch.equal(mask[0], dataset[5]["text_mask"])
    null_text, null_mask = conditioner.null(3)
    assert null_text.shape == (3, 2, 64) and torch.equal(null_text[2:], dataset.null_text[0])
    with pytest.raises(ConfigError, match="not a caption of the cache"):
        conditioner.encode(["a purple elephant"])


def test_latent_cache_holds_the_vae_posterior_mean(tmp_path: Path, grey_vae, moving):
    overrides = ["task=preprocess", "data=moving_digits", "task.max_items=6", "task.shard_size=4"]
    metrics = run_inprocess([*overrides, "task.batch_size=4", f"vae.path={grey_vae}"], tmp_path / "run")
    assert (metrics["items"], metrics["shards"]) == (6, 2)
    cache = Path(metrics["output"])
    meta = read_meta(cache)
    assert (meta["channels"], meta["frames"], meta["height"], meta["width"]) == (4, 8, 8, 8)
    assert (meta["space"], meta["latents"], meta["vae"]["path"]) == ("latent", "posterior_mean", str(grey_vae))

    codec = VideoCodec(VAEConfig(path=str(grey_vae)), "cpu")
    dataset = CachedDataset(CachedDataConfig(path=str(cache)))
    assert dataset.evaluator is None  # the moving-digits scorer reads pixels, not latents
    for index in range(6):
        expected = codec.encode(moving[(index, 0)]["x"][None], sample=False)[0]
        torch.testing.assert_close(dataset[index]["x"], expected, atol=1e-5, rtol=1e-5)

    # Training on the latents takes its geometry from the cache.
    train_dir = tmp_path / "train"
    out = run_inprocess([*TRAIN, f"data.path={cache}", "task.steps=1", "task.batch_size=2"], train_dir)
    model_cfg = ckpt_io.read_meta(Path(out["checkpoint"]))["model_config"]
    assert (model_cfg["in_channels"], model_cfg["input_size"]) == (4, [8, 8, 8])


def test_bf16_storage_loads_as_float32(tmp_path: Path, moving):
    overrides = ["task=preprocess", "data=moving_digits", "task.max_items=3", "task.dtype=bf16"]
    cache = Path(run_inprocess(overrides, tmp_path)["output"])
    assert load_file(cache / "shard_00000.safetensors")["x"].dtype == torch.bfloat16
    item = CachedDataset(CachedDataConfig(path=str(cache)))[2]
    assert item["x"].dtype == torch.float32
    assert torch.equal(item["x"], moving[(2, 0)]["x"].bfloat16().float())


def test_training_from_the_cache(tmp_path: Path, pixel_cache):
    metrics = run_inprocess([*TRAIN, f"data.path={pixel_cache[1]}", "task.log_every=1"], tmp_path)
    assert metrics["steps"] == 2 and metrics["skipped_samples"] == 0
    assert math.isfinite(metrics["final_loss"])
    model_cfg = ckpt_io.read_meta(Path(metrics["checkpoint"]))["model_config"]
    assert (model_cfg["in_channels"], model_cfg["input_size"], model_cfg["caption_channels"]) == (1, [8, 16, 16], 64)


def test_unreadable_items_are_skipped_and_counted(tmp_path: Path, monkeypatch, moving):
    read = MovingDigitsDataset.__getitem__

    def flaky(self, key):
        return BadSample(f"clip-{key[0]}", "broken on purpose") if key[0] in (1, 4) else read(self, key)

    monkeypatch.setattr(MovingDigitsDataset, "__getitem__", flaky)
    overrides = ["task=preprocess", "data=moving_digits", "task.max_items=6", "task.batch_size=4"]
    metrics = run_inprocess(overrides, tmp_path)
    assert (metrics["items"], metrics["skipped"]) == (4, 2)
    cache = Path(metrics["output"])
    assert read_meta(cache)["skipped"] == 2
    assert json.loads((cache / "shard_00000.json").read_text())["indices"] == [0, 2, 3, 5]
    monkeypatch.undo()
    assert torch.equal(CachedDataset(CachedDataConfig(path=str(cache)))[3]["x"], moving[(5, 0)]["x"])


def test_a_crash_leaves_no_meta_and_a_rerun_replaces_the_unfinished_cache(tmp_path: Path, monkeypatch):
    preprocess_module = sys.modules["videosys.tasks.preprocess"]
    write = preprocess_module._write_tensors
    calls = []

    def crash_on_second_shard(path, tensors):
        calls.append(path.name)
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        write(path, tensors)

    monkeypatch.setattr(preprocess_module, "_write_tensors", crash_on_second_shard)
    output = tmp_path / "cache"
    overrides = ["task=preprocess", "data=moving_digits", "task.max_items=8", "task.shard_size=4"]
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_inprocess([*overrides, f"task.output={output}"], tmp_path / "run1")
    assert (output / "shard_00000.safetensors").is_file() and not (output / "meta.json").exists()
    with pytest.raises(FileNotFoundError, match="has no meta.json"):
        CachedDataset(CachedDataConfig(path=str(output)))

    monkeypatch.undo()
    metrics = run_inprocess([*overrides, f"task.output={output}"], tmp_path / "run2")
    assert (metrics["items"], metrics["shards"]) == (8, 2)
    assert len(CachedDataset(CachedDataConfig(path=str(output)))) == 8


def test_output_folders_that_are_not_fresh_are_refused(tmp_path: Path, pixel_cache):
    overrides = ["task=preprocess", "data=moving_digits", "task.max_items=2"]
    with pytest.raises(ConfigError, match=r"task.output=.*already holds a finished cache.*new folder"):
        run_inprocess([*overrides, f"task.output={pixel_cache[1]}"], tmp_path / "a")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"task.output=.*busy is not empty.*notes.txt"):
        run_inprocess([*overrides, f"task.output={busy}"], tmp_path / "b")
    assert (busy / "notes.txt").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_inprocess([*overrides, f"task.output={empty}"], tmp_path / "c")["items"] == 2


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (["data=cached"], ConfigError, "data.path is not set"),
        (["data=digits"], ConfigError, "data=digits gives images"),
        (["task.shard_size=0"], ConfigError, "task.shard_size=0"),
        (["task.dtype=fp16"], ConfigError, "task.dtype='fp16'"),
    ],
)
def test_bad_preprocess_configs_name_the_key(tmp_path: Path, overrides, error, message):
    with pytest.raises(error, match=message):
        run_inprocess(["task=preprocess", "data=moving_digits", *overrides], tmp_path)


def test_missing_and_corrupt_caches_are_named(tmp_path: Path, pixel_cache):
    with pytest.raises(ConfigError, match="data.path is not set"):
        run_inprocess(["model=latte", "data=cached"], tmp_path / "run")
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=f"data.path={missing} does not exist.*task=preprocess"):
        run_inprocess(["model=latte", "data=cached", f"data.path={missing}"], tmp_path / "run")

    cache = tmp_path / "copy"
    shutil.copytree(pixel_cache[1], cache)
    meta_text = (cache / "meta.json").read_text()
    (cache / "meta.json").write_text(meta_text[:40])
    with pytest.raises(ConfigError, match="meta.json is corrupt"):
        CachedDataset(CachedDataConfig(path=str(cache)))
    (cache / "meta.json").write_text(json.dumps({**json.loads(meta_text), "version": 99}))
    with pytest.raises(ConfigError, match="format version 99.*rerun task=preprocess"):
        CachedDataset(CachedDataConfig(path=str(cache)))
    (cache / "meta.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(ConfigError, match="not a VideoSys cache"):
        CachedDataset(CachedDataConfig(path=str(cache)))

    # A damaged shard gives BadSamples (skipped and counted by training), the other shards still read.
    (cache / "meta.json").write_text(meta_text)
    (cache / "shard_00001.safetensors").write_bytes(b"\x00" * 64)
    dataset = CachedDataset(CachedDataConfig(path=str(cache)))
    assert isinstance(dataset[16], BadSample) and "shard_00001" in dataset[16].path
    assert not isinstance(dataset[15], BadSample) and not isinstance(dataset[32], BadSample)
    (cache / "shard_00002.json").unlink()
    with pytest.raises(FileNotFoundError, match="shard_00002.json"):
        CachedDataset(CachedDataConfig(path=str(cache)))
