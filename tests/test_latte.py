"""Latte model: parity with diffusers, the published size, initialisation, config errors, gradients."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from diffusers import LatteTransformer3DModel
from diffusers.models.embeddings import get_2d_sincos_pos_embed
from safetensors.torch import save_file

from videosys.distributed import DistContext, ParallelConfig
from videosys.errors import ConfigError, MissingGeometryError
from videosys.models.latte import LATTE_FLAVORS, Latte, LatteConfig, load_weights, spatial_pos_table
from videosys.ops import KernelsConfig
from videosys.parallelize import parallelize
from videosys.precision import PrecisionConfig

CPU = DistContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))

# diffusers' config of maxin-cn/Latte-1 (the published T2V model), less the defaults.
LATTE_1 = dict(
    sample_size=64,
    num_layers=28,
    patch_size=2,
    attention_head_dim=72,
    num_attention_heads=16,
    caption_channels=4096,
    in_channels=4,
    cross_attention_dim=1152,
    out_channels=8,
    attention_bias=True,
    activation_fn="gelu-approximate",
    num_embeds_ada_norm=1000,
    norm_type="ada_norm_single",
    norm_elementwise_affine=False,
    norm_eps=1e-6,
    video_length=16,
)
# The same model at the `debug` flavor's size: 4 frames of 8x8 latents.
TINY = dict(LATTE_1, sample_size=8, num_layers=2, attention_head_dim=16, num_attention_heads=4)
TINY.update(caption_channels=32, cross_attention_dim=64, video_length=4)


@pytest.fixture(scope="module")
def diffusers_latte(tmp_path_factory):
    torch.manual_seed(0)
    model = LatteTransformer3DModel(**TINY).eval()
    with torch.no_grad():
        # Random weights everywhere, zero-initialised layers and modulation tables included.
        for p in model.parameters():
            p.normal_(0, 0.1)
    folder = tmp_path_factory.mktemp("latte") / "latte-diffusers"
    model.save_pretrained(folder)
    return model, folder


def inputs(frames=4, height=8, width=8, empty_caption=False):
    torch.manual_seed(1)
    x = torch.randn(2, 4, frames, height, width)
    t = torch.tensor([3.0, 951.5])
    text = torch.randn(2, 6, 32)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    if empty_caption:
        mask[1] = False
    return x, t, text, mask


def diffusers_mask(mask: torch.Tensor, frames: int) -> torch.Tensor:
    """The only text mask LatteTransformer3DModel accepts with several frames: a PixArt-style additive
    bias already repeated per frame, (B * T, 1, L). (Its documented (B, L) mask reaches the per-frame
    attention unexpanded and fails to reshape.)

    A caption with no valid token gets bias 0 rather than -10000 everywhere: the same softmax, without
    the fp32 rounding of scores near -10000 (which alone moves diffusers' output by ~2e-5)."""
    bias = (1.0 - mask.float()) * -10000.0
    bias[~mask.any(dim=1)] = 0.0
    return bias.repeat_interleave(frames, dim=0)[:, None, :]


def load_tiny(folder, **overrides) -> Latte:
    cfg = LatteConfig(flavor="debug", weights=str(folder), **overrides).resolved()
    model = Latte(cfg).eval()
    load_weights(model, str(folder))
    return model


@pytest.mark.parametrize(
    ("frames", "size", "temporal", "empty_caption"),
    [
        pytest.param(4, (8, 8), True, False, id="video"),
        pytest.param(1, (8, 8), True, False, id="one-frame"),
        pytest.param(4, (8, 8), False, False, id="temporal-off"),
        pytest.param(4, (8, 12), True, False, id="other-resolution"),
        pytest.param(4, (8, 8), True, True, id="all-padding-caption"),
    ],
)
def test_matches_diffusers_latte(diffusers_latte, frames, size, temporal, empty_caption):
    reference, folder = diffusers_latte
    ours = load_tiny(folder, input_size=[4, *size])
    assert (ours.in_channels, ours.out_channels, ours.learn_sigma) == (4, 8, True)
    assert ours.config.norm_eps == 1e-6 and ours.config.num_frames_embed == 4 and ours.config.sample_size == 8
    x, t, text, mask = inputs(frames, *size, empty_caption=empty_caption)
    with torch.no_grad():
        expected = reference(
            x, t, text, encoder_attention_mask=diffusers_mask(mask, frames), enable_temporal_attentions=temporal
        ).sample
        actual = ours(x, t, text, mask, enable_temporal_attentions=temporal)
    assert actual.shape == expected.shape == (2, 8, frames, *size)
    rel = (actual - expected).norm() / expected.norm()
    assert rel < 1e-5, f"relative error {rel:.2e}"


@pytest.mark.parametrize(
    ("sample_size", "grid"),
    [(64, (32, 32)), (64, (16, 24)), (128, (64, 64)), (128, (32, 48)), (256, (64, 64))],
)
def test_spatial_table_follows_diffusers_interpolation_rules(sample_size, grid):
    # LatteTransformer3DModel: base size sample_size // patch, interpolation scale max(sample_size // 64, 1).
    expected = get_2d_sincos_pos_embed(
        96, grid, base_size=sample_size // 2, interpolation_scale=max(sample_size // 64, 1), output_type="pt"
    )
    torch.testing.assert_close(spatial_pos_table(96, *grid, sample_size, 2), expected, rtol=0, atol=1e-5)


def test_geometry_comes_from_the_diffusers_folder(diffusers_latte):
    _, folder = diffusers_latte
    cfg = LatteConfig(weights=str(folder)).resolved()
    assert cfg.input_size == [4, 8, 8] and cfg.in_channels == 4 and cfg.caption_channels == 32


def test_a_pipeline_folder_finds_its_transformer(diffusers_latte, tmp_path):
    reference, _ = diffusers_latte
    reference.save_pretrained(tmp_path / "pipeline" / "transformer")
    model = load_tiny(tmp_path / "pipeline")
    assert torch.equal(model.y_embedder.fc1.weight, reference.caption_projection.linear_1.weight)


def tiny_model(**overrides) -> Latte:
    torch.manual_seed(0)
    return Latte(LatteConfig(flavor="debug", input_size=[4, 8, 8], in_channels=4, **overrides))


def test_padded_text_tokens_are_ignored(diffusers_latte):
    model = load_tiny(diffusers_latte[1])
    x, t, text, mask = inputs()
    other = torch.where(mask[..., None], text, torch.randn_like(text))
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, other, mask), model(x, t, text, mask), rtol=0, atol=1e-6)
        assert not torch.allclose(model(x, t, other), model(x, t, text))


