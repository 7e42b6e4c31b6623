"""diffusers AutoencoderKL from a local folder, as an encode/decode pair in model latent space."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from videosys.errors import ConfigError
from videosys.precision import DTYPES


@dataclass
class VAEConfig:
    path: str | None = None  # local diffusers AutoencoderKL folder (config.json + weights); None: pixel space
    scaling_factor: float | None = None  # None: the VAE config's scaling_factor
    dtype: str = "fp32"  # fp32 | bf16 | fp16
    # Decode in slices of this many images so that large batches fit in memory.
    decode_batch_size: int = 16


@dataclass(frozen=True)
class LatentGeometry:
    channels: int
    downsample: int


def _vae_folder(cfg: VAEConfig) -> Path:
    folder = Path(cfg.path).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"vae.path={cfg.path} is not a diffusers AutoencoderKL folder (no config.json there); "
            "save one with AutoencoderKL.save_pretrained or point at the 'vae' folder of a local pipeline"
        )
    return folder


def latent_geometry(cfg: VAEConfig) -> LatentGeometry:
    """Latent channels and spatial downsampling, read from config.json without loading weights."""
    config = json.loads((_vae_folder(cfg) / "config.json").read_text())
    return LatentGeometry(config.get("latent_channels", 4), 2 ** (len(config.get("block_out_channels", [0] * 4)) - 1))


class LatentCodec:
    """Encodes images in [-1, 1] to scaled latents and decodes them back."""

    def __init__(self, cfg: VAEConfig, device: torch.device):
        from diffusers import AutoencoderKL

        if cfg.dtype not in DTYPES:
            raise ConfigError(f"vae.dtype={cfg.dtype!r} is not supported; use one of {sorted(DTYPES)}")
        folder = _vae_folder(cfg)
        self.vae = AutoencoderKL.from_pretrained(folder, local_files_only=True, torch_dtype=DTYPES[cfg.dtype])
        self.vae.to(device).eval().requires_grad_(False)
        self.scaling_factor = cfg.scaling_factor or self.vae.config.scaling_factor
        self.decode_batch_size = cfg.decode_batch_size
        self.dtype = DTYPES[cfg.dtype]
        self.geometry = latent_geometry(cfg)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        posterior = self.vae.encode(images.to(self.dtype)).latent_dist
        return (posterior.sample() * self.scaling_factor).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        chunks = latents.split(self.decode_batch_size)
        images = [self.vae.decode((z / self.scaling_factor).to(self.dtype)).sample.float() for z in chunks]
        return torch.cat(images).clamp(-1, 1)
