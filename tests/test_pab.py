"""Pyramid Attention Broadcast (videosys.cache): schedules from fractional and absolute windows, their
errors, exactness with every interval at 1, call counts against the schedule, reused outputs gated by the
current step, per-sample caches, and sequence- and CFG-parallel PAB against one process (gloo)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from multiprocess import run_ranks
from test_parallel import VIDEO, build, relative_error
from videosys.cache import (
    KINDS,
    BroadcastRule,
    MLPBroadcastRule,
    PABConfig,
    build_cache,
    compute_plan,
    model_kinds,
    steps_in_window,
)
from videosys.diffusion import DiffusionConfig, SamplingConfig
from videosys.diffusion.sampling import denoise_loop, guided, make_sampler
from videosys.distributed import CommCounter, ParallelConfig, init_distributed
from videosys.errors import ConfigError
from videosys.models.blocks import AdaLNSingleBlock, attend
from videosys.models.cogvideox import CogVideoX, CogVideoXConfig
from videosys.ops import KernelsConfig
from videosys.parallelize import cfg_parallel, compile_blocks, compile_settings, parallelize
from videosys.precision import PrecisionConfig
from videosys.run import compose_config, to_run_config
from videosys.tasks.common import attached

VIDEO_MODELS = ("latte", "opensora", "opensora_plan", "cogvideox")
STEPS = 10


def _preset(name: str) -> PABConfig:
    return to_run_config(compose_config([f"pab={name}"])).pab


def _every_kind(interval: int, window=(0.0, 1.0), mlp_blocks=(0,)) -> PABConfig:
    rule = BroadcastRule(interval=interval, window=list(window))
    mlp = MLPBroadcastRule(interval=interval, window=list(window), blocks=list(mlp_blocks))
    return PABConfig("test", *(dataclasses.replace(rule) for _ in KINDS[:-1]), mlp)


def _model(name: str):
    """A debug video model with random weights and its inputs (x, t, text, mask)."""
    if name != "cogvideox":
        return build(name)
    torch.manual_seed(0)
    model = CogVideoX(CogVideoXConfig(flavor="debug", input_size=VIDEO, in_channels=4, max_text_length=5))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    mask = torch.ones(2, 5, dtype=torch.bool)
    return model.eval(), (torch.randn(2, 4, *VIDEO), torch.tensor([10.0, 700.0]), torch.randn(2, 5, 32), mask)


def _sample(model, inputs, cache, steps: int = STEPS, guided_by=None) -> torch.Tensor:
    """The real denoise loop (DDIM) from inputs' x as noise, conditioned on inputs' text; with
    `guided_by` (a function over the [cond; uncond] batch, e.g. CFG parallel) classifier-free guidance."""
    x, _, text, mask = inputs
    sampler = make_sampler(SamplingConfig(sampler="ddim", num_steps=steps), DiffusionConfig(), False, False)

    def predict(x_t, t):
        if guided_by is None:
            return model(x_t, t, text, mask)
        both = guided_by(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([text, 0 * text]), torch.cat([mask, mask]))
        return guided(both.float(), x.shape[1], 4.0, False)

    with attached(cache, model):
        return denoise_loop(predict, x.clone(), sampler, torch.Generator().manual_seed(0), cache)


# --- schedules -------------------------------------------------------------------------------------


def test_fraction_window_selects_the_same_part_of_any_schedule():
    rule = BroadcastRule(interval=2, window=[0.25, 0.85])
    for steps, first, last in ((30, 8, 25), (60, 15, 50), (20, 5, 16)):
        inside = steps_in_window(rule, list(range(steps, 0, -1)))
        assert (inside[0], inside[-1]) == (first, last), steps
        plan = compute_plan("spatial", rule, list(range(steps, 0, -1)))
        # Outside the window every step computes; inside, the first step and every 2nd one after it.
        assert all(plan[i] for i in range(steps) if i not in inside)
        assert [plan[i] for i in inside] == [(i - first) % 2 == 0 for i in inside]
    assert compute_plan("spatial", BroadcastRule(interval=1, window=[0.5, 0.6]), [3, 2, 1]) == [True] * 3


def test_absolute_window_follows_the_timesteps_and_refuses_to_select_nothing():
    shifted = [1000.0, 993.0, 985.0, 900.0, 700.0, 450.0, 256.0, 143.0]
    rule = BroadcastRule(interval=2, timesteps=[930, 450])
    assert steps_in_window(rule, shifted) == [3, 4, 5]
    assert compute_plan("temporal", rule, shifted) == [True, True, True, True, False, True, True, True]
    with pytest.raises(ConfigError, match=r"pab\.cross\.timesteps=\[100, 50\] selects no step.*1000\.0 to 143\.0"):
        compute_plan("cross", BroadcastRule(interval=6, timesteps=[100, 50]), shifted)
    with pytest.raises(ConfigError, match=r"pab\.spatial\.window=\[0\.51, 0\.55\] selects no step of a 10-step"):
        compute_plan("spatial", BroadcastRule(interval=2, window=[0.51, 0.55]), list(range(10)))


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (PABConfig("x", spatial=BroadcastRule(interval=0)), r"pab\.spatial\.interval=0 must be at least 1"),
        (PABConfig("x", cross=BroadcastRule(window=[0.9, 0.1])), r"pab\.cross\.window=\[0\.9, 0\.1\] must be"),
        (PABConfig("x", temporal=BroadcastRule(timesteps=[500])), r"pab\.temporal\.timesteps=\[500\] must be"),
        (PABConfig("x", mlp=MLPBroadcastRule(blocks=[-1])), r"pab\.mlp\.blocks=\[-1\] must be"),
    ],
)
def test_bad_rules_are_refused_with_the_value(cfg, message):
    with pytest.raises(ConfigError, match=message):
        build_cache(cfg)


def test_policy_refuses_models_and_settings_it_cannot_serve():
    from videosys.models.dit import DiT, DiTConfig

    dit = DiT(DiTConfig(flavor="debug", input_size=8, in_channels=1, num_classes=10))
    with pytest.raises(ConfigError, match="DiT has none; use pab=off"), build_cache(_every_kind(2)).attached(dit):
        pass
    model, _ = _model("opensora")
    too_deep = build_cache(_every_kind(2, mlp_blocks=[0, 7]))
    message = r"pab\.mlp\.blocks has \[7\], but the model's block lists have 2"
    with pytest.raises(ConfigError, match=message), too_deep.attached(model):
        pass
    with pytest.raises(ConfigError, match="kernels.compile=true"):
        build_cache(_preset("opensora"), compiled_blocks=True)
    compiled, _ = _model("opensora")
    compile_blocks(compiled, compile_settings(), fullgraph=True)  # compiles lazily: nothing runs here
    with (
        pytest.raises(ConfigError, match=r"spatial_blocks\.0 is compiled"),
        build_cache(_every_kind(2)).attached(compiled),
    ):
        pass
    assert build_cache(PABConfig()) is None


def test_fraction_windows_are_checked_against_the_step_count_up_front():
    cfg = _preset("opensora")
    build_cache(cfg, num_steps=4)  # [0.25, 0.85] of 4 steps: steps 1 to 3
    with pytest.raises(ConfigError, match=r"pab\.spatial\.window=\[0\.25, 0\.85\] selects no step of a 1-step"):
        build_cache(cfg, num_steps=1)


def test_every_preset_composes():
    for name in ("off", "latte", "opensora", "opensora_plan", "cogvideox", "fast", "quality"):
        cfg = _preset(name)
        assert cfg.name == name
        build_cache(cfg)  # validates every rule


# --- models ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", VIDEO_MODELS)
def test_interval_one_equals_no_pab_exactly(name):
    model, inputs = _model(name)
    reference = _sample(model, inputs, None)
    cache = build_cache(_every_kind(1))
    out = _sample(model, inputs, cache)
    assert torch.equal(out, reference)
    report = cache.report()
    assert set(report["pab_reused"].values()) == {0}
    assert all(n > 0 for n in report["pab_computed"].values())


def _kind_counts(model) -> dict[str, int]:
    """How many blocks make each kind of call per forward."""
    counts = dict.fromkeys(KINDS, 0)
    for module in model.modules():
        if isinstance(module, AdaLNSingleBlock):
            counts[module.layout] += 1
            counts["cross"] += module.cross_attn is not None
        elif "cache" in vars(module):  # CogVideoX's joint block
            counts["full"] += 1
    return counts


@pytest.mark.parametrize("name", VIDEO_MODELS)
def test_counts_follow_the_schedule(name):
    model, inputs = _model(name)
    cfg = _every_kind(2, window=(0.2, 0.9), mlp_blocks=[1])
    cfg.temporal.interval, cfg.cross.interval = 3, 4
    cache = build_cache(cfg)
    timesteps = make_sampler(SamplingConfig(sampler="ddim", num_steps=STEPS), DiffusionConfig(), False, False).timesteps
    out = _sample(model, inputs, cache)
    assert torch.isfinite(out).all()
    assert relative_error(out, _sample(model, inputs, None)) > 0  # reuse changed something
    report = cache.report()
    blocks = _kind_counts(model)
    lists = 2 if name in ("latte", "opensora") else 1
    blocks["mlp"] = lists  # block 1 of each list
    for kind in KINDS:
        plan = compute_plan(kind, cfg.rules()[kind], timesteps)
        assert report["pab_computed"].get(kind, 0) == blocks[kind] * plan.count(True), kind
        assert report["pab_reused"].get(kind, 0) == blocks[kind] * plan.count(False), kind
    assert report["pab_cache_mib"] > 0
    assert cache.stored_bytes() == 0  # freed when the loop ended
    attention = [k for k in KINDS if k != "mlp"]
    reused = sum(report["pab_reused"].get(k, 0) for k in attention)
    total = reused + sum(report["pab_computed"].get(k, 0) for k in attention)
    assert report["pab_attention_reused"] == pytest.approx(reused / total) and 0 < reused < total
    assert model_kinds(model) == {kind for kind, n in blocks.items() if n}


def test_reused_attention_is_gated_by_the_current_step():
    """At a reuse step the block adds gate(t_now) * h(step it was computed): the stored output is the
    attention's, before its gate; cross-attention and MLP (interval 1) are computed fresh."""
    torch.manual_seed(0)
    block = AdaLNSingleBlock(16, 2, "spatial", cross_attention=True).eval()
    x_then, x_now = torch.randn(2, 3, 4, 16), torch.randn(2, 3, 4, 16)
    t6_then, t6_now = torch.randn(2, 6, 16), torch.randn(2, 6, 16)
    context, mask = torch.randn(2, 5, 16), torch.ones(2, 5, dtype=torch.bool)
    cfg = PABConfig("test", spatial=BroadcastRule(interval=2))
    cache = build_cache(cfg)
    holder = torch.nn.ModuleList([block])
    with torch.no_grad(), cache.attached(holder):
        cache.begin([2.0, 1.0])
        cache.at_step(0)
        block(x_then, t6_then, context, mask)
        cache.at_step(1)
        out = block(x_now, t6_now, context, mask)
        # By hand: the attention of step 0's input under step 0's modulation ...
        ops = block.ops
        shift, scale, *_ = (block.scale_shift_table[None] + t6_then).unbind(1)
        h_then = attend(block.attn, ops.norm_modulate(block.norm1, x_then, shift, scale), "spatial")
        # ... entering step 1 through step 1's gate, the rest of the block computed fresh.
        _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = (block.scale_shift_table[None] + t6_now).unbind(1)
        x = x_now + gate_msa[:, None, None] * h_then
        x = x + block.cross_attn(x, context, mask)
        expected = x + gate_mlp[:, None, None] * block.mlp(ops.norm_modulate(block.norm2, x, shift_mlp, scale_mlp))
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    # The MLP is no listed block: neither counted nor stored.
    assert cache.report()["pab_reused"] == {"spatial": 1, "cross": 0}


