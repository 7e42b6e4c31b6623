"""The `kernels` config and the block operations it switches between plain torch and Triton.

`BlockOps` holds the elementwise hot spots of every DiT-family block: adaLN modulation, LayerNorm
followed by modulation, RMSNorm (per-head q/k norm) and the gated residual add. Its torch path is
the reference and the default; each fused Triton kernel (`videosys.ops.fused`) is switched on on
its own, and is checked against that reference in the tests.

Modulation vectors (shift, scale, gate) are (B, C), one per sample, or (B, G, C), one per group
of consecutive tokens (G = frames gives one per frame).

Inside torch.compile'd code the torch path is traced instead: inductor fuses these ops with their
neighbours (bias adds, casts, the residual) into its own kernels, which measured faster than calling
ours from the graph (H200, bf16: DiT-XL/2 training 551 vs 524 samples/s, Open-Sora 480p step 293 vs
321 ms). The Triton kernels are the eager path's speed-up.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from videosys.errors import ConfigError


@dataclass
class KernelsConfig:
    name: str = "none"
    # auto (fastest that fits each call, measured) | sdpa | cudnn | flash | efficient | flash_attn | math
    attention: str = "sdpa"
    # Zero-pad odd head dims (72) for the attention kernels: auto (measured, GPU only) | off | a head dim.
    pad_head_dim: str = "off"
    fused_modulate: bool = False  # x * (1 + scale) + shift
    fused_norm: bool = False  # LayerNorm + modulate in one pass, and RMSNorm
    fused_gate_residual: bool = False  # x + gate * h
    compile: bool = False  # torch.compile, over compile_scope
    # blocks: each transformer block (regional compilation: any parallel mode, fast to compile) | model: the
    # whole forward as one graph (no sequence parallelism, and training in one process only; fuses across
    # blocks, and with compile_mode=reduce-overhead replays one CUDA graph per forward and per backward)
    compile_scope: str = "blocks"
    compile_mode: str = "default"  # torch.compile mode: default | reduce-overhead | max-autotune-no-cudagraphs | ...
    # Inductor options on top of the mode's, e.g. {coordinate_descent_tuning: true} (torch._inductor.config names).
    compile_options: dict[str, Any] = field(default_factory=dict)
    # Sampling (task=sample) replays each distinct denoising step's model call from a CUDA graph.
    cuda_graphs: bool = False

    @property
    def fused_switches(self) -> list[str]:
        """The names of the fused-kernel switches that are on."""
        return [k for k in ("fused_modulate", "fused_norm", "fused_gate_residual") if getattr(self, k)]


def modulation_groups(x: torch.Tensor, m: torch.Tensor, name: str) -> torch.Tensor:
    """The modulation tensor `m` (named `name`) for tokens x (B, *tokens, C) as (B, G, C): a (B, C) tensor
    is one group per sample; a (B, G, C) one needs G to divide the tokens per sample. Anything else is a
    ValueError that names both shapes."""
    if x.dim() < 3:
        raise ValueError(f"x must be (B, *tokens, C) with at least one token axis, got shape {tuple(x.shape)}")
    batch, channels, tokens = x.shape[0], x.shape[-1], math.prod(x.shape[1:-1])
    if m.dim() == 2 and tuple(m.shape) == (batch, channels):
        return m[:, None]
    if m.dim() == 3 and m.shape[0] == batch and m.shape[2] == channels and m.shape[1] > 0 and tokens % m.shape[1] == 0:
        return m
    raise ValueError(
        f"{name} must be (B, C) or (B, G, C) with G dividing the {tokens} tokens per sample of x; "
        f"got {name} of shape {tuple(m.shape)} for x of shape {tuple(x.shape)}"
    )


def _grouped(x: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """x (B, *tokens, C) viewed as (B, G, tokens per group, C) for (B, G, C) `groups`."""
    return x.reshape(x.shape[0], groups.shape[1], -1, x.shape[-1])


def modulate_torch(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation x * (1 + scale) + shift, broadcast per sample (or per group of tokens)."""
    scale, shift = modulation_groups(x, scale, "scale"), modulation_groups(x, shift, "shift")
    return (_grouped(x, scale) * (1 + scale[:, :, None]) + shift[:, :, None]).view(x.shape)


