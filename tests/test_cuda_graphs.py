"""Sampling replayed from CUDA graphs (kernels.cuda_graphs): the same samples and PAB counts as eager
sampling (GPU), and the policy side that makes it possible (CPU): one graph per step key, outputs kept at
fixed addresses, capture calls counted once per replay."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from conftest import run_inprocess
from multiprocess import run_ranks
from test_pab import _model, _preset, _sample
from videosys.cache import KINDS, build_cache, compute_plan
from videosys.diffusion import DiffusionConfig, SamplingConfig, make_sampler
from videosys.errors import ConfigError
from videosys.ops import KernelsConfig
from videosys.ops.kernels import check_cuda_graphs

gpu = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_cuda_graphs_need_a_gpu(tmp_path):
    message = r"kernels\.cuda_graphs=true .* needs a CUDA GPU .* set kernels\.cuda_graphs=false"
    with pytest.raises(ConfigError, match=message):
        run_inprocess(["task=sample", "model=opensora", "kernels.cuda_graphs=true"], tmp_path)
    assert not (tmp_path / "metrics.json").exists()


def test_cuda_graphs_refuse_compiled_blocks_that_capture_graphs_of_their_own():
    kernels = KernelsConfig(compile=True, compile_mode="reduce-overhead", cuda_graphs=True)
    with pytest.raises(ConfigError, match=r"compile_mode=reduce-overhead captures CUDA graphs of its own"):
        check_cuda_graphs(kernels, torch.device("cuda"), "dsp")
    check_cuda_graphs(KernelsConfig(compile=True, cuda_graphs=True), torch.device("cuda"), "dsp")  # default mode


def _refusal(rank: int, world: int, overrides: list[str], run_dir: str) -> str:
    try:
        run_inprocess(overrides, Path(run_dir))
    except ConfigError as err:
        return str(err)
    return "no error"


def test_cuda_graphs_take_dsp_but_refuse_other_sequence_parallel_modes(tmp_path):
    """Checked before the model is built, on every rank (gloo, 2 ranks)."""
    overrides = ["task=sample", "model=opensora", "kernels.cuda_graphs=true", "parallel=ulysses2"]
    message = run_ranks(2, _refusal, overrides, str(tmp_path))
    assert "sequence parallelism dsp only, not parallel.sp_mode=ulysses" in message
    assert "kernels.cuda_graphs=false" in message and not (tmp_path / "metrics.json").exists()


def test_step_key_names_the_kinds_each_step_reuses():
    """A step's key is the kinds of the attached model that the step reuses (Open-Sora has no full 3D
    attention, so a rule for it does not split graphs)."""
    cfg = _preset("fast")
    cache = build_cache(cfg)
    model, _ = _model("opensora")
    timesteps = make_sampler(SamplingConfig(sampler="ddim", num_steps=30), DiffusionConfig(), False, False).timesteps
    plans = {kind: compute_plan(kind, rule, timesteps) for kind, rule in cfg.rules().items()}
    assert not all(plans["full"])  # the preset does reuse full attention, in models that have it
    keys = []
    with cache.attached(model):
        cache.begin(timesteps)
        for i in range(30):
            cache.at_step(i)
            keys.append(cache.step_key())
            assert keys[-1] == tuple(k for k in KINDS if k != "full" and not plans[k][i])
    assert keys[0] == () and len(set(keys)) > 2  # the first step computes everything; steps differ


def test_outputs_kept_in_place_give_the_same_samples_at_fixed_addresses():
    """Kept in place, stored outputs are copied into buffers that stay put over steps and loops (graphs
    read those addresses), and the samples are exactly those of the default storage."""
    model, inputs = _model("opensora")
    reference_cache = build_cache(_preset("opensora"))
    reference = _sample(model, inputs, reference_cache)
    cache = build_cache(_preset("opensora"))
    with cache.keep_in_place():
        first = _sample(model, inputs, cache)
        addresses = {key: t.data_ptr() for key, t in cache._stored.items()}
        assert addresses and cache.stored_bytes() > 0  # kept after the loop
        second = _sample(model, inputs, cache)
        assert {key: t.data_ptr() for key, t in cache._stored.items()} == addresses
    assert cache.stored_bytes() == 0  # freed on leaving
    assert torch.equal(first, reference) and torch.equal(second, reference)
    doubled = {kind: 2 * n for kind, n in reference_cache.report()["pab_reused"].items()}
    assert cache.report()["pab_reused"] == doubled


def test_recorded_calls_are_counted_only_when_added():
    model, inputs = _model("opensora")
    cache = build_cache(_preset("opensora"))
    x, t, text, mask = inputs
    with torch.no_grad(), cache.attached(model):
        cache.begin([900.0, 800.0])
        cache.at_step(0)
        with cache.recording() as calls:
            model(x, t, text, mask)
        assert sum(cache.computed.values()) == 0 and sum(calls[0].values()) > 0
        cache.count(calls)
        cache.count(calls)
        assert cache.computed == calls[0] + calls[0]


# --- on a GPU ------------------------------------------------------------------------------------------

SAMPLE = ["task=sample", "sampling.num_steps=10", "sampling.num_frames=4", "sampling.height=16"]
SAMPLE += ["sampling.width=24", "precision=bf16"]
TWO_PROMPTS = "sampling.prompts=['a cat on a boat','a red car']"


def _graph_counts(text: str) -> tuple[int, int]:
    """(captured, replays) summed over the run's "CUDA graphs: ..." log lines."""
    found = re.findall(r"CUDA graphs: (\d+) captured, (\d+) replays", text)
    return sum(int(c) for c, _ in found), sum(int(r) for _, r in found)


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param(["model=opensora", "pab=opensora", TWO_PROMPTS], marks=gpu, id="opensora-pab"),
        pytest.param(["model=opensora", "pab=off", TWO_PROMPTS], marks=gpu, id="opensora-off"),
        pytest.param(["model=latte", "pab=fast", "kernels=fused", TWO_PROMPTS], marks=gpu, id="latte-fast-fused"),
        pytest.param(["model=cogvideox", "pab=cogvideox", TWO_PROMPTS], marks=gpu, id="cogvideox-pab"),
        # Batches of 2 then 1 prompt: the second batch's new shapes drop the graphs and capture again.
        pytest.param(
            ["model=opensora", "pab=opensora", "sampling.prompts=['a','b','c']", "sampling.batch_size=2"],
            marks=gpu,
            id="opensora-pab-two-batch-sizes",
        ),
    ],
)
def test_graphed_sampling_equals_eager_sampling(tmp_path, caplog, overrides):
    eager = run_inprocess([*SAMPLE, *overrides], tmp_path / "eager", device="cuda")
    with caplog.at_level("INFO"):
        graphed = run_inprocess([*SAMPLE, *overrides, "kernels.cuda_graphs=true"], tmp_path / "graphed", device="cuda")
    captured, replays = _graph_counts(caplog.text)
    assert captured >= 1 and replays >= 10 - captured  # most steps replayed a graph
    # The same kernels on the same inputs: bit for bit.
    latents = [torch.load(m["samples_pt"], weights_only=False)["latents"] for m in (eager, graphed)]
    assert torch.isfinite(latents[0]).all() and torch.equal(latents[0], latents[1])
    for key in ("pab_computed", "pab_reused"):
        assert graphed.get(key) == eager.get(key)


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=gpu)])
def test_graphed_class_sampling_equals_eager(tmp_path, caplog, device):
    # 20 samples in batches of 8, 8 and 4: one graph for the first two, captured again for the last.
    common = ["task=sample", "sampling.num_steps=5", "sampling.num_per_class=2", "sampling.batch_size=8"]
    common += ["precision=bf16"]
    eager = run_inprocess(common, tmp_path / "eager", device=device)
    with caplog.at_level("INFO"):
        graphed = run_inprocess([*common, "kernels.cuda_graphs=true"], tmp_path / "graphed", device=device)
    assert _graph_counts(caplog.text) == (2, 3 * 5 - 2)
    images = [torch.load(m["samples_pt"], weights_only=True)["latents"] for m in (eager, graphed)]
    assert torch.equal(images[0], images[1])
