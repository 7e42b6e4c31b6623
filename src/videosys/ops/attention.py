"""The one attention call every model goes through, with a registry of backends.

Tensors are laid out (batch, heads, tokens, head_dim). Each backend declares what it supports
(device, dtype, head dim, masks, log-sum-exp for Ring attention, backward), so that a request that
cannot run stops up front with the reason instead of failing deep inside a kernel.

`AttentionSelector` is the callable the models' attention modules hold. It runs one backend, or,
for `auto`, the fastest backend that fits each call shape: measured on the device the first time
that shape is seen (forward, plus backward when gradients are needed), then remembered and logged
once. Head dims the fast kernels handle badly (72 in Open-Sora and Latte) can also run zero-padded
to 80, 96 or 128 with the softmax scale of the real head dim, which is exact: the padded columns
add zero to every q.k and give zero output columns, which are dropped. Whether padding is faster
is measured in the same way.
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from videosys.errors import ConfigError

log = logging.getLogger(__name__)


def math_attention(q, k, v, mask=None, scale=None) -> torch.Tensor:
    """Reference attention: softmax(q k^T * scale) v computed in fp32, cast back to the input dtype.

    `mask` is boolean, broadcastable to (batch, heads, queries, keys); False keys are ignored.
    `scale` defaults to 1 / sqrt(head_dim).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q.float(), k.float().transpose(-2, -1)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(dim=-1), v.float()).to(q.dtype)


