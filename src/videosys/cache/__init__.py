"""Step-aware reuse policies for the denoising loop: Pyramid Attention Broadcast (PAB).

Attention outputs change little between neighbouring denoising steps in the middle of the trajectory.
PAB computes an attention at some steps and, at the steps in between, feeds the block the output it
computed last ("broadcasts" it), skipping the attention, its projections, its norm and (under
sequence parallelism) its all-to-alls. Spatial attention changes fastest and is recomputed most
often, temporal attention less, cross-attention least (the "pyramid"); the MLP output of chosen
blocks can be reused too.

One `PyramidAttentionBroadcast` is built per run from the `pab` config group and handed to the
sampling code, which attaches it to the model's blocks for a sampling call (`attached`) and tells it
where the denoising loop is (`begin`, `at_step`, `finish`). There is no process-wide state: two runs
in one process hold two policies.

A rule says, per kind of call, how often to compute (`interval`) inside a window of the trajectory.
The window is a fraction of the steps (`window: [0.1, 0.85]`: from the step 10% of the way in to the
one 85% of the way in), so a preset keeps working when the step count, resolution or frame count
changes. A window in model timesteps (`timesteps: [high, low]`, as earlier PAB implementations give
it) is accepted too; it moves with any timestep shift, so it is checked against the actual schedule
and one that selects no step is an error.

What is stored is the block's raw branch output, before its gate: a reused attention or MLP output is
gated with the current step's gate, exactly as a fresh output would be. Stored tensors are this rank's
batch and token shard, so every sample of a batch (and each half of a CFG-parallel pair, on its own
rank) keeps its own entries.

Replayed CUDA graphs (videosys.diffusion.graphs) use the policy too: a step's work depends only on which
kinds it reuses (`step_key`), so one graph per key serves every step with that key. For that the stored
outputs stay in place (`keep_in_place`: a computed output is copied into its entry's buffer, so the
addresses a graph reads stay valid), and the calls a capture makes are recorded rather than counted
(`recording`), then counted once per replay (`count`).
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from videosys.errors import ConfigError

log = logging.getLogger(__name__)

# The kinds of call a rule can govern: self-attention by layout, cross-attention, and MLPs.
KINDS = ("spatial", "temporal", "full", "cross", "mlp")


@dataclass
class BroadcastRule:
    """When one kind of call is computed. Outside the window every step computes; inside it, the first
    step of the window computes and then every `interval`-th step, the ones in between reuse."""

    interval: int = 1  # 1: never reuse
    window: list[float] = field(default_factory=lambda: [0.0, 1.0])  # [start, end) as fractions of the steps
    # [high, low] model timesteps (both included) instead of `window`; None: use `window`.
    timesteps: list[float] | None = None


@dataclass
class MLPBroadcastRule(BroadcastRule):
    blocks: list[int] = field(default_factory=list)  # depth indices (within each block list) whose MLP is reused


@dataclass
class PABConfig:
    name: str = "off"  # off: no policy, every step computes every call
    spatial: BroadcastRule = field(default_factory=BroadcastRule)
    temporal: BroadcastRule = field(default_factory=BroadcastRule)
    full: BroadcastRule = field(default_factory=BroadcastRule)  # full 3D attention (Open-Sora-Plan, CogVideoX)
    cross: BroadcastRule = field(default_factory=BroadcastRule)
    mlp: MLPBroadcastRule = field(default_factory=MLPBroadcastRule)

    def rules(self) -> dict[str, BroadcastRule]:
        return {kind: getattr(self, kind) for kind in KINDS}


def _check_rule(kind: str, rule: BroadcastRule) -> None:
    where = f"pab.{kind}"
    if rule.interval < 1:
        raise ConfigError(f"{where}.interval={rule.interval} must be at least 1 (1 computes every step)")
    if rule.timesteps is not None:
        if len(rule.timesteps) != 2:
            raise ConfigError(f"{where}.timesteps={list(rule.timesteps)} must be [high, low] model timesteps")
        return
    if len(rule.window) != 2 or not 0.0 <= rule.window[0] < rule.window[1] <= 1.0:
        raise ConfigError(
            f"{where}.window={list(rule.window)} must be [start, end) fractions of the trajectory with "
            "0 <= start < end <= 1, e.g. [0.1, 0.85]"
        )
    if isinstance(rule, MLPBroadcastRule) and any(b < 0 for b in rule.blocks):
        raise ConfigError(f"{where}.blocks={list(rule.blocks)} must be block indices >= 0")


def steps_in_window(rule: BroadcastRule, timesteps: Sequence[float]) -> list[int]:
    """The indices of the denoising steps inside `rule`'s window, for a loop over `timesteps`."""
    n = len(timesteps)
    if rule.timesteps is not None:
        high, low = max(rule.timesteps), min(rule.timesteps)
        return [i for i, t in enumerate(timesteps) if low <= float(t) <= high]
    start, end = rule.window
    # Step i is i / n of the way through; the epsilon keeps 0.1 * 30 == 3 inside despite rounding.
    return [i for i in range(n) if start - 1e-9 <= i / n < end - 1e-9]


