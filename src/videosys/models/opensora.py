"""Open-Sora 1.2: STDiT3, the spatial-temporal DiT of hpcaitech/Open-Sora.

Each of the `depth` layers is a spatial block (attention within each frame) followed by a
temporal block (attention across frames at each spatial position, with rotary positions on the
time axis). Both blocks cross-attend to T5 tokens (4096-d, 300 tokens) and are modulated by one
timestep embedding (adaLN-single) to which an fps embedding is added. Spatial positions are a
2D sin/cos table whose grid is rescaled with the clip's resolution (relative to `input_sq_size`)
and aspect ratio, so one model serves many resolutions and aspect ratios. The model predicts the
rectified-flow velocity; with `pred_sigma` (as published) it emits twice the input channels and
the objective reads the first half.

Parameter and buffer names follow the published checkpoint (hpcai-tech/OpenSora-STDiT-v3), so its
`model.safetensors` loads with no adapter.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from videosys.errors import ConfigError, MissingGeometryError
from videosys.models.blocks import (
    AdaLNSingleBlock,
    AdaLNSingleFinalLayer,
    LocalSequence,
    Mlp,
    PatchEmbed3D,
    RMSNorm,
    Rotary,
    TimestepEmbedder,
    cached_table,
    sincos_2d,
    unpatchify_video,
    xavier_init,
)
from videosys.models.weights import load_strict, read_state_dict_file, require_exists

# Published sizes (Open-Sora 1.2 registers STDiT3-XL/2 and STDiT3-3B/2) and a CPU-sized debug flavor.
OPENSORA_FLAVORS: dict[str, dict] = {
    "STDiT3-XL/2": dict(
        depth=28, hidden_size=1152, num_heads=16, patch_size=[1, 2, 2], caption_channels=4096, model_max_length=300
    ),
    "STDiT3-3B/2": dict(
        depth=28, hidden_size=1872, num_heads=26, patch_size=[1, 2, 2], caption_channels=4096, model_max_length=300
    ),
    "debug": dict(depth=2, hidden_size=64, num_heads=4, patch_size=[1, 2, 2]),
}
_ARCH_FIELDS = ("depth", "hidden_size", "num_heads", "patch_size", "caption_channels")


@dataclass
class OpenSoraConfig:
    name: str = "opensora"
    flavor: str = "debug"  # a key of OPENSORA_FLAVORS
    # Geometry of the model input (VAE latents); None takes it from the data and the VAE.
    input_size: list[int] | None = None  # [frames, height, width]
    in_channels: int | None = None
    caption_channels: int | None = None  # text embedding width; None: the flavor's or the text encoder's
    model_max_length: int | None = None  # text tokens (300 with T5 in Open-Sora 1.2); None: the text encoder's
    # Architecture overrides; None keeps the flavor's value.
    depth: int | None = None
    hidden_size: int | None = None
    num_heads: int | None = None
    patch_size: list[int] | None = None  # [time, height, width]
    mlp_ratio: float = 4.0
    pred_sigma: bool = True  # published: 2x output channels, the velocity is the first half
    class_dropout_prob: float = 0.1  # caption replaced by the learned-free null embedding while training
    qk_norm: bool = True  # RMSNorm on per-head queries and keys
    input_sq_size: int = 512  # sqrt(height * width) in pixels at which the position grid is unscaled
    vae_downsample: int | None = None  # pixels per latent (resolution conditioning); None: 8, the SD VAE
    fps: float = 24.0  # frame-rate conditioning when the data does not give one
    weights: str | None = None  # local Open-Sora / VideoSys weights (.safetensors, .pt or checkpoint)

    def resolved(self) -> OpenSoraConfig:
        if self.flavor not in OPENSORA_FLAVORS:
            raise ConfigError(
                f"model.flavor={self.flavor!r} is not an Open-Sora flavor; choose one of {sorted(OPENSORA_FLAVORS)}"
            )
        cfg = dataclasses.replace(self)
        for key, value in OPENSORA_FLAVORS[cfg.flavor].items():
            if getattr(cfg, key) is None:
                setattr(cfg, key, list(value) if isinstance(value, list) else value)
        if cfg.vae_downsample is None:
            cfg.vae_downsample = 8
        for key in ("input_size", "in_channels", "caption_channels", "model_max_length"):
            if getattr(cfg, key) is None:
                raise MissingGeometryError(
                    f"model.{key} is not set and could not be taken from the data, the VAE or the text encoder; set it"
                )
        if len(cfg.input_size) != 3 or len(cfg.patch_size) != 3:
            raise ConfigError(
                f"model.input_size={list(cfg.input_size)} and model.patch_size={list(cfg.patch_size)} must both be "
                "[frames, height, width]"
            )
        if cfg.hidden_size % cfg.num_heads:
            raise ConfigError(f"model.hidden_size={cfg.hidden_size} is not divisible by num_heads={cfg.num_heads}")
        if cfg.hidden_size % 4:
            raise ConfigError(f"model.hidden_size={cfg.hidden_size} must be a multiple of 4 (2D sin/cos positions)")
        if (cfg.hidden_size // cfg.num_heads) % 2:
            raise ConfigError(
                f"head size {cfg.hidden_size // cfg.num_heads} (model.hidden_size / model.num_heads) must be even "
                "for the temporal rotary embedding"
            )
        return cfg


class _RotaryFrequencies(nn.Module):
    """Holds the temporal rotary frequencies under the checkpoint name `rope.freqs`."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.register_buffer("freqs", self.default_freqs())

    def default_freqs(self) -> torch.Tensor:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32)[: self.head_dim // 2] / self.head_dim
        return 1.0 / self.theta**exponents

    def rotary(self, length: int) -> Rotary:
        """Interleaved-pair rotary over positions 0..length-1 (the rotary-embedding-torch layout)."""
        positions = torch.arange(length, device=self.freqs.device, dtype=torch.float32)
        angles = (positions[:, None] * self.freqs.float()[None, :]).repeat_interleave(2, dim=-1)
        return Rotary(angles.cos(), angles.sin(), interleaved=True)


class CaptionEmbedder(nn.Module):
    """Projects text embeddings to the hidden size; holds the fixed null caption used for CFG, which
    training swaps in for a `dropout_prob` fraction of captions (in `videosys.tasks.conditioning`)."""

    def __init__(self, caption_channels: int, hidden_size: int, token_num: int, dropout_prob: float):
        super().__init__()
        self.y_proj = Mlp(caption_channels, hidden_size, hidden_size)
        self.register_buffer("y_embedding", torch.randn(token_num, caption_channels) / caption_channels**0.5)
        self.dropout_prob = dropout_prob

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return self.y_proj(text)


class OpenSora(nn.Module):
    """STDiT3. forward(x (B, C, T, H, W), timestep (B,) in [0, 1000], text (B, L, C_text), text_mask (B, L))."""

    block_lists = ("spatial_blocks", "temporal_blocks")
    sequence_parallel_modes = ("dsp", "ulysses", "ring", "usp")
    token_layout = "video"  # what `videosys.parallelize` splits
    prediction_type = "flow"

    def __init__(self, cfg: OpenSoraConfig):
        super().__init__()
        self.sequence = LocalSequence()  # sequence-parallel hooks, set by videosys.parallelize
        cfg = cfg.resolved()
        self.config = cfg
        self.in_channels = cfg.in_channels
        self.out_channels = cfg.in_channels * 2 if cfg.pred_sigma else cfg.in_channels
        self.learn_sigma = False  # the second half of a pred_sigma output is unused by rectified flow
        self.patch_size = tuple(cfg.patch_size)
        dim = cfg.hidden_size
        qk_norm = "rms" if cfg.qk_norm else None

        self.rope = _RotaryFrequencies(dim // cfg.num_heads)
        self.x_embedder = PatchEmbed3D(self.patch_size, cfg.in_channels, dim)
        self.t_embedder = TimestepEmbedder(dim)
        self.fps_embedder = TimestepEmbedder(dim)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.y_embedder = CaptionEmbedder(cfg.caption_channels, dim, cfg.model_max_length, cfg.class_dropout_prob)
        self.spatial_blocks = nn.ModuleList(
            AdaLNSingleBlock(dim, cfg.num_heads, "spatial", True, cfg.mlp_ratio, qk_norm) for _ in range(cfg.depth)
        )
        self.temporal_blocks = nn.ModuleList(
            AdaLNSingleBlock(dim, cfg.num_heads, "temporal", True, cfg.mlp_ratio, qk_norm) for _ in range(cfg.depth)
        )
        self.final_layer = AdaLNSingleFinalLayer(dim, math.prod(self.patch_size) * self.out_channels)
        if self.t_block[1].weight.device.type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Open-Sora 1.2's initialisation (Xavier linears; the fps embedding and the temporal blocks'
        residual branches start at zero, so a fresh model is a per-frame image model)."""
        xavier_init(self, self.x_embedder.proj)
        for module in self.modules():
            if isinstance(module, nn.LayerNorm) and module.weight is not None:
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        dim = self.config.hidden_size
        for block in [*self.spatial_blocks, *self.temporal_blocks]:
            block.scale_shift_table.copy_(torch.randn(6, dim) / dim**0.5)
        self.final_layer.scale_shift_table.copy_(torch.randn(2, dim) / dim**0.5)
        caption_channels = self.config.caption_channels
        self.y_embedder.y_embedding.copy_(torch.randn_like(self.y_embedder.y_embedding) / caption_channels**0.5)
        self.rope.freqs.copy_(self.rope.default_freqs())
        nn.init.normal_(self.fps_embedder.mlp[0].weight, std=0.02)
        nn.init.zeros_(self.fps_embedder.mlp[2].weight)
        nn.init.zeros_(self.fps_embedder.mlp[2].bias)
        for block in self.temporal_blocks:
            nn.init.zeros_(block.attn.proj.weight)
            nn.init.zeros_(block.cross_attn.proj.weight)
            nn.init.zeros_(block.mlp.fc2.weight)

    def null_text(self, batch: int) -> torch.Tensor:
        """The unconditional caption for classifier-free guidance (the one dropout trained)."""
        return self.y_embedder.y_embedding[None].expand(batch, -1, -1)

    def position_embedding(self, grid_h: int, grid_w: int, height: float, width: float) -> torch.Tensor:
        """2D sin/cos table whose grid spans `base_size` / scale positions per axis, where scale grows
        with the pixel resolution and base_size with the number of patches (Open-Sora 1.2)."""
        scale = math.sqrt(height * width) / self.config.input_sq_size
        base_size = round(math.sqrt(grid_h * grid_w))
        table = sincos_2d(
            self.config.hidden_size,
            grid_h,
            grid_w,
            row_scale=base_size / (grid_h * scale),
            col_scale=base_size / (grid_w * scale),
        )
        return table.float()

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor | None = None,
        fps: torch.Tensor | float | None = None,
        height: float | None = None,
        width: float | None = None,
    ) -> torch.Tensor:
        """`height` / `width` are the clip's pixel size (default: latent size x vae_downsample)."""
        batch, _, frames, rows, cols = x.shape
        pt, ph, pw = self.patch_size
        # Pad up to whole patches, as the reference does; the padding is cropped from the output.
        pad = ((-cols) % pw, (-rows) % ph, (-frames) % pt)
        if any(pad):
            x = F.pad(x, (0, pad[0], 0, pad[1], 0, pad[2]))
        grid = (x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw)
        height = float(height if height is not None else rows * self.config.vae_downsample)
        width = float(width if width is not None else cols * self.config.vae_downsample)
        pos = cached_table(
            self,
            ("positions", grid[1], grid[2], height, width, x.device),
            lambda: self.position_embedding(grid[1], grid[2], height, width).to(x.device),
        )

        if fps is None:
            fps = self.config.fps
        if not torch.is_tensor(fps):
            fps = torch.full((batch,), float(fps), device=x.device)
        t = self.t_embedder(timestep) + self.fps_embedder(fps.reshape(-1).expand(batch))
        t6 = self.t_block(t).view(batch, 6, -1)
        context = self.y_embedder(text)

        h = self.x_embedder(x) + pos.to(self.x_embedder.proj.weight.dtype)
        h = self.sequence.scatter(h, 2)  # sequence parallel: each rank keeps a chunk of the spatial tokens
        rope = self.rope.rotary(grid[0])
        for spatial, temporal in zip(self.spatial_blocks, self.temporal_blocks, strict=True):
            h = spatial(h, t6, context, text_mask)
            h = temporal(h, t6, context, text_mask, rope)
        h = self.sequence.gather(self.final_layer(h, t), 2)
        out = unpatchify_video(h, grid, self.patch_size, self.out_channels)
        return out[:, :, :frames, :rows, :cols]


def load_weights(model: OpenSora, path: str) -> None:
    """Published Open-Sora 1.2 weights (model.safetensors / .pt / .pth), or a VideoSys checkpoint."""
    source = require_exists(path, "a local Open-Sora checkpoint (.safetensors or .pt) or a VideoSys checkpoint")
    if source.is_dir():  # a Hugging Face style folder holding model.safetensors
        candidates = [source / "model.safetensors", source / "pytorch_model.bin"]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise FileNotFoundError(f"model.weights={path} is a folder without model.safetensors or pytorch_model.bin")
        source = found[0]
    sd = read_state_dict_file(source)
    # Older exports lack the fixed rotary frequencies; they are a function of the head size.
    sd.setdefault("rope.freqs", model.rope.default_freqs())
    load_strict(model, sd, path)
