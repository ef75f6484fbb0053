"""MPTQ-ViT calibration (Tai et al., "MPTQ-ViT: Mixed-Precision Post-Training
Quantization for Vision Transformer", 2024).

- SQ-b (§3.1): vitdsl.quant.sqb.fold_sqb, applied first.
- OPT-m (§3.2): the inputs of a layer that follows GELU get a twin-range quantizer,
  Δ+ = 2^m·Δ-, with m (and Δ+) chosen per layer from a grid by the error of the
  layer's output on calibration data.
- The same output-error search picks every other layer's input range (a clipping
  factor on the min/max range), and the ranges of the attention operands (q, k by the
  error of q kᵀ; softmax output and v by the error of A·V).
- Weights: per output channel, a clipping factor on the largest magnitude chosen by
  that channel's output error (the same search, on the weight side).
- Greedy MP (§3.3): see `greedy_mixed_precision`.

Ranges start from the minimum and maximum over every calibration image; the searches
run on a sample (seeded random tokens, evenly spaced images).  The search is
deterministic: ties go to the earlier candidate.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .fake import AttnQuant, FakeQuant, QuantConv2d, QuantLinear, attn_quant_of

CLIPS = tuple(round(0.3 + 0.1 * i, 1) for i in range(8))  # 0.3 .. 1.0 of the observed range
M_GRID = tuple(range(0, 6))
WCLIPS = tuple(round(0.5 + 0.025 * i, 3) for i in range(21))  # 0.5 .. 1.0 of a weight channel's largest magnitude
MAX_ROWS = 512  # tokens (linear) kept per layer for the output-error search
KEEP_IMAGES = 8  # images kept (evenly spaced over the set) per conv input and attention
ROLES = ("q", "k", "probs", "v")  # AttnQuant.quantizers() order


def _is_post_gelu(model: nn.Module, name: str) -> bool:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    return leaf == "fc2" and isinstance(getattr(parent, "act", None), nn.GELU)


class LayerCalibrator:
    """Holds each quantized layer's float inputs and sets its quantizer ranges by
    output error; reused by the mixed-precision search when a layer's width changes.

    A qkv layer owns its attention's operand quantizers (AttnQuant): they share its
    activation width and are calibrated with it."""

    def __init__(self, model: nn.Module, data: torch.Tensor, method: str = "mptq"):
        from .calibrate import float_run

        self.model, self.method = model, method
        self.layers = {n: m for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantConv2d))}
        self.attn: dict[str, AttnQuant] = {}
        for n in self.layers:
            aq = attn_quant_of(model, n)
            if aq is not None:
                self.attn[n] = aq
        # Every calibration image goes through the float model once.  Each quantizer's
        # base range (min, max) is taken over all of them, so clipping factor 1.0 is
        # exactly minmax; the output-error search runs on a spread-out sample: MAX_ROWS
        # tokens drawn at random (seeded) for a linear layer, KEEP_IMAGES images evenly
        # spaced over the set for a conv input and the attention operands.
        self.inputs: dict[str, torch.Tensor] = {}
        self.attn_inputs: dict[str, dict[str, torch.Tensor]] = {}
        self.ranges: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # quantizer -> (min, max) over all images
        nimg = data.shape[0]
        stride = max(1, nimg // KEEP_IMAGES)
        picked = list(range(0, nimg, stride))[:KEEP_IMAGES]

        def images_of(x: torch.Tensor) -> torch.Tensor:  # rows of x that belong to the picked images
            per = max(1, x.shape[0] // nimg)
            return torch.cat([x[i * per:(i + 1) * per] for i in picked])

        hooks = []
        for n, m in self.layers.items():
            def pre(mod, args, n=n):
                x = args[0].detach()
                if getattr(mod, "pool", None) is not None:
                    from ..ops.io import _pool

                    x = _pool(x, mod.pool, mod.prefix)
                self.ranges[n] = (x.min(), x.max())
                if isinstance(mod, QuantConv2d):
                    self.inputs[n] = images_of(x).clone()
                else:
                    rows = x.reshape(-1, x.shape[-1])
                    if rows.shape[0] > MAX_ROWS:
                        g = torch.Generator().manual_seed(0)
                        rows = rows[torch.randperm(rows.shape[0], generator=g)[:MAX_ROWS].sort().values]
                    self.inputs[n] = rows.clone()
            hooks.append(m.register_forward_pre_hook(pre))
        for n, aq in self.attn.items():
            for role, fq in zip(ROLES, aq.quantizers()):
                def keep(x, n=n, role=role):
                    self.ranges[f"{n}:{role}"] = (x.min(), x.max())
                    self.attn_inputs.setdefault(n, {})[role] = images_of(x.detach()).clone()
                fq.observer = keep
        try:
            with torch.no_grad(), float_run(model):
                model.eval()(data)
        finally:
            for h in hooks:
                h.remove()
            for aq in self.attn.values():
                for fq in aq.quantizers():
                    fq.observer = None

    def _out(self, m: nn.Module, x: torch.Tensor, w: torch.Tensor, quant_input: bool) -> torch.Tensor:
        xin = m.input_quant(x) if quant_input else x
        if isinstance(m, QuantConv2d):
            return m._conv_forward(xin, w, m.bias)
        return F.linear(xin, w, m.bias)

    def _fixed_range(self, fq: FakeQuant, key: str, x: torch.Tensor) -> None:
        """minmax (over every calibration image) / percentile (of the kept sample), no search."""
        if self.method == "minmax":
            lo, hi = self.ranges[key]
        else:
            v = x.flatten()
            lo, hi = torch.quantile(v, 1e-4), torch.quantile(v, 1 - 1e-4)
        fq.set_range(lo.reshape(1), hi.reshape(1))

    def _search(self, fq: FakeQuant, key: str, out: Callable[[], torch.Tensor], ref: torch.Tensor) -> float:
        """The clipping factor of the full range that minimises the MSE of `out()` against
        `ref` on the kept sample (factor 1.0 is minmax)."""
        lo, hi = self.ranges[key]
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        best = (float("inf"), 1.0)
        for c in CLIPS:
            fq.set_range((c * lo).reshape(1), (c * hi).reshape(1))
            err = (out() - ref).pow(2).mean().item()
            if err < best[0]:
                best = (err, c)
        fq.set_range((best[1] * lo).reshape(1), (best[1] * hi).reshape(1))
        return best[0]

    @torch.no_grad()
    def calibrate(self, name: str) -> float:
        """Set layer `name`'s weight and input ranges (and its attention's, for a qkv
        layer); returns the chosen output MSE of the layer."""
        m = self.layers[name]
        w = m.weight.flatten(1)
        m.weight_quant.set_range(w.min(dim=1).values, w.max(dim=1).values)
        if name in self.attn:
            self._calibrate_attn(name)
        x = self.inputs[name]
        if self.method != "mptq":
            self._fixed_range(m.input_quant, name, x)
            return 0.0
        ref = self._out(m, x, m.weight, quant_input=False)
        self._search_weight(m, x, ref)
        wq = m.weight_quant(m.weight)  # fixed during the input search
        q = m.input_quant
        if not _is_post_gelu(self.model, name):
            return self._search(q, name, lambda: self._out(m, x, wq, True), ref)
        half = 2 ** (q.bits - 1) - 1  # OPT-m: twin range, m and Δ+ from a grid
        hi = self.ranges[name][1].clamp(min=0)
        best = (float("inf"), None)
        for c in CLIPS:
            for mm in M_GRID:
                q.set_twin(float(c * hi / half), mm)
                err = (self._out(m, x, wq, True) - ref).pow(2).mean().item()
                if err < best[0]:
                    best = (err, (float(c * hi / half), mm))
        q.set_twin(*best[1])
        return best[0]

    def _search_weight(self, m: nn.Module, x: torch.Tensor, ref: torch.Tensor) -> None:
        """Per output channel, the clipping factor of the largest magnitude that minimises
        that channel's output error (channels are independent, so one pass per factor
        searches them all)."""
        wq_ = m.weight_quant
        amax = m.weight.detach().flatten(1).abs().amax(dim=1).clamp_min(1e-12)
        reduce = (0, 2, 3) if isinstance(m, QuantConv2d) else 0
        best_err = torch.full_like(amax, float("inf"))
        best_scale = amax / wq_.qmax
        for c in WCLIPS:
            wq_.scale.copy_(c * amax / wq_.qmax)
            err = (self._out(m, x, wq_(m.weight), quant_input=False) - ref).pow(2).mean(dim=reduce)
            err = err.reshape(-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, wq_.scale, best_scale)
        wq_.scale.copy_(best_scale)

    def _calibrate_attn(self, name: str) -> None:
        """Operands of S = q kᵀ, then of A·V, each range chosen by the error of its own
        product (the other operand float first, then quantized), as for the layers."""
        aq, t = self.attn[name], self.attn_inputs[name]
        q, k, p, v = (t[r] for r in ROLES)
        key = {r: f"{name}:{r}" for r in ROLES}
        if self.method != "mptq":
            for role, fq in zip(ROLES, aq.quantizers()):
                self._fixed_range(fq, key[role], t[role])
            return
        kt = k.transpose(-2, -1)
        ref = q @ kt
        self._search(aq.q, key["q"], lambda: aq.q(q) @ kt, ref)
        qq = aq.q(q)
        self._search(aq.k, key["k"], lambda: qq @ aq.k(k).transpose(-2, -1), ref)
        ref = p @ v
        self._search(aq.probs, key["probs"], lambda: aq.probs(p) @ v, ref)
        pq = aq.probs(p)
        self._search(aq.v, key["v"], lambda: pq @ aq.v(v), ref)

    def calibrate_all(self, progress: Callable[[int, int], None] | None = None) -> dict[str, float]:
        errs = {}
        for i, name in enumerate(self.layers):
            errs[name] = self.calibrate(name)
            if progress:
                progress(i + 1, len(self.layers))
        return errs

    # -- width changes for the mixed-precision search -----------------------------
    def quantizers(self, name: str) -> list[FakeQuant]:
        m = self.layers[name]
        return [m.weight_quant, m.input_quant] + (self.attn[name].quantizers() if name in self.attn else [])

    def set_bits(self, name: str, wbits: int | None = None, abits: int | None = None) -> None:
        """Change a layer's widths in place (its ranges must be recalibrated)."""
        m = self.layers[name]
        if wbits is not None:
            m.weight_quant.set_bits(wbits)
        if abits is not None:
            m.input_quant.set_bits(abits)
            if name in self.attn:
                self.attn[name].set_bits(abits)

    def snapshot(self, name: str) -> tuple:
        """A layer's quantizer state (widths and buffers), to undo a trial cheaply."""
        return tuple((q.bits, {k: v.clone() for k, v in q.state_dict().items()}) for q in self.quantizers(name))

    def restore(self, name: str, snap: tuple) -> None:
        for q, (bits, buffers) in zip(self.quantizers(name), snap):
            q.set_bits(bits)
            q.load_state_dict(buffers)  # also re-syncs the quantizer's python flags


def kl_to_reference(model: nn.Module, data: torch.Tensor, ref_logits: torch.Tensor) -> float:
    """Mean KL(p_fp32 || p_quant) of the logits over the calibration images."""
    with torch.no_grad():
        logq = F.log_softmax(model(data), dim=-1)
        logp = F.log_softmax(ref_logits, dim=-1)
        return float((logp.exp() * (logp - logq)).sum(-1).mean())
