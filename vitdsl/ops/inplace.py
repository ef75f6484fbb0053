"""In-place reuse of dead intermediates during inference.

timm allocates a new tensor for every residual sum and activation.  When the executor
or a module knows that a tensor is about to die, it may write the next result into it
instead: same arithmetic in the same order, so bit-identical outputs, one allocation and
one pass over fresh memory fewer.  This is only done when nobody can observe it:

- not while autograd records (the tensor may be saved for backward), nor while
  torch.compile / torch.export / the ONNX tracer capture the graph (they plan memory
  themselves and must see a functional graph);
- only when the caller's own reference is the only one to the tensor and to its
  storage: a forward hook that kept the tensor, a view of it, or the caller's input
  tensor all make it ineligible.
"""
from __future__ import annotations

import sys

import torch
import torch.nn as nn
from torch.nn.modules import module as _module


def donor(eligible: list[bool]) -> int | None:
    """Which input an op that reuses a dead input (OpDef.reuses_dead_input) writes into:
    the second of two (a residual sum's branch), else the first; None when that input is
    not eligible (it must die at this step, appear once, and be a single-output value).
    The executor (backends/torch.py) and the memory model (vitdsl.passes.memory) both
    ask this."""
    n = len(eligible)
    for k in (n - 1, 0):
        if (k == 0 or n == 2) and eligible[k]:
            return k
    return None


def inference_reuse_allowed() -> bool:
    """True outside autograd recording and graph capture."""
    return not (torch.is_grad_enabled() or torch.compiler.is_compiling() or torch.compiler.is_exporting()
                or torch.jit.is_tracing())


def held_only_by_caller(t: object) -> bool:
    """True when the caller's single reference is the only one to tensor `t` and to its
    memory.  Storage holders counted: t itself, the temporary storage handle, and t's
    base when t is a view (outside inference_mode a linear layer's 3-d output is a view
    of its 2-d result, which nothing else holds)."""
    # getrefcount sees: the caller's reference, this function's argument, its own argument
    return (isinstance(t, torch.Tensor) and sys.getrefcount(t) == 3
            and torch._C._storage_Use_Count(t.untyped_storage()._cdata) == 2 + (t._base is not None))


def unhooked(m: nn.Module) -> bool:
    """No forward hook (the module's own or a global one) would see the in-place result."""
    return not (m._forward_hooks or m._forward_pre_hooks or _module._global_forward_hooks
                or _module._global_forward_pre_hooks)
