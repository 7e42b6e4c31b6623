"""VAEs from local folders: diffusers AutoencoderKL for images (LatentCodec) and three video codecs
(VideoCodec): a per-frame AutoencoderKL, Open-Sora 1.2's spatial + causal temporal VAE, and CogVideoX's
3D VAE. Nothing is downloaded; every path and config is checked before any weights load."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from videosys.distributed.collectives import CommGroup, split_work
from videosys.errors import ConfigError
from videosys.precision import DTYPES

VAE_KINDS = ("auto", "kl", "opensora", "cogvideox")
# diffusers class names (config.json "_class_name") that kind=auto recognises.
_CLASS_KINDS = {"AutoencoderKL": "kl", "AutoencoderKLCogVideoX": "cogvideox"}
# Open-Sora 1.2 multiplies the spatial VAE's latents by SD's factor, whatever the VAE's own config says.
OPENSORA_SPATIAL_SCALING = 0.18215
# Open-Sora 1.2's per-channel latent normalisation: latents = (z - shift) / scale.
OPENSORA_V12_SCALE = (3.85, 2.32, 2.33, 3.06)
OPENSORA_V12_SHIFT = (-0.10, 0.34, 0.27, 0.98)


@dataclass
class VAEConfig:
    path: str | None = None  # local diffusers VAE folder (config.json + weights); None: pixel space
    scaling_factor: float | None = None  # None: the VAE config's scaling_factor (kl, cogvideox)
    dtype: str = "fp32"  # fp32 | bf16 | fp16
    # Decode in slices of this many images so that large batches fit in memory (images).
    decode_batch_size: int = 16
    # Video: auto | kl (AutoencoderKL per frame) | opensora (spatial/ + temporal/ folders) | cogvideox.
    # auto reads config.json's _class_name, or finds spatial/ and temporal/ subfolders.
    kind: str = "auto"
    frame_chunk: int = 8  # frames per encode/decode call of a per-frame VAE (kl, opensora's spatial stage)
    tile: bool = False  # spatially tiled decode (diffusers enable_tiling) for large frames
    micro_frames: int = 17  # opensora: frames per temporal chunk (17 frames -> 5 latent frames)


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
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        posterior = self.vae.encode(images.to(self.dtype)).latent_dist
        return (posterior.sample(generator=generator) * self.scaling_factor).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        chunks = latents.split(self.decode_batch_size)
        images = [self.vae.decode((z / self.scaling_factor).to(self.dtype)).sample.float() for z in chunks]
        return torch.cat(images).clamp(-1, 1)


# ----------------------------------------------------------------------------------------------------
# Video latent geometry
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VideoLatentGeometry:
    """Latent channels and the spatial / temporal downsampling of a video VAE, with its frame-count rule."""

    kind: str  # kl | opensora | cogvideox
    channels: int
    spatial_downsample: int
    temporal_downsample: int
    micro_frames: int | None = None  # opensora: frames per temporal chunk

    def latent_frames(self, num_frames: int) -> int:
        """Latent frames for `num_frames` video frames.

        kl: one per frame. cogvideox: frame 0 alone, then one per `temporal_downsample` frames
        ((num_frames - 1) // 4 + 1; the VAE takes 1 + 4k frames). opensora: the video is cut into chunks of
        `micro_frames` frames and each chunk of n frames gives ceil(n / 4) latent frames (its front is
        zero-padded to a multiple of 4), so 17 -> 5, 34 -> 10, 20 -> 5 + 1.
        """
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        step = self.temporal_downsample
        if self.kind == "cogvideox":
            return (num_frames - 1) // step + 1
        if self.kind == "opensora":
            full, rest = divmod(num_frames, self.micro_frames)
            return full * math.ceil(self.micro_frames / step) + math.ceil(rest / step)
        return num_frames

    def pixel_frames(self, latent_frames: int) -> int:
        """Frames that `latent_frames` latent frames decode to (the most that encode to that many).

        kl: the same count; cogvideox: 4 (L - 1) + 1; opensora: `micro_frames` per full chunk of
        ceil(micro_frames / 4) latents, plus 4 per latent frame of a last, shorter chunk.
        """
        if latent_frames < 1:
            raise ValueError(f"latent_frames must be >= 1, got {latent_frames}")
        step = self.temporal_downsample
        if self.kind == "cogvideox":
            return (latent_frames - 1) * step + 1
        if self.kind == "opensora":
            full, rest = divmod(latent_frames, math.ceil(self.micro_frames / step))
            return full * self.micro_frames + rest * step
        return latent_frames

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C', T', H', W') of the latents of a (C, num_frames, height, width) video."""
        return (
            self.channels,
            self.latent_frames(num_frames),
            height // self.spatial_downsample,
            width // self.spatial_downsample,
        )


# ----------------------------------------------------------------------------------------------------
# Open-Sora 1.2 temporal VAE
# ----------------------------------------------------------------------------------------------------


@dataclass
class TemporalVAEConfig:
    """Sizes of OpenSoraTemporalVAE; the defaults are Open-Sora 1.2's VAE_Temporal_SD."""

    in_out_channels: int = 4  # channels of the spatial latents it compresses
    latent_embed_dim: int = 4  # channels of the encoder output / decoder input (mean and logvar: 2x)
    embed_dim: int = 4  # latent channels after quant_conv
    filters: int = 128
    num_res_blocks: int = 4
    channel_multipliers: tuple[int, ...] = (1, 2, 2, 4)
    # One entry per level but the last: halve time after that level (two Trues: 4x).
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    num_groups: int = 32  # GroupNorm groups
    # False: GroupNorm statistics over (channels of a group, T, H, W), as Open-Sora (so a latent frame can
    # depend on later frames of its 17-frame chunk). True: statistics per frame, which makes the whole
    # module strictly causal in time; the parameters are the same, the function is not.
    per_frame_norm: bool = False

    def __post_init__(self) -> None:
        self.channel_multipliers = tuple(int(m) for m in self.channel_multipliers)
        self.temporal_downsample = tuple(bool(t) for t in self.temporal_downsample)
        if len(self.temporal_downsample) != len(self.channel_multipliers) - 1:
            raise ConfigError(
                f"temporal_downsample={self.temporal_downsample} needs one entry per level but the last "
                f"({len(self.channel_multipliers) - 1} for channel_multipliers={self.channel_multipliers})"
            )
        widths = [self.filters] + [self.filters * m for m in self.channel_multipliers]
        if any(w % self.num_groups for w in widths):
            raise ConfigError(f"num_groups={self.num_groups} must divide every width {sorted(set(widths))}")


class _CausalConv3d(nn.Module):
    """Conv3d over (B, C, T, H, W) that pads time with zeros in front only, so output frame t sees input
    frames <= t (with stride s: <= s * t + s - 1), and pads space symmetrically ("same")."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, time_stride: int = 1, bias=True):
        super().__init__()
        self.time_pad = kernel_size - time_stride  # (k - 1) frames of history, less what the stride skips
        self.space_pad = kernel_size // 2
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size, stride=(time_stride, 1, 1), bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.space_pad
        return self.conv(F.pad(x, (p, p, p, p, self.time_pad, 0)))


class _GroupNorm(nn.GroupNorm):
    """GroupNorm over (B, C, T, H, W): over all frames at once, or frame by frame (per_frame)."""

    def __init__(self, num_groups: int, channels: int, per_frame: bool):
        super().__init__(num_groups, channels)
        self.per_frame = per_frame

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.per_frame:
            return super().forward(x)
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)
        out = F.group_norm(frames, self.num_groups, self.weight, self.bias, self.eps)
        return out.view(b, t, c, h, w).transpose(1, 2)


class _ResBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, cfg: TemporalVAEConfig):
        super().__init__()
        self.norm1 = _GroupNorm(cfg.num_groups, in_channels, cfg.per_frame_norm)
        self.conv1 = _CausalConv3d(in_channels, out_channels, 3, bias=False)
        self.norm2 = _GroupNorm(cfg.num_groups, out_channels, cfg.per_frame_norm)
        self.conv2 = _CausalConv3d(out_channels, out_channels, 3, bias=False)
        # A 1x1x1 projection of the skip path where the width changes.
        self.conv3 = _CausalConv3d(in_channels, out_channels, 1, bias=False) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (x if self.conv3 is None else self.conv3(x))


def _res_stack(in_channels: int, out_channels: int, cfg: TemporalVAEConfig) -> nn.ModuleList:
    widths = [in_channels] + [out_channels] * cfg.num_res_blocks
    return nn.ModuleList(_ResBlock(widths[i], widths[i + 1], cfg) for i in range(cfg.num_res_blocks))


class _TemporalEncoder(nn.Module):
    """conv_in -> per level: res blocks, then (but after the last) a stride-2-in-time causal conv or
    nothing -> res blocks -> norm, SiLU -> 1x1x1 conv to 2 * latent_embed_dim channels."""

    def __init__(self, cfg: TemporalVAEConfig):
        super().__init__()
        self.conv_in = _CausalConv3d(cfg.in_out_channels, cfg.filters, 3, bias=False)
        self.block_res_blocks = nn.ModuleList()
        self.conv_blocks = nn.ModuleList()
        width = cfg.filters
        for level, multiplier in enumerate(cfg.channel_multipliers):
            self.block_res_blocks.append(_res_stack(width, cfg.filters * multiplier, cfg))
            width = cfg.filters * multiplier
            if level < len(cfg.channel_multipliers) - 1:
                down = cfg.temporal_downsample[level]
                self.conv_blocks.append(_CausalConv3d(width, width, 3, time_stride=2) if down else nn.Identity())
        self.res_blocks = _res_stack(width, width, cfg)
        self.norm1 = _GroupNorm(cfg.num_groups, width, cfg.per_frame_norm)
        self.conv2 = _CausalConv3d(width, 2 * cfg.latent_embed_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for level, blocks in enumerate(self.block_res_blocks):
            for block in blocks:
                x = block(x)
            if level < len(self.conv_blocks):
                x = self.conv_blocks[level](x)
        for block in self.res_blocks:
            x = block(x)
        return self.conv2(F.silu(self.norm1(x)))


class _TemporalDecoder(nn.Module):
    """The mirror of the encoder: conv1 -> res blocks -> per level, deepest first: res blocks, then a
    causal conv to 2x channels followed by depth-to-space in time (2x frames) where the encoder halved
    time -> norm, SiLU -> conv_out."""

    def __init__(self, cfg: TemporalVAEConfig):
        super().__init__()
        self.temporal_downsample = cfg.temporal_downsample
        width = cfg.filters * cfg.channel_multipliers[-1]
        self.conv1 = _CausalConv3d(cfg.latent_embed_dim, width, 3)
        self.res_blocks = _res_stack(width, width, cfg)
        levels = len(cfg.channel_multipliers)
        blocks: list[nn.Module] = [nn.Identity() for _ in range(levels)]
        ups: list[nn.Module] = [nn.Identity() for _ in range(levels - 1)]
        for level in reversed(range(levels)):
            blocks[level] = _res_stack(width, cfg.filters * cfg.channel_multipliers[level], cfg)
            width = cfg.filters * cfg.channel_multipliers[level]
            if level > 0 and cfg.temporal_downsample[level - 1]:
                ups[level - 1] = _CausalConv3d(width, 2 * width, 3)
        # Indexed by level like the encoder (conv_blocks[i] undoes the encoder's conv_blocks[i]).
        self.block_res_blocks = nn.ModuleList(blocks)
        self.conv_blocks = nn.ModuleList(ups)
        self.norm1 = _GroupNorm(cfg.num_groups, width, cfg.per_frame_norm)
        self.conv_out = _CausalConv3d(width, cfg.in_out_channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for block in self.res_blocks:
            x = block(x)
        for level in reversed(range(len(self.block_res_blocks))):
            for block in self.block_res_blocks[level]:
                x = block(x)
            if level > 0 and self.temporal_downsample[level - 1]:
                x = self.conv_blocks[level - 1](x)
                b, c2, t, h, w = x.shape
                # Depth to space: channel 2c + s at time t becomes channel c at time 2t + s.
                x = x.view(b, c2 // 2, 2, t, h, w).transpose(2, 3).reshape(b, c2 // 2, 2 * t, h, w)
        return self.conv_out(F.silu(self.norm1(x)))


class OpenSoraTemporalVAE(nn.Module):
    """Open-Sora 1.2's temporal VAE (VAE_Temporal_SD): a causal 3D-conv VAE over spatial VAE latents that
    compresses time 4x. Written from the architecture, not copied.

    What matches Open-Sora (opensora/models/vae/vae_temporal.py, VAE_Temporal): the module tree and every
    parameter name and shape (encoder.conv_in.conv, encoder.block_res_blocks.{i}.{j}.norm1/conv1.conv/...,
    encoder.conv_blocks.{i}.conv, quant_conv.conv, post_quant_conv.conv, decoder.*, decoder.conv_out.conv),
    so their state dict loads with strict=True once its "temporal_vae." prefix is stripped
    (split_opensora_state_dict); and the computation: zero padding of the input's front to a multiple of
    4 frames, causal zero padding in time, GroupNorm over (C/G, T, H, W), channel-major depth-to-space,
    logvar clamped to [-30, 20], decode dropping the front padding. What does not: the config and file
    format (TemporalVAEConfig as config.json + model.safetensors), `per_frame_norm` (an option Open-Sora
    lacks) and sampling (mean + std * noise with an optional torch.Generator).
    """

    def __init__(self, config: TemporalVAEConfig | None = None):
        super().__init__()
        self.config = config or TemporalVAEConfig()
        self.time_downsample_factor = 2 ** sum(self.config.temporal_downsample)
        self.encoder = _TemporalEncoder(self.config)
        self.quant_conv = _CausalConv3d(2 * self.config.latent_embed_dim, 2 * self.config.embed_dim, 1)
        self.post_quant_conv = _CausalConv3d(self.config.embed_dim, self.config.latent_embed_dim, 1)
        self.decoder = _TemporalDecoder(self.config)

    def latent_frames(self, num_frames: int) -> int:
        return math.ceil(num_frames / self.time_downsample_factor)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, T, H, W) -> posterior (mean, logvar), each (B, embed_dim, ceil(T / 4), H, W)."""
        pad = -x.shape[2] % self.time_downsample_factor
        moments = self.quant_conv(self.encoder(F.pad(x, (0, 0, 0, 0, pad, 0))))
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor, num_frames: int | None = None) -> torch.Tensor:
        """(B, embed_dim, T', H, W) -> (B, C, num_frames, H, W); num_frames defaults to 4 T'."""
        x = self.decoder(self.post_quant_conv(z))
        num_frames = x.shape[2] if num_frames is None else num_frames
        if not 0 < num_frames <= x.shape[2] or self.latent_frames(num_frames) != z.shape[2]:
            raise ValueError(f"{z.shape[2]} latent frames do not decode to {num_frames} frames")
        return x[:, :, x.shape[2] - num_frames :]

    def save_pretrained(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(folder / "model.safetensors"))
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: torch.dtype = torch.float32) -> OpenSoraTemporalVAE:
        from safetensors.torch import load_file

        folder = Path(folder)
        model = cls(TemporalVAEConfig(**json.loads((folder / "config.json").read_text())))
        model.load_state_dict(load_file(str(folder / "model.safetensors")))
        return model.to(dtype)


