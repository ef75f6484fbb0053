"""`prepack(model)`: CPU inference of every linear layer on a weight packed once (oneDNN).

Why: on the CPU, `F.linear` (aten::addmm) packs the weight matrix into the GEMM's
blocked layout on every call and first writes the bias into the output, one more pass
over it.  oneDNN's linear takes a weight reordered once into its own layout and adds
the bias inside the GEMM.  The linear layers are about 80 % of a ViT forward; on a
2-core CPU with 2 threads the prepacked ViT-S/B runs at 0.83-0.95 of timm's time
(bench/latency.py, docs/benchmarks.md).  With one intra-op thread oneDNN was as slow
as F.linear or up to 5 % slower, while MKL's own packed GEMM (the weight packed once
per row count M = batch x tokens, torch.ops.mkl._mkl_linear, what torch.jit.freeze and
inductor use on the CPU) gives F.linear's numbers and was about 3 % faster on ViT-B's
layers, level on ViT-S's (interleaved, one thread, 197 rows; whole ViT-B batch 1 against
timm 0.998 -> 0.975): with one thread that path is taken (a few packed copies, one per
row count, for the first MKL_SHAPES row counts seen; torch.get_num_threads() decides
per call).

Opt-in, like torch.jit.freeze: `prepack(model)` gives each `nn.Linear` (exact type)
an instance-level forward; the modules, their parameters and state_dict keys stay what
they were.  A prepacked layer uses the packed weight only where nothing but the clock
and float rounding (about 1e-6) can tell: gradients
off (no_grad / inference_mode), no autocast, no forward-mode AD level, not while
torch.compile, torch.export, the ONNX exporter or torch.jit trace the module, a float32
contiguous (non-nested) CPU input, a float32 CPU weight that is not an inference tensor
and not parametrized, and a contiguous float32 bias of the right shape (or none).
Everything else runs F.linear.

The packed copy (as large as the weight) is kept outside the module (a weak mapping:
copies, pickles and state dicts never see it) and rebuilt when the weight changes in
a way autograd's version counter sees: a new tensor, an in-place update, a
`load_state_dict`.  Writes that bypass the counter (`weight.data[...] = ...`, numpy
views, fused optimizers such as `Adam(fused=True)`) are not seen: call `prepack`
again (it repacks) or `unpack` after such changes.
"""
from __future__ import annotations

import functools
import threading
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from .inplace import graph_capture_active

_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()
_MKL_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()
MKL_SHAPES = 4  # packed MKL copies per layer (one per row count); further row counts run F.linear
_MKL_LOCK = threading.Lock()  # the copies are shared by every Python thread running the model


def _fwd_ad_active() -> bool:
    return getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0


def _wrapped(x: torch.Tensor) -> bool:
    """A torch.func (vmap, grad, ...) wrapper: the oneDNN op cannot see through it."""
    try:
        return torch._C._functorch.is_functorch_wrapped_tensor(x)
    except AttributeError:  # pragma: no cover - older torch
        return False


def _packable(weight: torch.Tensor) -> bool:
    """A weight oneDNN can pack and whose changes the version counter shows."""
    return (weight.dtype == torch.float32 and weight.device.type == "cpu" and weight.numel() > 0
            and not weight.is_inference())