def test_each_sample_keeps_its_own_cache():
    """A batch of two sampled with PAB gives each sample what it gets sampled alone."""
    model, inputs = _model("opensora")
    cfg = _preset("opensora")
    together = _sample(model, inputs, build_cache(cfg))
    for i in range(2):
        alone = _sample(model, tuple(t[i : i + 1] for t in inputs), build_cache(cfg))
        # Batched and single GEMMs round differently (3e-7 without PAB too); another sample's cache would
        # give an error of order 1.
        assert relative_error(alone[0], together[i]) <= 1e-6


# --- parallel ---------------------------------------------------------------------------------------


def _parallel_pab(rank: int, world: int, cases: list[tuple[str, dict]]) -> dict:
    """PAB sampling (opensora-style rules) with a parallel layout against PAB in one process: output error,
    both processes' call counts, and the sequence all-to-alls with and without PAB."""
    results = {}
    cfg = _every_kind(2, window=(0.2, 0.9), mlp_blocks=[0])
    cfg.temporal.interval, cfg.cross.interval = 4, 6
    for name, degrees in cases:
        parallel = ParallelConfig(**degrees)
        ctx = init_distributed(parallel, "cpu")
        reference, inputs = build(name)
        model = copy.deepcopy(reference)
        ctx.counter = CommCounter()  # before parallelize: the sequence plan's groups report to it
        parallelize(model, ctx, parallel, KernelsConfig(), PrecisionConfig(name="fp32", dtype="fp32"))
        guided_by = cfg_parallel(model, ctx) if parallel.cfg > 1 else None
        ref_guided_by = reference if parallel.cfg > 1 else None
        baseline = _sample(model, inputs, None, guided_by=guided_by)
        calls_off = sum(ctx.counter.calls.values())
        cache = build_cache(cfg)
        out = _sample(model, inputs, cache, guided_by=guided_by)
        calls_pab = sum(ctx.counter.calls.values()) - calls_off
        one = build_cache(cfg)
        expected = _sample(reference, inputs, one, guided_by=ref_guided_by)
        results[name, tuple(sorted(degrees.items()))] = {
            "error": relative_error(out, expected),
            "error_off": relative_error(baseline, _sample(reference, inputs, None, guided_by=ref_guided_by)),
            "counts": (cache.report()["pab_reused"], one.report()["pab_reused"]),
            "calls": (calls_pab, calls_off),
        }
    return results


