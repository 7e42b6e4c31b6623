"""CogVideoX model: parity with diffusers (rotary, sin/cos and learned positions), published sizes,
meta-device initialisation, config errors and a training step."""

from __future__ import annotations

import copy
import json
import types

import pytest
import torch
from diffusers import CogVideoXTransformer3DModel
from diffusers.pipelines.cogvideo.pipeline_cogvideox import CogVideoXPipeline
from omegaconf import OmegaConf

from videosys.distributed import DistContext, ParallelConfig
from videosys.errors import ConfigError, MissingGeometryError
from videosys.models.cogvideox import (
    COGVIDEOX_FLAVORS,
    CogVideoX,
    CogVideoXConfig,
    convert_diffusers_state_dict,
    load_weights,
)
from videosys.ops import KernelsConfig
from videosys.parallelize import parallelize
from videosys.precision import PrecisionConfig

CPU = DistContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
TEXT_LEN = 226  # CogVideoX's padded T5 length (model.max_text_length)

# The debug flavor's sizes, so that `CogVideoXConfig(flavor="debug", weights=folder)` fits these weights.
TINY = dict(
    num_attention_heads=4,
    attention_head_dim=16,
    time_embed_dim=32,
    text_embed_dim=32,
    num_layers=2,
    patch_size=2,
    # A sample grid of 4x8 tokens: an 8x12-latent input (4x6 tokens) is fitted into it with a crop
    # offset and fractional rotary positions, the general case of the pipeline's position code.
    sample_height=8,
    sample_width=16,
    sample_frames=9,  # 3 latent frames
    max_text_seq_length=TEXT_LEN,
)


def tiny_diffusers(tmp_path, rotary: bool, learned: bool = False):
    torch.manual_seed(0)
    in_channels = 8 if learned else 4  # image-to-video: image latents concatenated to the noisy ones
    model = CogVideoXTransformer3DModel(
        **TINY,
        in_channels=in_channels,
        out_channels=4,
        use_rotary_positional_embeddings=rotary,
        use_learned_positional_embeddings=learned,
    ).eval()
    with torch.no_grad():
        # Random weights everywhere (diffusers zero-initialises none, but norms start at ones / zeros).
        # Norm gains stay near 1 so that attention is sharp enough for positions to matter.
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name and name.endswith("weight") else 0.0, 0.1)
        if learned:
            model.patch_embed.pos_embedding.normal_(0, 0.1)
    folder = tmp_path / "cogvideox-diffusers"
    model.save_pretrained(folder)
    return model, folder


def pipeline_rotary(reference, latent_height: int, latent_width: int, frames: int, device="cpu"):
    """The tables CogVideoXPipeline passes to the transformer (its own code, with a stand-in `self`)."""
    pipe = types.SimpleNamespace(vae_scale_factor_spatial=8, transformer=reference)
    height, width = latent_height * 8, latent_width * 8  # pixels
    return CogVideoXPipeline._prepare_rotary_positional_embeddings(pipe, height, width, frames, torch.device(device))


ON_GPU = pytest.param(
    "cuda",
    marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")],
)


