"""Encoders loaded from local paths: VAEs (images and video) and text encoders. Nothing is downloaded."""

from videosys.encoders.text import (
    CLIPConditioner,
    LabelConditioner,
    T5Conditioner,
    TextConditioner,
    TextEncoderConfig,
    build_text_conditioner,
    text_embedding_dim,
)
from videosys.encoders.vae import (
    LatentCodec,
    LatentGeometry,
    OpenSoraTemporalVAE,
    TemporalVAEConfig,
    VAEConfig,
    VideoCodec,
    VideoLatentGeometry,
    build_video_codec,
    latent_geometry,
    save_opensora_vae,
    split_opensora_state_dict,
    video_latent_geometry,
)

__all__ = [
    "CLIPConditioner",
    "LabelConditioner",
    "LatentCodec",
    "LatentGeometry",
    "OpenSoraTemporalVAE",
    "T5Conditioner",
    "TemporalVAEConfig",
    "TextConditioner",
    "TextEncoderConfig",
    "VAEConfig",
    "VideoCodec",
    "VideoLatentGeometry",
    "build_text_conditioner",
    "build_video_codec",
    "latent_geometry",
    "save_opensora_vae",
    "split_opensora_state_dict",
    "text_embedding_dim",
    "video_latent_geometry",
]
