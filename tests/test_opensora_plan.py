"""Open-Sora-Plan v1.2: 3D rotary positions, full 3D attention, text masking, meta builds, published size."""

from __future__ import annotations

import pytest
import torch

from videosys.errors import ConfigError, MissingGeometryError
from videosys.models.blocks import Rotary, rotary_tables
from videosys.models.opensora_plan import (
    OPENSORA_PLAN_FLAVORS,
    OpenSoraPlan,
    OpenSoraPlanConfig,
    load_weights,
    rope_3d,
)

GRID = (3, 4, 5)
HEAD_DIM = 24  # three rotary parts of 8 channels


def grid_positions(grid) -> torch.Tensor:
    """(t, h, w) index of every token of a t-major flattened grid: (N, 3)."""
    axes = torch.meshgrid(*(torch.arange(n) for n in grid), indexing="ij")
    return torch.stack([a.reshape(-1) for a in axes], dim=1)


def scores_everywhere(rope: Rotary, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Scores (N, N) between the same query vector placed at every token and the same key vector at every token."""
    n = rope.cos.shape[0]
    rq = rope(q.expand(1, 1, n, -1).clone())[0, 0]
    rk = rope(k.expand(1, 1, n, -1).clone())[0, 0]
    return rq @ rk.T


def assert_depends_only_on_offsets(scores: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Every pair of tokens with the same (dt, dh, dw) offset has the same score; returns the score per offset."""
    offsets = (positions[:, None, :] - positions[None, :, :]).reshape(-1, 3)
    unique, inverse = torch.unique(offsets, dim=0, return_inverse=True)
    flat = scores.reshape(-1)
    counts = torch.zeros(len(unique)).index_add_(0, inverse, torch.ones_like(flat))
    per_offset = torch.zeros(len(unique)).index_add_(0, inverse, flat) / counts
    assert (flat - per_offset[inverse]).abs().max() < 1e-4
    return unique, per_offset


@pytest.mark.parametrize("scales", [(1.0, 1.0, 1.0), (1.0, 1.5, 2.0)])
def test_rotary_scores_depend_only_on_the_3d_offset(scales):
    torch.manual_seed(0)
    q, k = torch.randn(HEAD_DIM), torch.randn(HEAD_DIM)
    rope = rope_3d(GRID, HEAD_DIM, scales)
    assert rope.cos.shape == (3 * 4 * 5, HEAD_DIM) and rope.interleaved
    scores = scores_everywhere(rope, q, k)
    offsets, per_offset = assert_depends_only_on_offsets(scores, grid_positions(GRID))
    # Zero offset: the rotations cancel and the score is the plain dot product.
    zero = (offsets == 0).all(dim=1)
    torch.testing.assert_close(per_offset[zero], (q @ k).reshape(1), rtol=1e-5, atol=1e-5)
    # ... and it is a real position encoding: the (3*2-1)(4*2-1)(5*2-1) = 315 offsets give distinct scores.
    assert len(offsets) == 315
    assert torch.unique(per_offset.round(decimals=3)).numel() > 300


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_each_third_of_the_head_rotates_with_its_own_axis(axis):
    part = HEAD_DIM // 3
    torch.manual_seed(axis)
    q, k = torch.zeros(HEAD_DIM), torch.zeros(HEAD_DIM)
    q[axis * part : (axis + 1) * part] = torch.randn(part)
    k[axis * part : (axis + 1) * part] = torch.randn(part)
    positions = grid_positions(GRID)
    offsets, per_offset = assert_depends_only_on_offsets(scores_everywhere(rope_3d(GRID, HEAD_DIM), q, k), positions)
    # Only this axis's offset matters ...
    for value in offsets[:, axis].unique():
        same = offsets[:, axis] == value
        assert per_offset[same].max() - per_offset[same].min() < 1e-4
    # ... and it does matter.
    assert per_offset.max() - per_offset.min() > 0.1

    # By value: this third is the 1D rotary of the axis's index (here over the three parts at once).
    x = torch.randn(1, 2, positions.shape[0], HEAD_DIM)
    rotated = rope_3d(GRID, HEAD_DIM, (1.0, 2.0, 0.5))(x)
    scale = (1.0, 2.0, 0.5)[axis]
    cos, sin = rotary_tables(part, positions[:, axis].double() / scale, interleaved=True)
    third = slice(axis * part, (axis + 1) * part)
    torch.testing.assert_close(rotated[..., third], Rotary(cos, sin)(x[..., third]), rtol=1e-6, atol=1e-6)


def test_interpolation_scale_divides_positions():
    # With scale 2 on h, a row offset of 2 scores like a row offset of 1 unscaled (t and w untouched).
    torch.manual_seed(0)
    q, k = torch.randn(HEAD_DIM), torch.randn(HEAD_DIM)
    positions = grid_positions(GRID)
    plain = scores_everywhere(rope_3d(GRID, HEAD_DIM), q, k)
    scaled = scores_everywhere(rope_3d(GRID, HEAD_DIM, (1.0, 2.0, 1.0)), q, k)
    origin = 0
    index = {tuple(p.tolist()): i for i, p in enumerate(positions)}
    torch.testing.assert_close(scaled[origin, index[(1, 2, 3)]], plain[origin, index[(1, 1, 3)]])
    assert not torch.allclose(scaled[origin, index[(1, 2, 3)]], plain[origin, index[(1, 2, 3)]])


def reference_rope_3d(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Open-Sora-Plan's RoPE3D layout written from its definition: per third, rotate halves (i, i + d/2)."""
    part = x.shape[-1] // 3
    outs = []
    for axis in range(3):
        chunk = x[..., axis * part : (axis + 1) * part]
        freqs = 1.0 / 10000 ** (torch.arange(0, part, 2, dtype=torch.float64) / part)
        angles = positions[:, axis].double()[:, None] * freqs[None]
        angles = torch.cat([angles, angles], dim=-1)
        first, second = chunk.chunk(2, dim=-1)
        turned = torch.cat([-second, first], dim=-1)
        outs.append(chunk * angles.cos().float() + turned * angles.sin().float())
    return torch.cat(outs, dim=-1)


def test_rotary_equals_the_reference_layout_up_to_a_channel_permutation():
    part = HEAD_DIM // 3
    # Our channel 2i pairs with 2i + 1; the reference's i pairs with i + d/2: map ours -> reference per third.
    within = torch.cat([torch.arange(0, part, 2), torch.arange(1, part, 2)])
    perm = torch.cat([within + a * part for a in range(3)])
    torch.manual_seed(0)
    positions = grid_positions(GRID)
    x = torch.randn(1, 2, positions.shape[0], HEAD_DIM)
    ours = rope_3d(GRID, HEAD_DIM)(x)
    torch.testing.assert_close(ours[..., perm], reference_rope_3d(x[..., perm], positions), rtol=1e-5, atol=1e-5)


def tiny_model(**overrides) -> OpenSoraPlan:
    torch.manual_seed(0)
    cfg = dict(flavor="debug", input_size=[3, 4, 4], in_channels=4) | overrides
    return OpenSoraPlan(OpenSoraPlanConfig(**cfg))


def randomize(model: OpenSoraPlan) -> OpenSoraPlan:
    """Move off the zero-initialised outputs so that every path shows in the output."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def inputs(batch=2, frames=3, size=4, tokens=6, caption=32):
    torch.manual_seed(2)
    x = torch.randn(batch, 4, frames, size, size)
    t = torch.linspace(10, 900, batch)
    text = torch.randn(batch, tokens, caption)
    return x, t, text


def test_full_attention_mixes_frames():
    model = randomize(tiny_model())
    x, t, text = inputs()
    changed = x.clone()
    changed[:, :, 0] += 1.0
    with torch.no_grad():
        out, out_changed = model(x, t, text), model(changed, t, text)
    assert out.shape == x.shape
    # A spatial-only model would leave frames 1 and 2 untouched.
    for frame in range(3):
        assert (out_changed[:, :, frame] - out[:, :, frame]).abs().max() > 1e-3, frame
    # Positions are encoded: reversing time does not just reverse the output.
    with torch.no_grad():
        reversed_out = model(x.flip(2), t, text)
    assert (reversed_out.flip(2) - out).abs().max() > 1e-3


def test_text_mask_hides_padding():
    model = randomize(tiny_model())
    x, t, text = inputs()
    mask = torch.tensor([[True, True, True, False, False, False], [True, True, True, True, True, False]])
    with torch.no_grad():
        out = model(x, t, text, mask)
        # Shuffle the padding positions (with their contents) and overwrite them: nothing may change.
        order = torch.tensor([0, 1, 2, 5, 3, 4])
        shuffled_text, shuffled_mask = text[:, order].clone(), mask[:, order]
        shuffled_text[~shuffled_mask] = 100 * torch.randn_like(shuffled_text[~shuffled_mask])
        torch.testing.assert_close(model(x, t, shuffled_text, shuffled_mask), out, rtol=1e-5, atol=1e-5)
        # Without the mask the padding is read, so the check above can fail.
        assert (model(x, t, shuffled_text) - out).abs().max() > 1e-3
        # An all-padding caption attends to every token (the reference's additive bias), not to NaN.
        empty = torch.zeros_like(mask)
        torch.testing.assert_close(model(x, t, text, empty), model(x, t, text), rtol=1e-6, atol=1e-6)


def test_meta_build_then_init_weights_matches_a_normal_build():
    eager = tiny_model()
    torch.manual_seed(0)
    eager.init_weights()
    with torch.device("meta"):
        lazy = OpenSoraPlan(eager.config)
    assert all(p.device.type == "meta" for p in lazy.parameters())
    lazy.to_empty(device="cpu")
    with torch.no_grad():
        for tensor in lazy.state_dict().values():
            tensor.fill_(float("nan"))
    torch.manual_seed(0)
    lazy.init_weights()
    eager_sd, lazy_sd = eager.state_dict(), lazy.state_dict()
    assert [(k, v.shape) for k, v in eager_sd.items()] == [(k, v.shape) for k, v in lazy_sd.items()]
    for name, value in eager_sd.items():  # init_weights set every tensor (no NaN left from to_empty)
        assert torch.equal(value, lazy_sd[name]), name
    x, t, text = inputs()
    with torch.no_grad():
        out = randomize(lazy)(x, t, text)
    assert torch.isfinite(out).all()


def test_fresh_model_predicts_zero():
    x, t, text = inputs()
    with torch.no_grad():
        assert torch.count_nonzero(tiny_model()(x, t, text)) == 0


def expected_params(depth, dim, heads, patch, patch_t, in_channels, caption, mlp_ratio=4.0) -> int:
    """Count from the architecture: patch conv, timestep MLP + adaLN-single projection, caption MLP,
    blocks (self-attention, cross-attention, MLP, 6-row table), final layer (2-row table + projection)."""
    del heads  # heads split the hidden size; they add no parameters
    hidden_mlp = int(dim * mlp_ratio)
    patch_embed = in_channels * patch_t * patch * patch * dim + dim
    timestep = (256 * dim + dim) + (dim * dim + dim) + (dim * 6 * dim + 6 * dim)
    caption_mlp = (caption * dim + dim) + (dim * dim + dim)
    self_attn = (dim * 3 * dim + 3 * dim) + (dim * dim + dim)
    cross_attn = (dim * dim + dim) + (dim * 2 * dim + 2 * dim) + (dim * dim + dim)
    mlp = (dim * hidden_mlp + hidden_mlp) + (hidden_mlp * dim + dim)
    block = self_attn + cross_attn + mlp + 6 * dim
    out = patch_t * patch * patch * in_channels
    final = 2 * dim + dim * out + out
    return patch_embed + timestep + caption_mlp + depth * block + final


def test_v1_2_parameter_count():
    cfg = OpenSoraPlanConfig(flavor="v1.2", input_size=[24, 60, 80], in_channels=4)  # 93x480x640 clip
    with torch.device("meta"):
        model = OpenSoraPlan(cfg)
    count = sum(p.numel() for p in model.parameters())
    print(f"Open-Sora-Plan v1.2 (OpenSoraT2V-ROPE-L/122): {count:,} parameters")
    assert count == expected_params(32, 2304, 24, 2, 1, 4, 4096) == 2_771_907_856  # "2.7B"
    assert model.head_dim == 96 and len(model.blocks) == 32 and model.out_channels == 4
    assert OPENSORA_PLAN_FLAVORS["OpenSoraT2V-ROPE-L/122"] == OPENSORA_PLAN_FLAVORS["v1.2"]
    debug = tiny_model()
    assert sum(p.numel() for p in debug.parameters()) == expected_params(2, 96, 4, 2, 1, 4, 32)


def test_temporal_patch_and_other_sizes():
    model = randomize(tiny_model(input_size=[4, 4, 4], patch_size_t=2))
    x, t, text = inputs(frames=4)
    with torch.no_grad():
        assert model(x, t, text).shape == x.shape
        # RoPE has no fixed table: a larger clip runs too.
        x, t, text = inputs(frames=6, size=6)
        assert model(x, t, text).shape == x.shape
        with pytest.raises(ValueError, match="latent frames 3 .* model.patch_size_t=2"):
            model(*inputs(frames=3))


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        (dict(flavor="v9"), ConfigError, "model.flavor='v9'"),
        (dict(input_size=None), MissingGeometryError, "model.input_size"),
        (dict(in_channels=None), MissingGeometryError, "model.in_channels"),
        (dict(input_size=[3, 5, 4]), ConfigError, r"model.input_size=\[3, 5, 4\].*height 5.*model.patch_size=2"),
        (dict(input_size=[3, 4]), ConfigError, r"model.input_size=\[3, 4\]"),
        (dict(input_size=8), ConfigError, r"model.input_size=8 must be the latent \[frames, height, width\]"),
        (dict(depth=0), ConfigError, "model.depth=0 must be a positive integer"),
        (dict(hidden_size=98), ConfigError, "model.hidden_size=98 is not divisible by model.num_heads=4"),
        (dict(hidden_size=64), ConfigError, "model.hidden_size=64 / model.num_heads=4 gives head size 16"),
        (dict(interpolation_scale_h=0.0), ConfigError, "model.interpolation_scale_h=0.0"),
        (dict(prediction_type="flow"), ConfigError, "model.prediction_type='flow'"),
    ],
)
def test_config_errors_name_the_key(overrides, error, match):
    cfg = dict(flavor="debug", input_size=[3, 4, 4], in_channels=4) | overrides
    with pytest.raises(error, match=match):
        OpenSoraPlanConfig(**cfg).resolved()


def test_resolved_fills_the_flavor_and_keeps_overrides():
    cfg = OpenSoraPlanConfig(flavor="v1.2", input_size=[24, 60, 80], in_channels=4, depth=4).resolved()
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.caption_channels) == (4, 2304, 24, 4096)
    assert (cfg.patch_size_t, cfg.patch_size) == (1, 2)
    model = tiny_model(prediction_type="v_prediction")
    assert model.prediction_type == "v_prediction" and not model.learn_sigma
    assert model.diffusion_defaults["objective"] == "v" and model.diffusion_defaults["zero_terminal_snr"]
    assert tiny_model().diffusion_defaults["objective"] == "eps"


def test_training_steps_give_finite_nonzero_gradients():
    model = tiny_model().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, t, text = inputs()
    mask = torch.ones(text.shape[:2], dtype=torch.bool)
    target = torch.randn_like(x)
    # Zero-initialised output and cross-attention projections: gradients reach every tensor by step 3.
    for _ in range(3):
        optimizer.zero_grad()
        loss = (model(x, t, text, mask) - target).square().mean()
        loss.backward()
        optimizer.step()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kind", ["safetensors", "pt", "checkpoint"])
def test_load_weights_formats(tmp_path, kind):
    source = randomize(tiny_model())
    sd = {k: v.clone() for k, v in source.state_dict().items()}
    if kind == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "w.safetensors"
        save_file(sd, str(path))
    elif kind == "pt":
        path = tmp_path / "w.pt"
        torch.save(sd, path)
    else:  # a VideoSys training checkpoint: the EMA weights are taken
        path = tmp_path / "ckpt.pt"
        torch.save({"model": {k: v + 1 for k, v in sd.items()}, "ema": {"model": sd, "num_updates": 3}}, path)
    fresh = tiny_model()
    load_weights(fresh, str(path))
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, sd[name]), name


def test_load_weights_errors_name_path_and_flavor(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(tiny_model(depth=3).state_dict(), path)
    with pytest.raises(ConfigError, match=f"model.weights={path} does not fit model flavor debug"):
        load_weights(tiny_model(), str(path))
    with pytest.raises(FileNotFoundError, match="model.weights=.*missing.pt"):
        load_weights(tiny_model(), str(tmp_path / "missing.pt"))
    with pytest.raises(ConfigError, match="is a folder"):
        load_weights(tiny_model(), str(tmp_path))