def split_opensora_state_dict(state_dict: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """An Open-Sora 1.2 VAE checkpoint (VideoAutoencoderPipeline) -> (AutoencoderKL state dict,
    OpenSoraTemporalVAE state dict): keys "spatial_vae.module.*" and "temporal_vae.*", prefixes
    stripped. Its "scale" and "shift" entries (if any) are left for save_opensora_vae."""
    spatial = {k.removeprefix("spatial_vae.module."): v for k, v in state_dict.items() if k.startswith("spatial_vae.")}
    temporal = {k.removeprefix("temporal_vae."): v for k, v in state_dict.items() if k.startswith("temporal_vae.")}
    return spatial, temporal


def save_opensora_vae(
    folder: str | Path,
    spatial_vae,
    temporal_vae: OpenSoraTemporalVAE,
    scale: float | tuple[float, ...] = OPENSORA_V12_SCALE,
    shift: float | tuple[float, ...] = OPENSORA_V12_SHIFT,
    spatial_scaling_factor: float = OPENSORA_SPATIAL_SCALING,
) -> Path:
    """Write the folder that VAEConfig(kind="opensora") loads: spatial/ (the diffusers AutoencoderKL,
    save_pretrained), temporal/ (config.json + model.safetensors) and a config.json with the latent
    normalisation: latents = (temporal_z - shift) / scale, per channel (or one number for all)."""
    channels = temporal_vae.config.embed_dim
    values = {}
    for name, value in (("scale", scale), ("shift", shift)):
        value = [float(value)] if isinstance(value, (int, float)) else [float(v) for v in value]
        if len(value) not in (1, channels):
            raise ConfigError(f"{name} has {len(value)} values; give 1 or one per latent channel ({channels})")
        values[name] = value
    if any(v == 0 for v in values["scale"]):
        raise ConfigError(f"scale={values['scale']} must not contain 0")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spatial_vae.save_pretrained(folder / "spatial")
    temporal_vae.save_pretrained(folder / "temporal")
    config = {"_class_name": "OpenSoraVAE", **values, "spatial_scaling_factor": spatial_scaling_factor}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


# ----------------------------------------------------------------------------------------------------
# Folder checks and geometry without loading weights
# ----------------------------------------------------------------------------------------------------

_VIDEO_VAE_FIX = (
    "point vae.path at a local diffusers AutoencoderKL / AutoencoderKLCogVideoX folder (save_pretrained output, "
    "or the vae/ folder of a local pipeline), or an Open-Sora VAE folder written by save_opensora_vae"
)


def _read_config(path: Path, cfg: VAEConfig) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"vae.path={cfg.path} has no {path}; {_VIDEO_VAE_FIX}")
    return json.loads(path.read_text())


