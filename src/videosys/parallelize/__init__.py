"""The one place where execution strategies touch a model, applied in a fixed order:

1. attention backend (every attention module's `attention_fn`),
2. activation checkpointing (per transformer block).

Sequence parallelism, FSDP2 sharding, CFG parallelism and torch.compile join this list; model
code never applies any of them itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from videosys.distributed import DistContext, ParallelConfig
from videosys.models.blocks import AttentionModule
from videosys.ops.attention import KernelsConfig, get_attention_backend
from videosys.precision import PrecisionConfig


@dataclass
class ParallelizePlan:
    """What `parallelize` did, for the run log."""

    attention_backend: str
    checkpointed_blocks: int


def transformer_block_lists(model: nn.Module) -> list[nn.ModuleList]:
    """The model's lists of transformer blocks, named by its `block_lists` attribute."""
    lists = [getattr(model, name, None) for name in getattr(model, "block_lists", ())]
    if not lists or not all(isinstance(blocks, nn.ModuleList) for blocks in lists):
        raise ValueError(f"{type(model).__name__} does not name its transformer block lists in `block_lists`")
    return lists


def parallelize(
    model: nn.Module,
    dist: DistContext,
    parallel: ParallelConfig,
    kernels: KernelsConfig,
    precision: PrecisionConfig,
    activation_checkpointing: bool = False,
) -> ParallelizePlan:
    """Apply the configured strategies to `model` in place (it may still be on the meta device)."""
    del parallel  # single-process layout: nothing to shard yet (validated in init_distributed)
    backend = get_attention_backend(kernels.attention, dist.device, precision.torch_dtype)
    for module in model.modules():
        if isinstance(module, AttentionModule):
            module.attention_fn = backend.fn
    checkpointed = 0
    if activation_checkpointing:
        for blocks in transformer_block_lists(model):
            for i, block in enumerate(blocks):
                # The wrapper's state-dict hooks keep state-dict keys unchanged.
                blocks[i] = checkpoint_wrapper(block)
                checkpointed += 1
    return ParallelizePlan(attention_backend=backend.name, checkpointed_blocks=checkpointed)
