"""DiT: class-conditional Diffusion Transformer (Peebles & Xie, "Scalable Diffusion Models with
Transformers", 2023).

Patch embedding plus fixed 2D sin/cos positions, one shared timestep + label embedding `c`, a
stack of adaLN-Zero blocks conditioned on `c`, an adaLN final layer, and an output with twice the
input channels when the variance is learned (epsilon and the variance interpolation).

Parameter names follow the DiT reference checkpoints, so those load without renaming; diffusers'
`DiTTransformer2DModel` weights load through `convert_diffusers_state_dict`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from videosys.errors import ConfigError, MissingGeometryError
from videosys.models.blocks import (
    AdaLNFinalLayer,
    Attention,
    LabelEmbedder,
    LocalSequence,
    Mlp,
    PatchEmbed,
    TimestepEmbedder,
    sincos_2d,
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

# Published sizes (DiT paper, table 1) for patch sizes 2, 4 and 8, plus a CPU-sized `debug` flavor.
_SIZES = {
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}
DIT_FLAVORS: dict[str, dict[str, int]] = {
    f"{size}/{patch}": dict(dims, patch_size=patch) for size, dims in _SIZES.items() for patch in (2, 4, 8)
}
DIT_FLAVORS["debug"] = dict(depth=4, hidden_size=128, num_heads=4, patch_size=2)

_ARCH_FIELDS = ("depth", "hidden_size", "num_heads", "patch_size")


@dataclass
class DiTConfig:
    name: str = "dit"
    flavor: str = "debug"  # a key of DIT_FLAVORS, e.g. "XL/2"
    # Input geometry; None takes it from the data (and the VAE when training on latents).
    input_size: int | None = None
    in_channels: int | None = None
    num_classes: int | None = None
    learn_sigma: bool = True
    class_dropout_prob: float = 0.1
    # Architecture overrides for custom sizes; None keeps the flavor's value.
    depth: int | None = None
    hidden_size: int | None = None
    num_heads: int | None = None
    patch_size: int | None = None
    mlp_ratio: float = 4.0
    # 0 is the DiT paper's timestep embedding, 1 is diffusers' (set automatically for diffusers weights).
    timestep_freq_shift: int = 0
    # LayerNorm eps before the MLP: 1e-6 in the DiT reference, diffusers' norm_eps for its weights.
    mlp_norm_eps: float = 1e-6
    # Local weights to start from: a diffusers DiTTransformer2DModel folder, a DiT reference
    # checkpoint (.pt) or a VideoSys checkpoint.
    weights: str | None = None

    def resolved(self) -> DiTConfig:
        """Fill the architecture from the flavor (and from diffusers weights) and check it."""
        if self.flavor not in DIT_FLAVORS:
            raise ConfigError(f"model.flavor={self.flavor!r} is not a DiT flavor; choose one of {sorted(DIT_FLAVORS)}")
        cfg = dataclasses.replace(self)
        for key, value in DIT_FLAVORS[cfg.flavor].items():
            if getattr(cfg, key) is None:
                setattr(cfg, key, value)
        if cfg.weights and is_diffusers_dit_folder(Path(cfg.weights)):
            cfg = _apply_diffusers_config(cfg, Path(cfg.weights))
        missing = [k for k in ("input_size", "in_channels", "num_classes") if getattr(cfg, k) is None]
        if missing:
            raise MissingGeometryError(
                f"model.{missing[0]} is not set and could not be taken from the data or the weights; set it"
            )
        if cfg.input_size % cfg.patch_size:
            raise ConfigError(
                f"model input size {cfg.input_size} is not divisible by patch size {cfg.patch_size}; "
                "pick a flavor with a smaller patch or change the image size"
            )
        if cfg.hidden_size % cfg.num_heads:
            raise ConfigError(f"model.hidden_size={cfg.hidden_size} is not divisible by num_heads={cfg.num_heads}")
        return cfg


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning: c -> (shift, scale, gate) for attention and MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, mlp_norm_eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=mlp_norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.ops = TORCH_OPS

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        ops = self.ops
        x = ops.gate_residual(x, gate_msa, self.attn(ops.norm_modulate(self.norm1, x, shift_msa, scale_msa)))
        return ops.gate_residual(x, gate_mlp, self.mlp(ops.norm_modulate(self.norm2, x, shift_mlp, scale_mlp)))


class DiT(nn.Module):
    block_lists = ("blocks",)  # the transformer block lists that parallel plans and checkpointing wrap
    sequence_parallel_modes = ("ulysses", "ring", "usp")
    token_layout = "image"  # (B, N, C) tokens, split along N

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.sequence = LocalSequence()  # sequence-parallel hooks, set by videosys.parallelize
        cfg = cfg.resolved()
        self.config = cfg
        self.in_channels = cfg.in_channels
        self.out_channels = cfg.in_channels * 2 if cfg.learn_sigma else cfg.in_channels
        self.learn_sigma = cfg.learn_sigma
        self.patch_size = cfg.patch_size
        self.input_size = cfg.input_size
        self.grid = cfg.input_size // cfg.patch_size

        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, cfg.hidden_size)
        self.t_embedder = TimestepEmbedder(cfg.hidden_size, freq_shift=cfg.timestep_freq_shift)
        self.y_embedder = LabelEmbedder(cfg.num_classes, cfg.hidden_size, cfg.class_dropout_prob)
        self.register_buffer("pos_embed", torch.zeros(1, self.grid * self.grid, cfg.hidden_size))
        self.blocks = nn.ModuleList(
            DiTBlock(cfg.hidden_size, cfg.num_heads, cfg.mlp_ratio, cfg.mlp_norm_eps) for _ in range(cfg.depth)
        )
        self.final_layer = AdaLNFinalLayer(cfg.hidden_size, cfg.patch_size * cfg.patch_size * self.out_channels)
        if self.pos_embed.device.type != "meta":
            self.init_weights()

    @property
    def null_label(self) -> int:
        return self.y_embedder.null_label

    @torch.no_grad()
    def init_weights(self) -> None:
        """DiT initialisation: Xavier linears, N(0, 0.02) embedders, zeroed adaLN and output layers.

        Called after `to_empty` when the model was built on the meta device.
        """
        xavier_init(self, self.x_embedder.proj)
        self.pos_embed.copy_(sincos_2d(self.pos_embed.shape[-1], self.grid, self.grid).float().unsqueeze(0))
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, p*p*C) -> (B, C, H, W)."""
        p, g, c = self.patch_size, self.grid, self.out_channels
        x = x.reshape(x.shape[0], g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, g * p, g * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) noisy input, t: (B,) timesteps, y: (B,) labels (null_label = unconditional)."""
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            raise ValueError(f"DiT was built for {self.input_size}x{self.input_size} inputs, got {tuple(x.shape[-2:])}")
        h = self.sequence.scatter(self.x_embedder(x) + self.pos_embed, 1)
        c = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            h = block(h, c)
        return self.unpatchify(self.sequence.gather(self.final_layer(h, c), 1))


# --- Loading published weights -------------------------------------------------------------------

DIFFUSERS_CLASS = "DiTTransformer2DModel"


def is_diffusers_dit_folder(path: Path) -> bool:
    return diffusers_config(path, DIFFUSERS_CLASS) is not None


def _apply_diffusers_config(cfg: DiTConfig, folder: Path) -> DiTConfig:
    """Take the architecture from a diffusers DiT config; any value already set must agree."""
    d = json.loads((folder / "config.json").read_text())
    in_channels = d.get("in_channels", 4)
    from_diffusers = dict(
        depth=d.get("num_layers", 28),
        hidden_size=d.get("num_attention_heads", 16) * d.get("attention_head_dim", 72),
        num_heads=d.get("num_attention_heads", 16),
        patch_size=d.get("patch_size", 2),
        input_size=d.get("sample_size", 32),
        in_channels=in_channels,
        num_classes=d.get("num_embeds_ada_norm", 1000),
    )
    for key, value in from_diffusers.items():
        current = getattr(cfg, key)
        if current is not None and current != value:
            hint = "pick the matching model.flavor" if key in _ARCH_FIELDS else f"set model.{key}={value}"
            raise ConfigError(
                f"model.weights={folder} holds a DiT with {key}={value}, but this run has {key}={current} "
                f"(model.flavor={cfg.flavor}); {hint}"
            )
    out_channels = d.get("out_channels") or in_channels
    return dataclasses.replace(
        cfg,
        **from_diffusers,
        learn_sigma=out_channels == 2 * in_channels,
        timestep_freq_shift=1,
        mlp_norm_eps=d.get("norm_eps", 1e-5),
    )


def convert_diffusers_state_dict(sd: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """Rename a diffusers DiTTransformer2DModel state dict to VideoSys / DiT-reference names.

    diffusers keeps a copy of the timestep/label embedder in every block (its conversion from the
    reference checkpoints copies one shared embedder into each); DiT shares a single one, so the
    copies must agree.
    """
    emb = "transformer_blocks.{}.norm1.emb."
    reference = {k[len(emb.format(0)) :]: v for k, v in sd.items() if k.startswith(emb.format(0))}
    for i in range(1, depth):
        for name, value in reference.items():
            other = sd[emb.format(i) + name]
            if not torch.equal(other, value):
                raise ConfigError(
                    f"diffusers DiT block {i} has its own timestep/label embedder ({emb.format(i)}{name} "
                    "differs from block 0); VideoSys's DiT shares one embedder across blocks as in the DiT "
                    "paper, so these weights cannot be represented exactly"
                )
    out = {
        "x_embedder.proj.weight": sd["pos_embed.proj.weight"],
        "x_embedder.proj.bias": sd["pos_embed.proj.bias"],
        "t_embedder.mlp.0.weight": reference["timestep_embedder.linear_1.weight"],
        "t_embedder.mlp.0.bias": reference["timestep_embedder.linear_1.bias"],
        "t_embedder.mlp.2.weight": reference["timestep_embedder.linear_2.weight"],
        "t_embedder.mlp.2.bias": reference["timestep_embedder.linear_2.bias"],
        "y_embedder.embedding_table.weight": reference["class_embedder.embedding_table.weight"],
        "final_layer.adaLN_modulation.1.weight": sd["proj_out_1.weight"],
        "final_layer.adaLN_modulation.1.bias": sd["proj_out_1.bias"],
        "final_layer.linear.weight": sd["proj_out_2.weight"],
        "final_layer.linear.bias": sd["proj_out_2.bias"],
    }
    for i in range(depth):
        src, dst = f"transformer_blocks.{i}.", f"blocks.{i}."
        for part in ("weight", "bias"):
            out[f"{dst}attn.qkv.{part}"] = torch.cat([sd[f"{src}attn1.to_{n}.{part}"] for n in "qkv"], dim=0)
            out[f"{dst}attn.proj.{part}"] = sd[f"{src}attn1.to_out.0.{part}"]
            out[f"{dst}mlp.fc1.{part}"] = sd[f"{src}ff.net.0.proj.{part}"]
            out[f"{dst}mlp.fc2.{part}"] = sd[f"{src}ff.net.2.{part}"]
            out[f"{dst}adaLN_modulation.1.{part}"] = sd[f"{src}norm1.linear.{part}"]
    return out


def load_weights(model: DiT, path: str) -> None:
    """Load local weights in any supported format into `model` (strictly: every tensor must match)."""
    source = require_exists(path, "a local diffusers DiT folder, a DiT .pt checkpoint or a VideoSys checkpoint")
    if is_diffusers_dit_folder(source):
        sd = convert_diffusers_state_dict(read_diffusers_state_dict(source), model.config.depth)
    else:
        sd = read_state_dict_file(source)
    # The position table is fixed; recompute it if the file does not carry one.
    sd.setdefault("pos_embed", model.pos_embed.detach().clone())
    load_strict(model, sd, path)
