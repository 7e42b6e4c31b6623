"""The one attention call every model goes through, with a registry of backends.

Tensors are laid out (batch, heads, tokens, head_dim). A backend declares what it supports so that
a request that cannot run fails up front with the reason instead of deep inside a kernel.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from videosys.errors import ConfigError


@dataclass
class KernelsConfig:
    name: str = "none"
    attention: str = "sdpa"  # a name in ATTENTION_BACKENDS


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Reference attention: softmax(q k^T / sqrt(d)) v computed in fp32, cast back to the input dtype.

    `mask` is boolean, broadcastable to (batch, heads, queries, keys); False keys are ignored.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q.float(), k.float().transpose(-2, -1)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(dim=-1), v.float()).to(q.dtype)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """PyTorch's scaled_dot_product_attention; its dispatcher picks flash / efficient / math."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@dataclass(frozen=True)
class AttentionBackend:
    name: str
    fn: Callable[..., torch.Tensor]  # (q, k, v, mask=None) -> out
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    supports_backward: bool
    description: str

    def unsupported_reason(self, device: torch.device, dtype: torch.dtype) -> str | None:
        if device.type not in self.devices:
            return f"attention backend {self.name!r} does not run on {device.type} (runs on {self.devices})"
        if dtype not in self.dtypes:
            return f"attention backend {self.name!r} does not support {dtype}"
        return None


_ALL_FLOAT = (torch.float32, torch.bfloat16, torch.float16)

ATTENTION_BACKENDS: dict[str, AttentionBackend] = {
    "sdpa": AttentionBackend(
        "sdpa", sdpa_attention, ("cpu", "cuda"), _ALL_FLOAT, True, "torch scaled_dot_product_attention"
    ),
    "math": AttentionBackend("math", math_attention, ("cpu", "cuda"), _ALL_FLOAT, True, "plain-torch fp32 reference"),
}


def get_attention_backend(name: str, device: torch.device, dtype: torch.dtype) -> AttentionBackend:
    """Look a backend up and check it can run here; the error names the value and the choices."""
    if name not in ATTENTION_BACKENDS:
        raise ConfigError(
            f"kernels.attention={name!r} is not a known attention backend; choose one of {sorted(ATTENTION_BACKENDS)}"
        )
    backend = ATTENTION_BACKENDS[name]
    reason = backend.unsupported_reason(device, dtype)
    if reason is not None:
        raise ConfigError(f"kernels.attention={name!r} cannot run here: {reason}")
    return backend