PARALLEL_CASES = [
    ("opensora", dict(sp_ulysses=2, sp_mode="dsp")),
    ("latte", dict(sp_ulysses=2, sp_mode="ulysses")),
    ("opensora_plan", dict(sp_ring=2, sp_mode="ring")),
    ("cogvideox", dict(sp_ulysses=2, sp_mode="ulysses")),
    ("latte", dict(cfg=2)),
]


def test_parallel_pab_equals_one_process():
    results = run_ranks(2, _parallel_pab, PARALLEL_CASES)
    assert len(results) == len(PARALLEL_CASES)
    for case, r in results.items():
        assert r["error"] <= 1e-5 and r["error_off"] <= 1e-5, (case, r)
        local, single = r["counts"]
        # CFG parallel: each rank runs its half through the same blocks, so the counts match one process
        # running the whole batch.
        assert local == single and sum(local.values()) > 0, (case, r)
        calls_pab, calls_off = r["calls"]
        if dict(case[1]).get("cfg", 1) == 1:
            assert 0 < calls_pab < calls_off, (case, r)  # broadcast steps skip the attention's collectives


# --- the sampling task ------------------------------------------------------------------------------


def test_sample_task_reports_calls_and_cache_memory(tmp_path, caplog):
    from conftest import run_inprocess

    overrides = ["task=sample", "model=opensora", "sampling.num_steps=10", "sampling.num_frames=4"]
    overrides += ["sampling.height=16", "sampling.width=24", "sampling.prompts=['a cat on a boat']"]
    off = run_inprocess(overrides, tmp_path / "off")
    with caplog.at_level("INFO"):
        metrics = run_inprocess([*overrides, "pab=opensora"], tmp_path / "pab")
    # opensora: [0.25, 0.85] of 10 steps is steps 3..8; spatial reuses every other one there (3 steps),
    # temporal 4 of 6, cross 5 of 6; the debug model has 2 spatial and 2 temporal blocks, all with cross.
    assert metrics["pab_reused"] == {"spatial": 2 * 3, "temporal": 2 * 4, "cross": 4 * 5}
    assert metrics["pab_computed"] == {"spatial": 2 * 7, "temporal": 2 * 6, "cross": 4 * 5}
    assert metrics["pab_cache_mib"] > 0
    assert "PAB (opensora): spatial 14 computed / 6 reused" in caplog.text
    videos = torch.load(metrics["samples_pt"], weights_only=False)["latents"]
    reference = torch.load(off["samples_pt"], weights_only=False)["latents"]
    assert torch.isfinite(videos).all() and not torch.equal(videos, reference)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["pab.spatial.window=[0.51,0.55]"], r"pab\.spatial\.window=\[0\.51, 0\.55\] selects no step of a 10-step"),
        (["kernels=compile"], "kernels.compile=true"),
    ],
)
def test_sample_task_refuses_a_policy_that_cannot_work(tmp_path, extra, message):
    from conftest import run_inprocess

    overrides = ["task=sample", "model=opensora", "sampling.num_steps=10", "sampling.num_frames=4", "pab=opensora"]
    overrides += ["sampling.height=16", "sampling.width=24", "sampling.prompts=['a cat on a boat']"]
    with pytest.raises(ConfigError, match=message):
        run_inprocess([*overrides, *extra], tmp_path)
    assert not (tmp_path / "samples.pt").exists()


def test_train_task_refuses_a_policy_the_model_cannot_serve_before_training(tmp_path):
    """DiT has no video blocks for PAB: the run stops when the model is built, before the first step (no
    metrics line, no checkpoint), not when it samples at the end."""
    from conftest import TINY, run_inprocess

    with pytest.raises(ConfigError, match="DiT has none; use pab=off"):
        run_inprocess([*TINY, "pab=opensora"], tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "checkpoints").exists()