def relative_error(actual, expected) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize(
    "rotary, learned, size",
    [
        (True, False, (8, 12)),  # 5B: rotary, input smaller than the sample grid
        (False, False, (8, 12)),  # 2B: sin/cos table recomputed for a non-configured size
        (False, False, (8, 16)),  # 2B: the precomputed table of the configured size
        (True, True, (8, 16)),  # 5B-I2V: learned table + rotary, 8 in / 4 out channels
    ],
)
@pytest.mark.parametrize("device", ["cpu", ON_GPU])
def test_matches_diffusers_cogvideox(tmp_path, rotary, learned, size, device):
    reference, folder = tiny_diffusers(tmp_path, rotary, learned)
    cfg = CogVideoXConfig(flavor="debug", weights=str(folder)).resolved()
    assert (cfg.rotary, cfg.sincos_pos_embed, cfg.learned_pos_embed) == (rotary, not rotary, learned)
    assert cfg.input_size == [3, 8, 16]  # no data: the sample size of the weights
    ours = CogVideoX(cfg).eval()
    load_weights(ours, str(folder))
    assert (ours.in_channels, ours.out_channels) == (reference.config.in_channels, 4)
    reference, ours = reference.to(device), ours.to(device)

    torch.manual_seed(1)
    height, width = size
    x = torch.randn(2, ours.in_channels, 3, height, width, device=device)  # VideoSys layout (B, C, T, H, W)
    t = torch.tensor([3.0, 901.0], device=device)
    text = torch.randn(2, TEXT_LEN, 32, device=device)
    rope = pipeline_rotary(reference, height, width, 3, device) if rotary else None
    mask = torch.ones(2, TEXT_LEN, dtype=torch.bool, device=device)
    with torch.no_grad():
        expected = reference(x.transpose(1, 2), text, t, image_rotary_emb=rope).sample.transpose(1, 2)
        actual = ours(x, t, text, text_mask=mask)
        # text_mask is ignored, as in the published model: a mask hiding tokens changes nothing.
        masked = ours(x, t, text, text_mask=~mask)
    assert actual.shape == expected.shape == (2, 4, 3, height, width)
    assert relative_error(actual, expected) < 1e-5
    assert torch.equal(masked, actual)
    if rotary:  # the positions matter: without them diffusers' output is far off
        with torch.no_grad():
            unrotated = reference(x.transpose(1, 2), text, t).sample.transpose(1, 2)
        assert relative_error(unrotated, expected) > 1e-2


def test_long_timesteps_and_our_names_round_trip(tmp_path):
    reference, folder = tiny_diffusers(tmp_path, rotary=True)
    ours = CogVideoX(CogVideoXConfig(weights=str(folder)))
    load_weights(ours, str(folder))
    torch.save(ours.state_dict(), tmp_path / "ours.pt")
    again = CogVideoX(CogVideoXConfig(weights=str(folder)))
    load_weights(again, str(tmp_path / "ours.pt"))
    x, text = torch.randn(1, 4, 2, 8, 12), torch.randn(1, 20, 32)  # any text length works without a learned table
    with torch.no_grad():
        a, b = ours(x, torch.tensor([500]), text), again(x, torch.tensor([500.0]), text)
    assert torch.equal(a, b)


# --- Published sizes ------------------------------------------------------------------------------

PUBLISHED_DIFFUSERS = {
    "2B": dict(num_attention_heads=30, num_layers=30),
    "5B": dict(num_attention_heads=48, num_layers=42, use_rotary_positional_embeddings=True),
}


@pytest.mark.parametrize("flavor", sorted(PUBLISHED_DIFFUSERS))
def test_published_sizes_match_diffusers(flavor):
    with torch.device("meta"):
        reference = CogVideoXTransformer3DModel(**PUBLISHED_DIFFUSERS[flavor])  # other keys: the published defaults
        ours = CogVideoX(CogVideoXConfig(flavor=flavor, input_size=[13, 60, 90], in_channels=16))
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in reference.parameters())
    assert count == {"2B": 1_693_783_872, "5B": 5_570_283_072}[flavor]
    # The same tensors, one for one, once renamed (shapes included).
    converted = convert_diffusers_state_dict(reference.state_dict(), ours.config)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {
        k: tuple(v.shape) for k, v in ours.state_dict().items()
    }
    assert ours.config.rotary == (flavor == "5B") and ours.config.sincos_pos_embed == (flavor == "2B")


def test_flavors():
    assert set(COGVIDEOX_FLAVORS) == {"2B", "5B", "debug"}
    assert COGVIDEOX_FLAVORS["debug"]["rotary"]


def test_config_is_a_structured_omegaconf_schema():
    merged = OmegaConf.merge(OmegaConf.structured(CogVideoXConfig), {"input_size": [13, 60, 90], "in_channels": 16})
    cfg = OmegaConf.to_object(merged).resolved()
    assert cfg.hidden_size == 64 and cfg.caption_channels == 32