def _check_video_cfg(cfg: VAEConfig) -> None:
    if cfg.kind not in VAE_KINDS:
        raise ConfigError(f"vae.kind={cfg.kind!r} is unknown; choose one of {list(VAE_KINDS)}")
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"vae.dtype={cfg.dtype!r} is not supported; use one of {sorted(DTYPES)}")
    if cfg.frame_chunk < 1:
        raise ConfigError(f"vae.frame_chunk={cfg.frame_chunk} must be >= 1")
    if cfg.micro_frames < 1:
        raise ConfigError(f"vae.micro_frames={cfg.micro_frames} must be >= 1")


def _resolve_video_vae(cfg: VAEConfig) -> tuple[Path, str]:
    """(folder, kind) of cfg.path, after checking that the files that kind needs are there."""
    _check_video_cfg(cfg)
    if not cfg.path:
        raise ConfigError(f"vae.path is not set; {_VIDEO_VAE_FIX}")
    folder = Path(cfg.path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"vae.path={cfg.path} does not exist; {_VIDEO_VAE_FIX}")
    if not (folder / "config.json").is_file() and (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"  # a diffusers pipeline root
    kind = cfg.kind
    if kind == "auto":
        if (folder / "spatial").is_dir() and (folder / "temporal").is_dir():
            kind = "opensora"
        else:
            class_name = _read_config(folder / "config.json", cfg).get("_class_name")
            if class_name not in _CLASS_KINDS:
                raise ConfigError(
                    f"vae.path={cfg.path} holds a {class_name!r}, which vae.kind=auto does not know; "
                    f"set vae.kind to one of {list(VAE_KINDS[1:])} or use an AutoencoderKL / AutoencoderKLCogVideoX"
                )
            kind = _CLASS_KINDS[class_name]
    if kind == "opensora":
        for part in ("config.json", "spatial/config.json", "temporal/config.json", "temporal/model.safetensors"):
            if not (folder / part).is_file():
                raise FileNotFoundError(
                    f"vae.path={cfg.path} is not an Open-Sora VAE folder (no {part}); write one with "
                    "videosys.encoders.save_opensora_vae(folder, spatial_vae, temporal_vae)"
                )
    else:
        expected = {"kl": "AutoencoderKL", "cogvideox": "AutoencoderKLCogVideoX"}[kind]
        class_name = _read_config(folder / "config.json", cfg).get("_class_name", expected)
        if class_name != expected:
            raise ConfigError(f"vae.kind={kind} loads a {expected}, but vae.path={cfg.path} holds a {class_name}")
    return folder, kind


def _spatial_downsample(config: dict) -> int:
    return 2 ** (len(config.get("block_out_channels", [0] * 4)) - 1)


def video_latent_geometry(cfg: VAEConfig) -> VideoLatentGeometry | None:
    """The latent geometry of cfg's video VAE from its config files only (no weights); None without a VAE."""
    if cfg.path is None:
        return None
    folder, kind = _resolve_video_vae(cfg)
    if kind == "opensora":
        spatial = json.loads((folder / "spatial" / "config.json").read_text())
        temporal = TemporalVAEConfig(**json.loads((folder / "temporal" / "config.json").read_text()))
        return VideoLatentGeometry(
            kind,
            temporal.embed_dim,
            _spatial_downsample(spatial),
            2 ** sum(temporal.temporal_downsample),
            cfg.micro_frames,
        )
    config = json.loads((folder / "config.json").read_text())
    temporal = int(config.get("temporal_compression_ratio", 4)) if kind == "cogvideox" else 1
    return VideoLatentGeometry(kind, config.get("latent_channels", 4), _spatial_downsample(config), temporal)


# ----------------------------------------------------------------------------------------------------
# VideoCodec
# ----------------------------------------------------------------------------------------------------


class VideoCodec:
    """Encodes videos (B, C, T, H, W) in [-1, 1] to normalised latents (B, C', T', H', W') and decodes
    them back, clamped to [-1, 1]. Always channels-first then time, whatever the backend's own layout.

    kind=kl: a diffusers AutoencoderKL on every frame (frames folded into the batch, `frame_chunk` at a
    time); latents = (z - shift_factor) * scaling_factor. kind=opensora: the same per-frame spatial VAE
    (latents x 0.18215), then OpenSoraTemporalVAE on chunks of `micro_frames` frames; latents =
    (z - shift) / scale per channel. kind=cogvideox: diffusers AutoencoderKLCogVideoX on the whole clip
    (its own frame batching; 1 + 4k frames -> 1 + k latents); latents = z * scaling_factor.
    """

    def __init__(self, cfg: VAEConfig, device: torch.device | str):
        folder, kind = _resolve_video_vae(cfg)
        if kind == "opensora" and cfg.scaling_factor is not None:
            raise ConfigError(
                f"vae.scaling_factor={cfg.scaling_factor} is not used by vae.kind=opensora (its config.json "
                "sets per-channel scale and shift); leave it unset"
            )
        self.kind = kind
        self.geometry = video_latent_geometry(cfg)
        self.device = torch.device(device)
        self.dtype = DTYPES[cfg.dtype]
        self.frame_chunk = cfg.frame_chunk
        self.micro_frames = cfg.micro_frames
        shape = (1, self.geometry.channels, 1, 1, 1)
        if kind == "opensora":
            from diffusers import AutoencoderKL

            config = json.loads((folder / "config.json").read_text())
            self.vae = AutoencoderKL.from_pretrained(folder / "spatial", local_files_only=True, torch_dtype=self.dtype)
            self.temporal = OpenSoraTemporalVAE.from_pretrained(folder / "temporal", self.dtype)
            self.temporal.to(self.device).eval().requires_grad_(False)
            self.spatial_scaling = float(config.get("spatial_scaling_factor", OPENSORA_SPATIAL_SCALING))
            # (z - shift) / scale, kept as shift and 1 / scale like the other kinds.
            self.shift = torch.tensor(config.get("shift", 0.0), dtype=torch.float32).expand(shape[1]).view(shape)
            self.scale = 1 / torch.tensor(config.get("scale", 1.0), dtype=torch.float32).expand(shape[1]).view(shape)
        else:
            import diffusers

            vae_class = diffusers.AutoencoderKL if kind == "kl" else diffusers.AutoencoderKLCogVideoX
            self.vae = vae_class.from_pretrained(folder, local_files_only=True, torch_dtype=self.dtype)
            shift = self.vae.config.get("shift_factor") or 0.0
            scale = cfg.scaling_factor or self.vae.config.scaling_factor
            self.shift = torch.full(shape, float(shift))
            self.scale = torch.full(shape, float(scale))
            if kind == "cogvideox":
                self.vae.enable_slicing()  # one clip at a time
        self.vae.to(self.device).eval().requires_grad_(False)
        if cfg.tile:
            self.vae.enable_tiling()
        self.shift, self.scale = self.shift.to(self.device), self.scale.to(self.device)

    # -- per-frame 2D VAE (kl, opensora's spatial stage) --------------------------------------------

    def _frames_in(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        b, c, t, h, w = x.shape
        return x.transpose(1, 2).reshape(b * t, c, h, w), b

    def _frames_out(self, frames: torch.Tensor, batch: int) -> torch.Tensor:
        n, c, h, w = frames.shape
        return frames.view(batch, n // batch, c, h, w).transpose(1, 2)

    def _encode_frames(self, video: torch.Tensor, sample: bool, generator) -> torch.Tensor:
        frames, batch = self._frames_in(video.to(self.device, self.dtype))
        out = []
        for chunk in frames.split(self.frame_chunk):
            posterior = self.vae.encode(chunk).latent_dist
            out.append(posterior.sample(generator=generator) if sample else posterior.mode())
        return self._frames_out(torch.cat(out), batch)

    def _decode_frames(self, z: torch.Tensor) -> torch.Tensor:
        frames, batch = self._frames_in(z.to(self.dtype))
        out = [self.vae.decode(chunk).sample for chunk in frames.split(self.frame_chunk)]
        return self._frames_out(torch.cat(out), batch)

    # -- public API ---------------------------------------------------------------------------------

    @property
    def frame_wise(self) -> bool:
        """Whether decode treats every latent frame on its own (so frames may be decoded apart)."""
        return self.kind == "kl"

    @torch.no_grad()
    def encode(self, video: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None):
        """(B, C, T, H, W) in [-1, 1] -> latents (B, C', T', H', W') float32; sample=False: posterior mean."""
        if video.ndim != 5:
            raise ValueError(f"videos must be (B, C, T, H, W), got shape {tuple(video.shape)}")
        down = self.geometry.spatial_downsample
        if video.shape[-1] % down or video.shape[-2] % down:
            raise ValueError(f"frame size {tuple(video.shape[-2:])} is not divisible by the VAE's {down}x downsampling")
        if self.kind == "kl":
            z = self._encode_frames(video, sample, generator)
        elif self.kind == "cogvideox":
            if (video.shape[2] - 1) % self.geometry.temporal_downsample:
                raise ValueError(
                    f"the CogVideoX VAE encodes 1 + {self.geometry.temporal_downsample}k frames, got {video.shape[2]}"
                )
            posterior = self.vae.encode(video.to(self.device, self.dtype)).latent_dist
            z = posterior.sample(generator=generator) if sample else posterior.mode()
        else:
            x = self._encode_frames(video, sample, generator) * self.spatial_scaling
            pieces = []
            for chunk in x.split(self.micro_frames, dim=2):
                mean, logvar = self.temporal.encode(chunk)
                if sample:
                    device = mean.device if generator is None else generator.device
                    noise = torch.randn(mean.shape, generator=generator, device=device).to(mean)
                    mean = mean + torch.exp(0.5 * logvar) * noise
                pieces.append(mean)
            z = torch.cat(pieces, dim=2)
        return (z.float() - self.shift) * self.scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, num_frames: int | None = None) -> torch.Tensor:
        """Latents (B, C', T', H', W') -> video (B, C, num_frames, H, W) float32 in [-1, 1].

        num_frames defaults to geometry.pixel_frames(T'); it must encode to T' latent frames. (The CogVideoX
        VAE gives 4 T' frames for an even T'; the surplus frames are at the front and are dropped.)
        """
        if latents.ndim != 5:
            raise ValueError(f"latents must be (B, C', T', H', W'), got shape {tuple(latents.shape)}")
        count = latents.shape[2]
        num_frames = self.geometry.pixel_frames(count) if num_frames is None else num_frames
        if num_frames < 1 or self.geometry.latent_frames(num_frames) != count:
            raise ValueError(f"{count} latent frames do not decode to {num_frames} frames ({self.kind} VAE)")
        z = (latents.to(self.device).float() / self.scale + self.shift).to(self.dtype)
        if self.kind == "kl":
            video = self._decode_frames(z)
        elif self.kind == "cogvideox":
            video = self.vae.decode(z).sample
            video = video[:, :, video.shape[2] - num_frames :]
        else:
            per_chunk = self.temporal.latent_frames(self.micro_frames)
            pieces, left = [], num_frames
            for chunk in z.split(per_chunk, dim=2):
                pieces.append(self.temporal.decode(chunk, min(self.micro_frames, left)))
                left -= self.micro_frames
            video = self._decode_frames(torch.cat(pieces, dim=2) / self.spatial_scaling)
        return video.float().clamp(-1, 1)


def build_video_codec(cfg: VAEConfig, device: torch.device | str) -> VideoCodec | None:
    """The video codec cfg describes, or None in pixel space (no vae.path)."""
    if cfg.path is None:
        _check_video_cfg(cfg)
        return None
    return VideoCodec(cfg, device)


def decode_across_ranks(codec, latents: torch.Tensor, comm: CommGroup) -> torch.Tensor:
    """The decode of latents that every rank of `comm` holds, split over those ranks: by frame for a
    frame-by-frame VAE, else by clip (or image). Every rank gets the whole result."""
    dim = 2 if getattr(codec, "frame_wise", False) else 0
    return split_work(latents, dim, comm, codec.decode)
