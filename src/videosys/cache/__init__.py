"""Step-aware reuse policies for the denoising loop (Pyramid Attention Broadcast comes here).

A policy is an object created per run and handed to the denoise loop; `build_cache` returns None
when caching is off, and the loop then computes every step.
"""

from __future__ import annotations

from dataclasses import dataclass

from videosys.errors import ConfigError


@dataclass
class PABConfig:
    name: str = "off"


def build_cache(cfg: PABConfig):
    if cfg.name != "off":
        raise ConfigError(f"pab={cfg.name!r} is not available yet; use pab=off")
    return None
