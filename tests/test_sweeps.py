"""Sweeps: Hydra multirun through the local, submitit-local and (real) Slurm launchers, the summary
table, and multi-task jobs as one torch.distributed world with the losses of torchrun."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import read_losses, run_cli
from slurm_cluster import free_port
from videosys.distributed import adopt_task_environment, first_host

TINY_TRAIN = ["task.steps=4", "task.batch_size=8", "task.log_every=1", "task.ckpt_every=2", "task.sample_at_end=false"]
REPO = Path(__file__).resolve().parents[1]


def launcher_args(launcher: str, tasks: int) -> list[str]:
    if launcher == "slurm":
        return [
            "hydra/launcher=slurm",
            "hydra.launcher.gpus_per_node=null",
            f"hydra.launcher.tasks_per_node={tasks}",
            "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.mem_gb=1",
            "hydra.launcher.timeout_min=10",
        ]
    if launcher == "submitit_local":
        return ["hydra/launcher=submitit_local", f"hydra.launcher.tasks_per_node={tasks}"]
    return []


@pytest.fixture
def launcher(request) -> tuple[str, dict]:
    """A launcher and the environment its jobs are submitted from: the real Slurm where it can run here (in
    CI it must), else submitit's local executor, which the same tests then exercise. Set
    VIDEOSYS_TEST_LAUNCHER=submitit_local to run them through the local executor anyway."""
    import slurm_cluster

    forced = os.environ.get("VIDEOSYS_TEST_LAUNCHER")
    if forced not in (None, "slurm", "submitit_local"):
        raise ValueError(f"VIDEOSYS_TEST_LAUNCHER={forced!r}: use slurm or submitit_local")
    use_slurm = forced == "slurm" or (
        forced is None and (slurm_cluster.missing() is None or os.environ.get("CI") == "true")
    )
    if use_slurm:
        return "slurm", request.getfixturevalue("slurm").env
    return "submitit_local", dict(os.environ)


def multirun(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    """`python -m videosys.run -m ARGS` on the CPU, from `env` (a launcher's submission environment)."""
    return subprocess.run(
        [sys.executable, "-m", "videosys.run", "-m", *args],
        cwd=cwd,
        env={**env, "CUDA_VISIBLE_DEVICES": ""},
        capture_output=True,
        text=True,
        timeout=900,
    )


def read_summary(sweep: Path) -> list[dict]:
    with open(sweep / "summary.csv") as f:
        return list(csv.DictReader(f))


def test_a_local_sweep_summarises_every_job_and_a_failure_does_not_stop_the_others(tmp_path: Path):
    sweep = tmp_path / "sweep"
    out = run_cli(["-m", *TINY_TRAIN[1:], "task.steps=2", "task.batch_size=0,8", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert out.returncode == 1, out.stderr[-2000:]  # a job failed: the sweep says so, after finishing
    rows = read_summary(sweep)
    assert [r["status"] for r in rows] == ["failed", "completed"]
    assert "task.batch_size=0" in rows[0]["overrides"] and rows[0]["log"] == str(sweep / "0" / "videosys.log")
    assert "must be at least 1" in json.loads((sweep / "0" / "status.json").read_text())["error"]
    final = json.loads((sweep / "1" / "metrics.json").read_text())["final_loss"]
    assert float(rows[1]["final_loss"]) == pytest.approx(final, rel=1e-3)
    assert f"job 0 failed: see {sweep / '0' / 'videosys.log'}" in out.stderr
    assert (sweep / "summary.md").read_text().count("\n") == 4  # header, rule, two jobs


def test_a_sweep_through_the_launcher_runs_one_job_per_combination(launcher, tmp_path: Path):
    """The issue's example grid (model=dit data=digits, 2 learning rates x parallel=none,ddp), as one-task
    jobs: four jobs, each one's metrics where the summary says."""
    name, env = launcher
    sweep = tmp_path / "sweep"
    grid = ["model=dit", "data=digits", "optimizer.lr=1e-3,3e-3", "parallel=none,ddp"]
    out = multirun([*launcher_args(name, 1), *TINY_TRAIN, *grid, f"hydra.sweep.dir={sweep}"], tmp_path, env)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = read_summary(sweep)
    assert [r["status"] for r in rows] == ["completed"] * 4
    losses = {}
    for row in rows:
        job = sweep / row["job"]
        lr = re.search(r"optimizer\.lr=(\S+)", row["overrides"]).group(1)
        layout = re.search(r"parallel=(\S+)", row["overrides"]).group(1)
        assert float(row["final_loss"]) == pytest.approx(
            json.loads((job / "metrics.json").read_text())["final_loss"], rel=1e-3
        )
        losses[lr, layout] = read_losses(job)
        assert sorted(losses[lr, layout]) == [1, 2, 3, 4]
    assert set(losses) == {(lr, layout) for lr in ("0.001", "0.003") for layout in ("none", "ddp")}
    assert losses["0.001", "none"] != losses["0.003", "none"]  # the learning rates differ
    for lr in ("0.001", "0.003"):  # data parallel over one task is the one-process run
        assert losses[lr, "ddp"] == pytest.approx(losses[lr, "none"], rel=1e-6)


def test_a_two_task_job_is_one_world_with_the_losses_of_torchrun(launcher, tmp_path: Path):
    name, env = launcher
    job = ["parallel=ddp", "device=cpu", *TINY_TRAIN]
    sweep = tmp_path / "sweep"
    out = multirun([*launcher_args(name, 2), *job, f"hydra.sweep.dir={sweep}"], tmp_path, env)
    assert out.returncode == 0, out.stderr[-3000:]
    shards = sorted(p.name for p in (sweep / "0" / "checkpoints" / "step_0000004").glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]  # both tasks held a shard: one 2-rank world
    reference = _torchrun_losses(job, tmp_path / "torchrun", tmp_path)
    assert read_losses(sweep / "0") == pytest.approx(reference, rel=1e-6)


def test_task_environments_become_torchrun_variables(monkeypatch):
    for key in [k for k in os.environ if k.startswith(("SLURM_", "SUBMITIT_"))] + [
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
    ]:
        monkeypatch.setenv(key, "")  # recorded, so that what adopt_task_environment sets is undone after
        monkeypatch.delenv(key)
    # The batch script of a 4-task allocation is one process: it has no step variables.
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_PROCID", "0")
    adopt_task_environment()
    assert "RANK" not in os.environ
    # Task 5 of an 8-task step over two nodes.
    step = dict(
        SLURM_STEP_NUM_TASKS="8",
        SLURM_PROCID="5",
        SLURM_LOCALID="1",
        SLURM_JOB_ID="4242",
        SLURM_STEP_NODELIST="gpu[07-08]",
    )
    for key, value in step.items():
        monkeypatch.setenv(key, value)
    adopt_task_environment()
    assert (os.environ["WORLD_SIZE"], os.environ["RANK"], os.environ["LOCAL_RANK"]) == ("8", "5", "1")
    assert os.environ["MASTER_ADDR"] == "gpu07" and 20000 <= int(os.environ["MASTER_PORT"]) < 40000
    port = os.environ["MASTER_PORT"]
    monkeypatch.setenv("SLURM_PROCID", "0")  # every task of the job computes the same port
    monkeypatch.delenv("RANK")
    adopt_task_environment()
    assert os.environ["MASTER_PORT"] == port and os.environ["RANK"] == "0"
    assert first_host("cpu1,gpu[1-2]") == "cpu1" and first_host("node-[7-8,10]") == "node-7"


def _wait_for_step(run_dir: Path, step: int, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run_dir / "metrics.jsonl").exists() and max(read_losses(run_dir), default=0) >= step:
            return
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.2)
    raise TimeoutError(f"no step {step} in {run_dir}")


@pytest.mark.parametrize("signum", [signal.SIGUSR2, signal.SIGTERM])
def test_a_stop_signal_checkpoints_the_current_step_and_resume_continues_the_same_losses(signum, tmp_path: Path):
    """What a Slurm time limit (SIGUSR2 from submitit) or a preemption (SIGTERM) does to a training run:
    it saves a checkpoint at the end of the step it is in (not only every ckpt_every), and a resume from
    it gives the losses of the uninterrupted run."""
    job = ["task.steps=60", "task.batch_size=8", "task.log_every=1", "task.ckpt_every=1000", "task.sample_at_end=false"]
    whole = tmp_path / "whole"
    assert run_cli([*job, f"run_dir={whole}"], tmp_path).returncode == 0
    stopped = tmp_path / "stopped"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    process = subprocess.Popen(
        [sys.executable, "-m", "videosys.run", *job, f"run_dir={stopped}"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for_step(stopped, 5, process)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == -signum, stderr[-3000:]  # the default action, after the checkpoint
    saved = sorted(p.name for p in (stopped / "checkpoints").glob("step_*"))
    assert len(saved) == 1 and 5 <= int(saved[0].removeprefix("step_")) < 60, saved
    assert run_cli([*job, f"run_dir={stopped}", "resume=auto"], tmp_path).returncode == 0
    assert read_losses(stopped) == pytest.approx(read_losses(whole), rel=1e-6)


def test_a_job_past_its_time_limit_is_requeued_and_resumes_with_continuous_losses(launcher, request, tmp_path: Path):
    """A job reaches its time limit: the stop signal comes before it, the job checkpoints the step it is in
    and submitit requeues it; the requeued job resumes in the same run directory and logs to the same
    (offline) wandb run. The losses equal those of one uninterrupted run, step for step.

    Slurm: the job starts with a 10-minute limit, and once it trains the test cuts the limit to one
    minute (`scontrol update TimeLimit=1`), so the signal (30 s before the limit, give or take Slurm's
    30 s check interval) comes while it trains, never while Python starts; 3000 steps (about 75 s here)
    outlast the minute, so the signal cannot miss the run. submitit_local: a one-minute
    limit, signalled exactly 30 s in, and 2000 steps (about 45 s here) outlast it."""
    name, env = launcher
    steps = 3000 if name == "slurm" else 2000
    job = [
        f"task.steps={steps}",
        "task.batch_size=8",
        "task.log_every=1",
        "task.ckpt_every=100000",
        "task.sample_at_end=false",
    ]
    if name == "slurm":
        limits = ["hydra.launcher.timeout_min=10", "hydra.launcher.signal_delay_s=30"]
        limits += ["hydra.launcher.max_num_timeout=8"]
    else:  # submitit's local executor always signals 30 s before the limit; its schema lacks the count
        limits = ["hydra.launcher.timeout_min=1", "+hydra.launcher.max_num_timeout=8"]
    sweep = tmp_path / "sweep"
    args = [*launcher_args(name, 1), *limits, *job, "logger=wandb", f"hydra.sweep.dir={sweep}"]
    env = {**env, "WANDB_MODE": "offline"}
    run_dir = sweep / "0"
    pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if name == "slurm":
        cluster = request.getfixturevalue("slurm")
        with cluster.requeued_jobs_start_at_once():
            command = [sys.executable, "-m", "videosys.run", "-m", *args]
            process = subprocess.Popen(command, cwd=tmp_path, env={**env, "CUDA_VISIBLE_DEVICES": ""}, **pipes)
            _wait_for_step(run_dir, 5, process)
            (job_id,) = cluster.running_job_ids()
            cluster.set_time_limit(job_id, 1)
            _, stderr = process.communicate(timeout=600)
    else:
        process = multirun(args, tmp_path, env)
        stderr = process.stderr
    assert process.returncode == 0, stderr[-3000:]
    log = (run_dir / "videosys.log").read_text()
    resumed = [int(step) for step in re.findall(r"resumed from \S+ at step (\d+)", log)]
    assert resumed and all(0 < step < steps for step in resumed), log[-3000:]  # requeued at least once
    assert read_summary(sweep)[0]["status"] == "completed"
    run_id = (run_dir / "wandb_run_id").read_text()
    wandb_runs = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == len(resumed) + 1 and all(r.endswith(f"-{run_id}") for r in wandb_runs), wandb_runs
    whole = tmp_path / "whole"
    assert run_cli([*job, f"run_dir={whole}"], tmp_path).returncode == 0
    assert read_losses(run_dir) == pytest.approx(read_losses(whole), rel=1e-6)


def _torchrun(args: list[str], cwd: Path) -> subprocess.Popen:
    """launch/torchrun.sh with 2 CPU processes, started (not waited for)."""
    env = {**os.environ, "NPROC": "2", "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    command = ["bash", str(REPO / "launch" / "torchrun.sh"), *args]
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _torchrun_losses(args: list[str], run_dir: Path, cwd: Path) -> dict[int, float]:
    """The losses of a 2-process torchrun of `args` in `run_dir`, run to its end."""
    process = _torchrun([*args, f"run_dir={run_dir}"], cwd)
    stderr = process.communicate(timeout=600)[1]
    assert process.returncode == 0, stderr[-3000:]
    return read_losses(run_dir)


def _ranks_of(process: subprocess.Popen) -> dict[int, int]:
    """{rank: pid} of the workers under a launch/torchrun.sh process (bash -> torchrun -> workers)."""
    ranks, frontier = {}, [process.pid]
    while frontier:
        parent = frontier.pop()
        children = subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True).stdout.split()
        for pid in map(int, children):
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                env = dict(
                    item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in item
                )
                if "RANK" in env and "videosys.run" in Path(f"/proc/{pid}/cmdline").read_text():
                    ranks[int(env["RANK"])] = pid
            frontier.append(pid)
    return ranks


def test_a_stop_signal_to_one_rank_checkpoints_every_rank_at_the_same_step(tmp_path: Path):
    """Slurm may signal the tasks of a job at slightly different times, or only some of them: the rank that
    got it tells the others, and all save one checkpoint of the same step before they stop."""
    job = ["parallel=ddp", "device=cpu", "task.steps=80", "task.batch_size=8", "task.log_every=1"]
    job += ["task.ckpt_every=1000", "task.sample_at_end=false"]
    whole = _torchrun_losses(job, tmp_path / "whole", tmp_path)
    stopped = tmp_path / "stopped"
    process = _torchrun([*job, f"run_dir={stopped}"], tmp_path)
    _wait_for_step(stopped, 5, process)
    os.kill(_ranks_of(process)[1], signal.SIGUSR2)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode != 0  # both ranks ended on the signal's default action, after the checkpoint
    saved = sorted((stopped / "checkpoints").glob("step_*"))
    assert len(saved) == 1 and 5 <= int(saved[0].name.removeprefix("step_")) < 80, stderr[-3000:]
    assert sorted(p.name for p in saved[0].glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    resumed = _torchrun_losses([*job, "resume=auto"], stopped, tmp_path)
    assert resumed == pytest.approx(whole, rel=1e-6)


def test_the_sweep_experiment_runs_its_grid(tmp_path: Path):
    sweep = tmp_path / "sweep"
    args = ["-m", "+experiment=dit_digits_sweep", "task.steps=2", "task.batch_size=8", "task.sample_at_end=false"]
    out = run_cli([*args, f"hydra.sweep.dir={sweep}"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = read_summary(sweep)
    grid = {(lr, width) for lr in ("0.0003", "0.001", "0.003") for width in ("96", "128")}
    got = {
        (
            re.search(r"optimizer\.lr=(\S+)", r["overrides"]).group(1),
            re.search(r"model\.hidden_size=(\S+)", r["overrides"]).group(1),
        )
        for r in rows
    }
    assert {(str(float(lr)), w) for lr, w in got} == {(str(float(lr)), w) for lr, w in grid}
    assert all(r["status"] == "completed" and float(r["final_loss"]) > 0 for r in rows)


def test_the_sbatch_template_runs_one_torchrun_world_with_the_losses_of_torchrun(slurm, tmp_path: Path):
    """launch/slurm.sbatch (srun + torchrun rendezvous, the multi-node template) on the real Slurm with two
    CPU processes on its one node gives the losses of launch/torchrun.sh."""
    job = ["parallel=ddp", "device=cpu", *TINY_TRAIN]
    run_dir = tmp_path / "sbatch_run"
    env = {
        **slurm.env,
        "NPROC_PER_NODE": "2",
        "RUN_DIR": str(run_dir),
        "PYTHON": sys.executable,
        "MASTER_PORT": str(free_port()),
        "CUDA_VISIBLE_DEVICES": "",
    }
    out = subprocess.run(
        ["sbatch", "--wait", "--nodes=1", "--cpus-per-task=2", f"--output={tmp_path / 'slurm-%j.out'}"]
        + [str(REPO / "launch" / "slurm.sbatch"), *job],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    logs = "\n".join(p.read_text()[-3000:] for p in tmp_path.glob("slurm-*.out"))
    assert out.returncode == 0, out.stderr + logs
    reference = _torchrun_losses(job, tmp_path / "torchrun", tmp_path)
    assert read_losses(run_dir) == pytest.approx(reference, rel=1e-6)
