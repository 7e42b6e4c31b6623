"""Open-Sora 1.2 STDiT3: published parameter names, its position encodings, conditioning and loading."""

from __future__ import annotations

import math

import pytest
import torch

from videosys.data import Batch
from videosys.diffusion import SampleDraws
from videosys.errors import ConfigError, MissingGeometryError
from videosys.models.opensora import OpenSora, OpenSoraConfig, load_weights
from videosys.tasks.common import make_conditioning


def tiny(**overrides) -> OpenSora:
    torch.manual_seed(0)
    cfg = dict(input_size=[4, 8, 8], in_channels=4, caption_channels=16, model_max_length=6)
    model = OpenSora(OpenSoraConfig(**{**cfg, **overrides})).eval()
    with torch.no_grad():  # no zero-initialised branches: every path must matter in the tests
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def inputs(batch: int = 2, frames: int = 4, size: int = 8):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, frames, size, size, generator=g)
    t = torch.tensor([100.0, 700.0][:batch])
    text = torch.randn(batch, 6, 16, generator=g)
    mask = torch.ones(batch, 6, dtype=torch.bool)
    mask[-1, 4:] = False
    return x, t, text, mask


def published_keys(depth: int) -> set[str]:
    """The tensor names of hpcai-tech/OpenSora-STDiT-v3's model.safetensors (STDiT3 with qk_norm)."""
    keys = {"rope.freqs", "y_embedder.y_embedding", "final_layer.scale_shift_table"}
    for name in (
        "x_embedder.proj",
        "t_block.1",
        "y_embedder.y_proj.fc1",
        "y_embedder.y_proj.fc2",
        "final_layer.linear",
    ):
        keys |= {f"{name}.weight", f"{name}.bias"}
    for embedder in ("t_embedder", "fps_embedder"):
        keys |= {f"{embedder}.mlp.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    for kind in ("spatial_blocks", "temporal_blocks"):
        for i in range(depth):
            block = f"{kind}.{i}"
            keys |= {f"{block}.scale_shift_table", f"{block}.attn.q_norm.weight", f"{block}.attn.k_norm.weight"}
            for layer in ("attn.qkv", "attn.proj", "cross_attn.q_linear", "cross_attn.kv_linear", "cross_attn.proj"):
                keys |= {f"{block}.{layer}.weight", f"{block}.{layer}.bias"}
            keys |= {f"{block}.mlp.fc{j}.{p}" for j in (1, 2) for p in ("weight", "bias")}
    return keys


def test_state_dict_uses_the_published_names_and_sizes():
    with torch.device("meta"):
        model = OpenSora(OpenSoraConfig(flavor="STDiT3-XL/2", input_size=[15, 60, 106], in_channels=4))
    sd = model.state_dict()
    assert set(sd) == published_keys(28)
    assert sd["y_embedder.y_embedding"].shape == (300, 4096)
    assert sd["rope.freqs"].shape == (36,)  # head size 72: one frequency per rotated pair
    assert sd["spatial_blocks.0.attn.q_norm.weight"].shape == (72,)
    assert sd["final_layer.linear.weight"].shape == (1 * 2 * 2 * 8, 1152)  # pred_sigma: 2 x 4 channels
    assert sum(p.numel() for p in model.parameters()) == 1_207_643_936


def test_meta_build_then_init_matches_a_direct_build():
    direct = tiny()
    with torch.device("meta"):
        meta = OpenSora(direct.config)
    meta.to_empty(device="cpu")
    meta.init_weights()
    assert {k: v.shape for k, v in meta.state_dict().items()} == {k: v.shape for k, v in direct.state_dict().items()}
    torch.testing.assert_close(meta.rope.freqs, direct.rope.freqs)
    assert torch.isfinite(meta(*inputs())).all()


def test_temporal_rotary_matches_complex_rotation_of_interleaved_pairs():
    model = tiny()
    head_dim = model.config.hidden_size // model.config.num_heads
    q = torch.randn(3, 2, 5, head_dim)
    rotated = model.rope.rotary(5)(q)
    # Independent reference: pairs (2i, 2i+1) as complex numbers times exp(i * pos * theta^(-2i/d)).
    freqs = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.arange(5).float()[:, None] * freqs[None]
    expected = torch.view_as_real(
        torch.view_as_complex(q.unflatten(-1, (-1, 2))) * torch.polar(torch.ones_like(angles), angles)
    )
    torch.testing.assert_close(rotated, expected.flatten(-2), rtol=1e-5, atol=1e-5)


def test_position_grid_scales_with_resolution_and_aspect_ratio():
    model = tiny(hidden_size=64)
    # Reference formula: row i sits at i / scale * base / H with scale = sqrt(h*w) / 512, base = round(sqrt(H*W)).
    grid_h, grid_w, height, width = 4, 6, 240.0, 426.0
    table = model.position_embedding(grid_h, grid_w, height, width)
    scale, base = math.sqrt(height * width) / 512, round(math.sqrt(grid_h * grid_w))
    quarter = 64 // 4
    freqs = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    for row, col in [(0, 0), (1, 2), (3, 5)]:
        r, c = row / scale * base / grid_h, col / scale * base / grid_w
        expected = torch.cat([torch.sin(c * freqs), torch.cos(c * freqs), torch.sin(r * freqs), torch.cos(r * freqs)])
        torch.testing.assert_close(table[row * grid_w + col].double(), expected, rtol=1e-5, atol=1e-5)
    # A different resolution changes the table, so the model is conditioned on it.
    assert not torch.allclose(table, model.position_embedding(grid_h, grid_w, 480.0, 852.0))


def test_fps_and_resolution_condition_the_output():
    model = tiny()
    x, t, text, mask = inputs()
    base = model(x, t, text, mask, fps=24.0)
    assert not torch.allclose(base, model(x, t, text, mask, fps=8.0), atol=1e-4)
    assert not torch.allclose(base, model(x, t, text, mask, fps=24.0, height=128, width=256), atol=1e-4)
    torch.testing.assert_close(base, model(x, t, text, mask))  # defaults: fps 24, latent size x 8


def test_masked_text_tokens_are_ignored():
    model = tiny()
    x, t, text, mask = inputs()
    changed = text.clone()
    changed[-1, 4:] = torch.randn(2, 16)  # only masked positions of the last sample
    torch.testing.assert_close(model(x, t, text, mask), model(x, t, changed, mask))
    assert not torch.allclose(model(x, t, text, None), model(x, t, changed, None))


def test_temporal_blocks_mix_frames_and_spatial_blocks_do_not():
    model = tiny()
    x, t, text, mask = inputs()
    moved = x.clone()
    moved[:, :, 0] += 1.0
    delta = (model(moved, t, text, mask) - model(x, t, text, mask)).abs()
    assert delta[:, :, -1].max() > 1e-4  # frame 0 reaches the last frame through temporal attention
    for block in model.temporal_blocks:  # without temporal blocks frames are independent
        block.forward = lambda h, *args, **kwargs: h
    delta = (model(moved, t, text, mask) - model(x, t, text, mask)).abs()
    assert delta[:, :, 1:].max() == 0


def test_odd_sizes_are_padded_and_cropped_back():
    model = tiny()
    x = torch.randn(1, 4, 3, 7, 9)
    out = model(x, torch.tensor([5.0]), torch.randn(1, 6, 16))
    assert out.shape == (1, 8, 3, 7, 9)


def test_caption_dropout_swaps_in_the_null_caption():
    model = tiny(class_dropout_prob=1.0)
    x, t, text, mask = inputs()
    conditioning = make_conditioning(model, None, None, None, 0.0)
    batch = Batch(x, None, [], tensors={"text": text, "text_mask": mask})
    dropped = conditioning.training_inputs(batch, torch.device("cpu"), SampleDraws([1, 2], "cpu"))
    torch.testing.assert_close(dropped["text"], model.null_text(2))
    assert torch.equal(dropped["text_mask"], mask)  # the conditional mask, as published


def test_load_weights_round_trip_and_errors(tmp_path):
    from safetensors.torch import save_file

    source = tiny()
    sd = {k: v.contiguous() for k, v in source.state_dict().items()}
    del sd["rope.freqs"]  # some exports omit the fixed rotary frequencies
    save_file(sd, str(tmp_path / "model.safetensors"))
    target = OpenSora(source.config).eval()
    load_weights(target, str(tmp_path))  # a folder holding model.safetensors
    x, t, text, mask = inputs()
    torch.testing.assert_close(target(x, t, text, mask), source(x, t, text, mask))
    with pytest.raises(FileNotFoundError, match="model.weights="):
        load_weights(target, str(tmp_path / "missing.safetensors"))
    bigger = OpenSora(OpenSoraConfig(**{**vars(source.config), "hidden_size": 128}))
    with pytest.raises(ConfigError, match="does not fit"):
        load_weights(bigger, str(tmp_path / "model.safetensors"))


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="model.flavor='XL'"):
        OpenSoraConfig(flavor="XL").resolved()
    with pytest.raises(MissingGeometryError, match="model.input_size"):
        OpenSoraConfig(in_channels=4, caption_channels=8, model_max_length=4).resolved()
    with pytest.raises(ConfigError, match="model.hidden_size=66"):
        OpenSoraConfig(
            input_size=[1, 4, 4], in_channels=4, caption_channels=8, model_max_length=4, hidden_size=66
        ).resolved()


def test_training_step_reaches_every_parameter():
    model = tiny()
    model.train()
    x, t, text, mask = inputs()
    model(x, t, text, mask).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