def test_shorter_videos_use_the_start_of_the_temporal_table(diffusers_latte):
    short = load_tiny(diffusers_latte[1])
    long = Latte(dataclasses.replace(short.config, num_frames_embed=8, weights=None)).eval()
    long.load_state_dict(short.state_dict())
    x, t, text, mask = inputs(frames=4)
    with torch.no_grad():
        torch.testing.assert_close(long(x, t, text, mask), short(x, t, text, mask), rtol=0, atol=0)
    with pytest.raises(ValueError, match="temporal position table has 4 frames, got 5"):
        short(torch.randn(2, 4, 5, 8, 8), t, text, mask)


def test_init_zeroes_the_output_and_meta_build_matches_a_normal_build():
    eager = tiny_model()
    x, t, text, mask = inputs()
    with torch.no_grad():
        assert torch.count_nonzero(eager(x, t, text, mask)) == 0  # zero-initialised output layer
    with torch.device("meta"):
        lazy = Latte(eager.config)
    assert all(p.is_meta for p in lazy.parameters())
    lazy.to_empty(device="cpu")
    with torch.no_grad():
        for tensor in (*lazy.parameters(), *lazy.buffers()):
            tensor.fill_(float("nan"))
    torch.manual_seed(0)
    lazy.init_weights()
    torch.manual_seed(0)
    eager.init_weights()
    eager_tensors = {**dict(eager.named_parameters()), **dict(eager.named_buffers())}
    lazy_tensors = {**dict(lazy.named_parameters()), **dict(lazy.named_buffers())}
    assert list(lazy_tensors) == list(eager_tensors)
    for name, tensor in lazy_tensors.items():
        assert tensor.shape == eager_tensors[name].shape, name
        assert torch.equal(tensor, eager_tensors[name]), name
    with torch.no_grad():
        for p in lazy.parameters():  # off the zero init, so the output exercises every layer
            p.add_(0.05 * torch.randn_like(p))
        out = lazy(x, t, text, mask)
    assert out.shape == (2, 8, 4, 8, 8) and torch.isfinite(out).all() and out.abs().sum() > 0


def test_xl2_matches_the_published_latte_1_size():
    with torch.device("meta"):
        reference = LatteTransformer3DModel(**LATTE_1)
        ours = Latte(LatteConfig(flavor="XL/2", input_size=[16, 64, 64], in_channels=4))
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in reference.parameters())
    assert round(count / 1e6) == 1057
    assert (ours.config.depth, ours.config.hidden_size, ours.config.num_heads) == (28, 1152, 16)
    assert len(ours.spatial_blocks) == len(ours.temporal_blocks) == 28
    assert (ours.config.caption_channels, ours.config.num_frames_embed, ours.config.sample_size) == (4096, 16, 64)


def test_published_folder_resolves_to_the_xl2_flavor(tmp_path):
    folder = tmp_path / "latte-1"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "LatteTransformer3DModel", **LATTE_1}))
    cfg = LatteConfig(flavor="XL/2", weights=str(folder)).resolved()
    assert cfg.input_size == [16, 64, 64] and cfg.learn_sigma and cfg.norm_eps == 1e-6


