"""The built wheel carries the configs, and an installed (non-editable) videosys runs from them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import TINY

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_carries_configs_and_runs_when_installed(tmp_path: Path):
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist), str(ROOT)],
        check=True,
        capture_output=True,
    )
    wheel = next(dist.glob("videosys-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {p.relative_to(ROOT / "configs").as_posix() for p in (ROOT / "configs").rglob("*.yaml")}
    assert {f"videosys/configs/{name}" for name in shipped} <= names
    assert "videosys/run.py" in names

    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
    )
    workdir = tmp_path / "elsewhere"  # away from the source tree
    workdir.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "CUDA_VISIBLE_DEVICES": ""}
    where = subprocess.run(
        [sys.executable, "-c", "import videosys.run as r; print(r.__file__); print(r.config_dir())"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert all(Path(p).is_relative_to(site) for p in where), where
    run_dir = workdir / "run"
    result = subprocess.run(
        [sys.executable, "-m", "videosys.run", *TINY, "task.sample_at_end=false", f"run_dir={run_dir}"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_dir / "checkpoints" / "step_0000004" / "meta.pt").is_file()


def test_console_script_is_installed():
    script = shutil.which("videosys", path=str(Path(sys.executable).parent))
    assert script is not None
    result = subprocess.run([script, "--cfg", "job"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "flavor: debug" in result.stdout
