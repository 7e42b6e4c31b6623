"""The one place where execution strategies touch a model, applied in a fixed order:

1. kernels: the attention backend (every attention module's `attention_fn`) and the block ops
   (every module's `ops`: torch or fused Triton kernels),
2. sequence parallelism (the model's `sequence` hooks and its self-attention modules; see
   `videosys.parallelize.sequence`),
3. activation checkpointing (per transformer block),
4. torch.compile of each transformer block's forward (regional compilation) or of the whole forward,
5. after the weights exist: ZeRO sharding with FSDP2 over the data-parallel and sequence-parallel
   ranks (`shard_parameters`),
6. for sampling: classifier-free-guidance parallelism around the denoiser (`cfg_parallel`).

Model code never applies any of them itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

from videosys.distributed import DistContext, ParallelConfig, validate_for_model
from videosys.distributed.collectives import all_gather_batch
from videosys.errors import ConfigError
from videosys.models.blocks import Attention, AttentionModule, CrossAttention
from videosys.ops import ATTENTION_BACKENDS, BlockOps, KernelsConfig, build_attention, build_block_ops
from videosys.parallelize.sequence import SequenceParallel, sequence_comm_per_forward
from videosys.precision import PrecisionConfig


@dataclass
class ParallelizePlan:
    """What `parallelize` did, for the run log."""

    attention_backend: str
    checkpointed_blocks: int
    sequence_parallel: str = "none"
    fused_ops: str = "none"
    compiled_blocks: int = 0  # blocks compiled one by one (regional compilation)
    compiled_model: bool = False  # the whole forward compiled as one graph

    @property
    def compiled(self) -> str:
        """What torch.compile covers, for the log."""
        if self.compiled_model:
            return "whole model"
        return f"{self.compiled_blocks} blocks" if self.compiled_blocks else "none"


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
    training: bool = True,
) -> ParallelizePlan:
    """Apply the configured strategies to `model` in place (it may still be on the meta device).
    `training` says whether backward will run (some attention backends have none)."""
    del parallel  # its degrees were resolved into dist.dims by init_distributed
    dims, backend = dist.dims, ATTENTION_BACKENDS.get(kernels.attention)
    if kernels.compile:  # checked before any work; the same settings serve every compiled region
        check_compile_scope(kernels.compile_scope, dist, training)
        settings = compile_settings(kernels.compile_mode, kernels.compile_options)
    if dims.sp > 1 and dims.sp_mode in ("ring", "usp") and backend is not None and not backend.returns_lse:
        raise ConfigError(
            f"kernels.attention={backend.name!r} gives Ring attention no log-sum-exp to merge its blocks with "
            f"(parallel.sp_mode={dims.sp_mode}); use kernels.attention=auto, sdpa, flash or math"
        )
    attention_modules = [m for m in model.modules() if isinstance(m, AttentionModule)]
    attention = build_attention(
        kernels.attention,
        kernels.pad_head_dim,
        dist.device,
        precision.torch_dtype,
        head_dims={m.head_dim for m in attention_modules},
        masked=any(isinstance(m, CrossAttention) for m in attention_modules),
        training=training,
    )
    for module in attention_modules:
        module.attention_fn = attention
    ops = build_block_ops(kernels, dist.device)
    for module in model.modules():
        if isinstance(getattr(module, "ops", None), BlockOps):
            module.ops = ops
    sequence = apply_sequence_parallel(model, dist, attention)
    checkpointed = 0
    if activation_checkpointing:
        for blocks in transformer_block_lists(model):
            for i, block in enumerate(blocks):
                # The wrapper's state-dict hooks keep state-dict keys unchanged.
                blocks[i] = checkpoint_wrapper(block)
                checkpointed += 1
    fused = ",".join(kernels.fused_switches) or "none"
    plan = ParallelizePlan(attention.name, checkpointed, sequence, fused)
    if kernels.compile and kernels.compile_scope == "model":
        compile_model(model, settings)
        plan.compiled_model = True
    elif kernels.compile:
        plan.compiled_blocks = compile_blocks(model, settings, fullgraph=sequence == "none")
    return plan


def compile_settings(mode: str = "default", options: dict | None = None) -> dict:
    """torch.compile's mode / options arguments for kernels.compile_mode and kernels.compile_options (torch
    takes one or the other: given options, the mode's own options are merged under them). Unknown names are a
    ConfigError."""
    if not options:
        return {"mode": None if mode == "default" else mode}
    from torch._inductor import list_mode_options

    known = list_mode_options()
    if mode not in known:
        raise ConfigError(f"kernels.compile_mode={mode!r} is not known; use one of {', '.join(known)}")
    from torch._inductor import config as inductor_config

    unknown = [k for k in options if k not in inductor_config.get_config_copy()]
    if unknown:
        raise ConfigError(
            f"kernels.compile_options has {unknown[0]!r}, which is no torch._inductor.config option; "
            "remove it or check its spelling (e.g. coordinate_descent_tuning)"
        )
    return {"options": {**known[mode], **dict(options)}}


def check_compile_scope(scope: str, dist: DistContext, training: bool) -> None:
    """kernels.compile_scope is known and fits the run; a ConfigError with the fix otherwise."""
    if scope not in ("blocks", "model"):
        raise ConfigError(f"kernels.compile_scope={scope!r} is not known; use blocks or model")
    if scope != "model":
        return
    if dist.dims.sp > 1:
        raise ConfigError(
            f"kernels.compile_scope=model compiles the forward as one graph, but sequence parallelism "
            f"(parallel.sp_mode={dist.dims.sp_mode} over {dist.dims.sp} ranks) communicates between the blocks; "
            "use kernels.compile_scope=blocks"
        )
    if training and dist.mesh is not None:
        # FSDP2 gathers and frees each block's parameters in hooks around the block, which would sit inside
        # the one graph; compiled blocks keep those hooks outside.
        raise ConfigError(
            f"kernels.compile_scope=model trains in one process only; this run has {dist.world_size} ranks, "
            "which train with ZeRO sharding hooks around every block; use kernels.compile_scope=blocks"
        )


def compile_model(model: nn.Module, settings: dict) -> None:
    """torch.compile (with `compile_settings`) the model's whole forward as one graph, in place (no graph
    break allowed): inductor fuses across block boundaries, and with mode reduce-overhead a forward and a
    backward are one CUDA graph replay each. Compile time grows with depth. Static shapes, as `compile_blocks`."""
    model.forward = torch.compile(model.forward, fullgraph=True, dynamic=False, **settings)


def compile_blocks(model: nn.Module, settings: dict, fullgraph: bool) -> int:
    """torch.compile (with `compile_settings`) each transformer block's forward, in place (regional
    compilation: every block of a list shares one compiled graph, and compile time does not grow with depth).

    The forward method is compiled rather than the module, so that the hooks FSDP2 and activation
    checkpointing put around a block stay in eager mode. Shapes are static (`dynamic=False`): a new
    shape compiles again, and attention `auto` measures its choice at trace time. `fullgraph` holds
    the blocks to no graph break; sequence-parallel attention runs between compiled regions.
    """
    count = 0
    for blocks in transformer_block_lists(model):
        for block in blocks:
            inner = getattr(block, "_checkpoint_wrapped_module", block)
            inner.forward = torch.compile(inner.forward, fullgraph=fullgraph, dynamic=False, **settings)
            count += 1
    return count


def apply_sequence_parallel(model: nn.Module, dist: DistContext, local_attention: Callable) -> str:
    """Give the model a sequence-parallel plan over the `sp` ranks; returns the mode ("none" for one rank)."""
    dims = dist.dims
    if dims.sp == 1:
        return "none"
    cfg = model.config
    validate_for_model(dims, cfg.name, getattr(model, "sequence_parallel_modes", ()), cfg.num_heads)
    plan = SequenceParallel(
        dims.sp_mode, dist.comm("sp"), dist.comm("sp_ulysses"), dist.comm("sp_ring"), local_attention
    )
    model.sequence = plan
    for module in model.modules():
        if isinstance(module, Attention):  # self-attention only: cross-attention keys are the whole text
            if model.token_layout == "image":
                module.attention_fn = plan.image_attention_fn(1)
            elif model.token_layout == "joint":
                module.attention_fn = plan.joint_attention_fn()
            else:
                module.sp = plan
    return dims.sp_mode


def token_grid(model: nn.Module, input_size) -> tuple[int, int]:
    """(frames, tokens per frame) of an input of `input_size` latents: [T, H, W] for video models
    (partial patches count, as Open-Sora pads them), an int side for image models (frames = 1)."""
    if model.token_layout == "image":
        return 1, (input_size // model.patch_size) ** 2
    patch = model.patch_size if isinstance(model.patch_size, (tuple, list)) else (1, model.patch_size, model.patch_size)
    frames, height, width = input_size
    grid = -(-frames // patch[0]), -(-height // patch[1]) * -(-width // patch[2])
    if model.token_layout == "joint":  # one sequence of all video tokens, split as a whole
        return 1, grid[0] * grid[1]
    return grid


def text_tokens(model: nn.Module) -> int:
    """The text tokens a joint [text; video] model splits and attends with the video (0 for other models)."""
    return model.config.max_text_length if model.token_layout == "joint" else 0


def attention_layouts(model: nn.Module) -> dict[str, int]:
    """How many self-attentions of each layout ("spatial", "temporal", "full", "image") the model runs."""
    counts: dict[str, int] = {}
    for blocks in transformer_block_lists(model):
        for block in blocks:
            layout = "image" if model.token_layout == "image" else getattr(block, "layout", "full")
            counts[layout] = counts.get(layout, 0) + 1
    return counts


def model_comm_per_forward(
    model: nn.Module, mode: str, ulysses: int, ring: int, batch: int, input_size, element_bytes: int
) -> dict[str, tuple[int, int]]:
    """`sequence_comm_per_forward` for this model at `input_size`: kind -> (calls, bytes per rank)."""
    frames, spatial = token_grid(model, input_size)
    return sequence_comm_per_forward(
        mode,
        ulysses,
        ring,
        attention_layouts(model),
        batch,
        frames,
        spatial,
        model.config.hidden_size,
        model.final_layer.linear.out_features,
        element_bytes,
        text_tokens(model),
    )


def shard_parameters(model: nn.Module, dist: DistContext, parallel: ParallelConfig) -> str:
    """ZeRO with FSDP2: shard parameters, gradients and optimizer state over dp_shard x sp ranks
    (replicated over dp_replicate), per transformer block and then the rest of the model.

    Gradients are averaged over all of these ranks; sequence-parallel ranks hold their own tokens'
    contribution scaled to make that exact (`videosys.distributed.collectives`).
    """
    if dist.mesh is None:
        return "none"
    dims = dist.dims
    mesh = dist.submesh("fsdp")
    if dims.dp_replicate > 1:
        mesh = dist.mesh["dp_replicate", "fsdp"]
    options = dict(
        mesh=mesh,
        reshard_after_forward=parallel.zero_stage == 3,
        offload_policy=CPUOffloadPolicy() if parallel.offload else OffloadPolicy(),
    )
    for blocks in transformer_block_lists(model):
        for block in blocks:
            fully_shard(block, **options)
    fully_shard(model, **options)
    return f"fsdp zero{parallel.zero_stage} over {mesh.size()} ranks" + (" (cpu offload)" if parallel.offload else "")


def cfg_parallel(fn: Callable[..., torch.Tensor], dist: DistContext) -> Callable[..., torch.Tensor]:
    """Run a denoiser on a [conditional; unconditional] batch with each half on one rank of the `cfg`
    pair; every argument whose first dimension is the batch is halved, and the halves' outputs are
    gathered back in order, so the guidance mix that follows is unchanged."""
    comm = dist.comm("cfg")
    if comm.size == 1:
        return fn

    def run(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        batch = x.shape[0]
        if batch % 2:
            raise ValueError(f"CFG parallel needs a [conditional; unconditional] batch, got batch {batch}")

        def half(value):
            if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == batch:
                return value.chunk(2)[comm.rank]
            return value

        out = fn(half(x), *map(half, args), **{k: half(v) for k, v in kwargs.items()})
        return all_gather_batch(out.contiguous(), comm)

    return run
