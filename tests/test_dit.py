"""DiT model: parity with diffusers, published sizes, initialisation and execution strategies."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from diffusers import DiTTransformer2DModel

from videosys.data import Batch
from videosys.diffusion import SampleDraws
from videosys.distributed import DistContext, ParallelConfig
from videosys.errors import ConfigError
from videosys.models import build_model
from videosys.models.dit import DIT_FLAVORS, DiT, DiTConfig, load_weights
from videosys.ops import KernelsConfig
from videosys.ops.attention import math_attention, sdpa_attention
from videosys.parallelize import parallelize
from videosys.precision import PrecisionConfig
from videosys.tasks.common import make_conditioning

CPU = DistContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def tiny_diffusers_dit(tmp_path, learn_sigma=True, share_embedders=True):
    torch.manual_seed(0)
    model = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=3,
        out_channels=6 if learn_sigma else 3,
        num_layers=3,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=5,
    ).eval()
    with torch.no_grad():
        # Random weights everywhere (diffusers zero-initialises some layers, which would hide bugs).
        for p in model.parameters():
            p.normal_(0, 0.2)
        if share_embedders:  # what diffusers' conversion of the DiT reference checkpoints produces
            first = model.transformer_blocks[0].norm1.emb
            for block in model.transformer_blocks[1:]:
                block.norm1.emb.load_state_dict(first.state_dict())
    folder = tmp_path / "dit-diffusers"
    model.save_pretrained(folder)
    return model, folder


ON_GPU = pytest.param(
    "cuda",
    marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")],
)


@pytest.mark.parametrize("device", ["cpu", ON_GPU])
@pytest.mark.parametrize("learn_sigma", [True, False])
def test_matches_diffusers_dit(tmp_path, learn_sigma, device):
    reference, folder = tiny_diffusers_dit(tmp_path, learn_sigma)
    # Architecture comes from the diffusers config.json; only the flavor's dims must be overridden to match.
    cfg = DiTConfig(flavor="debug", depth=3, hidden_size=32, num_heads=2, patch_size=2, weights=str(folder))
    ours = DiT(cfg).eval()
    load_weights(ours, str(folder))
    assert ours.config.timestep_freq_shift == 1 and ours.config.mlp_norm_eps == 1e-5
    assert ours.learn_sigma == learn_sigma
    reference, ours = reference.to(device), ours.to(device)
    torch.manual_seed(1)
    x = torch.randn(4, 3, 8, 8, device=device)
    t = torch.tensor([0, 17, 500, 999], device=device)
    y = torch.tensor([0, 1, 4, 5], device=device)  # 5 is the null (unconditional) label
    with torch.no_grad():
        expected = reference(x, t, y).sample
        actual = ours(x, t, y)
    assert actual.shape == expected.shape
    rel = (actual - expected).norm() / expected.norm()
    assert rel < 1e-5, f"relative error {rel:.2e}"


def test_diffusers_weights_with_per_block_embedders_are_refused(tmp_path):
    _, folder = tiny_diffusers_dit(tmp_path, share_embedders=False)
    cfg = DiTConfig(depth=3, hidden_size=32, num_heads=2, patch_size=2, weights=str(folder))
    with pytest.raises(ValueError, match="block 1 has its own timestep/label embedder"):
        load_weights(DiT(cfg), str(folder))


def test_diffusers_weights_that_do_not_fit_the_flavor_are_refused(tmp_path):
    _, folder = tiny_diffusers_dit(tmp_path)
    with pytest.raises(ConfigError, match="depth=3.*model.flavor=S/2"):
        DiTConfig(flavor="S/2", weights=str(folder)).resolved()


# Parameter counts of the DiT paper (table 4, millions) for 256x256 ImageNet (latent 32x32x4, 1000 classes).
PAPER_PARAMS_M = {"S/2": 33.0, "B/2": 130.0, "L/2": 458.0, "XL/2": 675.0}


@pytest.mark.parametrize("flavor", sorted(PAPER_PARAMS_M))
def test_published_sizes(flavor):
    with torch.device("meta"):
        model = build_model(DiTConfig(flavor=flavor, input_size=32, in_channels=4, num_classes=1000).resolved())
    params = sum(p.numel() for p in model.parameters()) / 1e6
    assert params == pytest.approx(PAPER_PARAMS_M[flavor], rel=0.01)
    assert model.config.depth == DIT_FLAVORS[flavor]["depth"]


def test_all_twelve_published_flavors_and_debug_exist():
    assert set(DIT_FLAVORS) == {f"{s}/{p}" for s in ("S", "B", "L", "XL") for p in (2, 4, 8)} | {"debug"}


def test_unknown_flavor_names_the_value():
    with pytest.raises(ConfigError, match="model.flavor='XXL/2'"):
        DiTConfig(flavor="XXL/2", input_size=8, in_channels=1, num_classes=10).resolved()


def tiny_model(**overrides) -> DiT:
    torch.manual_seed(0)
    return DiT(DiTConfig(flavor="debug", input_size=8, in_channels=1, num_classes=10, **overrides))


def test_adaln_zero_init_makes_every_block_the_identity_and_output_zero():
    model = tiny_model()
    x = torch.randn(3, 1, 8, 8)
    t, y = torch.tensor([1, 2, 3]), torch.tensor([0, 1, 2])
    with torch.no_grad():
        h = model.x_embedder(x) + model.pos_embed
        c = model.t_embedder(t) + model.y_embedder(y)
        for block in model.blocks:
            assert torch.equal(block(h, c), h)
        assert torch.count_nonzero(model(x, t, y)) == 0


def test_init_weights_sets_every_tensor_of_a_meta_built_model():
    # If init_weights skipped a tensor, the meta-built copy would keep to_empty's garbage there.
    eager = tiny_model()
    torch.manual_seed(0)
    eager.init_weights()
    with torch.device("meta"):
        lazy = DiT(eager.config)
    lazy.to_empty(device="cpu")
    with torch.no_grad():
        for tensor in lazy.state_dict().values():
            tensor.fill_(float("nan"))
    torch.manual_seed(0)
    lazy.init_weights()
    for (name, a), b in zip(eager.state_dict().items(), lazy.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_label_dropout_uses_each_samples_own_draws_and_the_null_row():
    model = tiny_model(class_dropout_prob=0.5)
    assert model.null_label == 10 and model.y_embedder.embedding_table.num_embeddings == 11
    labels = torch.arange(10).repeat(20)
    conditioning = make_conditioning(model, None, None, None, 0.0)
    batch = Batch(torch.zeros(200, 1), labels, [])
    seeds = list(range(1000, 1200))
    dropped = conditioning.training_inputs(batch, torch.device("cpu"), SampleDraws(seeds, "cpu"))["y"]
    assert set(dropped[dropped != labels].tolist()) == {10}
    assert 0.35 < (dropped == 10).float().mean() < 0.65
    # A sample's dropout depends on its seed alone, not on the batch it sits in.
    alone = conditioning.training_inputs(Batch(torch.zeros(1, 1), labels[7:8], []), "cpu", SampleDraws([1007], "cpu"))
    assert alone["y"].item() == dropped[7].item()
    # The model itself never drops labels.
    model.train()
    assert torch.equal(model.y_embedder(labels), model.y_embedder.embedding_table(labels))


def test_attention_backends_agree():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 8) for _ in range(3))
    torch.testing.assert_close(sdpa_attention(q, k, v), math_attention(q, k, v), rtol=1e-5, atol=1e-5)


def _grads(model, x, t, y):
    model.zero_grad()
    model(x, t, y).square().mean().backward()
    return {n.replace("_checkpoint_wrapped_module.", ""): p.grad.clone() for n, p in model.named_parameters()}


def test_activation_checkpointing_keeps_outputs_gradients_and_state_dict_names():
    base = tiny_model()
    with torch.no_grad():  # move off the zero init so every parameter gets a gradient
        for p in base.parameters():
            p.add_(0.05 * torch.randn_like(p))
    checkpointed = copy.deepcopy(base)
    fp32 = PrecisionConfig()
    plan = parallelize(checkpointed, CPU, ParallelConfig(), KernelsConfig(), fp32, activation_checkpointing=True)
    assert plan.checkpointed_blocks == len(base.blocks)
    assert list(checkpointed.state_dict()) == list(base.state_dict())
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([5, 900]), torch.tensor([3, 10])
    expected, actual = _grads(base.eval(), x, t, y), _grads(checkpointed.eval(), x, t, y)
    for name, grad in expected.items():
        torch.testing.assert_close(actual[name], grad, rtol=1e-6, atol=1e-7, msg=name)


def test_parallelize_sets_the_requested_attention_backend():
    model = tiny_model()
    parallelize(model, CPU, ParallelConfig(), KernelsConfig(attention="math"), PrecisionConfig())
    assert all(block.attn.attention_fn.fixed.backend.fn is math_attention for block in model.blocks)
    with pytest.raises(ConfigError, match="kernels.attention='flashy'"):
        parallelize(model, CPU, ParallelConfig(), KernelsConfig(attention="flashy"), PrecisionConfig())


def test_loading_a_videosys_checkpoint_file_takes_the_ema_weights(tmp_path):
    model = tiny_model()
    ema_state = {k: v + 1.0 for k, v in model.state_dict().items()}
    torch.save({"model": model.state_dict(), "ema": ema_state}, tmp_path / "ckpt.pt")
    fresh = tiny_model()
    load_weights(fresh, str(tmp_path / "ckpt.pt"))
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, ema_state[key]), key


def test_missing_weights_path_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.weights=.*nothing-here"):
        load_weights(tiny_model(), str(tmp_path / "nothing-here"))


def test_diffusers_folder_without_weights_is_explained(tmp_path):
    folder = tmp_path / "empty-dit"
    folder.mkdir()
    config = {"_class_name": "DiTTransformer2DModel", "num_layers": 4, "num_attention_heads": 4}
    config.update({"attention_head_dim": 32, "sample_size": 8, "in_channels": 1, "out_channels": 2})
    config["num_embeds_ada_norm"] = 10
    (folder / "config.json").write_text(json.dumps(config))
    model = DiT(DiTConfig(weights=str(folder)))
    with pytest.raises(FileNotFoundError, match="no diffusion_pytorch_model"):
        load_weights(model, str(folder))