# --- Initialisation -------------------------------------------------------------------------------

DEBUG_GEOMETRY = dict(input_size=[3, 8, 12], in_channels=4)


@pytest.mark.parametrize(
    "overrides",
    [{}, dict(rotary=False, sincos_pos_embed=True), dict(in_channels=8, out_channels=4, learned_pos_embed=True)],
)
def test_meta_build_then_init_weights_equals_an_eager_build(overrides):
    cfg = CogVideoXConfig(**{**DEBUG_GEOMETRY, **overrides})
    if overrides.get("learned_pos_embed"):
        cfg.input_size = [3, 8, 16]  # a learned table only fits the sample size
    eager = CogVideoX(cfg)
    torch.manual_seed(0)
    eager.init_weights()
    with torch.device("meta"):
        lazy = CogVideoX(cfg)
    assert {k: v.shape for k, v in lazy.named_parameters()} == {k: v.shape for k, v in eager.named_parameters()}
    lazy.to_empty(device="cpu")
    with torch.no_grad():  # if init_weights skipped a tensor, it would keep this NaN
        for tensor in [*lazy.parameters(), *lazy.buffers()]:
            tensor.fill_(float("nan"))
    torch.manual_seed(0)
    lazy.init_weights()
    eager_tensors = dict(eager.named_parameters()) | dict(eager.named_buffers())
    for name, tensor in [*lazy.named_parameters(), *lazy.named_buffers()]:
        assert torch.equal(tensor, eager_tensors[name]), name
    x = torch.randn(2, cfg.in_channels, *cfg.input_size)
    with torch.no_grad():
        out = lazy(x, torch.tensor([1, 999]), torch.randn(2, TEXT_LEN, 32))
    assert out.shape == (2, 4, *cfg.input_size) and torch.isfinite(out).all()


def test_adaln_zero_init_makes_every_block_the_identity():
    model = CogVideoX(CogVideoXConfig(**DEBUG_GEOMETRY))
    x, text = torch.randn(1, 16, 64), torch.randn(1, 5, 64)
    cond = model.t_embedder(torch.tensor([10]))
    with torch.no_grad():
        for block in model.blocks:
            out_x, out_text = block(x, text, cond, model.rotary(1, 4, 4, text_len=5))
            assert torch.equal(out_x, x) and torch.equal(out_text, text)
        out = model(torch.randn(1, 4, 3, 8, 12), torch.tensor([10]), torch.randn(1, 7, 32))
        assert out.shape == (1, 4, 3, 8, 12) and torch.count_nonzero(out) == 0


# --- Config errors --------------------------------------------------------------------------------


def test_missing_geometry_names_the_key():
    with pytest.raises(MissingGeometryError, match="model.input_size"):
        CogVideoXConfig(in_channels=16).resolved()
    with pytest.raises(MissingGeometryError, match="model.in_channels"):
        CogVideoXConfig(input_size=[13, 60, 90]).resolved()


def test_bad_values_are_named():
    with pytest.raises(ConfigError, match="model.flavor='10B'"):
        CogVideoXConfig(flavor="10B", **DEBUG_GEOMETRY).resolved()
    with pytest.raises(ConfigError, match=r"input_size=\[3, 9, 12\].*patch_size=2"):
        CogVideoXConfig(input_size=[3, 9, 12], in_channels=4).resolved()
    with pytest.raises(ConfigError, match="model.head_dim=24 must be divisible by 16"):
        CogVideoXConfig(head_dim=24, **DEBUG_GEOMETRY).resolved()
    with pytest.raises(ConfigError, match="learned_pos_embed.*model.rotary=true"):
        CogVideoXConfig(rotary=False, learned_pos_embed=True, **DEBUG_GEOMETRY).resolved()