def packed_path_allowed(layer: nn.Linear, x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The conditions of the module docstring (graph capture first: the tracers must not
    look into the rest)."""
    if graph_capture_active():
        return False
    b = layer.bias
    return (not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
            and not _fwd_ad_active()
            and x.dtype == torch.float32 and x.device.type == "cpu" and x.dim() >= 2 and type(x) is torch.Tensor
            and x.shape[-1] == weight.shape[-1]  # else F.linear says what is wrong (MKL's op would not)
            and not x.is_nested and not x.is_mkldnn and not _wrapped(x) and x.is_contiguous()
            and _packable(weight) and not parametrize.is_parametrized(layer)
            and (b is None or (b.dtype == torch.float32 and b.device.type == "cpu" and b.is_contiguous()
                               and tuple(b.shape) == (weight.shape[0],)))
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)


def _mkl_available() -> bool:
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


def _made_from(hit: tuple | None, weight: torch.Tensor) -> bool:
    """Whether a cache entry (key, weak reference, copies) was made from this very
    tensor object at this address and version (else its copies are stale)."""
    return (hit is not None and hit[0] == (weight.data_ptr(), weight._version, tuple(weight.shape))
            and hit[1]() is weight)


def _entry(weight: torch.Tensor, copies) -> tuple:
    return ((weight.data_ptr(), weight._version, tuple(weight.shape)), weakref.ref(weight), copies)


def _packed(layer: nn.Linear, weight: torch.Tensor) -> torch.Tensor:
    """The packed copy of `weight`, rebuilt unless `_made_from` it."""
    hit = _CACHE.get(layer)
    if _made_from(hit, weight):
        return hit[2]
    with torch.no_grad():
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
    _CACHE[layer] = _entry(weight, packed)
    return packed


def _mkl_packed(layer: nn.Linear, weight: torch.Tensor, rows: int) -> torch.Tensor | None:
    """MKL's packed copy of `weight` for `rows` input rows, or None when the layer
    already holds MKL_SHAPES copies for other row counts (packing on every call would
    cost more than it saves).  All of a layer's copies are dropped when the weight
    changes (`_made_from`, as for `_packed`)."""
    with _MKL_LOCK:
        hit = _MKL_CACHE.get(layer)
        if not _made_from(hit, weight):
            hit = _MKL_CACHE[layer] = _entry(weight, {})
        packs = hit[2]
        packed = packs.get(rows)
        if packed is None and len(packs) < MKL_SHAPES:
            with torch.no_grad():
                packed = torch.ops.mkl._mkl_reorder_linear_weight(weight.detach(), rows)
            packs[rows] = packed
        return packed


def forward(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A prepacked layer's forward (bound with functools.partial, so that copies and
    pickles of the model keep it, bound to their own layer): oneDNN with two or more
    intra-op threads, MKL's packed GEMM with one."""
    weight = layer.weight  # read once: a parametrization computes a new tensor per access
    if packed_path_allowed(layer, x, weight):
        if torch.get_num_threads() > 1:
            return torch.ops.mkldnn._linear_pointwise(x, _packed(layer, weight), layer.bias, "none", [], "")
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        packed = _mkl_packed(layer, weight, rows) if rows > 0 and _mkl_available() else None
        if packed is not None:
            return torch.ops.mkl._mkl_linear(x, packed, weight, layer.bias, rows)
    return F.linear(x, weight, layer.bias)


def prepack(model: nn.Module) -> int:
    """Give every `nn.Linear` (exact type) in `model` the packed CPU inference path and
    pack its weight now (again if it was); returns how many layers.  Needs oneDNN
    (torch.backends.mkldnn); without it nothing changes and 0 is returned."""
    if not torch.backends.mkldnn.is_available():
        return 0
    n = 0
    for m in model.modules():
        if type(m) is nn.Linear:
            m.forward = functools.partial(forward, m)
            _CACHE.pop(m, None)
            _MKL_CACHE.pop(m, None)
            if _packable(m.weight):
                _packed(m, m.weight)
            n += 1
    return n


def unpack(model: nn.Module) -> int:
    """Undo `prepack`: plain nn.Linear forwards, packed copies freed; returns how many."""
    n = 0
    for m in model.modules():
        if isinstance(m.__dict__.get("forward"), functools.partial) and m.__dict__["forward"].func is forward:
            del m.__dict__["forward"]
            _CACHE.pop(m, None)
            _MKL_CACHE.pop(m, None)
            n += 1
    return n


def _register_flops() -> None:
    """torch.utils.flop_counter counts aten.addmm; teach it the packed ops too, so that a
    FlopCounterMode over a prepacked forward sees the same 2·M·N·K per layer."""
    try:
        from torch.utils.flop_counter import register_flop_formula
    except ImportError:  # pragma: no cover - older torch
        return

    def _linear_flop(x_shape, *args, out_shape=None, **kwargs) -> int:
        n = 1
        for d in out_shape:
            n *= d
        return 2 * n * x_shape[-1]

    for path in (("mkldnn", "_linear_pointwise"), ("mkl", "_mkl_linear")):
        try:
            op = getattr(getattr(torch.ops, path[0]), path[1])
        except (AttributeError, RuntimeError):  # pragma: no cover - a build without it
            continue
        register_flop_formula(op)(_linear_flop)


_register_flops()
