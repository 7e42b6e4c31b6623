"""dry_run=true: print the parallel plan of a run without running it.

One CPU process joins a fake process group as rank 0 of `world_size`, builds the real mesh and
groups, builds the model on the meta device (no memory), applies the same validation as a real
run, and prints: the mesh and its rank order, every rank's groups and sequence shard, the
collectives per block and bytes per denoising step, and a per-GPU memory estimate.
"""

from __future__ import annotations

import torch

from videosys.distributed import (
    DistContext,
    ParallelConfig,
    init_distributed,
    shutdown_distributed,
    validate_for_model,
)
from videosys.distributed.collectives import chunk_length
from videosys.distributed.mesh import MESH_DIMS
from videosys.models import build_model, model_entry
from videosys.parallelize import attention_layouts, model_comm_per_forward, text_tokens, token_grid
from videosys.parallelize.sequence import sequence_comm_per_forward
from videosys.precision import PrecisionConfig

_MIB = 2**20
_GIB = 2**30


def dry_run(
    parallel: ParallelConfig,
    world_size: int,
    model_cfg,
    precision: PrecisionConfig,
    task: str,
    batch: int,
    emit=print,
) -> dict:
    """Validate and describe the plan for `world_size` ranks; returns the numbers it printed."""
    ctx = init_distributed(parallel, "cpu", fake_world_size=world_size)
    try:
        return _describe(ctx, parallel, model_cfg, precision, task, batch, emit)
    finally:
        shutdown_distributed()


def _describe(ctx: DistContext, parallel, model_cfg, precision, task, batch, emit) -> dict:
    dims = ctx.dims
    with torch.device("meta"):
        model = build_model(model_cfg)
    cfg = model.config
    validate_for_model(dims, model_cfg.name, getattr(model, "sequence_parallel_modes", ()), cfg.num_heads, task)
    frames, spatial = token_grid(model, cfg.input_size)
    element = torch.finfo(precision.torch_dtype).bits // 8
    params = sum(p.numel() for p in model.parameters())

    emit(
        f"VideoSys dry run: model={model_cfg.name} ({cfg.flavor}), parallel={parallel.name}, task={task}, "
        f"world size {dims.world_size} (fake backend: nothing is computed)"
    )
    emit(
        "mesh: "
        + " x ".join(f"{n}={s}" for n, s in zip(MESH_DIMS, dims.shape, strict=True))
        + f", sp_mode={dims.sp_mode}; ranks are row-major over this order (sequence-parallel ranks adjacent)"
    )
    shape = {
        "image": f"{spatial} tokens",
        "joint": f"{spatial} video tokens and {text_tokens(model)} text tokens, each split",
    }.get(model.token_layout, f"{frames} frames x {spatial} tokens")
    emit(f"tokens per sample: {shape}, hidden {cfg.hidden_size}, {cfg.num_heads} heads, {params / 1e6:.1f}M parameters")

    chunk = chunk_length(spatial, dims.sp)
    emit(f"{'rank':>4}  {'sp group':14} {'dp group':14} {'cfg group':10} {'tokens (split axis)':22}")
    ranks = []
    for rank in range(dims.world_size):
        sp_index = dims.sp_rank(rank)
        start, stop = min(sp_index * chunk, spatial), min((sp_index + 1) * chunk, spatial)
        padding = chunk - (stop - start)
        groups = {
            "sp": dims.group_ranks(rank, ("sp_ring", "sp_ulysses")),
            "dp": dims.group_ranks(rank, ("dp_replicate", "dp_shard")),
            "cfg": dims.group_ranks(rank, ("cfg",)),
        }
        shard = f"{start}:{stop}" + (f" (+{padding} pad)" if padding else "")
        emit(f"{rank:>4}  {_ranks(groups['sp']):14} {_ranks(groups['dp']):14} {_ranks(groups['cfg']):10} {shard:22}")
        ranks.append({"rank": rank, **groups, "tokens": [start, stop], "padding": padding})

    layouts = attention_layouts(model)
    local_batch = -(-batch // dims.cfg)
    per_step: dict[str, tuple[int, int]] = {}
    if dims.sp > 1:
        per_step = model_comm_per_forward(
            model, dims.sp_mode, dims.sp_ulysses, dims.sp_ring, local_batch, cfg.input_size, element
        )
        for layout in layouts:
            one = sequence_comm_per_forward(
                dims.sp_mode,
                dims.sp_ulysses,
                dims.sp_ring,
                {layout: 1},
                local_batch,
                frames,
                spatial,
                cfg.hidden_size,
                0,
                element,
                text_tokens(model),
            )
            text = ", ".join(f"{c} {k} ({b / _MIB:.2f} MiB)" for k, (c, b) in one.items() if c and b) or "none (local)"
            emit(f"per {layout} attention block: {text}")
    if dims.cfg > 1:
        out_elements = local_batch * frames * spatial * model.final_layer.linear.out_features
        per_step["all_gather (cfg)"] = (1, out_elements * element * (dims.cfg - 1))
    total = sum(b for _, b in per_step.values())
    emit(
        f"per denoising step (batch {batch} incl. CFG, {local_batch} per CFG rank), bytes each rank sends: "
        + (", ".join(f"{c} {k} = {b / _MIB:.1f} MiB" for k, (c, b) in per_step.items()) or "none")
        + f"; total {total / _MIB:.1f} MiB"
    )

    memory = _memory_estimate(params, dims, parallel, task, element, local_batch, frames, chunk, cfg.hidden_size)
    emit("memory per GPU (estimate): " + ", ".join(f"{k} {v / _GIB:.2f} GiB" for k, v in memory.items()))
    return {"dims": dims, "ranks": ranks, "per_step": per_step, "memory": memory, "layouts": layouts}


def _ranks(ranks: list[int]) -> str:
    if len(ranks) > 2 and ranks == list(range(ranks[0], ranks[-1] + 1)):
        return f"[{ranks[0]}-{ranks[-1]}]"
    return "[" + ",".join(map(str, ranks)) + "]"


def _memory_estimate(params, dims, parallel, task, element, batch, frames, chunk, hidden) -> dict[str, float]:
    """Weights (sharded over dp_shard x sp when training), fp32 gradients and AdamW state, plus the
    live activations of one block: about 12 hidden-sized tensors per local token (input, residual,
    q, k, v, attention output and the 4x-wide MLP hidden)."""
    activations = 12 * batch * frames * chunk * hidden * element
    if task != "train":
        return {"weights": params * element, "activations": activations, "total": params * element + activations}
    shards = dims.dp_shard * dims.sp
    states = params * (4 + 4 + 8) / shards  # fp32 master weights, gradients, AdamW moments
    gathered = params * 4 / shards if parallel.zero_stage == 3 else params * 4
    return {
        "sharded states": states,
        "gathered weights": gathered,
        "activations": activations,
        "total": states + gathered + activations,
    }


def resolve_for_plan(model_cfg, data_cfg, vae, text_encoder, sampling):
    """The model config a sample run would build: geometry from the weights or config, else from the
    data, else from `sampling` (frames, height, width)."""
    from videosys.tasks.common import TextGeometry
    from videosys.tasks.sample import resolve_for_sampling, sample_data

    is_video = model_entry(model_cfg.name).is_video
    _, spec = sample_data(data_cfg, is_video)
    text = None
    if is_video and text_encoder.name == "none":
        text = TextGeometry(text_encoder.embedding_dim, text_encoder.max_length)
    return resolve_for_sampling(model_cfg, spec, vae, text, sampling)
