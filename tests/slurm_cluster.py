"""A real single-node Slurm for the tests: Debian's slurm-wlm and munge, a slurm.conf in a temporary
folder, munged + slurmctld + slurmd started, and everything stopped afterwards.

Facts for Debian 12's Slurm 22.05: no cgroup plugin (leave cgroup.conf out), proctrack/linuxproc,
task/none, SlurmUser=root. Slurm runs where its daemons are installed and we are root; `install()`
adds them with apt when allowed (CI). Elsewhere the tests that need it skip, saying why.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch")


def missing() -> str | None:
    """Why a Slurm cannot be started here, or None."""
    if os.geteuid() != 0:
        return "the Slurm daemons need root"
    absent = [d for d in DAEMONS if shutil.which(d) is None]
    if absent:
        return f"{', '.join(absent)} not installed (apt-get install slurm-wlm munge)"
    return None


def install() -> None:
    """apt-get install slurm-wlm munge (needs root and the Debian mirror)."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "install", "-y", "-q", "slurm-wlm", "munge"], env=env, check=True, capture_output=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 4096


def _munge_works() -> bool:
    encoded = subprocess.run(["munge", "-n"], capture_output=True)
    if encoded.returncode:
        return False
    return subprocess.run(["unmunge"], input=encoded.stdout, capture_output=True).returncode == 0


class SlurmCluster:
    """One node (this machine), one partition `debug`; `env` points sbatch/squeue at it."""

    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.started: list[Path] = []  # pid files of the daemons we started

    def start(self) -> SlurmCluster:
        host = socket.gethostname().split(".")[0]
        for name in ("state", "spool", "log"):
            (self.root / name).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=videosys-test",
                    f"SlurmctldHost={host}",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    "AuthType=auth/munge",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "SchedulerType=sched/backfill",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_Core",
                    "ReturnToService=2",
                    "JobRequeue=1",
                    "KillWait=5",
                    "MinJobAge=600",
                    f"SlurmctldPort={free_port()}",
                    f"SlurmdPort={free_port()}",
                    f"StateSaveLocation={self.root / 'state'}",
                    f"SlurmdSpoolDir={self.root / 'spool'}",
                    f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
                    f"SlurmdPidFile={self.root / 'slurmd.pid'}",
                    f"SlurmctldLogFile={self.root / 'log' / 'slurmctld.log'}",
                    f"SlurmdLogFile={self.root / 'log' / 'slurmd.log'}",
                    f"NodeName={host} CPUs={os.cpu_count() or 2} RealMemory={int(_memory_mb() * 0.8)} State=UNKNOWN",
                    f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES",
                ]
            )
            + "\n"
        )
        if not _munge_works():
            Path("/run/munge").mkdir(parents=True, exist_ok=True)
            shutil.chown("/run/munge", "munge", "munge")
            subprocess.run(["munged", "--force"], check=True, capture_output=True)
            self.started.append(Path("/run/munge/munged.pid"))
        for daemon in ("slurmctld", "slurmd"):
            subprocess.run([daemon, "-f", str(self.conf)], env=self.env, check=True, capture_output=True)
            self.started.append(self.root / f"{daemon}.pid")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%t"], env=self.env, capture_output=True, text=True)
            if state.stdout.strip() == "idle":
                return self
            time.sleep(0.5)
        raise RuntimeError(
            f"Slurm node did not become idle: {state.stdout} {state.stderr}; logs in {self.root / 'log'}"
        )

    def stop(self) -> None:
        for pid_file in reversed(self.started):
            if pid_file.exists():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid_file.read_text().split()[0]), 15)
        self.started = []

    @contextlib.contextmanager
    def requeued_jobs_start_at_once(self):
        """Slurm holds a requeued batch job for 121 s (Reason=BeginTime) before it may start again. Inside
        this context a watcher makes such jobs eligible at once (`scontrol update StartTime=now`, what an
        administrator would do), so a requeue test does not wait two minutes per requeue, and gives them
        back a 10-minute time limit (a test may have shortened it to force a timeout)."""
        stop = threading.Event()

        def watch() -> None:
            while not stop.wait(1.0):
                pending = subprocess.run(
                    ["squeue", "-h", "-t", "PD", "-o", "%i %r"], env=self.env, capture_output=True, text=True
                )
                for line in pending.stdout.splitlines():
                    job_id, _, reason = line.partition(" ")
                    if reason.strip() == "BeginTime":
                        subprocess.run(
                            ["scontrol", "update", f"JobId={job_id}", "StartTime=now", "TimeLimit=10"],
                            env=self.env,
                            capture_output=True,
                        )

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            yield
        finally:
            stop.set()
            watcher.join()

    def running_job_ids(self) -> list[str]:
        out = subprocess.run(["squeue", "-h", "-t", "R", "-o", "%i"], env=self.env, capture_output=True, text=True)
        return out.stdout.split()

    def set_time_limit(self, job_id: str, minutes: int) -> None:
        command = ["scontrol", "update", f"JobId={job_id}", f"TimeLimit={minutes}"]
        subprocess.run(command, env=self.env, check=True, capture_output=True)
