"""MPTQ-ViT calibration (Tai et al., "MPTQ-ViT: Mixed-Precision Post-Training
Quantization for Vision Transformer", 2024).

- SQ-b (§3.1): vitdsl.quant.sqb.fold_sqb, applied first.
- OPT-m (§3.2): the inputs of a layer that follows GELU get a twin-range quantizer,
  Δ+ = 2^m·Δ-, with m (and Δ+) chosen per layer from a grid by the error of the
  layer's output on calibration data.
- The same output-error search picks every other layer's input range (a clipping
  factor on the min/max range).
- Greedy MP (§3.3): see `greedy_mixed_precision`.

The search is deterministic: the calibration rows kept per layer are a fixed stride
over the data, and ties go to the earlier candidate.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .fake import QuantConv2d, QuantLinear

CLIPS = tuple(round(0.3 + 0.1 * i, 1) for i in range(8))  # 0.3 .. 1.0 of the observed range
M_GRID = tuple(range(0, 6))
MAX_ROWS = 512  # tokens (linear) kept per layer for the output-error search
MAX_IMAGES = 4  # images (conv) kept per layer


def _is_post_gelu(model: nn.Module, name: str) -> bool:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    return leaf == "fc2" and isinstance(getattr(parent, "act", None), nn.GELU)


class LayerCalibrator:
    """Holds each quantized layer's float inputs and sets its quantizer ranges by
    output error; reused by the mixed-precision search when a layer's width changes."""

    def __init__(self, model: nn.Module, data: torch.Tensor, method: str = "mptq"):
        self.model, self.method = model, method
        self.layers = {n: m for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantConv2d))}
        self.inputs: dict[str, torch.Tensor] = {}
        hooks = []
        for n, m in self.layers.items():
            def pre(mod, args, n=n):
                x = args[0].detach()
                if getattr(mod, "pool", None) is not None:
                    from ..ops.io import _pool

                    x = _pool(x, mod.pool, mod.prefix)
                if isinstance(mod, QuantConv2d):
                    self.inputs.setdefault(n, x[:MAX_IMAGES].clone())
                else:
                    rows = x.reshape(-1, x.shape[-1])
                    step = max(1, rows.shape[0] // MAX_ROWS)
                    self.inputs.setdefault(n, rows[::step][:MAX_ROWS].clone())
            hooks.append(m.register_forward_pre_hook(pre))
        quantizers = [q for m in self.layers.values() for q in (m.input_quant, m.weight_quant)]
        for q in quantizers:
            q.bypass = True
        try:
            with torch.no_grad():
                model.eval()(data[: max(MAX_IMAGES, 8)])
        finally:
            for h in hooks:
                h.remove()
            for q in quantizers:
                q.bypass = False

    def _out(self, m: nn.Module, x: torch.Tensor, w: torch.Tensor, quant_input: bool) -> torch.Tensor:
        xin = m.input_quant(x) if quant_input else x
        if isinstance(m, QuantConv2d):
            return m._conv_forward(xin, w, m.bias)
        return F.linear(xin, w, m.bias)

    @torch.no_grad()
    def calibrate(self, name: str) -> float:
        """Set layer `name`'s weight and input ranges; returns the chosen output MSE."""
        m = self.layers[name]
        w = m.weight.flatten(1)
        m.weight_quant.set_range(w.min(dim=1).values, w.max(dim=1).values)
        x = self.inputs[name]
        if self.method != "mptq":  # minmax / percentile from the kept inputs, no search
            v = x.flatten()
            lo, hi = (v.min(), v.max()) if self.method == "minmax" else (torch.quantile(v, 1e-4), torch.quantile(v, 1 - 1e-4))
            m.input_quant.set_range(lo.reshape(1), hi.reshape(1))
            return 0.0
        ref = self._out(m, x, m.weight, quant_input=False)
        wq = m.weight_quant(m.weight)  # fixed during the input search
        lo, hi = x.min().clamp(max=0), x.max().clamp(min=0)
        best = (float("inf"), None)
        q = m.input_quant
        if _is_post_gelu(self.model, name):  # OPT-m
            half = 2 ** (q.bits - 1) - 1
            for c in CLIPS:
                for mm in M_GRID:
                    q.set_twin(float(c * hi / half), mm)
                    err = (self._out(m, x, wq, True) - ref).pow(2).mean().item()
                    if err < best[0]:
                        best = (err, ("twin", float(c * hi / half), mm))
        else:
            for c in CLIPS:
                q.set_range((c * lo).reshape(1), (c * hi).reshape(1))
                err = (self._out(m, x, wq, True) - ref).pow(2).mean().item()
                if err < best[0]:
                    best = (err, ("range", c, None))
        kind, a, b = best[1]
        if kind == "twin":
            q.set_twin(a, b)
        else:
            q.set_range((a * lo).reshape(1), (a * hi).reshape(1))
        return best[0]

    def calibrate_all(self, progress: Callable[[int, int], None] | None = None) -> dict[str, float]:
        errs = {}
        for i, name in enumerate(self.layers):
            errs[name] = self.calibrate(name)
            if progress:
                progress(i + 1, len(self.layers))
        return errs


def kl_to_reference(model: nn.Module, data: torch.Tensor, ref_logits: torch.Tensor) -> float:
    """Mean KL(p_fp32 || p_quant) of the logits over the calibration images."""
    with torch.no_grad():
        logq = F.log_softmax(model(data), dim=-1)
        logp = F.log_softmax(ref_logits, dim=-1)
        return float((logp.exp() * (logp - logq)).sum(-1).mean())


def set_bits(m: nn.Module, wbits: int | None = None, abits: int | None = None) -> None:
    """Change a quantized layer's widths in place (its ranges must be recalibrated)."""
    for q, b in ((m.weight_quant, wbits), (m.input_quant, abits)):
        if b is None:
            continue
        q.bits = b
        q.qmin = -(2 ** (b - 1) - 1) if q.signed else 0
        q.qmax = 2 ** (b - 1) - 1 if q.signed else 2**b - 1


def snapshot(m: nn.Module) -> tuple:
    """A layer's quantizer state (widths and buffers), to undo a trial cheaply."""
    qs = (m.weight_quant, m.input_quant)
    return tuple((q.bits, q.qmin, q.qmax, {k: v.clone() for k, v in q.state_dict().items()}) for q in qs)


def restore(m: nn.Module, snap: tuple) -> None:
    for q, (bits, qmin, qmax, buffers) in zip((m.weight_quant, m.input_quant), snap):
        q.bits, q.qmin, q.qmax = bits, qmin, qmax
        q.load_state_dict(buffers)  # also re-syncs the quantizer's python flags
