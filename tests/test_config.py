"""The Hydra config: every option composes into typed dataclasses; bad keys and values stop early."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from conftest import compose_config
from videosys.cache import PABConfig
from videosys.data import DATA_CONFIGS, DigitsDataConfig
from videosys.distributed import ParallelConfig, resolve_dims
from videosys.encoders import TextEncoderConfig
from videosys.errors import ConfigError
from videosys.models import MODELS
from videosys.ops import KernelsConfig
from videosys.precision import PrecisionConfig
from videosys.run import GROUP_SCHEMAS, RunConfig, config_dir, to_run_config
from videosys.tasks import BenchTaskConfig, ConsoleLoggerConfig, SampleTaskConfig, TrainTaskConfig, WandbLoggerConfig
from videosys.tasks.preprocess import PreprocessTaskConfig

EXPECTED_TYPES = {
    "model": {name: entry.config_cls for name, entry in MODELS.items()},
    "parallel": {
        name: ParallelConfig
        for name in (
            "none",
            "ddp",
            "zero2",
            "zero3",
            "dsp2",
            "dsp4",
            "dsp8",
            "ulysses2",
            "ulysses4",
            "ulysses8",
            "ring2",
            "ring4",
            "usp2x2",
            "cfg2",
            "cfg2_dsp4",
        )
    },
    "kernels": {k: KernelsConfig for k in ("none", "auto", "fused", "compile", "fused_compile")},
    "pab": {k: PABConfig for k in ("off", "latte", "opensora", "opensora_plan", "cogvideox", "fast", "quality")},
    "data": dict(DATA_CONFIGS),
    "precision": {"fp32": PrecisionConfig, "bf16": PrecisionConfig, "fp16": PrecisionConfig},
    "task": {
        "train": TrainTaskConfig,
        "sample": SampleTaskConfig,
        "bench": BenchTaskConfig,
        "preprocess": PreprocessTaskConfig,
    },
    "logger": {"console": ConsoleLoggerConfig, "wandb": WandbLoggerConfig},
    "text_encoder": {"none": TextEncoderConfig, "t5": TextEncoderConfig, "clip": TextEncoderConfig},
}


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(config_dir()) / group).glob("*.yaml"))


def test_every_group_option_is_known_to_this_test():
    for group, expected in EXPECTED_TYPES.items():
        assert group_options(group) == sorted(expected), f"configs/{group} changed: update EXPECTED_TYPES"


@pytest.mark.parametrize(
    "group,option", [(g, o) for g, opts in EXPECTED_TYPES.items() for o in opts], ids=lambda v: str(v)
)
def test_every_option_composes_to_its_dataclass(group, option):
    run_cfg = to_run_config(compose_config([f"{group}={option}"]))
    assert isinstance(run_cfg, RunConfig)
    node = getattr(run_cfg, group)
    assert type(node) is EXPECTED_TYPES[group][option]
    assert node.name == option


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (Path(config_dir()) / "experiment").glob("*.yaml")))
def test_every_experiment_composes(experiment):
    run_cfg = to_run_config(compose_config([f"+experiment={experiment}"]))
    assert isinstance(run_cfg, RunConfig)


def test_default_composition_is_the_digits_job():
    run_cfg = to_run_config(compose_config([]))
    assert isinstance(run_cfg.task, TrainTaskConfig)
    assert isinstance(run_cfg.data, DigitsDataConfig)
    assert run_cfg.model.flavor == "debug" and run_cfg.precision.dtype == "fp32"
    assert resolve_dims(run_cfg.parallel, 1).shape == (1, 1, 1, 1, 1)
    assert run_cfg.vae.path is None


def test_overrides_reach_the_typed_config():
    run_cfg = to_run_config(
        compose_config(["model.flavor=XL/2", "optimizer.lr=3e-4", "sampling.classes=[1,2]", "precision=bf16"])
    )
    assert run_cfg.model.flavor == "XL/2"
    assert run_cfg.optimizer.lr == pytest.approx(3e-4)
    assert run_cfg.sampling.classes == [1, 2]
    assert run_cfg.precision.dtype == "bf16"


def test_unknown_key_is_rejected_naming_it():
    with pytest.raises(ConfigCompositionException) as err:
        compose_config(["task.stepz=3"])
    assert "stepz" in str(err.value.__cause__ or err.value)


def test_appended_unknown_key_is_rejected_naming_key_and_value():
    # `+key=value` bypasses Hydra's struct check; the schema walk must still catch it.
    with pytest.raises(ConfigError, match=r"task\.foo=7"):
        to_run_config(compose_config(["+task.foo=7"]))


def test_wrong_type_is_rejected_naming_key_and_value():
    with pytest.raises(ConfigCompositionException) as err:
        compose_config(["task.steps=abc"])
    cause = err.value.__cause__
    assert isinstance(cause, ValidationError)
    assert "abc" in str(cause) and "task.steps" in str(cause)


def test_wrong_type_in_option_of_other_task_is_rejected():
    with pytest.raises(ConfigCompositionException):
        compose_config(["task=sample", "task.steps=10"])


def test_unknown_group_option_is_rejected_naming_it():
    with pytest.raises(ConfigCompositionException, match="nosuchmodel"):
        compose_config(["model=nosuchmodel"])


def test_semantic_validation_names_value():
    with pytest.raises(ConfigError, match="sampling.sampler='heun'"):
        to_run_config(compose_config(["sampling.sampler=heun"]))
    with pytest.raises(ConfigError, match="precision.dtype='fp8'"):
        to_run_config(compose_config(["precision.dtype=fp8"]))


def test_configuration_reference_documents_every_key():
    doc = (Path(config_dir()).parent / "docs" / "configuration.md").read_text()
    keys = []
    for name, annotation in typing.get_type_hints(RunConfig).items():
        if name in GROUP_SCHEMAS:  # groups whose options have their own schemas
            schemas = GROUP_SCHEMAS[name].values()
        elif dataclasses.is_dataclass(annotation):  # typed groups and plain sections
            schemas = [annotation]
        else:  # top-level values
            keys.append(name)
            continue
        keys += [f"{name}.{f.name}" for schema in schemas for f in dataclasses.fields(schema)]
    missing = [key for key in keys if f"`{key}`" not in doc]
    assert not missing, f"docs/configuration.md does not document: {missing}"