def gate_residual_torch(x: torch.Tensor, gate: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The gated residual add x + gate * h."""
    gate = modulation_groups(h, gate, "gate")
    return x + (gate[:, :, None] * _grouped(h, gate)).view(h.shape)


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The compute dtype a norm's output is cast to next (the following Linear's) under autocast."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return None


@dataclass(frozen=True)
class BlockOps:
    """Block operations, each in plain torch or as a fused Triton kernel (see KernelsConfig)."""

    fused_modulate: bool = False
    fused_norm: bool = False
    fused_gate_residual: bool = False

    @staticmethod
    def _fused_now(switch: bool) -> bool:
        # Inside compiled code the torch path is traced, for inductor to fuse (see the module docstring).
        return switch and not torch.compiler.is_compiling()

    def modulate(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        if self._fused_now(self.fused_modulate):
            return _fused().fused_modulate(x, shift, scale)
        return modulate_torch(x, shift, scale)

    def norm_modulate(self, norm: torch.nn.LayerNorm, x, shift, scale) -> torch.Tensor:
        """`modulate(norm(x), shift, scale)`; one pass over x with the fused norm kernel."""
        if self._fused_now(self.fused_norm):
            return _fused().fused_layernorm_modulate(
                x, shift, scale, norm.eps, norm.weight, norm.bias, out_dtype=_autocast_dtype(x)
            )
        return self.modulate(norm(x), shift, scale)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if self._fused_now(self.fused_norm):
            return _fused().fused_rms_norm(x, weight, eps, out_dtype=_autocast_dtype(x))
        return rms_norm_torch(x, weight, eps)

    def gate_residual(self, x: torch.Tensor, gate: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        if self._fused_now(self.fused_gate_residual):
            return _fused().fused_gate_residual(x, gate, h)
        return gate_residual_torch(x, gate, h)


TORCH_OPS = BlockOps()  # frozen: the shared default of every block until `parallelize` sets its own


def _fused():
    from videosys.ops import fused  # imported on first use: it needs triton

    return fused


def build_block_ops(kernels: KernelsConfig, device: torch.device) -> BlockOps:
    """The block ops `kernels` asks for; Triton kernels need a GPU (or the Triton interpreter)."""
    switches = kernels.fused_switches
    if switches:
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ConfigError(
                f"kernels.{switches[0]}=true runs a Triton kernel, which needs a CUDA GPU (this run is on "
                f"{device.type}); set {', '.join(f'kernels.{s}=false' for s in switches)} (or kernels=none), "
                "or TRITON_INTERPRET=1 to run them slowly through the Triton interpreter"
            )
        try:
            _fused()
        except ImportError as err:
            raise ConfigError(f"kernels.{switches[0]}=true: {err}") from err
    return BlockOps(kernels.fused_modulate, kernels.fused_norm, kernels.fused_gate_residual)


def check_cuda_graphs(kernels: KernelsConfig, device: torch.device, sp_mode: str) -> None:
    """Whether a sampling run can replay its steps from CUDA graphs (`sp_mode`: "none" without sequence
    parallelism); a ConfigError with the fix otherwise."""
    if not kernels.cuda_graphs:
        return
    if sp_mode not in ("none", "dsp"):
        # Verified bit-exact in graphs: one process, CFG parallel and DSP. Ulysses with padded lengths moves
        # a host-made index per call, and Ring exchanges point to point; neither is captured yet.
        raise ConfigError(
            f"kernels.cuda_graphs=true replays sampling steps with sequence parallelism dsp only, not "
            f"parallel.sp_mode={sp_mode}; use a dsp preset, or kernels.cuda_graphs=false"
        )
    if device.type != "cuda":
        raise ConfigError(
            f"kernels.cuda_graphs=true replays sampling steps from CUDA graphs, which needs a CUDA GPU (this run "
            f"is on {device.type}); set kernels.cuda_graphs=false"
        )
    if "reduce-overhead" in kernels.compile_mode and kernels.compile:
        raise ConfigError(
            f"kernels.compile_mode={kernels.compile_mode} captures CUDA graphs of its own, which cannot nest in "
            "kernels.cuda_graphs=true; use kernels.compile_mode=default or kernels.cuda_graphs=false"
        )
