"""In-place reuse of dead intermediates during inference.

timm allocates a new tensor for every residual sum and activation.  When the executor
or a module knows that a tensor is about to die, it may write the next result into it
instead: same arithmetic in the same order, so bit-identical outputs, one allocation and
one pass over fresh memory fewer.  This is only done when nobody can observe it:

- not while autograd records (the tensor may be saved for backward), nor while
  torch.compile / torch.export / the ONNX tracer capture the graph (they plan memory
  themselves and must see a functional graph);
- only when the caller's own reference is the only one to the tensor and to its
  storage: a forward hook that kept the tensor, a view of it, the tensor it is a view
  of, or the caller's input tensor all make it ineligible.  Outside inference_mode a
  linear layer's 3-d output is a view that keeps its 2-d base alive, so in practice the
  reuse happens under torch.inference_mode() (what `vitdsl bench` and the benchmarks use);
- only on the CPython versions whose reference counting this check was verified on
  (3.10 to 3.13: 3.14 borrows references on local loads, which changes the counts).
"""
from __future__ import annotations

import sys

import torch
import torch.nn as nn
from torch.nn.modules import module as _module


def donated_input(graph, node, step: int, last: dict[str, int]) -> int | None:
    """Which input `node` (at `step` in graph.order) writes its result into, or None: only
    for an op that reuses a dead input (OpDef.reuses_dead_input), the second of two (a
    residual sum's branch), else the first, and only if that input dies at this step
    (`last`: vitdsl.passes.memory.last_uses), appears once, is a single-output value and
    is not the caller's image.  The executor (backends/torch.py) and the memory model
    (vitdsl.passes.memory) both ask this."""
    from .base import REGISTRY

    if not REGISTRY[node.op].reuses_dead_input:
        return None
    refs = [r.partition("#") for r in node.inputs]
    names = [name for name, _, _ in refs]
    n = len(refs)
    for k in (n - 1, 0):
        name, _, port = refs[k]
        src = graph.node(name)
        if ((k == 0 or n == 2) and not port and last[name] == step and names.count(name) == 1
                and src.scores is None and src.op != "input"):
            return k
    return None


_REFCOUNTS_CHECKED = sys.implementation.name == "cpython" and (3, 10) <= sys.version_info[:2] < (3, 14)


def graph_capture_active() -> bool:
    """torch.compile, torch.export or the jit/ONNX tracer is recording the module: they
    must see the plain functional ops."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()


def inference_reuse_allowed() -> bool:
    """True outside autograd recording and graph capture, on a checked CPython."""
    return _REFCOUNTS_CHECKED and not (torch.is_grad_enabled() or graph_capture_active())


def held_only_by_caller(t: object) -> bool:
    """True when the caller's single reference is the only one to tensor `t` and to its
    memory: the storage's holders are t itself and the temporary handle, nothing else
    (no view of t, no tensor t is a view of).  Tensors without a storage of their own
    (torch.func's batched tensors, for instance) are never reused."""
    # getrefcount sees: the caller's reference, this function's argument, its own argument
    if not isinstance(t, torch.Tensor) or sys.getrefcount(t) != 3:
        return False
    try:
        return torch._C._storage_Use_Count(t.untyped_storage()._cdata) == 2
    except (NotImplementedError, RuntimeError):
        return False


def same_layout(xs) -> bool:
    """Every tensor has the first one's shape, strides, dtype and device: then writing the
    result into one of them visits the elements in the order a new tensor would."""
    t = xs[0]
    return all(x.shape == t.shape and x.stride() == t.stride() and x.dtype == t.dtype and x.device == t.device
               for x in xs)


def unhooked(m: nn.Module) -> bool:
    """No forward hook (the module's own or a global one) would see the in-place result."""
    return not (m._forward_hooks or m._forward_pre_hooks or _module._global_forward_hooks
                or _module._global_forward_pre_hooks)
