"""Training: resume equality, precision, accumulation, EMA, checkpoints, latents and bad input."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from conftest import TINY, read_checkpoint, read_losses, run_inprocess
from videosys.errors import ConfigError
from videosys.precision import PrecisionConfig, make_grad_scaler
from videosys.tasks import checkpoint as ckpt_io
from videosys.tasks.common import EMA
from videosys.tasks.train import optimizer_step

RESUMABLE = ["task.steps=6", "task.ckpt_every=3", "task.log_every=1", "task.keep_last=0", "task.sample_at_end=false"]


@pytest.mark.parametrize(
    "data",
    [
        ["task.batch_size=8", "task.grad_accum=2"],
        # Worker processes and random flips must resume to the same samples too.
        ["data=imagefolder", "data.image_size=16", "data.num_workers=2", "task.batch_size=4"],
    ],
    ids=["digits-accum", "imagefolder-workers-flip"],
)
def test_stopped_and_resumed_run_has_the_same_losses(tmp_path: Path, data, request):
    if "data=imagefolder" in data:
        data = [*data, f"data.path={request.getfixturevalue('image_folder')}"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_inprocess([*RESUMABLE, *data], straight)
    # Stop after the step-3 checkpoint ...
    run_inprocess([*RESUMABLE, *data, "task.steps=3"], resumed)
    assert [p.name for p in ckpt_io.list_checkpoints(resumed / "checkpoints")] == ["step_0000003"]
    # ... and resume in a fresh run of the same directory.
    metrics = run_inprocess([*RESUMABLE, *data, "resume=auto"], resumed)
    assert metrics["resumed_from_step"] == 3
    expected, actual = read_losses(straight), read_losses(resumed)
    assert sorted(actual) == sorted(expected) == [1, 2, 3, 4, 5, 6]
    assert actual == expected  # bit-for-bit on CPU
    final_a = read_checkpoint(straight / "checkpoints/step_0000006")
    final_b = read_checkpoint(resumed / "checkpoints/step_0000006")
    for key, value in final_a["ema"].items():
        assert torch.equal(value, final_b["ema"][key]), key


def test_resume_after_a_crash_past_the_checkpoint_rewinds_the_metrics(tmp_path: Path):
    run_dir = tmp_path / "run"
    run_inprocess(RESUMABLE, run_dir)
    straight = read_losses(run_dir)
    # A crash after step 5 loses the step-6 checkpoint but metrics.jsonl already has steps 4..6.
    shutil.rmtree(run_dir / "checkpoints/step_0000006")
    run_inprocess([*RESUMABLE, "resume=auto"], run_dir)
    lines = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert lines == [1, 2, 3, 4, 5, 6]
    assert read_losses(run_dir) == straight


def test_resume_from_an_explicit_checkpoint_of_another_run(tmp_path: Path):
    first = tmp_path / "first"
    run_inprocess(RESUMABLE, first)
    metrics = run_inprocess([*RESUMABLE, f"resume={first}/checkpoints/step_0000003"], tmp_path / "second")
    assert metrics["resumed_from_step"] == 3
    assert read_losses(tmp_path / "second") == {s: v for s, v in read_losses(first).items() if s > 3}


def test_resume_auto_without_checkpoint_starts_fresh(tmp_path: Path):
    metrics = run_inprocess([*TINY, "resume=auto", "task.sample_at_end=false"], tmp_path / "run")
    assert metrics["resumed_from_step"] == 0


def test_resume_with_a_different_model_is_refused(tmp_path: Path):
    run_inprocess([*RESUMABLE, "task.steps=3"], tmp_path / "run")
    with pytest.raises(ConfigError, match="hidden_size"):
        run_inprocess([*RESUMABLE, "resume=auto", "model.hidden_size=64"], tmp_path / "run")


def test_missing_resume_path_names_it(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="resume=.*nope.pt"):
        run_inprocess([*TINY, f"resume={tmp_path / 'nope.pt'}"], tmp_path / "run")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_tracks_fp32(tmp_path: Path, precision):
    common = [*TINY, "task.sample_at_end=false", "task.log_every=1"]
    run_inprocess(common, tmp_path / "fp32")
    reference = read_losses(tmp_path / "fp32")
    run_inprocess([*common, f"precision={precision}"], tmp_path / precision)
    losses = read_losses(tmp_path / precision)
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    # Same data, noise and init: the first step's loss differs only by rounding.
    assert losses[1] == pytest.approx(reference[1], rel=0.03)
    state = read_checkpoint(tmp_path / precision / "checkpoints/step_0000004")
    assert all(v.dtype == torch.float32 for v in state["ema"].values())
    assert all(v.dtype == torch.float32 for v in state["model"].values())


def _deterministic_objective(model, x, inputs, draws):
    """Stands in for the diffusion loss: a fixed function of the batch, so accumulation is testable."""
    return (model(x) - inputs["y"].float().view(-1, 1)).square().mean(dim=1)


def test_gradient_accumulation_equals_one_big_batch():
    torch.manual_seed(0)
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    grads = []
    for chunks in (1, 2, 4):
        torch.manual_seed(1)
        model = torch.nn.Linear(5, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        fp32 = PrecisionConfig()
        micro = [(xc, {"y": yc}, None) for xc, yc in zip(x.chunk(chunks), y.chunk(chunks), strict=True)]
        loss, _ = optimizer_step(
            model, _deterministic_objective, micro, optimizer, make_grad_scaler(fp32, x.device), fp32, 0.0
        )
        grads.append((loss.item(), model.weight.grad.clone()))
    for loss, grad in grads[1:]:
        assert loss == pytest.approx(grads[0][0], rel=1e-6)
        torch.testing.assert_close(grad, grads[0][1])


def test_ema_update_rule():
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.9, warmup=False)
    before = {name: value.clone() for name, value in ema.shadow.items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for name, current in model.named_parameters():
        torch.testing.assert_close(ema.shadow[name], 0.9 * before[name] + 0.1 * current)
    ema.copy_to(model)
    assert torch.equal(model.weight, ema.shadow["weight"])
    warm = EMA(model, decay=0.9999, warmup=True)
    assert warm.current_decay() == pytest.approx(0.1)


def test_checkpoint_write_is_atomic(tmp_path: Path, monkeypatch):
    target = tmp_path / "checkpoints" / "step_0000010.pt"
    ckpt_io.atomic_save({"step": 5}, target)

    def failing_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt_io.atomic_save({"step": 10}, target)
    monkeypatch.undo()
    assert torch.load(target, weights_only=True) == {"step": 5}  # the old file is untouched
    assert sorted(p.name for p in target.parent.iterdir()) == ["step_0000010.pt"]  # no temp file left


def test_checkpoints_are_pruned_to_keep_last(tmp_path: Path):
    run_inprocess([*RESUMABLE, "task.ckpt_every=1", "task.keep_last=2"], tmp_path / "run")
    assert [p.name for p in ckpt_io.list_checkpoints(tmp_path / "run/checkpoints")] == [
        "step_0000005",
        "step_0000006",
    ]


def test_activation_checkpointing_trains_the_same(tmp_path: Path):
    common = [*RESUMABLE, "task.steps=3"]
    run_inprocess(common, tmp_path / "plain")
    run_inprocess([*common, "task.activation_checkpointing=true"], tmp_path / "ac")
    plain, ac = read_losses(tmp_path / "plain"), read_losses(tmp_path / "ac")
    assert plain.keys() == ac.keys()
    for step in plain:
        assert ac[step] == pytest.approx(plain[step], rel=1e-5)


def test_latent_training_on_an_image_folder_with_a_local_vae(tmp_path: Path, image_folder, tiny_vae):
    overrides = [
        *TINY,
        "data=imagefolder",
        f"data.path={image_folder}",
        "data.image_size=16",
        "data.num_workers=0",
        f"vae.path={tiny_vae}",
        "sampling.classes=[1]",
        "sampling.num_per_class=3",
    ]
    metrics = run_inprocess(overrides, tmp_path / "run")
    state = ckpt_io.read_meta(Path(metrics["checkpoint"]))
    # The model works on the VAE's latent: 4 channels at half the image size, 2 classes from the folders.
    assert (state["model_config"]["in_channels"], state["model_config"]["input_size"]) == (4, 8)
    assert state["model_config"]["num_classes"] == 2
    samples = torch.load(metrics["samples_pt"], weights_only=True)
    assert samples["latents"].shape == (3, 4, 8, 8)
    assert samples["images"].shape == (3, 3, 16, 16)  # decoded back to pixels
    assert samples["labels"].tolist() == [1, 1, 1]
    assert samples["images"].abs().max() <= 1.0
    assert "class_accuracy" not in metrics  # only digits has a classifier


def test_unreadable_images_are_skipped_warned_and_counted(tmp_path: Path, image_folder, caplog):
    bad = image_folder / "dogs" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    (image_folder / "cats" / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0 garbage")
    overrides = [*TINY, "data=imagefolder", f"data.path={image_folder}", "data.image_size=16", "data.num_workers=0"]
    overrides += ["task.steps=6", "task.batch_size=7", "task.sample_at_end=false"]
    with caplog.at_level(logging.WARNING):
        metrics = run_inprocess(overrides, tmp_path / "run")
    # 14 files, 42 samples drawn: each of the two broken files comes up three times (three epochs).
    assert metrics["skipped_samples"] == 6
    assert "broken.png" in caplog.text and "truncated.jpg" in caplog.text


def test_bad_data_paths_stop_before_training(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="data.path=.*missing-folder"):
        run_inprocess([*TINY, "data=imagefolder", f"data.path={tmp_path / 'missing-folder'}"], tmp_path / "a")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="no class sub-folders"):
        run_inprocess([*TINY, "data=imagefolder", f"data.path={empty}"], tmp_path / "b")
    (empty / "cats").mkdir()
    (empty / "cats" / "notes.txt").write_text("no images here")
    with pytest.raises(ConfigError, match="no images"):
        run_inprocess([*TINY, "data=imagefolder", f"data.path={empty}"], tmp_path / "c")
    with pytest.raises(ConfigError, match="data=imagefolder needs data.path"):
        run_inprocess([*TINY, "data=imagefolder"], tmp_path / "d")
    assert not (tmp_path / "a" / "checkpoints").exists()


def test_missing_vae_path_names_it(tmp_path: Path, image_folder):
    overrides = [*TINY, "data=imagefolder", f"data.path={image_folder}", f"vae.path={tmp_path / 'no-vae'}"]
    with pytest.raises(FileNotFoundError, match="vae.path=.*no-vae"):
        run_inprocess(overrides, tmp_path / "run")


def test_unknown_flavor_and_batch_arithmetic_stop_early(tmp_path: Path):
    with pytest.raises(ConfigError, match="model.flavor='M/3'"):
        run_inprocess([*TINY, "model.flavor=M/3"], tmp_path / "a")
    with pytest.raises(ConfigError, match="task.batch_size=10 is not divisible by task.grad_accum=4"):
        run_inprocess([*TINY, "task.batch_size=10", "task.grad_accum=4"], tmp_path / "b")


def test_copying_a_run_dir_keeps_it_resumable(tmp_path: Path):
    run_inprocess([*RESUMABLE, "task.steps=3"], tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    metrics = run_inprocess([*RESUMABLE, "resume=auto"], tmp_path / "b")
    assert metrics["resumed_from_step"] == 3


def test_sampling_from_diffusers_weights_matches_the_diffusers_model(tmp_path: Path):
    from test_dit import tiny_diffusers_dit
    from videosys.diffusion import DiffusionConfig, SamplingConfig, make_sampler, sample_class_conditional

    reference, folder = tiny_diffusers_dit(tmp_path)
    arch = ["model.depth=3", "model.hidden_size=32", "model.num_heads=2", f"model.weights={folder}"]
    sampling = ["sampling.classes=[0,4]", "sampling.num_per_class=2", "sampling.num_steps=5", "sampling.seed=3"]
    # The default data is digits (1 x 8 x 8, 10 classes); the diffusers folder's own geometry must win.
    metrics = run_inprocess(["task=sample", *arch, *sampling], tmp_path / "run")
    ours = torch.load(metrics["samples_pt"], weights_only=True)
    assert metrics["model_config"]["in_channels"] == 3 and metrics["model_config"]["num_classes"] == 5
    cfg = SamplingConfig(classes=[0, 4], num_per_class=2, num_steps=5, seed=3, cfg_scale=2.0)
    expected = sample_class_conditional(
        lambda x, t, y: reference(x, t, y).sample,
        torch.tensor([0, 0, 4, 4]),
        (3, 8, 8),
        make_sampler(cfg, DiffusionConfig().resolved(), learn_sigma=True, clip=True),
        null_label=5,
        cfg_scale=2.0,
        generator=torch.Generator().manual_seed(3),
    )
    torch.testing.assert_close(ours["latents"], expected, rtol=1e-4, atol=1e-5)


def test_sampling_from_a_plain_state_dict_takes_geometry_from_the_data(tmp_path: Path):
    from videosys.models.dit import DiT, DiTConfig

    weights = tmp_path / "dit.pt"
    torch.save(DiT(DiTConfig(input_size=8, in_channels=2, num_classes=3)).state_dict(), weights)
    data = ["data=synthetic", "data.channels=2", "data.image_size=8", "data.num_classes=3"]
    metrics = run_inprocess(
        ["task=sample", f"model.weights={weights}", *data, "sampling.num_steps=2", "sampling.num_per_class=1"],
        tmp_path / "run",
    )
    assert torch.load(metrics["samples_pt"], weights_only=True)["images"].shape == (3, 2, 8, 8)


def test_interrupted_saves_are_not_checkpoints(tmp_path: Path):
    run_inprocess([*RESUMABLE, "task.steps=3"], tmp_path / "run")
    folder = tmp_path / "run/checkpoints"
    shutil.copytree(folder / "step_0000003", folder / ".step_0000006.tmp")  # a save that never finished
    shutil.copytree(folder / "step_0000003", folder / "step_0000005")
    (folder / "step_0000005/meta.pt").unlink()  # rank 0 died before writing its metadata
    assert [p.name for p in ckpt_io.list_checkpoints(folder)] == ["step_0000003"]
    assert ckpt_io.resolve_resume("auto", tmp_path / "run").name == "step_0000003"


def test_a_file_given_as_checkpoint_is_refused(tmp_path: Path):
    weights = tmp_path / "old.pt"
    torch.save({"model": {}}, weights)
    with pytest.raises(ConfigError, match="resume=.*old.pt is a file; VideoSys checkpoints are step_\\* folders"):
        run_inprocess([*TINY, f"resume={weights}"], tmp_path / "run")


def test_offload_without_gpus_is_refused_before_work(tmp_path: Path):
    with pytest.raises(ConfigError, match="parallel.offload=true on device=cpu.*set parallel.offload=false"):
        run_inprocess([*TINY, "parallel.offload=true"], tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()