def test_weights_that_disagree_with_the_run_are_named(tmp_path):
    _, folder = tiny_diffusers(tmp_path, rotary=True)
    with pytest.raises(ConfigError, match=r"max_text_length=226.*model.max_text_length=77.*set model.max_text_length"):
        CogVideoXConfig(weights=str(folder), max_text_length=77).resolved()
    with pytest.raises(ConfigError, match="in_channels=4.*model.in_channels=16"):
        CogVideoXConfig(weights=str(folder), in_channels=16).resolved()
    with pytest.raises(ConfigError, match="depth=2.*model.flavor=5B has depth=42; use model.flavor=debug"):
        CogVideoXConfig(flavor="5B", weights=str(folder)).resolved()
    # A model built without the weights in its config (sin/cos positions) refuses the rotary weights.
    sincos = CogVideoX(CogVideoXConfig(rotary=False, sincos_pos_embed=True, input_size=[3, 8, 16], in_channels=4))
    with pytest.raises(ConfigError, match="rotary=True.*built with rotary=False"):
        load_weights(sincos, str(folder))


def test_cogvideox_1_5_weights_are_refused_with_the_reason(tmp_path):
    folder = tmp_path / "cogvideox-1.5"
    folder.mkdir()
    config = {"_class_name": "CogVideoXTransformer3DModel", "patch_size_t": 2, "use_rotary_positional_embeddings": True}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="patch_size_t=2.*CogVideoX 1.5"):
        CogVideoXConfig(flavor="5B", weights=str(folder)).resolved()


def test_bad_weight_files_are_named(tmp_path):
    model = CogVideoX(CogVideoXConfig(**DEBUG_GEOMETRY))
    with pytest.raises(FileNotFoundError, match="model.weights=.*nothing-here"):
        load_weights(model, str(tmp_path / "nothing-here"))
    sd = model.state_dict()
    sd.pop("blocks.1.mlp.fc2.bias")
    torch.save(sd, tmp_path / "partial.pt")
    with pytest.raises(ConfigError, match=r"partial.pt does not fit model flavor debug(.|\n)*blocks.1.mlp.fc2.bias"):
        load_weights(model, str(tmp_path / "partial.pt"))


# --- Training -------------------------------------------------------------------------------------


def _perturbed_model() -> CogVideoX:
    torch.manual_seed(0)
    model = CogVideoX(CogVideoXConfig(**DEBUG_GEOMETRY))
    with torch.no_grad():  # move off the zero init so that every parameter gets a gradient
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _grads(model, batch):
    model.zero_grad()
    x, t, text, target = batch
    torch.nn.functional.mse_loss(model(x, t, text), target).backward()
    return {n.replace("_checkpoint_wrapped_module.", ""): p.grad.clone() for n, p in model.named_parameters()}


def _batch():
    torch.manual_seed(2)
    return (
        torch.randn(2, 4, 3, 8, 12),
        torch.tensor([17, 800]),
        torch.randn(2, TEXT_LEN, 32),
        torch.randn(2, 4, 3, 8, 12),
    )


def test_training_step_gives_finite_nonzero_gradients_everywhere():
    model = _perturbed_model().train()
    batch = _batch()
    grads = _grads(model, batch)
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), name
        assert grad.abs().sum() > 0, name
    before = torch.nn.functional.mse_loss(model(*batch[:3]), batch[3]).item()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    optimizer.step()
    after = torch.nn.functional.mse_loss(model(*batch[:3]), batch[3]).item()
    assert after < before


def test_activation_checkpointing_keeps_gradients():
    base = _perturbed_model()
    checkpointed = copy.deepcopy(base)
    plan = parallelize(checkpointed, CPU, ParallelConfig(), KernelsConfig(), PrecisionConfig(), True)
    assert plan.checkpointed_blocks == len(base.blocks)
    batch = _batch()
    expected, actual = _grads(base, batch), _grads(checkpointed, batch)
    for name, grad in expected.items():
        torch.testing.assert_close(actual[name], grad, rtol=1e-5, atol=1e-7, msg=name)
