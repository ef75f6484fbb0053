"""Fake quantization for the torch backend: uniform quantize-dequantize with a
straight-through estimator, so a quantized model runs in float and can be fine-tuned.

What is quantized (docs/quantization.md):
  - linear and conv weights: symmetric, per output channel, signed narrow range
    [-(2^(b-1)-1), 2^(b-1)-1] (TensorRT's convention, zero point 0);
  - the input of every linear and conv: per tensor, asymmetric, [0, 2^b - 1] with a
    zero point;
  - layers marked fp16/bf16 compute in that type (inputs and weights are cast).
Scales and zero points are buffers, so they live in the state dict.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() whose gradient is the identity (Bengio et al. 2013's straight-through estimator)."""
    return x + (x.round() - x).detach()


class FakeQuant(nn.Module):
    """Quantize-dequantize x with the stored scale and zero point.

    `channels` > 1 means one scale per slice along dim 0 (weights, per output channel).
    """

    def __init__(self, bits: int, signed: bool, channels: int = 1):
        super().__init__()
        self.bits, self.signed = bits, signed
        self.qmin = -(2 ** (bits - 1) - 1) if signed else 0
        self.qmax = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
        self.register_buffer("scale", torch.ones(channels))
        self.register_buffer("zero_point", torch.zeros(channels))
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.bool))
        # Twin-range mode (MPTQ-ViT §3.2, OPT-m): when > 0, negatives use this step and
        # positives use `scale` = 2^m * neg_scale, each on its half of a signed grid.
        self.register_buffer("neg_scale", torch.zeros(1))
        self.bypass = False  # calibration observes float inputs
        # Python mirrors of the two flags, so forward has no data-dependent branch
        # (torch.export traces it); kept in sync by set_range/set_twin and state-dict loads.
        self._ready, self._twin = False, False

    def _sync(self) -> None:
        self._ready, self._twin = bool(self.calibrated), bool((self.neg_scale > 0).any())

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._sync()

    def extra_repr(self) -> str:
        return f"bits={self.bits}, {'signed per-channel' if self.signed else 'unsigned per-tensor'}"

    def _view(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return t.view(-1, *([1] * (x.dim() - 1))) if t.numel() > 1 else t

    def set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Scale (and zero point) that map [lo, hi] onto the integer grid."""
        if self.signed:  # symmetric: the larger magnitude sets the scale
            amax = torch.maximum(lo.abs(), hi.abs()).clamp_min(1e-12)
            self.scale.copy_(amax / self.qmax)
            self.zero_point.zero_()
        else:
            lo, hi = torch.minimum(lo, torch.zeros_like(lo)), torch.maximum(hi, torch.zeros_like(hi))
            scale = ((hi - lo) / (self.qmax - self.qmin)).clamp_min(1e-12)
            self.scale.copy_(scale)
            self.zero_point.copy_((self.qmin - lo / scale).round().clamp(self.qmin, self.qmax))
        self.neg_scale.zero_()
        self.calibrated.fill_(True)
        self._sync()

    def set_twin(self, pos_scale: float, m: int) -> None:
        """Twin-range quantizer for post-GELU inputs: Δ+ = pos_scale, Δ- = Δ+ / 2^m."""
        self.scale.fill_(pos_scale)
        self.zero_point.zero_()
        self.neg_scale.fill_(pos_scale / 2**m)
        self.calibrated.fill_(True)
        self._sync()

    def twin(self, x: torch.Tensor) -> torch.Tensor:
        half = 2 ** (self.bits - 1)
        neg = torch.clamp(round_ste(x / self.neg_scale), -half, 0) * self.neg_scale
        pos = torch.clamp(round_ste(x / self.scale), 0, half - 1) * self.scale
        return torch.where(x < 0, neg, pos)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bypass:
            return x
        if not self._ready:
            raise RuntimeError("this model has quantized layers without ranges: run vitdsl.quant.calibrate(model, data) first")
        if self._twin:
            return self.twin(x)
        s, z = self._view(self.scale, x), self._view(self.zero_point, x)
        q = torch.clamp(round_ste(x / s) + z, self.qmin, self.qmax)
        return (q - z) * s


class QuantLinear(nn.Linear):
    """nn.Linear with fake-quantized weight (per output channel) and input (per tensor)."""

    def __init__(self, src: nn.Linear, wbits: int, abits: int):
        super().__init__(src.in_features, src.out_features, bias=src.bias is not None, device=src.weight.device)
        self.weight, self.bias = src.weight, src.bias
        for k, v in src.__dict__.items():  # keep attributes of subclasses (e.g. the head's pooling)
            if k not in self.__dict__ and not k.startswith("_"):
                self.__dict__[k] = v
        self.weight_quant = FakeQuant(wbits, signed=True, channels=src.out_features)
        self.input_quant = FakeQuant(abits, signed=False)

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
        self.input_quant = FakeQuant(abits, signed=False)

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
    return model


class _FloatCastInPlace:
    """fp16/bf16 layers keep their own state-dict keys: the cast is a forward pre/post hook."""

    @staticmethod
    def wrap(layer: nn.Module, dtype: torch.dtype) -> nn.Module:
        cast = FloatCast(layer, dtype)
        layer.forward = cast.forward  # type: ignore[method-assign]
        layer.__dict__["compute_dtype"] = dtype
        return layer
