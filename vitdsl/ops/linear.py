"""The linear layer of every vitdsl op: nn.Linear, with CPU inference on a pre-packed weight.

Why: on the CPU, `F.linear` (aten::addmm) packs the weight matrix into the GEMM's
blocked layout on every call and first writes the bias into the output, one more pass
over it.  oneDNN's linear takes a weight reordered once into its own layout and adds
the bias inside the GEMM.  On ViT-S/16 this makes a whole forward 7-17 % faster than
the same module with F.linear on a 2-core CPU (batch 1 and 8, 1 and 2 threads), the
linear layers being about 80 % of the time; bench/latency.py compares with timm.

When: only where nothing can tell the difference but the clock and float rounding:
gradients off (torch.no_grad or torch.inference_mode), not while torch.compile,
torch.export, the ONNX exporter or torch.jit trace the module (they must see plain
aten.linear), a float32 contiguous input on the CPU, not inside torch.func transforms,
weights that are not inference tensors (those keep no version counter to notice updates),
oneDNN available and enabled (torch.backends.mkldnn), and `packing()` not switched off.
Otherwise it is exactly nn.Linear.

Cost: each layer keeps its packed copy (as large as the weight) after its first such
call; it is rebuilt when the weight changes (a new tensor or an in-place update, seen
by the version counter) and freed by `drop_packed(model)`.  Results differ from
F.linear by rounding only (another summation order, about 1e-6 relative).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

_enabled = True


@contextlib.contextmanager
def packing(enabled: bool) -> Iterator[None]:
    """Switch the packed CPU path on or off within a block (on by default)."""
    global _enabled
    old, _enabled = _enabled, enabled
    try:
        yield
    finally:
        _enabled = old


def _wrapped(x: torch.Tensor) -> bool:
    """A torch.func (vmap, grad, ...) wrapper: the oneDNN op cannot see through it."""
    try:
        return torch._C._functorch.is_functorch_wrapped_tensor(x)
    except AttributeError:  # pragma: no cover - older torch
        return False


def packed_path_allowed(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The conditions of the module docstring (graph capture first: the tracers must not
    look into the rest)."""
    if torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing():
        return False
    return (_enabled and not torch.is_grad_enabled() and x.dtype == torch.float32 and weight.dtype == torch.float32
            and x.device.type == "cpu" and weight.device.type == "cpu" and x.dim() >= 2 and not weight.is_inference()
            and type(x) is torch.Tensor and not x.is_mkldnn and not _wrapped(x) and x.is_contiguous()
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)


class Linear(nn.Linear):
    """nn.Linear (same parameters, state_dict keys and autograd) whose gradient-free CPU
    forward runs oneDNN's linear on a weight packed once (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if packed_path_allowed(x, self.weight):
            return torch.ops.mkldnn._linear_pointwise(x, self._packed_weight(), self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def _packed_weight(self) -> torch.Tensor:
        w = self.weight
        key = (w.data_ptr(), w._version, tuple(w.shape))
        cached = self.__dict__.get("_packed")
        if cached is None or cached[0] != key:
            with torch.no_grad():
                packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), None)
            cached = self.__dict__["_packed"] = (key, packed)
        return cached[1]


def _register_flops() -> None:
    """torch.utils.flop_counter counts aten.addmm; teach it the packed op too, so that a
    FlopCounterMode over a gradient-free forward sees the same 2·M·N·K per layer."""
    try:
        from torch.utils.flop_counter import register_flop_formula

        op = torch.ops.mkldnn._linear_pointwise
    except (ImportError, AttributeError, RuntimeError):  # pragma: no cover - no oneDNN build
        return

    @register_flop_formula(op)
    def _linear_flop(x_shape, *args, out_shape=None, **kwargs) -> int:
        n = 1
        for d in out_shape:
            n *= d
        return 2 * n * x_shape[-1]


_register_flops()


def drop_packed(model: nn.Module) -> int:
    """Free every packed weight copy in `model`; returns how many were dropped."""
    n = 0
    for m in model.modules():
        if m.__dict__.pop("_packed", None) is not None:
            n += 1
    return n
