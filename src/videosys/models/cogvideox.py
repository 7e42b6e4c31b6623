"""CogVideoX: text-to-video Diffusion Transformer with joint text/video attention (Yang et al.,
"CogVideoX: Text-to-Video Diffusion Models with An Expert Transformer", 2024; THUDM/CogVideoX-2b, -5b).

Token layout. A latent video (B, C, T, H, W) is cut into 1 x p x p patches (every latent frame on
its own; the VAE already compressed time 4x) and projected to the hidden width; the T5 text
embedding (B, L, 4096), L = 226 padded tokens, is projected to the same width. Every block runs
one self-attention over the joint sequence [L text tokens; T * H/p * W/p video tokens] (video
tokens row-major over frame, row, column), so there is no separate cross-attention. The two
streams keep their own residuals: each block's "LayerNormZero" turns the timestep embedding into a
separate shift / scale / gate for the text and for the video tokens, around a LayerNorm shared by
both, before attention and before the (tanh-GELU) MLP, which also runs over the joint sequence.
Queries and keys get a per-head LayerNorm. Positions exist only for the video tokens:

- 2B: fixed 3D sin/cos absolute positions added after the patch embedding (1/4 of the channels
  encode the frame, 3/4 the row and column, the grid divided by the interpolation scales);
- 5B: 3D rotary embedding on the video queries and keys inside attention (1/4 of each head's
  channels rotate with the frame, 3/8 with the row, 3/8 with the column). As in diffusers'
  pipeline, the row/column positions are those of the latent grid resized and centre-cropped
  into the published sample grid (`sample_height` x `sample_width` latents, 60 x 90), so other
  resolutions see fractional positions inside the trained range;
- 5B-I2V (`learned_pos_embed`): a fixed-size table over the whole joint sequence, on top of rotary.

After the blocks the video stream goes through a LayerNorm, a final adaptive LayerNorm (shift and
scale from the timestep embedding) and a linear projection back to patch values. The model predicts
v (the published schedulers use `prediction_type="v_prediction"`).

The published model attends to every text token, padding included (it was trained that way), so
`forward` accepts `text_mask` for the common VideoSys interface but ignores it, as diffusers does.

Weights. `convert_diffusers_state_dict` renames diffusers' `CogVideoXTransformer3DModel` tensors to
VideoSys names: q/k/v are fused into one projection (the shared `Attention`), the Conv2d patch
kernel becomes the equivalent 1 x p x p Conv3d kernel of `PatchEmbed3D`, and the rows of the
output projection are reordered from diffusers' (channel, row, column) to the (row, column,
channel) order of `unpatchify_video`. CogVideoX 1.5 checkpoints (temporal patches, "ofs"
embedding) are refused with a message.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from videosys.errors import ConfigError, MissingGeometryError
from videosys.models.blocks import (
    Attention,
    LocalSequence,
    Mlp,
    PatchEmbed3D,
    Rotary,
    TimestepEmbedder,
    cached,
    cached_table,
    rotary_tables,
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
from videosys.ops.kernels import TORCH_OPS

# Published sizes (THUDM/CogVideoX-2b and -5b transformer/config.json), plus a CPU-sized `debug`
# flavor that keeps rotary on so that CPU tests exercise the 5B path.
_PUBLISHED = dict(
    head_dim=64,
    time_embed_dim=512,
    patch_size=2,
    caption_channels=4096,  # T5-XXL
    qkv_bias=True,
    norm_eps=1e-5,
    time_freq_shift=0,
    learned_pos_embed=False,
    sample_frames=49,  # pixel frames: (49 - 1) / 4 + 1 = 13 latent frames
    sample_height=60,  # latents (480 pixels / 8)
    sample_width=90,  # latents (720 pixels / 8)
    temporal_compression_ratio=4,
    spatial_interpolation_scale=1.875,
    temporal_interpolation_scale=1.0,
)
COGVIDEOX_FLAVORS: dict[str, dict] = {
    "2B": dict(_PUBLISHED, depth=30, num_heads=30, rotary=False, sincos_pos_embed=True),
    "5B": dict(_PUBLISHED, depth=42, num_heads=48, rotary=True, sincos_pos_embed=False),
    "debug": dict(
        _PUBLISHED,
        depth=2,
        num_heads=4,
        head_dim=16,
        time_embed_dim=32,
        caption_channels=32,
        rotary=True,
        sincos_pos_embed=False,
        sample_frames=9,
        sample_height=8,
        sample_width=16,
    ),
}

# Keys that fix parameter shapes: a flavor and diffusers weights must agree on them.
_SIZE_FIELDS = ("depth", "num_heads", "head_dim", "time_embed_dim", "patch_size")
_QK_NORM_EPS = 1e-6  # fixed in CogVideoX (diffusers builds the q/k LayerNorms with eps=1e-6)


@dataclass
class CogVideoXConfig:
    name: str = "cogvideox"
    flavor: str = "debug"  # a key of COGVIDEOX_FLAVORS: "2B", "5B" or "debug"
    # Input geometry; None takes it from the data (latents through the VAE) or from diffusers weights.
    input_size: list[int] | None = None  # [frames, height, width] of the latents
    in_channels: int | None = None
    out_channels: int | None = None  # None: in_channels (5B-I2V has 32 in, 16 out)
    caption_channels: int | None = None  # text embedding width; None: the flavor's (4096, T5-XXL)
    max_text_length: int = 226  # text tokens the model was trained with (padded)
    # Architecture overrides; None keeps the flavor's value (or takes the one of diffusers weights).
    depth: int | None = None
    num_heads: int | None = None
    head_dim: int | None = None
    time_embed_dim: int | None = None
    patch_size: int | None = None
    mlp_ratio: float = 4.0
    qkv_bias: bool | None = None
    norm_eps: float | None = None
    time_freq_shift: int | None = None
    rotary: bool | None = None  # 3D rotary positions on the video tokens (5B)
    sincos_pos_embed: bool | None = None  # fixed 3D sin/cos positions added to the video tokens (2B)
    learned_pos_embed: bool | None = None  # a fixed-size position table over text + video (5B-I2V)
    # The published sample size: rotary positions are fitted into it, the learned table is sized by it.
    sample_frames: int | None = None  # in pixel frames, as diffusers counts them
    sample_height: int | None = None  # in latents
    sample_width: int | None = None  # in latents
    temporal_compression_ratio: int | None = None
    spatial_interpolation_scale: float | None = None
    temporal_interpolation_scale: float | None = None
    # Local weights to start from: a diffusers CogVideoXTransformer3DModel folder (the `transformer`
    # folder of a CogVideoX pipeline), a .safetensors / .pt state dict with VideoSys names, or a
    # VideoSys checkpoint.
    weights: str | None = None

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def latent_sample_frames(self) -> int:
        return (self.sample_frames - 1) // self.temporal_compression_ratio + 1

    def resolved(self) -> CogVideoXConfig:
        """Fill the architecture from diffusers weights (if given) and the flavor, and check it."""
        if self.flavor not in COGVIDEOX_FLAVORS:
            raise ConfigError(
                f"model.flavor={self.flavor!r} is not a CogVideoX flavor; choose one of {sorted(COGVIDEOX_FLAVORS)}"
            )
        cfg = dataclasses.replace(self)
        if cfg.input_size is not None:
            cfg.input_size = [int(v) for v in cfg.input_size]
        if cfg.weights and is_diffusers_cogvideox_folder(Path(cfg.weights)):
            cfg = _apply_diffusers_config(cfg, Path(cfg.weights))
        for key, value in COGVIDEOX_FLAVORS[cfg.flavor].items():
            if getattr(cfg, key) is None:
                setattr(cfg, key, value)
        for key in ("input_size", "in_channels"):
            if getattr(cfg, key) is None:
                raise MissingGeometryError(
                    f"model.{key} is not set and could not be taken from the data or the weights; set it"
                    + (" (latent [frames, height, width], e.g. [13, 60, 90])" if key == "input_size" else "")
                )
        if cfg.out_channels is None:
            cfg.out_channels = cfg.in_channels
        _validate(cfg)
        return cfg


def _validate(cfg: CogVideoXConfig) -> None:
    size = cfg.input_size
    if len(size) != 3 or min(size) < 1:
        raise ConfigError(f"model.input_size={size} must be the latent [frames, height, width], e.g. [13, 60, 90]")
    if size[1] % cfg.patch_size or size[2] % cfg.patch_size:
        raise ConfigError(
            f"model.input_size={size}: latent height and width must be divisible by patch_size={cfg.patch_size}; "
            "change the video size"
        )
    for key in ("depth", "num_heads", "head_dim", "time_embed_dim", "patch_size", "caption_channels"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"model.{key}={getattr(cfg, key)} must be positive")
    if (cfg.sincos_pos_embed or cfg.learned_pos_embed) and cfg.hidden_size % 16:
        raise ConfigError(
            f"3D sin/cos positions need a hidden size (num_heads * head_dim = {cfg.hidden_size}) divisible by 16; "
            "change model.num_heads or model.head_dim"
        )
    if cfg.rotary and cfg.head_dim % 16:
        raise ConfigError(
            f"3D rotary positions split each head into 1/4 frame and 3/8 + 3/8 row/column channel pairs, so "
            f"model.head_dim={cfg.head_dim} must be divisible by 16"
        )
    if cfg.learned_pos_embed:
        if not cfg.rotary or cfg.sincos_pos_embed:
            raise ConfigError(
                "model.learned_pos_embed=true exists only with rotary positions and without sin/cos positions "
                "(CogVideoX-5b-I2V); set model.rotary=true and model.sincos_pos_embed=false"
            )
        if [size[1], size[2]] != [cfg.sample_height, cfg.sample_width]:
            raise ConfigError(
                f"model.input_size={size}: a learned position table only fits the sample size "
                f"{cfg.sample_height}x{cfg.sample_width} latents; change the video size"
            )


# --- Positions ----------------------------------------------------------------------------------


def sincos_3d(
    dim: int, frames: int, height: int, width: int, spatial_scale: float, temporal_scale: float
) -> torch.Tensor:
    """CogVideoX's fixed 3D position table for a (frames, height, width) token grid: (F*H*W, dim),
    float64. The first quarter of the channels encodes the frame, the rest the 2D position (column
    half first, as in `sincos_2d`); positions are divided by the interpolation scales."""
    spatial = sincos_2d(dim * 3 // 4, height, width, row_scale=1 / spatial_scale, col_scale=1 / spatial_scale)
    temporal = sincos_1d(dim // 4, torch.arange(frames, dtype=torch.float64) / temporal_scale)
    tokens = height * width
    table = torch.cat([temporal[:, None].expand(-1, tokens, -1), spatial[None].expand(frames, -1, -1)], dim=-1)
    return table.reshape(frames * tokens, dim)


def crop_region(grid: tuple[int, int], base_height: int, base_width: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Where a (height, width) token grid lands when resized to cover the base grid's aspect ratio and
    centred in it: ((top, left), (bottom, right)), rounded like the CogVideoX pipeline."""
    height, width = grid
    if height / width > base_height / base_width:
        resized_h, resized_w = base_height, int(round(base_height / height * width))
    else:
        resized_h, resized_w = int(round(base_width / width * height)), base_width
    top = int(round((base_height - resized_h) / 2.0))
    left = int(round((base_width - resized_w) / 2.0))
    return (top, left), (top + resized_h, left + resized_w)