def compute_plan(kind: str, rule: BroadcastRule, timesteps: Sequence[float]) -> list[bool]:
    """Per step, whether `kind` is computed (True) or reused (False). A rule that would reuse but whose
    window holds no step of this schedule is an error: it would silently do nothing."""
    plan = [True] * len(timesteps)
    if rule.interval == 1:
        return plan
    inside = steps_in_window(rule, timesteps)
    if not inside:
        if rule.timesteps is not None:
            span = f"this schedule's timesteps run from {max(timesteps):.1f} to {min(timesteps):.1f}"
            fix = f"give pab.{kind}.timesteps within that span, or a pab.{kind}.window of fractions"
            raise ConfigError(f"pab.{kind}.timesteps={list(rule.timesteps)} selects no step: {span}; {fix}")
        raise ConfigError(
            f"pab.{kind}.window={list(rule.window)} selects no step of a {len(timesteps)}-step schedule; "
            "widen the window"
        )
    for i in inside:
        plan[i] = (i - inside[0]) % rule.interval == 0
    return plan


class BlockCache:
    """One block's handle on the run's policy: `reuse(kind, compute)` returns compute() or the output
    this block stored the last time it computed that kind."""

    def __init__(self, policy: PyramidAttentionBroadcast, name: str, index: int):
        self.policy = policy
        self.name = name
        self.index = index  # depth index within its block list

    def reuse(self, kind: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        return self.policy.reuse_or_compute(self, kind, compute)


def cacheable_blocks(model: nn.Module) -> list[tuple[str, int, nn.Module]]:
    """(name, depth index, block) of every block that takes a policy handle: the modules with a `cache`
    attribute (videosys.models.blocks.cached is how they use it). The index is the block's position in
    its list (the last number in its name)."""
    found = []
    for name, module in model.named_modules():
        if "cache" in vars(module):
            numbers = [part for part in name.split(".") if part.isdigit()]
            found.append((name, int(numbers[-1]) if numbers else 0, module))
    return found


def model_kinds(model: nn.Module) -> set[str]:
    """The kinds of call `model`'s cacheable blocks make (each block lists its own in `cache_kinds`)."""
    return {kind for _, _, block in cacheable_blocks(model) for kind in block.cache_kinds}


def attention_reused_fraction(computed: dict[str, int], reused: dict[str, int]) -> float:
    """The fraction of attention calls (every kind but MLPs) that were reused."""
    attention = [k for k in KINDS if k != "mlp"]
    total = sum(computed.get(k, 0) + reused.get(k, 0) for k in attention)
    return sum(reused.get(k, 0) for k in attention) / total if total else 0.0


def format_counts(counts: dict[str, int]) -> str:
    """Counts per kind in one short cell, "s84 t68 c60" (s spatial, t temporal, f full, c cross, m MLP)."""
    return " ".join(f"{kind[0]}{n}" for kind, n in counts.items()) if counts else "-"


class PyramidAttentionBroadcast:
    """The per-run PAB policy (see the module docstring). Counters accumulate over every sampling loop
    of the run; stored outputs live only within one loop."""

    def __init__(self, cfg: PABConfig):
        self.name = cfg.name
        self.rules = cfg.rules()
        for kind, rule in self.rules.items():
            _check_rule(kind, rule)
        self.mlp_blocks = set(self.rules["mlp"].blocks)
        self.computed: Counter[str] = Counter()
        self.reused: Counter[str] = Counter()
        self.peak_bytes = 0
        self._plans: dict[str, list[bool]] | None = None
        self._reused_kinds: set[str] = set()  # kinds the current loop reuses at some step: only those are stored
        self._step: int | None = None
        self._stored: dict[tuple[str, str], torch.Tensor] = {}
        self._stored_bytes = 0
        self._model_kinds = set(KINDS)  # the kinds the attached model makes (step keys name only those)
        self._in_place = False  # copy computed outputs into fixed buffers (for CUDA graphs)
        self._recording: tuple[Counter[str], Counter[str]] | None = None  # counts of a capture, not counted

    # --- attaching to a model ---------------------------------------------------------------------

    def check_model(self, model: nn.Module) -> list[tuple[str, int, nn.Module]]:
        """`model`'s cacheable blocks, or a ConfigError with the fix if this policy cannot drive them. The
        tasks call it when the model is built, so a bad pairing stops the run before training or sampling."""
        blocks = cacheable_blocks(model)
        if not blocks:
            raise ConfigError(
                f"pab={self.name} reuses attention in video transformer blocks, and {type(model).__name__} has "
                "none; use pab=off"
            )
        # torch.compile of a block's forward (videosys.parallelize.compile_blocks) leaves this marker.
        compiled = [name for name, _, b in blocks if hasattr(vars(b).get("forward"), "_torchdynamo_orig_callable")]
        if compiled:
            raise ConfigError(
                f"pab={self.name} cannot drive compiled blocks ({compiled[0]} is compiled: kernels.compile=true); "
                "use a kernels preset without compile (e.g. kernels=fused) or pab=off"
            )
        depth = 1 + max(index for _, index, _ in blocks)
        bad = sorted(b for b in self.mlp_blocks if b >= depth)
        if bad:
            raise ConfigError(
                f"pab.mlp.blocks has {bad}, but the model's block lists have {depth} blocks (0..{depth - 1}); "
                "list indices in that range"
            )
        return blocks

    @contextlib.contextmanager
    def attached(self, model: nn.Module) -> Iterator[None]:
        """Give each cacheable block of `model` its handle for the duration of a sampling call."""
        blocks = self.check_model(model)
        for name, index, block in blocks:
            block.cache = BlockCache(self, name, index)
        self._model_kinds = {kind for _, _, block in blocks for kind in block.cache_kinds}
        try:
            yield
        finally:
            for _, _, block in blocks:
                block.cache = None
            self._model_kinds = set(KINDS)
            self.finish()

    # --- the denoising loop -----------------------------------------------------------------------

    def begin(self, timesteps: Sequence[float]) -> None:
        """A new loop over `timesteps`: plan every kind (raising if a window selects no step), drop what
        an earlier loop stored."""
        self._plans = {kind: compute_plan(kind, rule, timesteps) for kind, rule in self.rules.items()}
        self._reused_kinds = {kind for kind, plan in self._plans.items() if not all(plan)}
        if not self._in_place:
            self._drop_stored()
        self._step = None

    def at_step(self, i: int) -> None:
        self._step = i

    def finish(self) -> None:
        """The loop is over: free what it stored (kept while outputs are kept in place: graphs read them)."""
        if not self._in_place:
            self._drop_stored()
        self._plans = None
        self._step = None

    def _drop_stored(self) -> None:
        self._stored.clear()
        self._stored_bytes = 0

    # --- CUDA graphs (videosys.diffusion.graphs) --------------------------------------------------

    def step_key(self) -> tuple[str, ...]:
        """The kinds of the attached model that the current step reuses. A step's calls depend on nothing
        else: every kind is computed at a window's first step and before it, so a reused entry always holds
        this loop's output."""
        if self._plans is None or self._step is None:
            raise RuntimeError("step_key() outside a denoising loop (call begin() and at_step() first)")
        reused = (k for k in KINDS if k in self._model_kinds and not self._plans[k][self._step])
        return tuple(k for k in reused if k != "mlp" or self.mlp_blocks)

    @contextlib.contextmanager
    def keep_in_place(self) -> Iterator[None]:
        """While inside: computed outputs are copied into fixed per-entry buffers that outlive each loop,
        so that captured graphs read and write the same memory on every replay. Leaving frees them."""
        self._in_place = True
        try:
            yield
        finally:
            self._in_place = False
            self._drop_stored()

    @contextlib.contextmanager
    def recording(self) -> Iterator[tuple[Counter[str], Counter[str]]]:
        """Calls made inside (a graph capture: nothing runs yet) go to the yielded (computed, reused)
        counters instead of the run's; `count` adds them when the graph runs."""
        self._recording = (Counter(), Counter())
        try:
            yield self._recording
        finally:
            self._recording = None

    def count(self, calls: tuple[Counter[str], Counter[str]]) -> None:
        computed, reused = calls
        self.computed.update(computed)
        self.reused.update(reused)

    # --- the blocks -------------------------------------------------------------------------------

    def reuse_or_compute(self, block: BlockCache, kind: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        if self._plans is None or self._step is None:
            raise RuntimeError("a PAB-attached block ran outside a denoising loop (call begin() and at_step() first)")
        if kind == "mlp" and block.index not in self.mlp_blocks:
            return compute()  # not a listed block: not counted, never stored
        key = (block.name, kind)
        computed, reused = self._recording or (self.computed, self.reused)
        if self._plans[kind][self._step] or key not in self._stored:
            out = compute()
            if kind in self._reused_kinds:
                self._store(key, out)
            computed[kind] += 1
            return out
        reused[kind] += 1
        return self._stored[key]

    def _store(self, key: tuple[str, str], out: torch.Tensor) -> None:
        replaced = self._stored.get(key)
        if self._in_place and replaced is not None and replaced.shape == out.shape and replaced.dtype == out.dtype:
            replaced.copy_(out)
            return
        # In place, the first store takes a copy: `out` may be a view of memory the model reuses.
        self._stored[key] = out.clone() if self._in_place else out
        self._stored_bytes += _nbytes(out) - (_nbytes(replaced) if replaced is not None else 0)
        self.peak_bytes = max(self.peak_bytes, self._stored_bytes)

    def stored_bytes(self) -> int:
        return self._stored_bytes

    # --- reporting --------------------------------------------------------------------------------

    def report(self) -> dict:
        """Calls computed and reused per kind (kinds the model has), and the largest memory the stored
        outputs took on this rank."""
        kinds = [k for k in KINDS if self.computed[k] or self.reused[k]]
        return {
            "pab": self.name,
            "pab_computed": {k: self.computed[k] for k in kinds},
            "pab_reused": {k: self.reused[k] for k in kinds},
            "pab_cache_mib": round(self.peak_bytes / 2**20, 3),
            "pab_attention_reused": attention_reused_fraction(self.computed, self.reused),
        }

    def log_report(self) -> None:
        r = self.report()
        computed, reused = r["pab_computed"], r["pab_reused"]
        calls = ", ".join(f"{k} {computed[k]} computed / {reused[k]} reused" for k in computed)
        log.info("PAB (%s): %s; cache held up to %.1f MiB on this rank", self.name, calls, r["pab_cache_mib"])


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def build_cache(
    cfg: PABConfig, compiled_blocks: bool = False, num_steps: int | None = None
) -> PyramidAttentionBroadcast | None:
    """The run's policy, or None for pab=off. `compiled_blocks`: kernels.compile is on. `num_steps`: the
    sampling steps, to check fractional windows now, before any model is built (a window in timesteps is
    checked when the loop starts: the schedule is known only then)."""
    if cfg.name == "off":
        return None
    if compiled_blocks:
        # The compute-or-reuse choice is Python state that changes every step; inside a compiled block
        # it would recompile per step.
        raise ConfigError(
            f"pab={cfg.name} decides per step, in Python, whether a block's attention runs, which compiled "
            "blocks (kernels.compile=true) cannot follow; use a kernels preset without compile (e.g. "
            "kernels=fused) or pab=off"
        )
    policy = PyramidAttentionBroadcast(cfg)
    if num_steps is not None:
        for kind, rule in policy.rules.items():
            if rule.timesteps is None:
                compute_plan(kind, rule, [float(num_steps - i) for i in range(num_steps)])
    return policy
