"""Model registry: one file per model family, each with its config class and flavors."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from videosys.errors import ConfigError
from videosys.models import dit


@dataclass(frozen=True)
class ModelEntry:
    config_cls: type
    model_cls: type[nn.Module]
    flavors: dict
    load_weights: Callable[[nn.Module, str], None]


MODELS: dict[str, ModelEntry] = {
    "dit": ModelEntry(dit.DiTConfig, dit.DiT, dit.DIT_FLAVORS, dit.load_weights),
}


def model_entry(name: str) -> ModelEntry:
    if name not in MODELS:
        raise ConfigError(f"model.name={name!r} is not a known model; choose one of {sorted(MODELS)}")
    return MODELS[name]


def build_model(cfg) -> nn.Module:
    """Build the model for a (resolved) model config on the current default device (meta is fine)."""
    return model_entry(cfg.name).model_cls(cfg)
