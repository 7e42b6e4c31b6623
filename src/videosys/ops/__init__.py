"""Hot operations behind stable functions: attention backends and fused block kernels."""

from videosys.ops.attention import (
    ATTENTION_BACKENDS,
    AttentionSelector,
    build_attention,
    get_attention_backend,
)
from videosys.ops.kernels import BlockOps, KernelsConfig, build_block_ops

__all__ = [
    "ATTENTION_BACKENDS",
    "AttentionSelector",
    "BlockOps",
    "KernelsConfig",
    "build_attention",
    "build_block_ops",
    "get_attention_backend",
]
