"""Open-Sora-Plan v1.2: text-to-video DiT with full 3D attention and 3D rotary positions
(PKU-YuanGroup/Open-Sora-Plan, `OpenSoraT2V` built as `OpenSoraT2V-ROPE-L/122` with `use_rope`).

Latents (B, C, T, H, W) of the v1.2 CausalVAE (4x temporal, 8x8 spatial, 4 channels) are cut into
(pt, ph, pw) patches with no absolute position embedding. Every block attends over all T'*H'*W'
tokens at once ("full" layout), with a 3D rotary embedding on its queries and keys, then
cross-attends to the projected mT5-XXL caption (4096-d, up to 512 tokens, padding masked out) and
runs a GELU-tanh MLP; a single timestep embedding modulates every block PixArt-alpha style
(adaLN-single: TimestepEmbedder -> SiLU -> Linear to 6 x hidden, plus a learned table per block).

3D rotary (RoPE3D of the reference): the head dimension is split into three equal parts, in the
order (t, h, w); each part is a standard 1D rotary (theta 10000, frequencies over its own width)
of that axis's patch index divided by the axis's interpolation scale. Split rule: head_dim must be
a multiple of 6, so that each part (head_dim / 3) is even; v1.2 has 96 = 3 x 32. Positions are
in patch units, so a score between tokens depends only on their (dt, dh, dw) offset. The v1.2
checkpoints use scales (t, h, w) = (1, 1, 1) at 480p and (1, 1.5, 2) at 720p: dividing by the scale
makes a 720p grid of 45 x 80 patches span the 30 x 40 positions seen at 480p.

Differences from the reference, none of which changes what the network can represent:

- RoPE channel layout: each 1D part here rotates interleaved pairs (2i, 2i + 1) (the one `Rotary`
  applies to the whole head, with all three parts concatenated into one table), where the
  reference rotates halves within each part (i, i + d/2). The two differ by a fixed permutation of
  the query/key channels inside each third of each head, which a converter folds into the rows of
  `attn.qkv`; the attention scores are identical. The tables are computed in float64 and stored in
  float32 (the reference computes them in the activation dtype).
- Module names follow VideoSys's shared blocks; `pos_embed` and `caption_projection` keep the
  reference's names. A converter from the published (diffusers-style) checkpoint would map
  `adaln_single.emb.timestep_embedder.linear_{1,2}` -> `t_embedder.mlp.{0,2}`, `adaln_single.linear`
  -> `t_block.1`, `caption_projection.linear_{1,2}` -> `caption_projection.fc{1,2}`,
  `transformer_blocks.i` -> `blocks.i` with `attn1.to_{q,k,v}` -> `attn.qkv` (concatenated, rope
  channels permuted as above), `attn1.to_out.0` -> `attn.proj`, `attn2.to_q` -> `cross_attn.q_linear`,
  `attn2.to_{k,v}` -> `cross_attn.kv_linear` (concatenated), `attn2.to_out.0` -> `cross_attn.proj`,
  `ff.net.0.proj` / `ff.net.2` -> `mlp.fc1` / `mlp.fc2`; the top-level `scale_shift_table` and
  `proj_out` -> `final_layer.scale_shift_table` / `final_layer.linear`; `pos_embed.proj.weight`
  (Conv2d, per frame) gains a temporal kernel axis of size patch_size_t (Conv3d). Such a converter
  is not provided: published-weight compatibility is not a goal of this file.
- Not carried over: joint image + video batches (`use_image_num`), the latent padding mask for
  batches of clips with different sizes, the convolutional "downsampler" variants, and the
  first-frame replication that lets odd frame counts use patch_size_t > 1 (here the latent frame
  count must be divisible by patch_size_t). Sequence parallelism belongs to `videosys.parallelize`.
- A caption whose mask is all False attends to all of its tokens, which is what the reference's
  additive -10000 bias amounts to (instead of the NaN a boolean mask would give).

Training objective: the v1.2 release trains with epsilon prediction on the default DDPM schedule
(linear betas, 1000 steps; `DDPMScheduler()` in `train_t2v_diffusers.py`) with min-SNR weighting
(gamma 5); v-prediction with zero-terminal-SNR betas arrived with v1.3. `prediction_type` is
therefore a config value, "epsilon" by default. The variance is not learned (out = in channels).
Classifier-free guidance uses the encoded empty caption (no learned null embedding).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from videosys.errors import ConfigError, MissingGeometryError
from videosys.models.blocks import (
    AdaLNSingleBlock,
    AdaLNSingleFinalLayer,
    LocalSequence,
    Mlp,
    PatchEmbed3D,
    Rotary,
    TimestepEmbedder,
    rotary_tables,
    unpatchify_video,
    xavier_init,
)
from videosys.models.weights import diffusers_config, load_strict, read_state_dict_file, require_exists

_V1_2 = dict(depth=32, hidden_size=2304, num_heads=24, patch_size=2, patch_size_t=1, caption_channels=4096)
# Published size (OpenSoraT2V-ROPE-L/122: 32 layers, 24 heads x 96, patches 1x2x2, mT5-XXL captions)
# under its release name and its registry name, and a CPU-sized debug flavor (4 heads x 24).
OPENSORA_PLAN_FLAVORS: dict[str, dict] = {
    "v1.2": _V1_2,
    "OpenSoraT2V-ROPE-L/122": _V1_2,
    "debug": dict(depth=2, hidden_size=96, num_heads=4, patch_size=2, patch_size_t=1, caption_channels=32),
}
PREDICTION_TYPES = ("epsilon", "v_prediction")
_PATCH_KEYS = ("patch_size_t", "patch_size", "patch_size")  # the config key of each latent axis's patch
ROPE_THETA = 10000.0


@dataclass
class OpenSoraPlanConfig:
    name: str = "opensora_plan"
    flavor: str = "debug"  # a key of OPENSORA_PLAN_FLAVORS
    # Geometry of the model input (VAE latents); None takes it from the data and the VAE.
    input_size: list[int] | None = None  # [frames, height, width] of the latents
    in_channels: int | None = None
    caption_channels: int | None = None  # text embedding width; None: the flavor's (4096, mT5-XXL)
    max_text_length: int = 512  # caption tokens (mT5, v1.2)
    # Architecture overrides; None keeps the flavor's value.
    depth: int | None = None
    hidden_size: int | None = None
    num_heads: int | None = None
    patch_size: int | None = None  # spatial patch (height and width)
    patch_size_t: int | None = None  # temporal patch
    mlp_ratio: float = 4.0
    # RoPE positions are divided by these: (1, 1, 1) for the 480p checkpoints, (1, 1.5, 2) for 720p.
    interpolation_scale_t: float = 1.0
    interpolation_scale_h: float = 1.0
    interpolation_scale_w: float = 1.0
    prediction_type: str = "epsilon"  # what the network predicts: epsilon (v1.2) or v_prediction
    weights: str | None = None  # local VideoSys-named weights (.safetensors / .pt) or a VideoSys checkpoint

    def resolved(self) -> OpenSoraPlanConfig:
        """Fill the architecture from the flavor and check that every size fits together."""
        if self.flavor not in OPENSORA_PLAN_FLAVORS:
            raise ConfigError(
                f"model.flavor={self.flavor!r} is not an Open-Sora-Plan flavor; "
                f"choose one of {sorted(OPENSORA_PLAN_FLAVORS)}"
            )
        cfg = dataclasses.replace(self)
        for key, value in OPENSORA_PLAN_FLAVORS[cfg.flavor].items():
            if getattr(cfg, key) is None:
                setattr(cfg, key, value)
        for key in ("input_size", "in_channels", "caption_channels"):
            if getattr(cfg, key) is None:
                raise MissingGeometryError(
                    f"model.{key} is not set and could not be taken from the data, the VAE or the text encoder; set it"
                )
        if isinstance(cfg.input_size, int | float | str):
            raise ConfigError(
                f"model.input_size={cfg.input_size!r} must be the latent [frames, height, width] of a video "
                "(Open-Sora-Plan is a video model; use video data or set model.input_size=[T, H, W])"
            )
        cfg.input_size = [int(s) for s in cfg.input_size]
        if len(cfg.input_size) != 3 or min(cfg.input_size) < 1:
            raise ConfigError(
                f"model.input_size={cfg.input_size} must be three positive latent sizes [frames, height, width]"
            )
        positive = ("depth", "hidden_size", "num_heads", "patch_size", "patch_size_t", "in_channels")
        for key in (*positive, "caption_channels", "max_text_length"):
            if getattr(cfg, key) < 1:
                raise ConfigError(f"model.{key}={getattr(cfg, key)} must be a positive integer")
        patch = (cfg.patch_size_t, cfg.patch_size, cfg.patch_size)
        for axis, size, p, key in zip(("frames", "height", "width"), cfg.input_size, patch, _PATCH_KEYS, strict=True):
            if size % p:
                raise ConfigError(
                    f"model.input_size={cfg.input_size}: latent {axis} {size} is not divisible by model.{key}={p}; "
                    f"change the clip size (a multiple of {p} latents) or the patch size"
                )
        if cfg.hidden_size % cfg.num_heads:
            raise ConfigError(
                f"model.hidden_size={cfg.hidden_size} is not divisible by model.num_heads={cfg.num_heads}; "
                "pick a head count that divides it"
            )
        head_dim = cfg.hidden_size // cfg.num_heads
        if head_dim % 6:
            raise ConfigError(
                f"model.hidden_size={cfg.hidden_size} / model.num_heads={cfg.num_heads} gives head size {head_dim}, "
                "which the 3D rotary cannot split into three even parts (t, h, w); choose sizes whose head size is "
                "a multiple of 6 (v1.2: 2304 / 24 = 96)"
            )
        for axis in "thw":
            key = f"interpolation_scale_{axis}"
            if not getattr(cfg, key) > 0:
                raise ConfigError(f"model.{key}={getattr(cfg, key)} must be positive (1.0 keeps positions unscaled)")
        if cfg.mlp_ratio <= 0:
            raise ConfigError(f"model.mlp_ratio={cfg.mlp_ratio} must be positive (4.0 in v1.2)")
        if cfg.prediction_type not in PREDICTION_TYPES:
            raise ConfigError(
                f"model.prediction_type={cfg.prediction_type!r} is not known; use one of {PREDICTION_TYPES}"
            )
        return cfg


def rope_3d(
    grid: tuple[int, int, int],
    head_dim: int,
    scales: tuple[float, float, float] = (1.0, 1.0, 1.0),
    device: torch.device | str | None = None,
) -> Rotary:
    """The 3D rotary for a (t, h, w) patch grid flattened t-major (the PatchEmbed3D token order).

    Channels [0, d), [d, 2d), [2d, 3d) of each head (d = head_dim / 3) carry a 1D rotary of the
    token's frame, row and column index, each divided by its interpolation scale; pairs (2i, 2i + 1)
    rotate together, so no pair straddles two parts.
    """
    if head_dim % 6:
        raise ValueError(f"head size {head_dim} cannot be split into three even rotary parts (t, h, w)")
    part = head_dim // 3
    axes = [torch.arange(n, device=device, dtype=torch.float64) for n in grid]
    positions = torch.meshgrid(*axes, indexing="ij")
    tables = [
        rotary_tables(part, pos.reshape(-1) / scale, theta=ROPE_THETA, interleaved=True)
        for pos, scale in zip(positions, scales, strict=True)
    ]
    cos = torch.cat([cos for cos, _ in tables], dim=-1)
    sin = torch.cat([sin for _, sin in tables], dim=-1)
    return Rotary(cos, sin, interleaved=True)


class OpenSoraPlan(nn.Module):
    """Open-Sora-Plan v1.2. forward(x (B, C, T, H, W), timestep (B,) in [0, 1000), text (B, L, C_text),
    text_mask (B, L) bool, True = a real token) -> (B, C, T, H, W).

    Any latent size divisible by the patch works (positions come from RoPE, not a learned table);
    `config.input_size` is the size the run was configured for.
    """

    block_lists = ("blocks",)  # the transformer block lists that parallel plans and checkpointing wrap
    sequence_parallel_modes = ("ulysses", "ring", "usp")
    token_layout = "video"  # what `videosys.parallelize` splits
    learn_sigma = False
    prediction_type = "epsilon"  # overridden per instance by config.prediction_type

    def __init__(self, cfg: OpenSoraPlanConfig):
        super().__init__()
        self.sequence = LocalSequence()  # sequence-parallel hooks, set by videosys.parallelize
        cfg = cfg.resolved()
        self.config = cfg
        self.in_channels = cfg.in_channels
        self.out_channels = cfg.in_channels
        self.prediction_type = cfg.prediction_type
        # The objective this model was published with, for fields of `diffusion` left unset: v1.2's
        # DDPM defaults for epsilon; v1.3's zero-terminal-SNR schedule for v-prediction.
        if cfg.prediction_type == "epsilon":
            self.diffusion_defaults = dict(objective="eps", beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
        else:
            self.diffusion_defaults = dict(objective="v", beta_schedule="linear", zero_terminal_snr=True)
        self.patch_size = (cfg.patch_size_t, cfg.patch_size, cfg.patch_size)
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.rope_scales = (cfg.interpolation_scale_t, cfg.interpolation_scale_h, cfg.interpolation_scale_w)
        dim = cfg.hidden_size

        self.pos_embed = PatchEmbed3D(self.patch_size, cfg.in_channels, dim)  # no position table: RoPE
        self.t_embedder = TimestepEmbedder(dim)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.caption_projection = Mlp(cfg.caption_channels, dim, dim)
        self.blocks = nn.ModuleList(
            AdaLNSingleBlock(dim, cfg.num_heads, "full", cross_attention=True, mlp_ratio=cfg.mlp_ratio)
            for _ in range(cfg.depth)
        )
        self.final_layer = AdaLNSingleFinalLayer(dim, math.prod(self.patch_size) * self.out_channels)
        if self.t_block[1].weight.device.type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """PixArt-alpha's initialisation, the lineage of v1.2's blocks: Xavier linears and patch
        projection, N(0, 0.02) timestep and caption MLPs, random adaLN tables, and zeroed
        cross-attention outputs and output projection (a fresh model predicts zero).

        Sets every tensor, so it also materialises a model built on the meta device after `to_empty`.
        """
        xavier_init(self, self.pos_embed.proj)
        for linear in (self.t_embedder.mlp[0], self.t_embedder.mlp[2], self.t_block[1]):
            nn.init.normal_(linear.weight, std=0.02)
        nn.init.normal_(self.caption_projection.fc1.weight, std=0.02)
        nn.init.normal_(self.caption_projection.fc2.weight, std=0.02)
        dim = self.config.hidden_size
        for block in self.blocks:
            block.scale_shift_table.copy_(torch.randn_like(block.scale_shift_table) / dim**0.5)
            nn.init.zeros_(block.cross_attn.proj.weight)
            nn.init.zeros_(block.cross_attn.proj.bias)
        table = self.final_layer.scale_shift_table
        table.copy_(torch.randn_like(table) / dim**0.5)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def rotary(self, grid: tuple[int, int, int], device: torch.device) -> Rotary:
        """The 3D rotary for a patch grid (a few KB of tables; rebuilt per call, no cache to invalidate)."""
        return rope_3d(grid, self.head_dim, self.rope_scales, device)

    def _check_inputs(self, x: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None) -> None:
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"Open-Sora-Plan expects latents (B, {self.in_channels}, T, H, W), got {tuple(x.shape)}")
        axes = ("frames", "height", "width")
        for axis, size, p, key in zip(axes, x.shape[2:], self.patch_size, _PATCH_KEYS, strict=True):
            if size % p:
                raise ValueError(f"latent {axis} {size} (input {tuple(x.shape)}) is not divisible by model.{key}={p}")
        cfg = self.config
        if text.dim() != 3 or text.shape[0] != x.shape[0] or text.shape[2] != cfg.caption_channels:
            raise ValueError(
                f"text must be (B={x.shape[0]}, L, model.caption_channels={cfg.caption_channels}), "
                f"got {tuple(text.shape)}"
            )
        if text.shape[1] > cfg.max_text_length:
            raise ValueError(f"text has {text.shape[1]} tokens, more than model.max_text_length={cfg.max_text_length}")
        if text_mask is not None and tuple(text_mask.shape) != tuple(text.shape[:2]):
            raise ValueError(f"text_mask must be (B, L) = {tuple(text.shape[:2])}, got {tuple(text_mask.shape)}")

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self._check_inputs(x, text, text_mask)
        batch, _, frames, height, width = x.shape
        pt, ph, pw = self.patch_size
        grid = (frames // pt, height // ph, width // pw)

        timestep = timestep.reshape(-1).expand(batch) if timestep.numel() == 1 else timestep
        t = self.t_embedder(timestep)  # (B, C): also modulates the final layer
        t6 = self.t_block(t).view(batch, 6, -1)
        context = self.caption_projection(text)
        if text_mask is not None:
            text_mask = text_mask.to(torch.bool)
            # A caption with no real token attends to all of them (the reference's additive bias), not NaN.
            text_mask = text_mask | ~text_mask.any(dim=1, keepdim=True)

        h = self.pos_embed(x)  # (B, T', H'W', C), tokens t-major then row-major
        h = self.sequence.scatter(h, 2)  # sequence parallel: each rank keeps a chunk of every frame's tokens
        rope = self.rotary(grid, x.device)
        for block in self.blocks:
            h = block(h, t6, context, text_mask, rope)
        h = self.sequence.gather(self.final_layer(h, t), 2)
        return unpatchify_video(h, grid, self.patch_size, self.out_channels)


def load_weights(model: OpenSoraPlan, path: str) -> None:
    """Load a .safetensors / .pt state dict with VideoSys names, or a VideoSys checkpoint (its EMA
    weights), strictly: every tensor must be present and fit."""
    formats = "a .safetensors or .pt state dict with VideoSys Open-Sora-Plan names, or a VideoSys checkpoint"
    source = require_exists(path, formats)
    flavor = model.config.flavor
    if source.is_dir():
        published = diffusers_config(source, "OpenSoraT2V") is not None
        hint = (
            "it holds a published Open-Sora-Plan (diffusers OpenSoraT2V) checkpoint, whose names and layout are not "
            "converted (see videosys.models.opensora_plan); "
            if published
            else ""
        )
        raise ConfigError(f"model.weights={path} is a folder; {hint}give {formats} (model.flavor={flavor})")
    try:
        sd = read_state_dict_file(source)
    except Exception as err:  # a corrupt or foreign file: name it rather than fail deep in a reader
        raise ConfigError(
            f"model.weights={path} could not be read as {formats} (model.flavor={flavor}): {err}"
        ) from err
    if not isinstance(sd, dict):
        raise ConfigError(f"model.weights={path} holds a {type(sd).__name__}, not a state dict (model.flavor={flavor})")
    load_strict(model, sd, path)
