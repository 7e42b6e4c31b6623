"""Reading weight files from local paths: diffusers model folders, safetensors, torch checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from videosys.errors import ConfigError


def diffusers_config(path: Path, class_name: str) -> dict | None:
    """The config.json of a diffusers model folder of `class_name`, or None if `path` is not one."""
    config = path / "config.json"
    if not (path.is_dir() and config.is_file()):
        return None
    data = json.loads(config.read_text())
    return data if data.get("_class_name") == class_name else None


def read_diffusers_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    safetensors_file = folder / "diffusion_pytorch_model.safetensors"
    if safetensors_file.is_file():
        from safetensors.torch import load_file

        return load_file(str(safetensors_file))
    bin_file = folder / "diffusion_pytorch_model.bin"
    if bin_file.is_file():
        return torch.load(bin_file, map_location="cpu", weights_only=True)
    raise FileNotFoundError(
        f"model.weights={folder} has a diffusers config.json but no diffusion_pytorch_model.safetensors or "
        ".bin (sharded diffusers checkpoints are not supported; re-save with save_pretrained)"
    )


def read_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """A .safetensors file, a torch state dict, or a VideoSys training checkpoint (its EMA weights)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "ema" in sd and "model" in sd:  # a VideoSys training checkpoint
        sd = sd["ema"]["model"] if isinstance(sd["ema"], dict) and "model" in sd["ema"] else sd["ema"]
    if isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    return sd


def require_exists(path: str, formats: str) -> Path:
    source = Path(path).expanduser()
    if not source.exists():
        raise FileNotFoundError(f"model.weights={path} does not exist; give {formats}")
    return source


def load_strict(model: nn.Module, sd: dict[str, torch.Tensor], path: str) -> None:
    """Load every tensor; a mismatch names the weights, the flavor and the offending keys."""
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as err:
        flavor = getattr(getattr(model, "config", None), "flavor", "?")
        raise ConfigError(f"model.weights={path} does not fit model flavor {flavor}: {err}") from err
