"""Hot operations behind stable functions: attention backends (and, later, fused kernels)."""

from videosys.ops.attention import ATTENTION_BACKENDS, KernelsConfig, get_attention_backend

__all__ = ["ATTENTION_BACKENDS", "KernelsConfig", "get_attention_backend"]
