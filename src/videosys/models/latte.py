"""Latte: text-to-video latent Diffusion Transformer (Ma et al., "Latte: Latent Diffusion Transformer
for Video Generation", 2024), the T2V model published as Latte-1.

Layout. The latent video (B, C, T, H, W) is cut frame by frame into p x p patches, giving activations
(B, T, S, C) with S = (H/p)(W/p) tokens per frame, plus a fixed 2D sin/cos position table per frame.
The network alternates two PixArt-alpha ("adaLN-single") blocks `depth` times: a spatial block
(self-attention within each frame, then cross-attention to the projected T5 caption, then the MLP)
and a temporal block (self-attention across frames at each spatial position, then the MLP). A fixed
1D sin/cos table over frames is added once, just before the first temporal block. One timestep
embedding is projected once to the (B, 6, C) modulation that every block adds to its own learned
table; the final layer is modulated by the timestep embedding itself. The output holds epsilon and,
with `learn_sigma`, the learned variance interpolation (2 * in_channels channels).

Weights. Parameter names follow the shared blocks (Open-Sora style). `convert_diffusers_state_dict`
maps a diffusers `LatteTransformer3DModel` (e.g. the `transformer/` folder of maxin-cn/Latte-1) to
them: fuses attn1 to_q/to_k/to_v into `attn.qkv` and attn2 to_k/to_v into `cross_attn.kv_linear`,
turns the per-frame Conv2d patch embedding into the (1, p, p) Conv3d, and renames the timestep,
caption and output layers. `LatteConfig.resolved()` reads a diffusers folder's config.json for the
architecture and geometry. The math matches diffusers (tested to 1e-5 relative), including its
position-table interpolation when sampling at a resolution other than `sample_size`.

Differences from diffusers, on purpose: the text mask is a (B, L) bool key mask (diffusers'
LatteTransformer3DModel forwards its `encoder_attention_mask` to per-frame attention unchanged and only
accepts a mask already expanded to one bias row per frame); and videos shorter than the temporal
table use its first T rows (diffusers needs exactly `video_length` frames, or 1). A caption whose mask
is all False attends to all of its tokens, as under diffusers' additive bias.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from videosys.errors import ConfigError, MissingGeometryError
from videosys.models.blocks import (
    AdaLNSingleBlock,
    AdaLNSingleFinalLayer,
    LocalSequence,
    Mlp,
    PatchEmbed3D,
    TimestepEmbedder,
    cached_table,
    sincos_1d,
    sincos_2d,
    unpatchify_video,
    xavier_init,
)
from videosys.models.weights import (
    diffusers_config,
    load_strict,
    read_diffusers_state_dict,
    read_state_dict_file,
    require_exists,
)

# Latte-1 T2V (diffusers config of maxin-cn/Latte-1): 28 spatial + 28 temporal blocks, 16 heads x 72,
# T5-XXL captions, 512 px videos (64 x 64 latents) of 16 frames. `debug` is sized for CPU tests.
LATTE_FLAVORS: dict[str, dict[str, int]] = {
    "XL/2": dict(
        depth=28,
        hidden_size=1152,
        num_heads=16,
        patch_size=2,
        caption_channels=4096,
        num_frames_embed=16,
        sample_size=64,
    ),
    "debug": dict(depth=2, hidden_size=64, num_heads=4, patch_size=2, caption_channels=32),
}

_ARCH_FIELDS = ("depth", "hidden_size", "num_heads", "patch_size", "caption_channels")
# Filled from the weights first, then the flavor, then the input geometry (see LatteConfig.resolved).
_TABLE_FIELDS = ("num_frames_embed", "sample_size")


@dataclass
class LatteConfig:
    name: str = "latte"
    flavor: str = "debug"  # a key of LATTE_FLAVORS
    # Input geometry of the model input (latents): [frames, height, width]; None takes it from the data
    # (through the VAE) or from diffusers weights. Height and width may differ from `sample_size`.
    input_size: list[int] | None = None
    in_channels: int | None = None
    # Width of the text embeddings (4096 for T5-XXL); None keeps the flavor's.
    caption_channels: int | None = None
    # Epsilon plus the learned variance interpolation: out_channels = 2 * in_channels.
    learn_sigma: bool = True
    # Architecture overrides for custom sizes; None keeps the flavor's value.
    depth: int | None = None  # number of (spatial, temporal) block pairs
    hidden_size: int | None = None
    num_heads: int | None = None
    patch_size: int | None = None
    mlp_ratio: float = 4.0
    # Length of the temporal sin/cos table (diffusers' `video_length`): the most frames the model takes.
    # None: the weights', else the flavor's, else the input's frame count.
    num_frames_embed: int | None = None
    # Latent height/width the spatial sin/cos table is laid out for (diffusers' `sample_size`): other
    # resolutions stretch their grid to the same range, as in diffusers. None: the weights', else the
    # flavor's, else the input height.
    sample_size: int | None = None
    # LayerNorm eps inside the blocks (taken from diffusers weights' norm_eps).
    norm_eps: float = 1e-6
    # Local weights to start from: a diffusers LatteTransformer3DModel folder (or a pipeline folder
    # with one in transformer/), a .safetensors / .pt state dict of VideoSys names, or a VideoSys
    # checkpoint.
    weights: str | None = None

    def resolved(self) -> LatteConfig:
        """Fill the architecture from the flavor (and from diffusers weights) and check it."""
        if self.flavor not in LATTE_FLAVORS:
            raise ConfigError(
                f"model.flavor={self.flavor!r} is not a Latte flavor; choose one of {sorted(LATTE_FLAVORS)}"
            )
        cfg = dataclasses.replace(self)
        flavor = LATTE_FLAVORS[cfg.flavor]
        for key, value in flavor.items():
            if key not in _TABLE_FIELDS and getattr(cfg, key) is None:
                setattr(cfg, key, value)
        folder = diffusers_latte_folder(cfg.weights) if cfg.weights else None
        if folder is not None:
            cfg = _apply_diffusers_config(cfg, folder)
        for key in _TABLE_FIELDS:
            if getattr(cfg, key) is None and key in flavor:
                setattr(cfg, key, flavor[key])
        if cfg.input_size is None:
            raise MissingGeometryError(
                "model.input_size ([frames, height, width] of the latents) is not set and could not be taken "
                "from the data or the weights; set it"
            )
        if cfg.in_channels is None:
            raise MissingGeometryError(
                "model.in_channels is not set and could not be taken from the data or the weights; set it"
            )
        size = None if isinstance(cfg.input_size, str) else cfg.input_size
        size = list(size) if isinstance(size, Sequence) else None
        if size is None or len(size) != 3 or not all(isinstance(v, int) and v > 0 for v in size):
            raise ConfigError(
                f"model.input_size={cfg.input_size!r} must be three positive integers [frames, height, width]"
            )
        cfg.input_size = size
        frames, height, width = size
        if cfg.num_frames_embed is None:
            cfg.num_frames_embed = frames
        if cfg.sample_size is None:
            cfg.sample_size = height
        if height % cfg.patch_size or width % cfg.patch_size:
            raise ConfigError(
                f"model.input_size={size}: height and width must be divisible by model.patch_size="
                f"{cfg.patch_size}; change the video size or pick a flavor with a smaller patch"
            )
        if cfg.hidden_size % cfg.num_heads:
            raise ConfigError(f"model.hidden_size={cfg.hidden_size} is not divisible by num_heads={cfg.num_heads}")
        if cfg.hidden_size % 4:
            raise ConfigError(
                f"model.hidden_size={cfg.hidden_size} must be a multiple of 4 for the 2D sin/cos position table"
            )
        if frames > cfg.num_frames_embed:
            raise ConfigError(
                f"model.input_size={size} has {frames} frames but the temporal position table "
                f"model.num_frames_embed={cfg.num_frames_embed} is shorter; use at most {cfg.num_frames_embed} "
                "frames or raise model.num_frames_embed (only when training from scratch)"
            )
        return cfg


def spatial_pos_table(dim: int, grid_h: int, grid_w: int, sample_size: int, patch: int) -> torch.Tensor:
    """diffusers' PatchEmbed sin/cos table for a (grid_h, grid_w) token grid: (grid_h * grid_w, dim).

    The grid is stretched so that it spans `sample_size // patch` positions (its base size), then
    divided by the interpolation scale max(sample_size // 64, 1) that LatteTransformer3DModel uses.
    """
    base = sample_size // patch
    interpolation = max(sample_size // 64, 1)
    return sincos_2d(
        dim, grid_h, grid_w, row_scale=base / (grid_h * interpolation), col_scale=base / (grid_w * interpolation)
    )


class Latte(nn.Module):
    block_lists = ("spatial_blocks", "temporal_blocks")  # the block lists that parallel plans wrap
    sequence_parallel_modes = ("dsp", "ulysses", "ring", "usp")
    token_layout = "video"  # what `videosys.parallelize` splits
    prediction_type = "epsilon"

    def __init__(self, cfg: LatteConfig):
        super().__init__()
        self.sequence = LocalSequence()  # sequence-parallel hooks, set by videosys.parallelize
        cfg = cfg.resolved()
        self.config = cfg
        self.in_channels = cfg.in_channels
        self.out_channels = cfg.in_channels * 2 if cfg.learn_sigma else cfg.in_channels
        self.learn_sigma = cfg.learn_sigma
        self.caption_channels = cfg.caption_channels
        self.patch_size = cfg.patch_size
        self.input_size = tuple(cfg.input_size)  # (frames, height, width)
        self.grid = (cfg.input_size[1] // cfg.patch_size, cfg.input_size[2] // cfg.patch_size)
        dim, p = cfg.hidden_size, cfg.patch_size

        self.x_embedder = PatchEmbed3D((1, p, p), cfg.in_channels, dim)
        # Timesteps(256, flip_sin_to_cos=True, shift 0) + TimestepEmbedding of diffusers' AdaLayerNormSingle.
        self.t_embedder = TimestepEmbedder(dim, freq_dim=256, freq_shift=0)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        # PixArt-alpha caption projection: linear, GELU(tanh), linear.
        self.y_embedder = Mlp(cfg.caption_channels, dim, dim)
        # Fixed tables, recomputed by init_weights (so not part of the state dict).
        self.register_buffer("pos_embed", torch.zeros(1, 1, self.grid[0] * self.grid[1], dim), persistent=False)
        self.register_buffer("temp_embed", torch.zeros(1, cfg.num_frames_embed, 1, dim), persistent=False)
        self.spatial_blocks = nn.ModuleList(
            AdaLNSingleBlock(dim, cfg.num_heads, "spatial", True, cfg.mlp_ratio, norm_eps=cfg.norm_eps)
            for _ in range(cfg.depth)
        )
        self.temporal_blocks = nn.ModuleList(
            AdaLNSingleBlock(dim, cfg.num_heads, "temporal", False, cfg.mlp_ratio, norm_eps=cfg.norm_eps)
            for _ in range(cfg.depth)
        )
        self.final_layer = AdaLNSingleFinalLayer(dim, p * p * self.out_channels)
        if self.pos_embed.device.type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """PixArt-alpha initialisation (Latte T2V starts from PixArt): Xavier linears, N(0, 0.02) timestep
        and caption embedders, zeroed cross-attention outputs and output layer, N(0, 1/C) modulation
        tables, and the fixed sin/cos tables. Called after `to_empty` when built on the meta device."""
        xavier_init(self, self.x_embedder.proj)
        for linear in (self.t_embedder.mlp[0], self.t_embedder.mlp[2], self.t_block[1]):
            nn.init.normal_(linear.weight, std=0.02)
        # The caption projection keeps its Xavier init: PixArt's fixed N(0, 0.02) is sized for 4096-d
        # T5 inputs and starves small caption widths, whose conditioning then never takes hold.
        dim = self.config.hidden_size
        for block in (*self.spatial_blocks, *self.temporal_blocks):
            nn.init.normal_(block.scale_shift_table, std=dim**-0.5)
            if block.cross_attn is not None:
                nn.init.zeros_(block.cross_attn.proj.weight)
                nn.init.zeros_(block.cross_attn.proj.bias)
        nn.init.normal_(self.final_layer.scale_shift_table, std=dim**-0.5)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        table = spatial_pos_table(dim, *self.grid, self.config.sample_size, self.patch_size)
        self.pos_embed.copy_(table.view(self.pos_embed.shape))
        frames = torch.arange(self.temp_embed.shape[1])
        self.temp_embed.copy_(sincos_1d(dim, frames).view(self.temp_embed.shape))

    def spatial_positions(self, grid_h: int, grid_w: int, like: torch.Tensor) -> torch.Tensor:
        """The (1, 1, S, C) table for a token grid: the stored one, or diffusers' stretched one for
        another resolution."""
        if (grid_h, grid_w) == self.grid:
            return self.pos_embed

        def make():
            table = spatial_pos_table(like.shape[-1], grid_h, grid_w, self.config.sample_size, self.patch_size)
            return table.to(device=like.device, dtype=torch.float32).view(1, 1, grid_h * grid_w, -1)

        return cached_table(self, ("positions", grid_h, grid_w, like.device), make)

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor | None = None,
        enable_temporal_attentions: bool = True,
    ) -> torch.Tensor:
        """x: (B, C, T, H, W) noisy latents, timestep: (B,), text: (B, L, caption_channels) caption
        embeddings, text_mask: (B, L) bool, False at padding. Returns (B, out_channels, T, H, W).

        `enable_temporal_attentions=False` skips the temporal blocks and table (Latte-1's image mode)."""
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"Latte takes (B, {self.in_channels}, T, H, W) latents, got {tuple(x.shape)}")
        frames, height, width = x.shape[2:]
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"Latte with patch size {p} needs height and width divisible by it, got {height}x{width}")
        if enable_temporal_attentions and frames > self.temp_embed.shape[1]:
            raise ValueError(f"Latte's temporal position table has {self.temp_embed.shape[1]} frames, got {frames}")
        grid = (frames, height // p, width // p)

        h = self.x_embedder(x)  # (B, T, S, C)
        h = (h + self.spatial_positions(grid[1], grid[2], h)).to(h.dtype)
        h = self.sequence.scatter(h, 2)  # sequence parallel: each rank keeps a chunk of the spatial tokens
        t_emb = self.t_embedder(timestep)  # (B, C)
        t6 = self.t_block(t_emb).unflatten(1, (6, -1))  # (B, 6, C)
        context = self.y_embedder(text)
        if text_mask is not None:
            # diffusers masks with an additive -10000 bias, under which a caption with no valid token
            # attends to all of them alike; a boolean mask would give zeros instead.
            text_mask = text_mask.to(torch.bool)
            text_mask = text_mask | ~text_mask.any(dim=1, keepdim=True)
        for i, (spatial, temporal) in enumerate(zip(self.spatial_blocks, self.temporal_blocks, strict=True)):
            h = spatial(h, t6, context, text_mask)
            if enable_temporal_attentions:
                if i == 0 and frames > 1:
                    h = h + self.temp_embed[:, :frames].to(h.dtype)
                h = temporal(h, t6)
        h = self.sequence.gather(self.final_layer(h, t_emb), 2)
        return unpatchify_video(h, grid, (1, p, p), self.out_channels)


# --- Loading published weights -------------------------------------------------------------------

DIFFUSERS_CLASS = "LatteTransformer3DModel"


def diffusers_latte_folder(path: str | Path) -> Path | None:
    """The diffusers LatteTransformer3DModel folder at `path` (or in its transformer/ subfolder, the
    layout of a pipeline download), or None if there is none."""
    path = Path(path).expanduser()
    for folder in (path, path / "transformer"):
        if diffusers_config(folder, DIFFUSERS_CLASS) is not None:
            return folder
    return None


def _apply_diffusers_config(cfg: LatteConfig, folder: Path) -> LatteConfig:
    """Take the architecture from a diffusers Latte config; any value already set must agree."""
    d = json.loads((folder / "config.json").read_text())
    heads, head_dim = d.get("num_attention_heads", 16), d.get("attention_head_dim", 88)
    hidden = heads * head_dim
    supported = dict(
        norm_type=("ada_norm_single", "only the PixArt-style adaLN-single variant (Latte T2V) is implemented"),
        activation_fn=("gelu-approximate", "the blocks' MLP uses tanh-approximated GELU"),
        attention_bias=(True, "the blocks' q/k/v projections have biases"),
        norm_elementwise_affine=(False, "the blocks' LayerNorms have no affine parameters"),
        cross_attention_dim=(hidden, "the caption is projected to the hidden size before cross-attention"),
    )
    defaults = dict(norm_type="layer_norm", activation_fn="geglu", attention_bias=False)
    defaults.update(norm_elementwise_affine=True, cross_attention_dim=None)
    for key, (wanted, why) in supported.items():
        value = d.get(key, defaults[key])
        if value != wanted:
            raise ConfigError(
                f"model.weights={folder} holds a LatteTransformer3DModel with {key}={value!r}; VideoSys's Latte "
                f"needs {key}={wanted!r} ({why})"
            )
    in_channels = d.get("in_channels")
    out_channels = d.get("out_channels") or in_channels
    if out_channels not in (in_channels, 2 * in_channels):
        raise ConfigError(
            f"model.weights={folder} has out_channels={out_channels} for in_channels={in_channels}; Latte predicts "
            "epsilon (in_channels) or epsilon and the variance (2 * in_channels)"
        )
    sample_size = d.get("sample_size", 64)
    video_length = d.get("video_length", 16)
    from_diffusers = dict(
        depth=d.get("num_layers", 1),
        hidden_size=hidden,
        num_heads=heads,
        patch_size=d.get("patch_size"),
        caption_channels=d.get("caption_channels"),
        mlp_ratio=4.0,  # diffusers' FeedForward default (mult=4)
        in_channels=in_channels,
        num_frames_embed=video_length,
        sample_size=sample_size,
    )
    for key, value in from_diffusers.items():
        current = getattr(cfg, key)
        if current is not None and current != value:
            hint = "pick the matching model.flavor" if key in _ARCH_FIELDS else f"set model.{key}={value}"
            raise ConfigError(
                f"model.weights={folder} holds a Latte with {key}={value}, but this run has {key}={current} "
                f"(model.flavor={cfg.flavor}); {hint}"
            )
    input_size = cfg.input_size if cfg.input_size is not None else [video_length, sample_size, sample_size]
    return dataclasses.replace(
        cfg,
        **from_diffusers,
        input_size=input_size,
        learn_sigma=out_channels == 2 * in_channels,
        norm_eps=d.get("norm_eps", 1e-5),
    )


# Fixed tables diffusers may carry; VideoSys recomputes them.
_DIFFUSERS_BUFFERS = ("pos_embed.pos_embed", "temp_pos_embed")


def convert_diffusers_state_dict(sd: dict[str, torch.Tensor], cfg: LatteConfig) -> dict[str, torch.Tensor]:
    """Rename a diffusers LatteTransformer3DModel state dict to VideoSys names (see the module docstring).

    Every tensor of `sd` must be used; a missing or an unexpected one raises ConfigError naming it.
    """
    left = {k: v for k, v in sd.items() if k not in _DIFFUSERS_BUFFERS}

    def take(key: str) -> torch.Tensor:
        if key not in left:
            raise ConfigError(f"the diffusers Latte state dict has no {key} (is it a {DIFFUSERS_CLASS}?)")
        return left.pop(key)

    def linear(dst: str, src: str) -> None:
        for part in ("weight", "bias"):
            out[f"{dst}.{part}"] = take(f"{src}.{part}")

    def fused(dst: str, srcs: list[str]) -> None:
        for part in ("weight", "bias"):
            out[f"{dst}.{part}"] = torch.cat([take(f"{src}.{part}") for src in srcs], dim=0)

    depth = cfg.depth if cfg.depth is not None else LATTE_FLAVORS[cfg.flavor]["depth"]
    out: dict[str, torch.Tensor] = {}
    out["x_embedder.proj.weight"] = take("pos_embed.proj.weight").unsqueeze(2)  # Conv2d -> (1, p, p) Conv3d
    out["x_embedder.proj.bias"] = take("pos_embed.proj.bias")
    linear("t_embedder.mlp.0", "adaln_single.emb.timestep_embedder.linear_1")
    linear("t_embedder.mlp.2", "adaln_single.emb.timestep_embedder.linear_2")
    linear("t_block.1", "adaln_single.linear")
    linear("y_embedder.fc1", "caption_projection.linear_1")
    linear("y_embedder.fc2", "caption_projection.linear_2")
    out["final_layer.scale_shift_table"] = take("scale_shift_table")
    linear("final_layer.linear", "proj_out")
    for i in range(depth):
        pairs = [(f"transformer_blocks.{i}", f"spatial_blocks.{i}")]
        pairs.append((f"temporal_transformer_blocks.{i}", f"temporal_blocks.{i}"))
        for src, dst in pairs:
            out[f"{dst}.scale_shift_table"] = take(f"{src}.scale_shift_table")
            fused(f"{dst}.attn.qkv", [f"{src}.attn1.to_{n}" for n in "qkv"])
            linear(f"{dst}.attn.proj", f"{src}.attn1.to_out.0")
            linear(f"{dst}.mlp.fc1", f"{src}.ff.net.0.proj")
            linear(f"{dst}.mlp.fc2", f"{src}.ff.net.2")
            if dst.startswith("spatial"):
                linear(f"{dst}.cross_attn.q_linear", f"{src}.attn2.to_q")
                fused(f"{dst}.cross_attn.kv_linear", [f"{src}.attn2.to_k", f"{src}.attn2.to_v"])
                linear(f"{dst}.cross_attn.proj", f"{src}.attn2.to_out.0")
    if left:
        raise ConfigError(
            f"the diffusers Latte state dict has {len(left)} tensors VideoSys's Latte (depth {depth}) has no "
            f"place for, e.g. {sorted(left)[:3]}"
        )
    return out


def load_weights(model: Latte, path: str) -> None:
    """Load local weights in any supported format into `model` (strictly: every tensor must match)."""
    source = require_exists(
        path, "a local diffusers LatteTransformer3DModel folder, a .safetensors/.pt state dict or a VideoSys checkpoint"
    )
    folder = diffusers_latte_folder(source)
    if folder is not None:
        try:
            sd = convert_diffusers_state_dict(read_diffusers_state_dict(folder), model.config)
        except ConfigError as err:
            raise ConfigError(f"model.weights={path} does not fit model flavor {model.config.flavor}: {err}") from err
    else:
        sd = read_state_dict_file(source)
    load_strict(model, sd, path)
