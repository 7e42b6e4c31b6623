"""Model registry: one file per model family, each with its config class and flavors."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from videosys.errors import ConfigError
from videosys.models import cogvideox, dit, latte, opensora, opensora_plan


@dataclass(frozen=True)
class ModelEntry:
    config_cls: type
    model_cls: type[nn.Module]
    flavors: dict
    load_weights: Callable[[nn.Module, str], None]
    conditioning: str = "text"  # "class": class labels (image DiT); "text": text embeddings (video models)

    @property
    def is_video(self) -> bool:
        return self.conditioning == "text"


MODELS: dict[str, ModelEntry] = {
    "dit": ModelEntry(dit.DiTConfig, dit.DiT, dit.DIT_FLAVORS, dit.load_weights, conditioning="class"),
    "latte": ModelEntry(latte.LatteConfig, latte.Latte, latte.LATTE_FLAVORS, latte.load_weights),
    "opensora": ModelEntry(
        opensora.OpenSoraConfig, opensora.OpenSora, opensora.OPENSORA_FLAVORS, opensora.load_weights
    ),
    "opensora_plan": ModelEntry(
        opensora_plan.OpenSoraPlanConfig,
        opensora_plan.OpenSoraPlan,
        opensora_plan.OPENSORA_PLAN_FLAVORS,
        opensora_plan.load_weights,
    ),
    "cogvideox": ModelEntry(
        cogvideox.CogVideoXConfig, cogvideox.CogVideoX, cogvideox.COGVIDEOX_FLAVORS, cogvideox.load_weights
    ),
}


def model_entry(name: str) -> ModelEntry:
    if name not in MODELS:
        raise ConfigError(f"model.name={name!r} is not a known model; choose one of {sorted(MODELS)}")
    return MODELS[name]


def build_model(cfg) -> nn.Module:
    """Build the model for a (resolved) model config on the current default device (meta is fine)."""
    return model_entry(cfg.name).model_cls(cfg)