def sdpa_attention(q, k, v, mask=None, scale=None) -> torch.Tensor:
    """PyTorch's scaled_dot_product_attention; its dispatcher picks flash / efficient / cuDNN / math."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _sdpa_with(kernel: SDPBackend) -> Callable[..., torch.Tensor]:
    def attention(q, k, v, mask=None, scale=None) -> torch.Tensor:
        with sdpa_kernel(kernel):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)

    attention.__name__ = f"sdpa_{kernel.name.lower()}"
    return attention


# The flash-attn releases by the module that holds their flash_attn_func, tried in this order: v3 (built from
# the flash-attention repo's hopper/), the CuTe-DSL v4 (the flash-attn-4 wheel; Hopper and Blackwell), v2.
FLASH_ATTN_MODULES = ("flash_attn_interface", "flash_attn.cute", "flash_attn")


@functools.cache
def _flash_attn_module() -> tuple[object | None, str | None]:
    """(the first importable flash-attn module with a flash_attn_func, None) or (None, why there is none)."""
    failures = []
    for name in FLASH_ATTN_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name is not None and (name == err.name or name.startswith(err.name + ".")):
                continue  # not installed
            failures.append(f"{name} failed to import: {err}")  # installed, but a dependency is missing
            continue
        except Exception as err:  # installed but broken (e.g. built for another torch or CUDA): say so
            failures.append(f"{name} failed to import: {type(err).__name__}: {str(err).splitlines()[0]}")
            continue
        if hasattr(module, "flash_attn_func"):
            return module, None
    if failures:
        return None, "the flash-attn package is installed but unusable (" + "; ".join(failures) + ")"
    return None, (
        "the flash-attn package is not installed (pip install flash-attn for v2 or flash-attn-4 for the "
        "CuTe v4; v3 builds from the flash-attention repo's hopper/)"
    )


def _flash_attn_missing() -> str | None:
    return _flash_attn_module()[1]


def flash_attn_attention(q, k, v, mask=None, scale=None) -> torch.Tensor:
    """The flash-attn package (see FLASH_ATTN_MODULES); it takes (batch, tokens, heads, head_dim)."""
    module, _ = _flash_attn_module()
    out = module.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale)
    if isinstance(out, tuple):  # some releases also return the log-sum-exp
        out = out[0]
    return out.transpose(1, 2)


_ALL_FLOAT = (torch.float32, torch.bfloat16, torch.float16)
_HALF = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class AttentionBackend:
    name: str
    fn: Callable[..., torch.Tensor]  # (q, k, v, mask=None, scale=None) -> out
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    description: str
    max_head_dim: int | None = None
    head_dim_multiple: int = 1
    supports_mask: bool = True
    # Ring attention merges per-block results by their log-sum-exp; it runs its blocks on the
    # kernels of the backends that declare it (SDPA's flash kernel, or the fp32 math path).
    returns_lse: bool = True
    supports_backward: bool = True
    missing: Callable[[], str | None] = lambda: None  # why this install cannot run it, if so
    # Checked against the fp32 reference on a small call at each head dim before it is used (see
    # probe_failure): an external package's kernels differ by release and GPU, and flash-attn-4 4.0.0b36
    # on an H200 returns wrong gradients at head dim 72 while its forward is right.
    probe: bool = False

    def unsupported_reason(
        self,
        device: torch.device,
        dtype: torch.dtype,
        head_dim: int | None = None,
        masked: bool = False,
        backward: bool = False,
    ) -> str | None:
        """Why this backend cannot run such a call, or None if it can."""
        if device.type not in self.devices:
            return f"it runs on {'/'.join(self.devices)}, not {device.type}"
        if dtype not in self.dtypes:
            return f"it does not support {str(dtype).removeprefix('torch.')}"
        if head_dim is not None and self.max_head_dim is not None and head_dim > self.max_head_dim:
            return f"head dim {head_dim} is above its limit of {self.max_head_dim}"
        if head_dim is not None and head_dim % self.head_dim_multiple:
            return f"head dim {head_dim} is not a multiple of {self.head_dim_multiple}"
        if masked and not self.supports_mask:
            return "it takes no attention mask (the models' cross-attention masks padded text)"
        if backward and not self.supports_backward:
            return "it has no backward (training needs one)"
        missing = self.missing()
        if missing is None and self.probe and head_dim is not None:
            return probe_failure(self, device, dtype, head_dim, backward)
        return missing


PROBE_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 5e-2}


@functools.cache
def probe_failure(
    backend: AttentionBackend, device: torch.device, dtype: torch.dtype, head_dim: int, backward: bool
) -> str | None:
    """How `backend` got a small call (1 x 2 heads x 128 tokens, `head_dim`) wrong against fp32 math attention
    on the same rounded inputs, forward and, with `backward`, the gradients of q, k and v; None if it did
    not (relative error within PROBE_TOLERANCE, several times a correct kernel's)."""
    generator = torch.Generator(device).manual_seed(0)

    def tensor():  # token-major, as the attention modules hand it over
        return torch.randn(1, 128, 2, head_dim, device=device, generator=generator).transpose(1, 2).to(dtype)

    inputs = [tensor() for _ in range(3)]
    low = [t.clone().requires_grad_(backward) for t in inputs]
    full = [t.float().requires_grad_(backward) for t in inputs]
    errors = {}
    try:
        with torch.autocast(device.type, enabled=False), torch.set_grad_enabled(backward):
            out, expected = backend.fn(*low), math_attention(*full)
            errors["output"] = _relative_error(out, expected)
            if backward:
                grad = torch.randn(expected.shape, device=device, generator=generator)
                got = torch.autograd.grad(out, low, grad.to(out.dtype), allow_unused=True, materialize_grads=True)
                want = torch.autograd.grad(expected, full, grad)
                for name, g, w in zip(("dq", "dk", "dv"), got, want, strict=True):
                    errors[name] = _relative_error(g, w)
    except RuntimeError as err:
        return f"it failed a probe call at head dim {head_dim}: {str(err).splitlines()[0]}"
    wrong = {name: error for name, error in errors.items() if not error <= PROBE_TOLERANCE[dtype]}  # nan too
    if wrong:
        worst = max(wrong.values(), key=lambda e: math.inf if math.isnan(e) else e)
        return (
            f"its {', '.join(wrong)} at head dim {head_dim} differ from the fp32 reference on a probe call "
            f"(relative error {worst:.2g})"
        )
    return None


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = want.float().norm().item()
    return (got.float() - want.float()).norm().item() / (scale or 1.0)


ATTENTION_BACKENDS: dict[str, AttentionBackend] = {
    backend.name: backend
    for backend in (
        AttentionBackend("sdpa", sdpa_attention, ("cpu", "cuda"), _ALL_FLOAT, "torch SDPA, its own dispatcher"),
        AttentionBackend(
            "cudnn",
            _sdpa_with(SDPBackend.CUDNN_ATTENTION),
            ("cuda",),
            _HALF,
            "cuDNN fused attention through SDPA",
            max_head_dim=128,
            head_dim_multiple=8,
            returns_lse=False,
        ),
        AttentionBackend(
            "flash",
            _sdpa_with(SDPBackend.FLASH_ATTENTION),
            ("cuda",),
            _HALF,
            "FlashAttention-2 kernel inside SDPA",
            max_head_dim=256,
            head_dim_multiple=8,
            supports_mask=False,
        ),
        AttentionBackend(
            "efficient",
            _sdpa_with(SDPBackend.EFFICIENT_ATTENTION),
            ("cuda",),
            _ALL_FLOAT,
            "memory-efficient attention inside SDPA (the fast kernel for fp32 and masks)",
            returns_lse=False,
        ),
        AttentionBackend(
            "flash_attn",
            flash_attn_attention,
            ("cuda",),
            _HALF,
            "the flash-attn package (v2, v3 or the CuTe v4)",
            max_head_dim=256,
            head_dim_multiple=8,
            supports_mask=False,
            returns_lse=False,
            missing=_flash_attn_missing,
            probe=True,
        ),
        AttentionBackend("math", math_attention, ("cpu", "cuda"), _ALL_FLOAT, "plain-torch fp32 reference"),
    )
}
# What `auto` may pick, fastest-first in a tie. `math` is the reference, never a candidate.
AUTO_CANDIDATES = ("cudnn", "flash", "flash_attn", "efficient", "sdpa")
# Head dims the fast kernels are tuned for; an unusual head dim may run padded up to one of them.
PADDED_HEAD_DIMS = (64, 80, 96, 128, 160, 192, 256)


def padded_head_dims(head_dim: int) -> list[int]:
    """The padded head dims worth trying for `head_dim`: tuned sizes up to its next multiple of 64."""
    if head_dim % 64 == 0:
        return []
    limit = -(-head_dim // 64) * 64
    return [d for d in PADDED_HEAD_DIMS if head_dim < d <= limit]


@dataclass(frozen=True)
class AttentionChoice:
    backend: AttentionBackend
    head_dim: int | None = None  # run zero-padded to this head dim (None: as is)

    def __call__(self, q, k, v, mask=None) -> torch.Tensor:
        return run_attention(self.backend, self.head_dim, q, k, v, mask)

    def describe(self, real_head_dim: int) -> str:
        if self.head_dim is None:
            return self.backend.name
        return f"{self.backend.name} (head dim {real_head_dim} padded to {self.head_dim})"


def run_attention(backend: AttentionBackend, head_dim: int | None, q, k, v, mask=None) -> torch.Tensor:
    """Attention with `backend`, zero-padded to `head_dim` (None: as is) at the real head dim's scale."""
    if head_dim is None:
        return backend.fn(q, k, v, mask)
    real = q.shape[-1]
    pad = (0, head_dim - real)
    out = backend.fn(F.pad(q, pad), F.pad(k, pad), F.pad(v, pad), mask, scale=1.0 / math.sqrt(real))
    return out[..., :real]


def autocast_inputs(q, k, v) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 inputs cast to the autocast dtype when autocast is on, as SDPA would cast them itself: the
    backend is then chosen for (and a non-SDPA backend runs in) the dtype the attention really runs in.
    Without this an fp32 q under bf16 autocast (after an fp32 norm) would be timed as fp32, where only
    the slow memory-efficient kernel fits."""
    device_type = q.device.type
    if not torch.is_autocast_enabled(device_type):
        return q, k, v
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t.dtype == torch.float32 else t for t in (q, k, v))


# A call's shape as plain constants (strings, ints, tuples; torch.compile passes them to the choice as
# constants): (device type, device index, dtype name, q shape, k shape, mask shape or None, backward).
Signature = tuple
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def call_signature(q, k, v, mask) -> Signature:
    backward = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    mask_shape = None if mask is None else tuple(mask.shape)
    dtype = _DTYPE_NAMES[q.dtype]
    return (q.device.type, q.device.index, dtype, tuple(q.shape), tuple(k.shape), mask_shape, backward)


def _device_and_dtype(signature: Signature) -> tuple[torch.device, torch.dtype]:
    return torch.device(signature[0], signature[1]), getattr(torch, signature[2])


class AttentionSelector:
    """The `attention_fn(q, k, v, mask)` of a model's attention modules.

    With one candidate backend and a set padding choice it just runs it. Otherwise, for each new
    call signature it times every candidate (and padded head dim) that fits that call on the device,
    keeps the fastest, and logs the choice and the timings once. Under torch.compile (static shapes)
    the choice is made at trace time and the compiled graph calls the chosen kernel directly.
    """

    def __init__(
        self, candidates: list[AttentionBackend], pad_head_dim: str = "off", measure_iters: int = 5, name: str = "auto"
    ):
        if not candidates:
            raise ValueError("an attention selector needs at least one backend")
        self.name = name  # what was asked for: a backend's name, or auto
        self.candidates = candidates
        self.pad_head_dim = pad_head_dim  # "auto" (measured), "off", or a head dim as a string
        self.measure_iters = measure_iters
        self.choices: dict[Signature, AttentionChoice] = {}
        self.fixed = None  # one backend and a set padding: nothing to measure
        if len(candidates) == 1 and pad_head_dim != "auto":
            self.fixed = AttentionChoice(candidates[0], None if pad_head_dim == "off" else int(pad_head_dim))
        self.by_name = {backend.name: backend for backend in candidates}  # never changes: compile reads it

        def choose(signature: Signature) -> tuple[str, int | None]:
            choice = self.choose(signature)
            return choice.backend.name, choice.head_dim

        # Under torch.compile this runs once at trace time (the measurement is not traced) and its
        # result, plain strings and ints, is a constant of the graph.
        self._choose_constant = torch.compiler.assume_constant_result(choose)

    def __call__(self, q, k, v, mask=None) -> torch.Tensor:
        q, k, v = autocast_inputs(q, k, v)
        if self.fixed is not None:
            return self.fixed(q, k, v, mask)
        name, head_dim = self._choose_constant(call_signature(q, k, v, mask))
        return run_attention(self.by_name[name], head_dim, q, k, v, mask)

    def choose(self, signature: Signature) -> AttentionChoice:
        """The choice for `signature`, measured the first time it is seen."""
        if signature not in self.choices:
            self.choices[signature] = self._measure(signature)
        return self.choices[signature]

    def options(self, signature: Signature) -> tuple[list[AttentionChoice], list[str]]:
        """The choices that fit a call, and why each other backend does not."""
        (device, dtype), (q_shape, _, mask_shape, backward) = _device_and_dtype(signature), signature[3:]
        head_dim = q_shape[-1]
        pads = padded_head_dims(head_dim) if self.pad_head_dim == "auto" else []
        if self.pad_head_dim not in ("auto", "off"):
            pads = [int(self.pad_head_dim)]
        fitting, excluded = [], []
        for backend in self.candidates:
            as_is = backend.unsupported_reason(device, dtype, head_dim, mask_shape is not None, backward)
            if as_is is None and self.pad_head_dim in ("auto", "off"):
                fitting.append(AttentionChoice(backend))
            elif as_is is not None:
                excluded.append(f"{backend.name}: {as_is}")
            for padded in pads:
                if backend.unsupported_reason(device, dtype, padded, mask_shape is not None, backward) is None:
                    fitting.append(AttentionChoice(backend, padded))
        return fitting, excluded

    def _measure(self, signature: Signature) -> AttentionChoice:
        (device, dtype), (q_shape, k_shape, mask_shape, backward) = _device_and_dtype(signature), signature[3:]
        fitting, excluded = self.options(signature)
        if not fitting:
            raise ConfigError(
                f"no attention backend fits q {q_shape} ({dtype}, {device}): "
                + "; ".join(excluded)
                + ". Use kernels.attention=sdpa or math"
            )
        timings = []
        if len(fitting) == 1:
            timings = [(0.0, fitting[0])]
        else:
            for choice in fitting:
                try:
                    timings.append((self._time(choice, signature), choice))
                except RuntimeError as err:  # a kernel's own limits that no declaration covers
                    excluded.append(f"{choice.describe(q_shape[-1])}: {str(err).splitlines()[0]}")
        if not timings:
            raise ConfigError(f"every attention backend failed for q {q_shape}: " + "; ".join(excluded))
        timings.sort(key=lambda pair: pair[0])
        best = timings[0][1]
        extras = (" masked" if mask_shape else "") + (" fwd+bwd" if backward else "")
        call = f"q {q_shape} k {k_shape} {str(dtype).removeprefix('torch.')}{extras}"
        if len(timings) == 1:
            why = "the only backend that fits"
        else:
            why = "measured " + ", ".join(f"{c.describe(q_shape[-1])} {ms:.3f} ms" for ms, c in timings)
        skipped = f"; not fitting: {'; '.join(excluded)}" if excluded else ""
        log.info("attention %s: %s (%s)%s", call, best.describe(q_shape[-1]), why, skipped)
        return best

    def _time(self, choice: AttentionChoice, signature: Signature) -> float:
        """Median milliseconds of one call (forward, plus backward if the call needs it) on fresh data."""
        (device, dtype), (q_shape, k_shape, mask_shape, backward) = _device_and_dtype(signature), signature[3:]
        generator = torch.Generator(device).manual_seed(0)

        def tensor(shape):  # the token-major layout the attention modules hand over
            batch, heads, tokens, dim = shape
            data = torch.randn(batch, tokens, heads, dim, device=device, dtype=dtype, generator=generator)
            return data.transpose(1, 2).requires_grad_(backward)

        q, k, v = tensor(q_shape), tensor(k_shape), tensor(k_shape)
        mask = None if mask_shape is None else torch.ones(mask_shape, dtype=torch.bool, device=device)
        times = []
        with torch.autocast(device.type, enabled=False), torch.enable_grad():
            for i in range(self.measure_iters + 2):  # two warm-up calls
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                started = time.perf_counter()
                out = choice(q, k, v, mask)
                if backward:
                    out.backward(torch.ones_like(out))
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if i >= 2:
                    times.append((time.perf_counter() - started) * 1e3)
        return sorted(times)[len(times) // 2]


def get_attention_backend(name: str, device: torch.device, dtype: torch.dtype) -> AttentionBackend:
    """Look a named backend up and check it can run on this device and dtype."""
    if name not in ATTENTION_BACKENDS:
        raise ConfigError(
            f"kernels.attention={name!r} is not a known attention backend; "
            f"choose one of {['auto', *sorted(ATTENTION_BACKENDS)]}"
        )
    backend = ATTENTION_BACKENDS[name]
    reason = backend.unsupported_reason(device, dtype)
    if reason is not None:
        raise ConfigError(f"kernels.attention={name!r} cannot run here: {reason}")
    return backend


def build_attention(
    name: str,
    pad_head_dim: str,
    device: torch.device,
    dtype: torch.dtype,
    head_dims: set[int],
    masked: bool,
    training: bool,
) -> AttentionSelector:
    """The attention selector for a model whose attentions have `head_dims`, some `masked` (text
    cross-attention), with a backward when `training`. A named backend that cannot run every such
    call stops here with the reason; `auto` keeps the candidates that can run on this device."""
    pad_head_dim = str(pad_head_dim)
    if pad_head_dim not in ("auto", "off") and not (pad_head_dim.isdigit() and int(pad_head_dim) > 0):
        raise ConfigError(
            f"kernels.pad_head_dim={pad_head_dim!r} is not valid; use auto (measured), off, or a head dim such as 128"
        )
    if pad_head_dim.isdigit() and any(int(pad_head_dim) < d for d in head_dims):
        raise ConfigError(
            f"kernels.pad_head_dim={pad_head_dim} is below this model's head dim {max(head_dims)}; "
            "use a larger value, auto or off"
        )
    if name == "auto":
        candidates = [
            ATTENTION_BACKENDS[c]
            for c in AUTO_CANDIDATES
            if ATTENTION_BACKENDS[c].unsupported_reason(device, dtype, backward=training) is None
        ]
        selector = AttentionSelector(candidates, pad_head_dim if device.type == "cuda" else "off")
        if selector.fixed is not None:
            log.info("attention auto: %s (the only candidate on %s %s)", candidates[0].name, device.type, dtype)
        return selector
    backend = get_attention_backend(name, device, dtype)
    for head_dim in sorted(head_dims):
        run_dim = int(pad_head_dim) if pad_head_dim.isdigit() else head_dim
        reason = backend.unsupported_reason(device, dtype, run_dim, masked, training)
        fits_padded = any(
            backend.unsupported_reason(device, dtype, d, masked, training) is None for d in padded_head_dims(head_dim)
        )
        if reason is not None and pad_head_dim == "auto" and fits_padded:
            reason = None  # padding makes it fit (e.g. a head dim a kernel has no build for)
        if reason is not None:
            raise ConfigError(
                f"kernels.attention={name!r} cannot run this model's attention: {reason}. "
                "Use kernels.attention=auto (picks a backend per call) or sdpa"
            )
    return AttentionSelector([backend], pad_head_dim if device.type == "cuda" else "off", name=name)
