"""Calibration: choose every quantizer's range from data (post-training quantization).

    vitdsl.quant.calibrate(model, data, method="minmax" | "percentile")

Weights: per output channel, from the weights themselves (the largest magnitude).
Layer inputs and attention operands: per tensor, from the calibration data:
  - minmax: the smallest and largest value seen (the baseline);
  - percentile: the p-th and (100-p)-th percentiles of the values seen (p=99.99 by
    default), which clips rare outliers.
  - mptq: MPTQ-ViT (vitdsl.quant.mptq): SQ-b folded into LayerNorm + next linear, a
    twin-range quantizer (OPT-m) on post-GELU inputs, and every other input range
    chosen by the error of the layer's output.  Mixed precision is a separate search
    (vitdsl.quant.mixed), run by `vitdsl quantize --budget`.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable

import torch
import torch.nn as nn

from ..errors import InputError
from .fake import FakeQuant, QuantConv2d, QuantLinear

METHODS = ("minmax", "percentile", "mptq")
_SAMPLE = 100_000  # values kept per batch and layer for percentiles (a uniform random subset)


def _batches(data) -> Iterable[torch.Tensor]:
    if isinstance(data, torch.Tensor):
        yield data
        return
    for b in data:
        yield b[0] if isinstance(b, (tuple, list)) else b


def activation_quantizers(model: nn.Module) -> dict[str, FakeQuant]:
    """Every quantizer that sees activations (not weights), by module name: layer inputs
    (`blocks.0.mlp.fc1.input_quant`) and attention operands (`blocks.0.attn.matmul_quant.q`)."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, FakeQuant) and not n.endswith("weight_quant")}


@contextmanager
def float_run(model: nn.Module):
    """Every quantizer passes its input through unchanged (calibration sees the float model)."""
    qs = [m for m in model.modules() if isinstance(m, FakeQuant)]
    for q in qs:
        q.bypass = True
    try:
        yield
    finally:
        for q in qs:
            q.bypass = False


def calibrate(model: nn.Module, data, method: str = "minmax", percentile: float = 99.99,
              progress: Callable[[int, int, str], None] | None = None) -> nn.Module:
    """Set the scales of every fake-quantized layer of `model` from `data` (a tensor of
    images, or an iterable of batches).  Returns the model, in eval mode.

    progress(done, total, label): after every batch of a tensor or sized iterable and once
    at the end (minmax, percentile), or after every layer calibrated (mptq), e.g. a
    `vitdsl.progress.Bar`."""
    if method not in METHODS:
        raise InputError(f"unknown calibration method '{method}'; available: {', '.join(METHODS)}")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantConv2d))]
    if not layers:
        raise InputError("the model has no quantized layers: give its spec a bits section")
    if method == "mptq":
        return _mptq(model, _stack(data), layers, progress)
    model.eval()
    with torch.no_grad():
        for _, m in layers:  # weights: symmetric per output channel, largest magnitude
            w = m.weight.flatten(1)
            m.weight_quant.set_range(w.min(dim=1).values, w.max(dim=1).values)
    acts = activation_quantizers(model)
    stats: dict[str, list] = {n: [] for n in acts}
    gen = torch.Generator().manual_seed(0)

    def observe(name):
        def record(x: torch.Tensor) -> None:
            x = x.detach().float().flatten()
            if method == "minmax":
                stats[name].append((x.min(), x.max()))
            else:
                if x.numel() > _SAMPLE:
                    x = x[torch.randint(0, x.numel(), (_SAMPLE,), generator=gen)]
                stats[name].append(x)
        return record

    seen = 0
    batches = 0
    known = 1 if isinstance(data, torch.Tensor) else len(data) if hasattr(data, "__len__") else 0
    try:
        for n, q in acts.items():
            q.observer = observe(n)
        with torch.no_grad(), float_run(model):
            for batches, batch in enumerate(_batches(data), 1):
                if batch.dim() != 4:
                    raise InputError(f"calibration batches are images (B, C, H, W); got shape {tuple(batch.shape)}")
                _check_image_shape(model, batch)
                if batch.shape[0] == 0:  # an empty batch has no range to observe
                    continue
                model(batch)
                seen += batch.shape[0]
                if progress and batches < known:  # the last call, after the loop, ends the bar
                    progress(batches, known, "observing ranges")
    finally:
        for q in acts.values():
            q.observer = None
    if seen == 0:
        raise InputError("the calibration set is empty")
    if progress:
        progress(batches, batches, "observing ranges")
    for name, q in acts.items():
        if not stats[name]:
            raise InputError(f"quantizer {name} saw no data during calibration")
        if method == "minmax":
            lo = torch.stack([s[0] for s in stats[name]]).min()
            hi = torch.stack([s[1] for s in stats[name]]).max()
        else:
            v = torch.cat(stats[name])
            lo = torch.quantile(v, 1 - percentile / 100)
            hi = torch.quantile(v, percentile / 100)
        q.set_range(lo.reshape(1), hi.reshape(1))
    return model


def _stack(data) -> torch.Tensor:
    batches = list(_batches(data))
    if not batches:
        raise InputError("the calibration set is empty")
    x = torch.cat(batches)
    if x.dim() != 4:
        raise InputError(f"calibration batches are images (B, C, H, W); got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise InputError("the calibration set is empty")
    return x


def _check_image_shape(model: nn.Module, images: torch.Tensor) -> None:
    """Images (B, C, H, W) must match a vitdsl model's input (other models: unchecked)."""
    graph = getattr(model, "graph", None)
    if graph is not None and tuple(images.shape[1:]) != tuple(graph.input.out.shape):
        raise InputError(f"calibration images are {'x'.join(map(str, images.shape[1:]))}, "
                         f"the model's input is {graph.input.out}")


def _mptq(model: nn.Module, data: torch.Tensor, layers, progress) -> nn.Module:
    from .mptq import LayerCalibrator
    from .sqb import fold_sqb

    _check_image_shape(model, data)
    if getattr(model, "graph", None) is not None:
        fold_sqb(model, data)  # SQ-b first: it changes the weights the ranges are chosen for
    LayerCalibrator(model, data, sequential=True).calibrate_all(progress=progress)
    return model.eval()
