"""Encoders loaded from local paths: VAEs (and, later, text encoders). Nothing is downloaded."""

from videosys.encoders.vae import LatentCodec, LatentGeometry, VAEConfig, latent_geometry

__all__ = ["LatentCodec", "LatentGeometry", "VAEConfig", "latent_geometry"]