def rotary_3d(
    head_dim: int, frames: int, height: int, width: int, base_height: int, base_width: int, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos / sin tables (frames * height * width, head_dim) of CogVideoX's 3D rotary embedding.

    Frame positions are 0, 1, ...; row and column positions span the crop region of the grid in the
    base (sample) grid, evenly spaced with the end point left out, as `get_3d_rotary_pos_embed`
    (grid_type="linspace") places them, including its end point of `stop * (n - 1) / n`.
    """
    (top, left), (bottom, right) = crop_region((height, width), base_height, base_width)
    kw = dict(dtype=torch.float32, device=device)
    rows = torch.linspace(top, bottom * (height - 1) / height, height, **kw)
    cols = torch.linspace(left, right * (width - 1) / width, width, **kw)
    steps = torch.arange(frames, **kw)
    dim_t, dim_s = head_dim // 4, head_dim // 8 * 3
    tables = [rotary_tables(dim_t, steps), rotary_tables(dim_s, rows), rotary_tables(dim_s, cols)]
    shape = (frames, height, width)

    def combine(parts):
        t, h, w = parts
        t = t[:, None, None].expand(*shape, -1)
        h = h[None, :, None].expand(*shape, -1)
        w = w[None, None, :].expand(*shape, -1)
        return torch.cat([t, h, w], dim=-1).reshape(frames * height * width, head_dim)

    return combine([table[0] for table in tables]), combine([table[1] for table in tables])


# --- Model --------------------------------------------------------------------------------------


class JointLayerNormZero(nn.Module):
    """One LayerNorm shared by the video and text tokens, with its own shift / scale / gate for each
    stream from the timestep embedding (diffusers' CogVideoXLayerNormZero)."""

    def __init__(self, cond_dim: int, dim: int, eps: float):
        super().__init__()
        self.linear = nn.Linear(cond_dim, 6 * dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.ops = TORCH_OPS

    def forward(self, x: torch.Tensor, context: torch.Tensor, cond: torch.Tensor):
        shift, scale, gate, c_shift, c_scale, c_gate = self.linear(F.silu(cond)).chunk(6, dim=1)
        x = self.ops.norm_modulate(self.norm, x, shift, scale)
        return x, self.ops.norm_modulate(self.norm, context, c_shift, c_scale), gate, c_gate


class CogVideoXBlock(nn.Module):
    """Joint self-attention and MLP over [text; video], each stream with its own modulation and gate."""

    def __init__(self, dim: int, num_heads: int, cond_dim: int, mlp_ratio: float, norm_eps: float, qkv_bias: bool):
        super().__init__()
        self.norm1 = JointLayerNormZero(cond_dim, dim, norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, qk_norm="layernorm", qk_norm_eps=_QK_NORM_EPS)
        self.norm2 = JointLayerNormZero(cond_dim, dim, norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ops = TORCH_OPS
        self.cache = None  # step-reuse policy handle while sampling (videosys.cache)
        self.cache_kinds = ("full", "mlp")  # what `cached` wraps

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, cond: torch.Tensor, rope: Rotary | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, N, C) video tokens, context: (B, L, C) text tokens, cond: (B, C_t) timestep embedding."""
        text_len = context.shape[1]
        x_in, c_in, gate, c_gate = self.norm1(x, context, cond)
        ops, cache = self.ops, self.cache
        # Cached branches are stored before their gates, so a reused output gets this step's gates.
        h = cached(cache, "full", lambda: self.attn(torch.cat([c_in, x_in], dim=1), rope))
        x = ops.gate_residual(x, gate, h[:, text_len:])
        context = ops.gate_residual(context, c_gate, h[:, :text_len])
        x_in, c_in, gate, c_gate = self.norm2(x, context, cond)
        h = cached(cache, "mlp", lambda: self.mlp(torch.cat([c_in, x_in], dim=1)))
        x = ops.gate_residual(x, gate, h[:, text_len:])
        context = ops.gate_residual(context, c_gate, h[:, :text_len])
        return x, context


class CogVideoXFinalLayer(nn.Module):
    """LayerNorm (affine) with shift and scale from the timestep embedding, then the projection to
    patch values, ordered (row, column, channel) for `unpatchify_video` (diffusers' AdaLayerNorm with
    chunk_dim=1, then proj_out)."""

    def __init__(self, dim: int, cond_dim: int, out_features: int, eps: float):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * dim))
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.linear = nn.Linear(dim, out_features)
        self.ops = TORCH_OPS

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(cond).chunk(2, dim=1)
        return self.linear(self.ops.norm_modulate(self.norm, x, shift, scale))


class CogVideoX(nn.Module):
    block_lists = ("blocks",)  # the transformer block lists that parallel plans and checkpointing wrap
    sequence_parallel_modes = ("ulysses",)
    token_layout = "joint"  # what `videosys.parallelize` splits: video and text tokens, each along its sequence
    learn_sigma = False
    prediction_type = "v_prediction"

    @property
    def diffusion_defaults(self) -> dict:
        """The published objective: v-prediction on scaled-linear betas with zero terminal SNR; the
        2B model also divides the SNR by 3 (snr_shift_scale), the 5B model does not."""
        shift = 1.0 if self.config.flavor == "5B" else 3.0
        return dict(
            objective="v",
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            zero_terminal_snr=True,
            snr_shift_scale=shift,
        )

    @property
    def default_sampler(self) -> str:
        """The published pipelines sample 2B with CogVideoX's DDIM and 5B with its DPM solver."""
        return "cogvideox_dpm" if self.config.flavor == "5B" else "cogvideox_ddim"

    def __init__(self, cfg: CogVideoXConfig):
        super().__init__()
        cfg = cfg.resolved()
        self.config = cfg
        self.in_channels = cfg.in_channels
        self.out_channels = cfg.out_channels
        self.patch_size = cfg.patch_size
        self.input_size = tuple(cfg.input_size)
        dim, p = cfg.hidden_size, cfg.patch_size
        self.grid = (cfg.input_size[0], cfg.input_size[1] // p, cfg.input_size[2] // p)  # token grid of input_size
        self.sequence = LocalSequence()  # sequence-parallel hooks, set by videosys.parallelize

        self.x_embedder = PatchEmbed3D((1, p, p), cfg.in_channels, dim)
        self.text_embedder = nn.Linear(cfg.caption_channels, dim)
        # Sinusoidal features of width `dim`, then Linear(dim, time_embed_dim), SiLU, Linear.
        self.t_embedder = TimestepEmbedder(cfg.time_embed_dim, freq_dim=dim, freq_shift=cfg.time_freq_shift)
        self.blocks = nn.ModuleList(
            CogVideoXBlock(dim, cfg.num_heads, cfg.time_embed_dim, cfg.mlp_ratio, cfg.norm_eps, cfg.qkv_bias)
            for _ in range(cfg.depth)
        )
        self.norm_final = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.final_layer = CogVideoXFinalLayer(dim, cfg.time_embed_dim, p * p * cfg.out_channels, cfg.norm_eps)
        if cfg.sincos_pos_embed:
            # The table for the configured size (recomputed in forward for other sizes); not saved.
            tokens = self.grid[0] * self.grid[1] * self.grid[2]
            self.register_buffer("pos_embed", torch.zeros(1, tokens, dim), persistent=False)
        if cfg.learned_pos_embed:
            tokens = cfg.latent_sample_frames * (cfg.sample_height // p) * (cfg.sample_width // p)
            self.register_buffer("pos_embed_learned", torch.zeros(1, cfg.max_text_length + tokens, dim))
        if self.x_embedder.proj.weight.device.type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Xavier linears, N(0, 0.02) timestep MLP, zeroed modulations and output ("adaLN-Zero": every
        block starts as the identity), fixed position tables. Called after `to_empty` for meta builds."""
        xavier_init(self, self.x_embedder.proj)
        for module in self.modules():
            if isinstance(module, nn.LayerNorm):
                module.reset_parameters()
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            for norm in (block.norm1, block.norm2):
                nn.init.zeros_(norm.linear.weight)
                nn.init.zeros_(norm.linear.bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        cfg, p = self.config, self.patch_size
        if cfg.sincos_pos_embed:
            self.pos_embed.copy_(self._sincos(*self.grid)[None])
        if cfg.learned_pos_embed:
            # diffusers starts the table from the sin/cos positions of the sample size, text rows zero.
            grid = (cfg.latent_sample_frames, cfg.sample_height // p, cfg.sample_width // p)
            self.pos_embed_learned.zero_()
            self.pos_embed_learned[0, cfg.max_text_length :].copy_(self._sincos(*grid))

    def _sincos(self, frames: int, height: int, width: int) -> torch.Tensor:
        cfg = self.config
        scales = cfg.spatial_interpolation_scale, cfg.temporal_interpolation_scale
        return sincos_3d(cfg.hidden_size, frames, height, width, *scales).float()

    def rotary(self, frames: int, height: int, width: int, text_len: int, device=None) -> Rotary:
        """The rotary embedding of a (frames, height, width) token grid behind `text_len` text tokens."""
        base_h, base_w = self.config.sample_height // self.patch_size, self.config.sample_width // self.patch_size
        cos, sin = rotary_3d(self.config.head_dim, frames, height, width, base_h, base_w, device=device)
        return Rotary(cos, sin, interleaved=True, start=text_len)

    def _add_positions(self, x: torch.Tensor, context: torch.Tensor, grid: tuple[int, int, int]):
        cfg, p = self.config, self.patch_size
        if cfg.learned_pos_embed and grid[1:] != (cfg.sample_height // p, cfg.sample_width // p):
            raise ValueError(
                f"this CogVideoX has a learned position table for {cfg.sample_height}x{cfg.sample_width} latents "
                f"only, got {grid[1] * p}x{grid[2] * p}"
            )
        if cfg.learned_pos_embed and grid[0] == cfg.latent_sample_frames:
            table = self.pos_embed_learned.to(x.dtype)
            if context.shape[1] != cfg.max_text_length:
                raise ValueError(
                    f"the learned position table covers exactly {cfg.max_text_length} text tokens, got "
                    f"{context.shape[1]}; pad or truncate the text to model.max_text_length"
                )
            return x + table[:, cfg.max_text_length :], context + table[:, : cfg.max_text_length]
        if cfg.learned_pos_embed or cfg.sincos_pos_embed:
            # Like diffusers, a learned table only applies at the sample frame count; sin/cos otherwise.
            if cfg.sincos_pos_embed and grid == self.grid:
                table = self.pos_embed
            else:
                table = cached_table(
                    self, ("positions", *grid, x.device), lambda: self._sincos(*grid).to(x.device)[None]
                )
            x = x + table.to(x.dtype)
        return x, context

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (B, C, T, H, W) noisy latents, timestep: (B,), text: (B, L, caption_channels) -> v (B, C', T, H, W).

        `text_mask` is accepted for the common interface and ignored: the published CogVideoX attends
        to all (padded) text tokens.
        """
        del text_mask
        batch, channels, frames, height, width = x.shape
        p = self.patch_size
        if channels != self.in_channels or height % p or width % p:
            raise ValueError(
                f"CogVideoX expects (B, {self.in_channels}, T, H, W) latents with H and W divisible by {p}, "
                f"got {tuple(x.shape)}"
            )
        if text.shape[-1] != self.config.caption_channels:
            raise ValueError(f"text width {text.shape[-1]} != model.caption_channels={self.config.caption_channels}")
        grid = (frames, height // p, width // p)
        cond = self.t_embedder(timestep)
        h = self.x_embedder(x).flatten(1, 2)  # (B, T * H/p * W/p, C), row-major over (frame, row, column)
        context = self.text_embedder(text)
        h, context = self._add_positions(h, context, grid)
        # Sequence parallel: each rank keeps a chunk of the video tokens and one of the text tokens.
        h, context = self.sequence.scatter(h, 1), self.sequence.scatter(context, 1, "text")
        rope = None
        if self.config.rotary:
            rope = self.rotary(*grid, text_len=context.shape[1], device=x.device)
            rope = self.sequence.local_rotary(rope, 1)
        for block in self.blocks:
            h, context = block(h, context, cond, rope)
        h = self.sequence.gather(self.final_layer(self.norm_final(h), cond), 1)
        return unpatchify_video(h.view(batch, frames, -1, h.shape[-1]), grid, (1, p, p), self.out_channels)


# --- Loading published weights -------------------------------------------------------------------

DIFFUSERS_CLASS = "CogVideoXTransformer3DModel"

# diffusers options VideoSys implements only at their published value: key -> (value, what else means).
_FIXED_DIFFUSERS_OPTIONS = {
    "patch_size_t": (None, "a CogVideoX 1.5 checkpoint (temporal patches)"),
    "ofs_embed_dim": (None, "a CogVideoX 1.5 image-to-video checkpoint (ofs embedding)"),
    "patch_bias": (True, "a CogVideoX 1.5 checkpoint (no patch bias)"),
    "flip_sin_to_cos": (True, "a sin-first timestep embedding"),
    "activation_fn": ("gelu-approximate", "another MLP activation"),
    "timestep_activation_fn": ("silu", "another timestep MLP activation"),
    "norm_elementwise_affine": (True, "LayerNorms without affine parameters"),
    "dropout": (0.0, "dropout"),
}


def is_diffusers_cogvideox_folder(path: Path) -> bool:
    return diffusers_config(path, DIFFUSERS_CLASS) is not None


def _diffusers_values(folder: Path) -> dict:
    """VideoSys config values of a diffusers CogVideoX folder (diffusers' defaults for absent keys)."""
    d = json.loads((folder / "config.json").read_text())
    for key, (expected, meaning) in _FIXED_DIFFUSERS_OPTIONS.items():
        if d.get(key, expected) != expected:
            raise ConfigError(
                f"model.weights={folder} has {key}={d[key]!r}, {meaning}, which VideoSys's CogVideoX does not "
                f"implement (it supports {key}={expected!r}: CogVideoX 1.0 2B / 5B / 5B-I2V)"
            )
    rotary = bool(d.get("use_rotary_positional_embeddings", False))
    in_channels = d.get("in_channels", 16)
    return dict(
        depth=d.get("num_layers", 30),
        num_heads=d.get("num_attention_heads", 30),
        head_dim=d.get("attention_head_dim", 64),
        time_embed_dim=d.get("time_embed_dim", 512),
        patch_size=d.get("patch_size", 2),
        in_channels=in_channels,
        out_channels=d.get("out_channels") or in_channels,
        caption_channels=d.get("text_embed_dim", 4096),
        max_text_length=d.get("max_text_seq_length", 226),
        qkv_bias=bool(d.get("attention_bias", True)),
        norm_eps=d.get("norm_eps", 1e-5),
        time_freq_shift=d.get("freq_shift", 0),
        rotary=rotary,
        sincos_pos_embed=not rotary,  # diffusers: use_positional_embeddings = not use_rotary_positional_embeddings
        learned_pos_embed=bool(d.get("use_learned_positional_embeddings", False)),
        sample_frames=d.get("sample_frames", 49),
        sample_height=d.get("sample_height", 60),
        sample_width=d.get("sample_width", 90),
        temporal_compression_ratio=d.get("temporal_compression_ratio", 4),
        spatial_interpolation_scale=d.get("spatial_interpolation_scale", 1.875),
        temporal_interpolation_scale=d.get("temporal_interpolation_scale", 1.0),
    )


def _matching_flavors(values: dict) -> list[str]:
    return [name for name, f in COGVIDEOX_FLAVORS.items() if all(f[k] == values[k] for k in _SIZE_FIELDS)]


def _apply_diffusers_config(cfg: CogVideoXConfig, folder: Path) -> CogVideoXConfig:
    """Take the architecture from a diffusers config. Values set in the run must agree with it, and so
    must the flavor's parameter shapes; the flavor's other defaults give way to the weights'."""
    values = _diffusers_values(folder)
    flavor = COGVIDEOX_FLAVORS[cfg.flavor]
    for key, value in values.items():
        current = getattr(cfg, key)
        if current is not None and current != value:
            raise ConfigError(
                f"model.weights={folder} holds a CogVideoX with {key}={value}, but this run sets "
                f"model.{key}={current} (model.flavor={cfg.flavor}); set model.{key}={value} or drop the override"
            )
        if key in _SIZE_FIELDS and flavor[key] != value:
            matches = _matching_flavors(values)
            hint = (
                f"use model.flavor={matches[0]}" if matches else "pick the flavor closest to it and override the sizes"
            )
            raise ConfigError(
                f"model.weights={folder} holds a CogVideoX with {key}={value}, but model.flavor={cfg.flavor} has "
                f"{key}={flavor[key]}; {hint}"
            )
    if cfg.input_size is None:  # no data to size it: the published sample size
        values["input_size"] = [
            (values["sample_frames"] - 1) // values["temporal_compression_ratio"] + 1,
            values["sample_height"],
            values["sample_width"],
        ]
    return dataclasses.replace(cfg, **values)


def convert_diffusers_state_dict(sd: dict[str, torch.Tensor], cfg: CogVideoXConfig) -> dict[str, torch.Tensor]:
    """Rename a diffusers CogVideoXTransformer3DModel state dict to VideoSys names (see module docstring).

    Every diffusers tensor must be used: one left over means a variant this model does not implement.
    """
    cfg = cfg.resolved()
    sd = dict(sd)
    p, c = cfg.patch_size, cfg.out_channels

    def take(name: str) -> torch.Tensor:
        if name not in sd:
            raise ConfigError(f"diffusers CogVideoX weights lack {name} (model.flavor={cfg.flavor})")
        return sd.pop(name)

    out = {
        "x_embedder.proj.weight": take("patch_embed.proj.weight").unsqueeze(2),  # Conv2d -> 1 x p x p Conv3d
        "x_embedder.proj.bias": take("patch_embed.proj.bias"),
        "text_embedder.weight": take("patch_embed.text_proj.weight"),
        "text_embedder.bias": take("patch_embed.text_proj.bias"),
        "t_embedder.mlp.0.weight": take("time_embedding.linear_1.weight"),
        "t_embedder.mlp.0.bias": take("time_embedding.linear_1.bias"),
        "t_embedder.mlp.2.weight": take("time_embedding.linear_2.weight"),
        "t_embedder.mlp.2.bias": take("time_embedding.linear_2.bias"),
        "norm_final.weight": take("norm_final.weight"),
        "norm_final.bias": take("norm_final.bias"),
        "final_layer.adaLN_modulation.1.weight": take("norm_out.linear.weight"),
        "final_layer.adaLN_modulation.1.bias": take("norm_out.linear.bias"),
        "final_layer.norm.weight": take("norm_out.norm.weight"),
        "final_layer.norm.bias": take("norm_out.norm.bias"),
    }
    # Output rows: diffusers orders them (channel, row, column); unpatchify_video wants (row, column, channel).
    weight, bias = take("proj_out.weight"), take("proj_out.bias")
    out["final_layer.linear.weight"] = weight.view(c, p, p, -1).permute(1, 2, 0, 3).reshape(p * p * c, -1)
    out["final_layer.linear.bias"] = bias.view(c, p, p).permute(1, 2, 0).reshape(-1)
    if "patch_embed.pos_embedding" in sd:  # persistent only for learned positions (5B-I2V)
        out["pos_embed_learned"] = take("patch_embed.pos_embedding")
    parts = ("weight", "bias") if cfg.qkv_bias else ("weight",)
    for i in range(cfg.depth):
        src, dst = f"transformer_blocks.{i}.", f"blocks.{i}."
        for part in parts:
            out[f"{dst}attn.qkv.{part}"] = torch.cat([take(f"{src}attn1.to_{n}.{part}") for n in "qkv"], dim=0)
        for part in ("weight", "bias"):
            out[f"{dst}attn.q_norm.{part}"] = take(f"{src}attn1.norm_q.{part}")
            out[f"{dst}attn.k_norm.{part}"] = take(f"{src}attn1.norm_k.{part}")
            out[f"{dst}attn.proj.{part}"] = take(f"{src}attn1.to_out.0.{part}")
            out[f"{dst}mlp.fc1.{part}"] = take(f"{src}ff.net.0.proj.{part}")
            out[f"{dst}mlp.fc2.{part}"] = take(f"{src}ff.net.2.{part}")
            for norm in ("norm1", "norm2"):
                out[f"{dst}{norm}.linear.{part}"] = take(f"{src}{norm}.linear.{part}")
                out[f"{dst}{norm}.norm.{part}"] = take(f"{src}{norm}.norm.{part}")
    if sd:
        raise ConfigError(
            f"diffusers CogVideoX weights hold tensors this model (model.flavor={cfg.flavor}, depth={cfg.depth}) "
            f"has no place for: {sorted(sd)[:8]}{' ...' if len(sd) > 8 else ''}"
        )
    return out


def load_weights(model: CogVideoX, path: str) -> None:
    """Load local weights in any supported format into `model` (strictly: every tensor must match)."""
    source = require_exists(
        path, "a local diffusers CogVideoXTransformer3DModel folder, a .safetensors / .pt state dict or a checkpoint"
    )
    cfg = model.config
    if is_diffusers_cogvideox_folder(source):
        for key, value in _diffusers_values(source).items():
            if getattr(cfg, key) != value:
                raise ConfigError(
                    f"model.weights={path} holds a CogVideoX with {key}={value}, but the model was built with "
                    f"{key}={getattr(cfg, key)} (model.flavor={cfg.flavor}); set model.weights when building it "
                    "so that the architecture is taken from the weights"
                )
        sd = convert_diffusers_state_dict(read_diffusers_state_dict(source), cfg)
    else:
        sd = read_state_dict_file(source)
    load_strict(model, sd, path)
