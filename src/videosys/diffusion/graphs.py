"""CUDA-graph replay of the model call inside a denoising loop (`kernels.cuda_graphs=true`).

A video DiT forward issues thousands of small kernels, collectives and Python decisions; split over
several GPUs, each GPU's share of the work shrinks but the host's cost of issuing it does not, and the
GPUs wait on the CPU. A CUDA graph records the forward's kernels once and replays them with one launch.

`StepGraphs` wraps the model call `fn(*args)` of a sampling loop. The first call with a new *step key*
runs eagerly (this step's result, and warm-up: attention choice, Triton compilation, NCCL setup), then
captures the same call into a graph; later calls with that key copy their tensor arguments into the
graph's input buffers, replay it and return a copy of its output. The step key is the PAB policy's
`step_key()` (which kinds this step reuses: a step's calls depend on nothing else), or one key without a
policy; a new argument signature (shapes, dtypes, non-tensor values) drops every graph and starts again.

Everything `fn` reads that is not an argument (weights, a closure's tensors) is read at the address it had
at capture, so it must not be reallocated while the graphs live; arguments may change freely. `fn` must
not synchronise with the host (no `.item()`, no data-dependent shapes): capture refuses that.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: list  # the graph's input buffers, positional then keyword (None where not a tensor)
    output: torch.Tensor
    calls: object  # what the policy recorded during capture, counted per replay


class StepGraphs:
    """Replays `fn`'s CUDA work from one graph per step key (see the module docstring). Use it through
    `step_graphs`, which also keeps the policy's stored outputs in place for as long as the graphs live."""

    def __init__(self, fn: Callable[..., torch.Tensor], cache=None):
        self.fn = fn
        self.cache = cache
        self.signature: tuple | None = None
        self.graphs: dict[tuple, _Captured] = {}
        self.pool = None  # one memory pool for every graph: they never run at the same time
        self.captures = 0
        self.replays = 0

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        names = tuple(sorted(kwargs))
        values = (*args, *(kwargs[n] for n in names))
        signature = (len(args), names) + tuple(
            (tuple(v.shape), v.dtype, v.device) if torch.is_tensor(v) else ("value", v) for v in values
        )
        if signature != self.signature:
            self.release()
            self.signature = signature
        key = self.cache.step_key() if self.cache is not None else ()
        captured = self.graphs.get(key)
        if captured is None:
            out = self.fn(*args, **kwargs)
            self.graphs[key] = self._capture(values, len(args), names)
            return out
        for buffer, value in zip(captured.inputs, values, strict=True):
            if buffer is not None:
                buffer.copy_(value)
        captured.graph.replay()
        if self.cache is not None:
            self.cache.count(captured.calls)
        self.replays += 1
        return captured.output.clone()

    def _capture(self, values: tuple, positional: int, names: tuple[str, ...]) -> _Captured:
        inputs = [v.clone() if torch.is_tensor(v) else None for v in values]
        call = [b if b is not None else v for b, v in zip(inputs, values, strict=True)]
        args, kwargs = call[:positional], dict(zip(names, call[positional:], strict=True))
        graph = torch.cuda.CUDAGraph()
        recording = self.cache.recording() if self.cache is not None else contextlib.nullcontext()
        try:
            with recording as calls, torch.cuda.graph(graph, pool=self.pool):
                output = self.fn(*args, **kwargs)
        except RuntimeError as err:
            raise RuntimeError(
                f"this model call cannot be captured as a CUDA graph ({err}); run with kernels.cuda_graphs=false"
            ) from err
        self.pool = graph.pool()
        self.captures += 1
        return _Captured(graph, inputs, output, calls)

    def release(self) -> None:
        """Drop every graph (their memory returns to the allocator)."""
        self.graphs.clear()
        self.pool = None
        self.signature = None


@contextlib.contextmanager
def step_graphs(fn: Callable[..., torch.Tensor], cache=None, enabled: bool = True) -> Iterator[Callable]:
    """`fn` replayed from CUDA graphs (a `StepGraphs`) while inside, or `fn` itself when not `enabled`.
    With a policy, its stored outputs stay at fixed addresses until the graphs are dropped on leaving."""
    if not enabled:
        yield fn
        return
    graphs = StepGraphs(fn, cache)
    with cache.keep_in_place() if cache is not None else contextlib.nullcontext():
        try:
            yield graphs
        finally:
            graphs.release()  # before the policy frees the buffers the graphs read
            log.info("CUDA graphs: %d captured, %d replays", graphs.captures, graphs.replays)
