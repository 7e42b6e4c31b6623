"""dry_run=true plans a multi-rank run in one CPU process (fake backend) and fails like a real run."""

from __future__ import annotations

import pytest

from conftest import compose_config, run_cli
from videosys.errors import ConfigError
from videosys.run import execute, to_run_config


def plan(overrides: list[str], tmp_path) -> dict:
    cfg = compose_config([*overrides, "dry_run=true", f"run_dir={tmp_path}"])
    return execute(to_run_config(cfg), tmp_path, {})


def test_dsp8_plan_for_opensora(tmp_path):
    overrides = ["parallel=dsp8", "model=opensora", "world_size=16", "task=sample", "sampling.num_frames=8"]
    result = plan(overrides, tmp_path)
    dims = result["dims"]
    assert (dims.dp_shard, dims.sp_ulysses, dims.world_size) == (2, 8, 16)  # dsp8 leaves 2 ranks to dp_shard
    assert result["ranks"][9]["sp"] == list(range(8, 16)) and result["ranks"][9]["dp"] == [1, 9]
    # 8 frames x (64 / 2)^2 = 1024 spatial tokens split in 8 chunks of 128, none padded.
    assert [r["tokens"] for r in result["ranks"][:8]] == [[128 * i, 128 * (i + 1)] for i in range(8)]
    calls, nbytes = result["per_step"]["all_to_all"]
    assert calls == 2 * result["layouts"]["spatial"] and result["layouts"]["temporal"] > 0
    # Each all-to-all moves 7/8 of one rank's (2 x 8 x 128 x hidden) fp32 activations.
    hidden = 64
    assert nbytes == calls * (2 * 8 * 128 * hidden * 4) * 7 // 8
    assert list(tmp_path.iterdir()) == []  # a plan writes nothing


def test_plan_has_padding_when_the_degree_does_not_divide(tmp_path):
    result = plan(["parallel=ulysses4", "model=dit", "world_size=4", "model.input_size=10"], tmp_path)
    assert [r["padding"] for r in result["ranks"]] == [0, 0, 0, 3]  # 25 tokens in chunks of 7


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["parallel=dsp4", "world_size=6"], "multiply to 4 .* world size is 6|does not divide the world size 6"),
        (["parallel=ulysses8", "model=latte", "world_size=8"], "sp_ulysses=8 does not divide model=latte's 4"),
        (["parallel=dsp2", "model=dit", "world_size=2"], "sp_mode=dsp is not supported by model=dit"),
        (["parallel=cfg2", "world_size=2"], "parallel.cfg=2 splits the two guidance halves of sampling"),
        (["parallel=none"], "dry_run=true needs world_size"),
    ],
)
def test_plan_fails_with_the_real_validation(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        plan(overrides, tmp_path)


def test_dry_run_from_the_command_line(tmp_path):
    result = run_cli(["parallel=dsp8", "model=opensora", "dry_run=true", "world_size=8"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "sp_ulysses=8" in result.stdout and "per spatial attention block: 2 all_to_all" in result.stdout
