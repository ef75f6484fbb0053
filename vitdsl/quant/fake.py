"""Fake quantization for the torch backend: uniform quantize-dequantize with a
straight-through estimator, so a quantized model runs in float and can be fine-tuned.

What is quantized (docs/quantization.md).  Every quantizer is zero-point free
(TensorRT's convention, so an export is a plain Q/DQ pair):
  - linear and conv weights: symmetric, per output channel, signed narrow range
    [-(2^(b-1)-1), 2^(b-1)-1];
  - the input of every linear and conv: symmetric, per tensor, the same range;
  - attention, when its qkv layer is integer-quantized: both operands of QK^T and of
    A.V, per tensor, at the qkv layer's activation width; the softmax output A is
    unsigned, [0, 2^b - 1] (AttnQuant);
  - layers marked fp16/bf16 compute in that type (inputs and weights are cast).
Scales are buffers, so they live in the state dict.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.inplace import graph_capture_active


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() whose gradient is the identity (Bengio et al. 2013's straight-through estimator)."""
    return x + (x.round() - x).detach()


class FakeQuant(nn.Module):
    """Quantize-dequantize x with the stored scale: q = clamp(round(x / s), qmin, qmax) * s.

    signed: [-(2^(b-1)-1), 2^(b-1)-1]; unsigned (softmax outputs): [0, 2^b - 1].
    `channels` > 1 means one scale per slice along dim 0 (weights, per output channel).
    """

    def __init__(self, bits: int, signed: bool, channels: int = 1):
        super().__init__()
        self.signed = signed
        self.set_bits(bits)
        self.register_buffer("scale", torch.ones(channels))
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.bool))
        # Twin-range mode (MPTQ-ViT §3.2, OPT-m): when > 0, negatives use this step and
        # positives use `scale` = 2^m * neg_scale, each on its half of a signed grid.
        self.register_buffer("neg_scale", torch.zeros(1))
        self.bypass = False  # calibration runs the float model
        self.observer: Callable[[torch.Tensor], None] | None = None  # sees the float input while set
        # Python mirrors of the two flags, so forward has no data-dependent branch
        # (torch.export traces it); kept in sync by set_range/set_twin and state-dict loads.
        self._ready, self._twin = False, False

    def set_bits(self, bits: int) -> None:
        """Change the width (the scale must be recalibrated)."""
        self.bits = bits
        self.qmin = -(2 ** (bits - 1) - 1) if self.signed else 0
        self.qmax = 2 ** (bits - 1) - 1 if self.signed else 2**bits - 1

    def _sync(self) -> None:
        self._ready, self._twin = bool(self.calibrated), bool((self.neg_scale > 0).any())

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._sync()

    def extra_repr(self) -> str:
        kind = "signed" if self.signed else "unsigned"
        return f"bits={self.bits}, {kind} per-{'channel' if self.scale.numel() > 1 else 'tensor'}"

    def _view(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return t.view(-1, *([1] * (x.dim() - 1))) if t.numel() > 1 else t

    def set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """The scale that maps [lo, hi] into the grid without clipping: symmetric, so the
        larger magnitude decides (unsigned grids only look at hi)."""
        amax = torch.maximum(lo.abs(), hi.abs()) if self.signed else hi.clamp_min(0)
        self.scale.copy_(amax.clamp_min(1e-12) / self.qmax)
        self.neg_scale.zero_()
        self.calibrated.fill_(True)
        self._sync()

    def set_twin(self, pos_scale: float, m: int) -> None:
        """Twin-range quantizer for post-GELU inputs: Δ+ = pos_scale, Δ- = Δ+ / 2^m."""
        self.scale.fill_(pos_scale)
        self.neg_scale.fill_(pos_scale / 2**m)
        self.calibrated.fill_(True)
        self._sync()

    def _grid(self, x: torch.Tensor, s: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """clamp(round(x / s), lo, hi) * s. Without autograd (calibration searches, evaluation)
        the same operations run in place on x / s's own buffer: for finite x / s the same
        values (x + (round(x) - x) is round(x) exactly in floating point; only the sign of a
        zero can differ) in about a third of the time (a 16384 x 192 input, one CPU thread).
        An infinite x / s saturates to the grid's end here, as a Q/DQ pair does, where the
        straight-through form gives NaN. Graph capture (torch.export, the tracers) sees the
        functional form (vitdsl/ops/inplace.py)."""
        if (torch.is_grad_enabled() and (x.requires_grad or s.requires_grad)) or graph_capture_active():
            return torch.clamp(round_ste(x / s), lo, hi) * s
        return (x / s).round_().clamp_(lo, hi).mul_(s)

    def twin(self, x: torch.Tensor) -> torch.Tensor:
        half = 2 ** (self.bits - 1)
        neg = self._grid(x, self.neg_scale, -half, 0)
        pos = self._grid(x, self.scale, 0, half - 1)
        return torch.where(x < 0, neg, pos)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer(x)
            return x
        if self.bypass:
            return x
        if not self._ready:
            raise RuntimeError("this model has quantized layers without ranges: run vitdsl.quant.calibrate(model, data) first")
        if self._twin:
            return self.twin(x)
        return self._grid(x, self._view(self.scale, x), self.qmin, self.qmax)


class AttnQuant(nn.Module):
    """The quantized attention product: both operands of S = (q·scale) kᵀ and of A·V are
    fake-quantized per tensor (signed), and A = softmax(S) on an unsigned grid, since it
    lies in [0, 1].  The products are written out (no fused kernel), so each MatMul's
    inputs are visible to an exporter."""

    def __init__(self, bits: int):
        super().__init__()
        self.q, self.k, self.v = (FakeQuant(bits, signed=True) for _ in range(3))
        self.probs = FakeQuant(bits, signed=False)

    def quantizers(self) -> list[FakeQuant]:
        return [self.q, self.k, self.probs, self.v]

    def set_bits(self, bits: int) -> None:
        for fq in self.quantizers():
            fq.set_bits(bits)

    def scores(self, q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
        return self.q(q * scale) @ self.k(k).transpose(-2, -1)

    def mix(self, probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.probs(probs) @ self.v(v)

    def forward(self, q, k, v, add: torch.Tensor | None, scale: float) -> torch.Tensor:
        """softmax((q·scale) kᵀ + add) v, as F.scaled_dot_product_attention computes it."""
        s = self.scores(q, k, scale)
        if add is not None:
            s = s + add
        return self.mix(s.softmax(dim=-1), v)


class QuantLinear(nn.Linear):
    """nn.Linear with fake-quantized weight (per output channel) and input (per tensor)."""

    def __init__(self, src: nn.Linear, wbits: int, abits: int):
        super().__init__(src.in_features, src.out_features, bias=src.bias is not None, device=src.weight.device)
        self.weight, self.bias = src.weight, src.bias
        for k, v in src.__dict__.items():  # keep attributes of subclasses (e.g. the head's pooling)
            if k not in self.__dict__ and not k.startswith("_") and k != "forward":  # not a prepacked forward
                self.__dict__[k] = v
        self.weight_quant = FakeQuant(wbits, signed=True, channels=src.out_features)
        self.input_quant = FakeQuant(abits, signed=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(self, "pool", None) is not None:  # the classifier head pools first
            from ..ops.io import _pool

            x = _pool(x, self.pool, self.prefix)
        return F.linear(self.input_quant(x), self.weight_quant(self.weight), self.bias)


class QuantConv2d(nn.Conv2d):
    """nn.Conv2d with fake-quantized weight (per output channel) and input (per tensor)."""

    def __init__(self, src: nn.Conv2d, wbits: int, abits: int):
        super().__init__(src.in_channels, src.out_channels, src.kernel_size, src.stride, src.padding,
                         src.dilation, src.groups, bias=src.bias is not None, device=src.weight.device)
        self.weight, self.bias = src.weight, src.bias
        self.weight_quant = FakeQuant(wbits, signed=True, channels=src.out_channels)
        self.input_quant = FakeQuant(abits, signed=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.input_quant(x), self.weight_quant(self.weight), self.bias)


class FloatCast(nn.Module):
    """Run the wrapped layer in fp16/bf16: cast its input and parameters, cast back."""

    def __init__(self, layer: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.layer, self.dtype = layer, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.layer.weight.to(self.dtype)
        b = self.layer.bias.to(self.dtype) if self.layer.bias is not None else None
        xin = x.to(self.dtype)
        if isinstance(self.layer, nn.Conv2d):
            y = self.layer._conv_forward(xin, w, b)
        else:
            if getattr(self.layer, "pool", None) is not None:
                from ..ops.io import _pool

                xin = _pool(xin, self.layer.pool, self.layer.prefix)
            y = F.linear(xin, w, b)
        return y.to(x.dtype)


def apply_bits(model: nn.Module, bits: dict) -> nn.Module:
    """Swap every layer named in `bits` for its fake-quantized (or reduced-float) version."""
    for name, spec in bits.items():
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = getattr(parent, leaf)
        if spec.float_type == "fp32":
            continue
        if spec.float_type is not None:
            dtype = torch.float16 if spec.float_type == "fp16" else torch.bfloat16
            new: nn.Module = _FloatCastInPlace.wrap(layer, dtype)
        elif isinstance(layer, nn.Conv2d):
            new = QuantConv2d(layer, spec.weight, spec.act)
        else:
            new = QuantLinear(layer, spec.weight, spec.act)
        parent._modules[leaf] = new
        if leaf == "qkv" and spec.float_type is None and hasattr(parent, "matmul_quant"):
            parent.matmul_quant = AttnQuant(spec.act)  # QKᵀ and A·V at the qkv layer's input width
    return model


def require_ranges(model: nn.Module, graph, what: str) -> None:
    """A SpecError at the spec's bits section when quantized layers have no calibrated
    ranges (a spec with integer widths built or trained from scratch): ranges come
    from calibration data, which `what` does not have."""
    from ..errors import SpecError

    missing = sorted({n.rsplit(".", 1)[0] for n, m in model.named_modules()
                      if isinstance(m, FakeQuant) and not m._ready})
    if not missing:
        return
    stmt = next((s for s in graph.program if s.kind == "bits"), None)
    more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
    err = SpecError(f"{what} needs calibrated quantization ranges, and {', '.join(missing[:3])}{more} have none: "
                    "quantize the float spec with `vitdsl quantize` (it writes the ranges with the weights), "
                    "or drop the bits section", stmt.span if stmt is not None else None)
    raise err.located(graph.filename, graph.source)


def attn_quant_of(model: nn.Module, layer: str) -> AttnQuant | None:
    """The attention quantizers that belong to quantized layer `layer` (a qkv layer), if any."""
    parent_name, _, leaf = layer.rpartition(".")
    if leaf != "qkv":
        return None
    parent = model.get_submodule(parent_name) if parent_name else model
    mq = getattr(parent, "matmul_quant", None)
    return mq if isinstance(mq, AttnQuant) else None


class _FloatCastInPlace:
    """fp16/bf16 layers keep their own state-dict keys: the cast is a forward pre/post hook."""

    @staticmethod
    def wrap(layer: nn.Module, dtype: torch.dtype) -> nn.Module:
        cast = FloatCast(layer, dtype)
        layer.forward = cast.forward  # type: ignore[method-assign]
        layer.__dict__["compute_dtype"] = dtype
        return layer