def test_weights_that_disagree_with_the_config_are_refused(diffusers_latte):
    _, folder = diffusers_latte
    with pytest.raises(ConfigError, match="caption_channels=32, but this run has caption_channels=4096"):
        LatteConfig(weights=str(folder), caption_channels=4096).resolved()
    with pytest.raises(ConfigError, match="depth=2.*depth=28.*model.flavor=XL/2"):
        LatteConfig(flavor="XL/2", weights=str(folder)).resolved()
    with pytest.raises(ConfigError, match="in_channels=4, but this run has in_channels=3.*set model.in_channels=4"):
        LatteConfig(weights=str(folder), in_channels=3).resolved()


def test_unsupported_diffusers_variants_are_named(tmp_path):
    folder = tmp_path / "latte-layernorm"
    folder.mkdir()
    config = {"_class_name": "LatteTransformer3DModel", **TINY, "norm_type": "layer_norm"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="norm_type='layer_norm'"):
        LatteConfig(weights=str(folder)).resolved()


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        (dict(in_channels=4), MissingGeometryError, "model.input_size"),
        (dict(input_size=[4, 8, 8]), MissingGeometryError, "model.in_channels"),
        (dict(input_size=[8, 8], in_channels=4), ConfigError, r"model.input_size=\[8, 8\]"),
        (dict(input_size=[4, 9, 8], in_channels=4), ConfigError, r"model.input_size=\[4, 9, 8\].*patch_size=2"),
        (dict(input_size=[4, 8, 8], in_channels=4, hidden_size=66), ConfigError, "model.hidden_size=66"),
        (dict(input_size=[8, 8, 8], in_channels=4, num_frames_embed=4), ConfigError, "model.num_frames_embed=4"),
        (dict(flavor="XXL/2"), ConfigError, "model.flavor='XXL/2'"),
    ],
)
def test_config_errors_name_the_key(overrides, error, message):
    with pytest.raises(error, match=message):
        LatteConfig(**overrides).resolved()


def test_a_training_step_reaches_every_parameter():
    model = tiny_model().train()
    with torch.no_grad():  # off the zero init (output layer, cross-attention outputs)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, t, text, mask = inputs()
    noise = torch.randn(2, 8, 4, 8, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = (model(x, t, text, mask) - noise).square().mean()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    opt.step()
    with torch.no_grad():
        assert (model(x, t, text, mask) - noise).square().mean() < loss


def test_activation_checkpointing_wraps_both_block_lists_and_keeps_outputs():
    base = tiny_model().eval()
    with torch.no_grad():
        for p in base.parameters():
            p.add_(0.05 * torch.randn_like(p))
    wrapped = copy.deepcopy(base)
    fp32 = PrecisionConfig()
    plan = parallelize(wrapped, CPU, ParallelConfig(), KernelsConfig(), fp32, activation_checkpointing=True)
    assert plan.checkpointed_blocks == 2 * base.config.depth
    assert list(wrapped.state_dict()) == list(base.state_dict())
    x, t, text, mask = inputs()
    torch.testing.assert_close(wrapped(x, t, text, mask), base(x, t, text, mask), rtol=1e-6, atol=1e-7)


def test_state_dict_files_and_videosys_checkpoints_load(tmp_path):
    model = tiny_model()
    shifted = {k: v + 1.0 for k, v in model.state_dict().items()}
    save_file(shifted, tmp_path / "latte.safetensors")
    torch.save({"model": model.state_dict(), "ema": shifted}, tmp_path / "ckpt.pt")
    for name in ("latte.safetensors", "ckpt.pt"):
        fresh = tiny_model()
        load_weights(fresh, str(tmp_path / name))
        for key, value in fresh.state_dict().items():
            assert torch.equal(value, shifted[key]), (name, key)


def test_weights_that_do_not_fit_name_the_path_and_flavor(tmp_path, diffusers_latte):
    with pytest.raises(FileNotFoundError, match="model.weights=.*nothing-here"):
        load_weights(tiny_model(), str(tmp_path / "nothing-here"))
    bigger = tiny_model(hidden_size=128)
    save_file(bigger.state_dict(), tmp_path / "big.safetensors")
    with pytest.raises(ConfigError, match="model.weights=.*big.safetensors does not fit model flavor debug"):
        load_weights(tiny_model(), str(tmp_path / "big.safetensors"))
    deeper = tiny_model(depth=1)  # the tiny diffusers folder has two block pairs
    with pytest.raises(ConfigError, match="does not fit model flavor debug.*has no place for"):
        load_weights(deeper, str(diffusers_latte[1]))


def test_flavors():
    assert set(LATTE_FLAVORS) == {"XL/2", "debug"}
    assert Latte.block_lists == ("spatial_blocks", "temporal_blocks") and Latte.prediction_type == "epsilon"
