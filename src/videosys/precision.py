"""Mixed-precision settings shared by parallelize and the tasks.

Parameters, optimizer state and EMA weights stay in fp32; `dtype` only sets the autocast compute
dtype. fp16 also needs loss scaling, which `make_grad_scaler` provides.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from videosys.errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class PrecisionConfig:
    name: str = "fp32"
    dtype: str = "fp32"  # autocast compute dtype: fp32 | bf16 | fp16
    # fp16 loss scaling (torch.amp.GradScaler); ignored for fp32 and bf16.
    init_scale: float = 65536.0
    growth_interval: int = 2000

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(
                f"precision.dtype={self.dtype!r} is not supported; use one of {sorted(DTYPES)} "
                "(or pick a preset: precision=fp32|bf16|fp16)"
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def autocast(cfg: PrecisionConfig, device: torch.device):
    """Autocast context for forward passes; a no-op in fp32."""
    if cfg.dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=cfg.torch_dtype)


def make_grad_scaler(cfg: PrecisionConfig, device: torch.device) -> torch.amp.GradScaler:
    """A GradScaler that is active only for fp16 (bf16 and fp32 need no loss scaling)."""
    return torch.amp.GradScaler(
        device.type,
        init_scale=cfg.init_scale,
        growth_interval=cfg.growth_interval,
        enabled=cfg.dtype == "fp16",
    )
