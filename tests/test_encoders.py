"""Text encoders and video VAEs, checked by value against the transformers / diffusers models they wrap,
on tiny random models saved into temporary folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from videosys.encoders import (
    LabelConditioner,
    OpenSoraTemporalVAE,
    TemporalVAEConfig,
    TextEncoderConfig,
    VAEConfig,
    build_text_conditioner,
    build_video_codec,
    save_opensora_vae,
    split_opensora_state_dict,
    text_embedding_dim,
    video_latent_geometry,
)
from videosys.errors import ConfigError

WORDS = ["a", "cat", "dog", "runs", "jumps", "left", "right", "red", "blue", "big"]


def _word_tokenizer(special: list[str], template: str, **tokens):
    """A whitespace WordLevel tokenizer over WORDS, built locally with the tokenizers library."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate([*special, *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(s, vocab[s]) for s in special if s in template]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", **tokens), len(vocab)


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory) -> Path:
    from transformers import T5Config, T5EncoderModel

    tokenizer, vocab_size = _word_tokenizer(["<pad>", "</s>", "<unk>"], "$A </s>", pad_token="<pad>", eos_token="</s>")
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, pad_token_id=0, eos_token_id=1
    )
    path = tmp_path_factory.mktemp("t5")
    T5EncoderModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    from transformers import CLIPTextConfig, CLIPTextModel

    special = ["<|startoftext|>", "<|endoftext|>", "<unk>"]
    tokenizer, vocab_size = _word_tokenizer(
        special,
        "<|startoftext|> $A <|endoftext|>",
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=24,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    path = tmp_path_factory.mktemp("clip")
    CLIPTextModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _t5(path, **kw) -> TextEncoderConfig:
    return TextEncoderConfig(**{"name": "t5", "path": str(path), "max_length": 8, "dtype": "fp32", **kw})


def _reference_t5(path, prompts, max_length):
    from transformers import AutoTokenizer, T5EncoderModel

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = T5EncoderModel.from_pretrained(path).eval()
    tokens = tokenizer(prompts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
    return out, tokens.attention_mask.bool()


# ----------------------------------------------------------------------------------------------------
# Text encoders
# ----------------------------------------------------------------------------------------------------


def test_t5_encode_equals_the_model_on_the_same_tokens(t5_dir):
    cfg = _t5(t5_dir)
    cond = build_text_conditioner(cfg, "cpu")
    prompts = ["a red cat runs left", "dog", ""]
    emb, mask = cond.encode(prompts)
    ref, ref_mask = _reference_t5(t5_dir, prompts, 8)
    assert emb.shape == (3, 8, 32) and emb.dtype == torch.float32 and mask.dtype == torch.bool
    torch.testing.assert_close(emb, ref)
    assert torch.equal(mask, ref_mask)
    assert mask.sum(1).tolist() == [6, 2, 1]  # the words plus </s>
    assert cond.dim == text_embedding_dim(cfg) == 32


def test_t5_pads_and_truncates_to_max_length(t5_dir):
    cond = build_text_conditioner(_t5(t5_dir, max_length=4), "cpu")
    emb, mask = cond.encode(["a big red dog jumps right", "cat"])
    assert emb.shape == (2, 4, 32)
    assert mask.tolist() == [[True] * 4, [True, True, False, False]]
    ids, _ = cond.tokenize(["a big red dog jumps right"])
    assert ids[0, -1].item() == cond.tokenizer.eos_token_id  # truncation keeps the end-of-sequence token
    torch.testing.assert_close(emb, _reference_t5(t5_dir, ["a big red dog jumps right", "cat"], 4)[0])


def test_t5_null_is_the_empty_prompt(t5_dir):
    cond = build_text_conditioner(_t5(t5_dir), "cpu")
    emb, mask = cond.null(3)
    empty, empty_mask = cond.encode([""])
    assert emb.shape == (3, 8, 32)
    torch.testing.assert_close(emb, empty.expand(3, -1, -1))
    assert torch.equal(mask, empty_mask.expand(3, -1))
    assert mask[0].tolist() == [True] + [False] * 7
    with pytest.raises(ValueError, match="8 tokens"):
        cond.null(2, length=5)


def test_t5_loads_from_a_pipeline_root(t5_dir, tmp_path):
    root = tmp_path / "pipeline"
    (root / "text_encoder").mkdir(parents=True)
    (root / "tokenizer").mkdir()
    for f in t5_dir.iterdir():
        target = "text_encoder" if f.name in ("config.json", "model.safetensors") else "tokenizer"
        shutil.copy(f, root / target / f.name)
    (root / "model_index.json").write_text("{}")
    cfg = _t5(root)
    assert text_embedding_dim(cfg) == 32
    emb, mask = build_text_conditioner(cfg, "cpu").encode(["a cat"])
    ref, ref_mask = build_text_conditioner(_t5(t5_dir), "cpu").encode(["a cat"])
    torch.testing.assert_close(emb, ref)
    assert torch.equal(mask, ref_mask)


def test_t5_in_bf16_returns_float32(t5_dir):
    cond = build_text_conditioner(_t5(t5_dir, dtype="bf16"), "cpu")
    assert next(cond.model.parameters()).dtype == torch.bfloat16
    emb, _ = cond.encode(["a cat runs"])
    assert emb.dtype == torch.float32
    ref, _ = _reference_t5(t5_dir, ["a cat runs"], 8)
    torch.testing.assert_close(emb, ref, atol=0.1, rtol=0.1)


def test_clip_encode_equals_the_model_and_caps_max_length(clip_dir):
    from transformers import AutoTokenizer, CLIPTextModel

    cfg = TextEncoderConfig(name="clip", path=str(clip_dir), max_length=300, dtype="fp32")
    cond = build_text_conditioner(cfg, "cpu")
    assert cond.max_length == 16 and cond.dim == text_embedding_dim(cfg) == 24
    prompts = ["a blue dog jumps", ""]
    emb, mask = cond.encode(prompts)
    tokenizer = AutoTokenizer.from_pretrained(clip_dir)
    ids = tokenizer(prompts, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    with torch.no_grad():
        ref = CLIPTextModel.from_pretrained(clip_dir).eval()(input_ids=ids.input_ids).last_hidden_state
    assert emb.shape == (2, 16, 24)
    torch.testing.assert_close(emb, ref)
    assert mask.sum(1).tolist() == [6, 2]  # start + words + end
    null, null_mask = cond.null(2)
    torch.testing.assert_close(null, emb[1:].expand(2, -1, -1))
    assert torch.equal(null_mask, mask[1:].expand(2, -1))


DIGITS_VOCAB = tuple(str(i) for i in range(10)) + ("left", "right", "up", "down")


def test_label_conditioner_maps_words_to_fixed_vectors():
    cfg = TextEncoderConfig(name="none", max_length=2, embedding_dim=16, seed=3)
    cond = build_text_conditioner(cfg, "cpu", label_vocab=DIGITS_VOCAB)
    assert isinstance(cond, LabelConditioner) and text_embedding_dim(cfg) == cond.dim == 16
    assert cond.tokens("a 3 moving left") == [3, 10]
    assert cond.tokens("Digit 7 goes UP.") == [7, 12]
    emb, mask = cond.encode(["a 3 moving left", "9 down"])
    expected = torch.randn(len(DIGITS_VOCAB) + 1, 16, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(emb, expected[torch.tensor([[3, 10], [9, 13]])])
    assert mask.all()
    tok_emb, tok_mask = cond.encode_tokens(torch.tensor([[3, 10]]))
    torch.testing.assert_close(tok_emb, emb[:1])
    assert tok_mask.all() and tok_mask.shape == (1, 2)
    # The same seed gives the same table in a fresh conditioner; another seed another one.
    again = LabelConditioner(DIGITS_VOCAB, 16, seed=3, max_length=2)
    assert torch.equal(again.table, cond.table)
    assert not torch.allclose(LabelConditioner(DIGITS_VOCAB, 16, seed=4).table, cond.table)
    with pytest.raises(ValueError, match=r"\[0, 14\]"):
        cond.encode_tokens(torch.tensor([[15]]))


def test_label_conditioner_null_and_padding():
    cond = LabelConditioner(DIGITS_VOCAB, 8, seed=0, max_length=3)
    null, null_mask = cond.null(2)
    assert null.shape == (2, 3, 8) and null_mask.all()
    row = cond.table[len(DIGITS_VOCAB)]
    torch.testing.assert_close(null, row.expand(2, 3, 8))
    assert not any(torch.allclose(row, cond.table[i]) for i in range(len(DIGITS_VOCAB)))
    assert cond.null(4, length=5)[0].shape == (4, 5, 8)
    # A prompt with fewer words than max_length is padded with the null vector, masked out.
    emb, mask = cond.encode(["5"])
    assert mask.tolist() == [[True, False, False]]
    torch.testing.assert_close(emb[0, 1:], row.expand(2, 8))
    # Multi-word vocabulary entries match as a phrase, and longer prompts are cut.
    phrases = LabelConditioner(("golden retriever", "cat", "golden"), 4, max_length=2)
    assert phrases.tokens("a golden retriever and a cat and golden") == [0, 1, 2]
    assert phrases.encode(["golden retriever cat golden"])[1].tolist() == [[True, True]]


def test_label_conditioner_rejects_unknown_prompts():
    cond = LabelConditioner(DIGITS_VOCAB, 8)
    with pytest.raises(ConfigError, match=r"'a purple whale'.*'left'"):
        cond.encode(["3 left", "a purple whale"])


def test_text_encoder_errors(t5_dir, clip_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"text_encoder.name='bert'.*\['none', 't5', 'clip'\]"):
        build_text_conditioner(TextEncoderConfig(name="bert"), "cpu")
    with pytest.raises(ConfigError, match="text_encoder.path is not set"):
        build_text_conditioner(TextEncoderConfig(name="t5"), "cpu")
    with pytest.raises(ConfigError, match="text_encoder.path is not set"):
        text_embedding_dim(TextEncoderConfig(name="clip"))
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=rf"text_encoder.path={missing} does not exist.*save_pretrained"):
        build_text_conditioner(_t5(missing), "cpu")
    no_config = tmp_path / "tokenizer_only"
    no_config.mkdir()
    shutil.copy(t5_dir / "tokenizer.json", no_config)
    with pytest.raises(FileNotFoundError, match="no model config.json.*save_pretrained"):
        build_text_conditioner(_t5(no_config), "cpu")
    no_tokenizer = tmp_path / "model_only"
    no_tokenizer.mkdir()
    shutil.copy(t5_dir / "config.json", no_tokenizer)
    with pytest.raises(FileNotFoundError, match="no tokenizer files.*save_pretrained"):
        build_text_conditioner(_t5(no_tokenizer), "cpu")
    with pytest.raises(ConfigError, match="no label vocabulary.*text_encoder=t5"):
        build_text_conditioner(TextEncoderConfig(name="none"), "cpu")
    with pytest.raises(ConfigError, match="holds a 'clip_text_model' model"):
        build_text_conditioner(_t5(clip_dir), "cpu")
    with pytest.raises(ConfigError, match="text_encoder.dtype='fp8'"):
        build_text_conditioner(_t5(t5_dir, dtype="fp8"), "cpu")


# ----------------------------------------------------------------------------------------------------
# Video VAEs
# ----------------------------------------------------------------------------------------------------


def _tiny_kl():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    )


def _tiny_temporal(**kw) -> OpenSoraTemporalVAE:
    config = TemporalVAEConfig(filters=8, num_res_blocks=1, num_groups=4, **kw)
    return OpenSoraTemporalVAE(config).eval()


@pytest.fixture(scope="module")
def kl_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("kl")
    _tiny_kl().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def cog_dir(tmp_path_factory) -> Path:
    from diffusers import AutoencoderKLCogVideoX

    torch.manual_seed(0)
    vae = AutoencoderKLCogVideoX(
        down_block_types=("CogVideoXDownBlock3D",) * 3,
        up_block_types=("CogVideoXUpBlock3D",) * 3,
        block_out_channels=(8, 16, 16),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        # Tiles of 48 x 40 pixels (12 x 10 latents): sizes whose overlaps round to whole latents.
        sample_height=96,
        sample_width=80,
    )
    path = tmp_path_factory.mktemp("cogvideox")
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def opensora_dir(tmp_path_factory):
    torch.manual_seed(0)
    spatial, temporal = _tiny_kl().eval(), _tiny_temporal()
    path = save_opensora_vae(
        tmp_path_factory.mktemp("opensora"), spatial, temporal, scale=(2.0, 1.5, 1.0, 0.5), shift=0.25
    )
    return path, spatial, temporal


def test_kl_video_codec_is_the_image_vae_on_every_frame(kl_dir):
    from diffusers import AutoencoderKL

    codec = build_video_codec(VAEConfig(path=str(kl_dir), frame_chunk=3), "cpu")
    geometry = codec.geometry
    assert (codec.kind, geometry.channels, geometry.spatial_downsample, geometry.temporal_downsample) == ("kl", 4, 2, 1)
    assert video_latent_geometry(VAEConfig(path=str(kl_dir))) == geometry
    assert geometry.latent_frames(7) == geometry.pixel_frames(7) == 7
    torch.manual_seed(1)
    video = torch.rand(2, 3, 5, 16, 16) * 2 - 1
    latents = codec.encode(video, sample=False)
    assert latents.shape == (2, 4, 5, 8, 8) == (2, *geometry.latent_shape(5, 16, 16))
    vae = AutoencoderKL.from_pretrained(kl_dir).eval()
    sf = vae.config.scaling_factor
    with torch.no_grad():
        for t in range(5):
            torch.testing.assert_close(latents[:, :, t], vae.encode(video[:, :, t]).latent_dist.mode() * sf)
        decoded = codec.decode(latents)
        assert decoded.shape == video.shape and decoded.abs().max() <= 1
        for t in (0, 4):
            torch.testing.assert_close(decoded[:, :, t], vae.decode(latents[:, :, t] / sf).sample.clamp(-1, 1))
    whole = build_video_codec(VAEConfig(path=str(kl_dir), frame_chunk=100), "cpu")
    torch.testing.assert_close(whole.decode(latents), decoded)
    torch.testing.assert_close(whole.encode(video, sample=False), latents)
    # Sampling the posterior is reproducible with a generator.
    a = codec.encode(video, generator=torch.Generator().manual_seed(0))
    b = codec.encode(video, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and not torch.allclose(a, latents)


def test_cogvideox_codec_compresses_time_4x(cog_dir):
    from diffusers import AutoencoderKLCogVideoX

    codec = build_video_codec(VAEConfig(path=str(cog_dir)), "cpu")
    geometry = codec.geometry
    assert (codec.kind, geometry.channels, geometry.spatial_downsample, geometry.temporal_downsample) == (
        "cogvideox",
        4,
        4,
        4,
    )
    assert [geometry.latent_frames(1 + 4 * k) for k in range(4)] == [1, 2, 3, 4]
    assert [geometry.pixel_frames(1 + k) for k in range(4)] == [1, 5, 9, 13]
    torch.manual_seed(2)
    vae = AutoencoderKLCogVideoX.from_pretrained(cog_dir).eval()
    for frames in (5, 9):
        video = torch.rand(2, 3, frames, 16, 16) * 2 - 1
        latents = codec.encode(video, sample=False)
        assert latents.shape == (2, 4, 1 + (frames - 1) // 4, 4, 4)
        with torch.no_grad():
            expected = vae.encode(video).latent_dist.mode() * vae.config.scaling_factor
        torch.testing.assert_close(latents, expected)
        assert codec.decode(latents).shape == video.shape
    with pytest.raises(ValueError, match="1 \\+ 4k frames, got 6"):
        codec.encode(torch.zeros(1, 3, 6, 16, 16))
    with pytest.raises(ValueError, match="do not decode to 7 frames"):
        codec.decode(latents, num_frames=7)


def test_cogvideox_tiled_decode_is_close_to_untiled(cog_dir, monkeypatch):
    plain = build_video_codec(VAEConfig(path=str(cog_dir)), "cpu")
    tiled = build_video_codec(VAEConfig(path=str(cog_dir), tile=True), "cpu")
    calls = []
    original = tiled.vae.tiled_decode
    monkeypatch.setattr(tiled.vae, "tiled_decode", lambda *a, **k: calls.append(1) or original(*a, **k))
    torch.manual_seed(3)
    latents = torch.randn(1, 4, 2, 16, 16)  # 64 x 64 pixels: 2 x 2 tiles of 48 x 40
    reference = plain.decode(latents)
    result = tiled.decode(latents)
    assert calls and result.shape == reference.shape == (1, 3, 5, 64, 64)
    # Tiles see less context (and their own GroupNorm statistics), so they agree only approximately.
    assert (result - reference).abs().mean() < 0.2 * reference.abs().mean()


def test_opensora_temporal_vae_frame_counts_and_causality():
    torch.manual_seed(4)
    vae = _tiny_temporal()
    x = torch.randn(1, 4, 17, 4, 4)
    mean, logvar = vae.encode(x)
    assert mean.shape == logvar.shape == (1, 4, 5, 4, 4)
    assert vae.decode(mean, 17).shape == (1, 4, 17, 4, 4)
    assert vae.decode(mean).shape == (1, 4, 20, 4, 4)
    assert vae.encode(x[:, :, :9])[0].shape[2] == 3
    # Open-Sora's GroupNorm pools statistics over time, so later frames reach earlier latents a little;
    # with per-frame statistics the module is strictly causal.
    later = x.clone()
    later[:, :, 5:] += 1.0
    assert not torch.allclose(vae.encode(later)[0][:, :, 0], mean[:, :, 0])
    causal = _tiny_temporal(per_frame_norm=True)
    causal_mean = causal.encode(x)[0]
    changed = causal.encode(later)[0]
    # Latent frame k sees input frames <= 4k (after 3 frames of front padding): 0 and 1 stay put.
    torch.testing.assert_close(changed[:, :, :2], causal_mean[:, :, :2])
    assert not torch.allclose(changed[:, :, 2], causal_mean[:, :, 2])
    z = torch.randn(1, 4, 5, 4, 4)
    z_later = z.clone()
    z_later[:, :, 3:] += 1.0
    # Decoding is causal too: latent frame 3 first shows at output frame 4 * 3 - 3 = 9.
    torch.testing.assert_close(causal.decode(z_later, 17)[:, :, :9], causal.decode(z, 17)[:, :, :9])
    with pytest.raises(ConfigError, match="one entry per level"):
        TemporalVAEConfig(temporal_downsample=(True,))


def test_opensora_codec_frame_counts_and_chunk_independence(opensora_dir):
    path, spatial, temporal = opensora_dir
    codec = build_video_codec(VAEConfig(path=str(path)), "cpu")
    geometry = codec.geometry
    assert (codec.kind, geometry.channels, geometry.spatial_downsample, geometry.temporal_downsample) == (
        "opensora",
        4,
        2,
        4,
    )
    assert [geometry.latent_frames(n) for n in (1, 17, 20, 34, 35)] == [1, 5, 6, 10, 11]
    assert [geometry.pixel_frames(n) for n in (5, 6, 10)] == [17, 21, 34]
    torch.manual_seed(5)
    video = torch.rand(1, 3, 34, 8, 8) * 2 - 1
    latents = codec.encode(video, sample=False)
    assert latents.shape == (1, 4, 10, 4, 4)
    assert codec.encode(video[:, :, :17], sample=False).shape[2] == 5
    decoded = codec.decode(latents)
    assert decoded.shape == video.shape and decoded.abs().max() <= 1
    odd = codec.encode(video[:, :, :20], sample=False)
    assert odd.shape[2] == 6
    assert codec.decode(odd, num_frames=20).shape[2] == 20
    assert codec.decode(odd).shape[2] == 21
    with pytest.raises(ValueError, match="do not decode to 30 frames"):
        codec.decode(odd, num_frames=30)
    # Each 17-frame chunk is encoded on its own: a change in the second leaves the first's latents alone.
    changed = video.clone()
    changed[:, :, 20] = 0.0
    new = codec.encode(changed, sample=False)
    torch.testing.assert_close(new[:, :, :5], latents[:, :, :5])
    assert not torch.allclose(new[:, :, 5:], latents[:, :, 5:])


def test_opensora_codec_round_trips_the_saved_modules(opensora_dir):
    path, spatial, temporal = opensora_dir
    codec = build_video_codec(VAEConfig(path=str(path), frame_chunk=4), "cpu")
    for name, tensor in temporal.state_dict().items():
        assert torch.equal(codec.temporal.state_dict()[name], tensor), name
    assert json.loads((path / "config.json").read_text())["spatial_scaling_factor"] == 0.18215
    torch.manual_seed(6)
    video = torch.rand(2, 3, 17, 8, 8) * 2 - 1
    scale = torch.tensor([2.0, 1.5, 1.0, 0.5]).view(1, 4, 1, 1, 1)
    with torch.no_grad():
        frames = video.transpose(1, 2).reshape(34, 3, 8, 8)
        x = spatial.encode(frames).latent_dist.mode().view(2, 17, 4, 4, 4).transpose(1, 2) * 0.18215
        mean, _ = temporal.encode(x)
        torch.testing.assert_close(codec.encode(video, sample=False), (mean - 0.25) / scale)
        x_rec = temporal.decode(mean, 17) / 0.18215
        pixels = spatial.decode(x_rec.transpose(1, 2).reshape(34, 4, 4, 4)).sample
        expected = pixels.view(2, 17, 3, 8, 8).transpose(1, 2).clamp(-1, 1)
        torch.testing.assert_close(codec.decode((mean - 0.25) / scale), expected)
    # A fresh module saved and loaded gives the same outputs.
    loaded = OpenSoraTemporalVAE.from_pretrained(path / "temporal")
    torch.testing.assert_close(loaded.encode(x)[0], mean)


def test_opensora_checkpoint_keys_split_into_both_stages(opensora_dir):
    _, spatial, temporal = opensora_dir
    checkpoint = {f"spatial_vae.module.{k}": v for k, v in spatial.state_dict().items()}
    checkpoint.update({f"temporal_vae.{k}": v for k, v in temporal.state_dict().items()})
    checkpoint["scale"], checkpoint["shift"] = torch.ones(4), torch.zeros(4)
    spatial_sd, temporal_sd = split_opensora_state_dict(checkpoint)
    _tiny_kl().load_state_dict(spatial_sd, strict=True)
    _tiny_temporal().load_state_dict(temporal_sd, strict=True)


def test_video_vae_errors(kl_dir, opensora_dir, tmp_path):
    assert build_video_codec(VAEConfig(), "cpu") is None
    assert video_latent_geometry(VAEConfig()) is None
    with pytest.raises(ConfigError, match=r"vae.kind='magvit'.*\['auto', 'kl', 'opensora', 'cogvideox'\]"):
        build_video_codec(VAEConfig(path=str(kl_dir), kind="magvit"), "cpu")
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=rf"vae.path={missing} does not exist.*save_pretrained"):
        video_latent_geometry(VAEConfig(path=str(missing)))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=rf"vae.path={empty} has no .*config.json"):
        build_video_codec(VAEConfig(path=str(empty)), "cpu")
    with pytest.raises(FileNotFoundError, match="not an Open-Sora VAE folder.*save_opensora_vae"):
        build_video_codec(VAEConfig(path=str(kl_dir), kind="opensora"), "cpu")
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"_class_name": "AutoencoderTiny"}))
    with pytest.raises(ConfigError, match="'AutoencoderTiny'.*set vae.kind"):
        video_latent_geometry(VAEConfig(path=str(other)))
    with pytest.raises(ConfigError, match="vae.kind=cogvideox loads a AutoencoderKLCogVideoX"):
        video_latent_geometry(VAEConfig(path=str(kl_dir), kind="cogvideox"))
    with pytest.raises(ConfigError, match="vae.scaling_factor=0.5 is not used by vae.kind=opensora"):
        build_video_codec(VAEConfig(path=str(opensora_dir[0]), scaling_factor=0.5), "cpu")
    with pytest.raises(ConfigError, match="vae.frame_chunk=0"):
        build_video_codec(VAEConfig(path=str(kl_dir), frame_chunk=0), "cpu")
    # A diffusers pipeline root resolves to its vae/ folder.
    pipeline = tmp_path / "pipeline"
    shutil.copytree(kl_dir, pipeline / "vae")
    assert video_latent_geometry(VAEConfig(path=str(pipeline))).kind == "kl"
