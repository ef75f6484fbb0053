"""MPTQ-ViT calibration (Tai et al., "MPTQ-ViT: Mixed-Precision Post-Training
Quantization for Vision Transformer", 2024).

- SQ-b (§3.1): vitdsl.quant.sqb.fold_sqb, applied first.
- OPT-m (§3.2): the inputs of a layer that follows GELU get a twin-range quantizer,
  Δ+ = 2^m·Δ-, with m (and Δ+) chosen per layer from a grid by the error of the
  layer's output on calibration data.
- The same output-error search picks every other layer's input range (a clipping
  factor on the min/max range), and the ranges of the attention operands (q, k, the
  softmax output and v, each by the error of A·V).
- Weights: per output channel, a clipping factor on the largest magnitude chosen by
  that channel's output error (the same search, on the weight side).
- Greedy MP (§3.3): see `greedy_mixed_precision`.

Weight rounding (not in the paper; vitdsl.quant.gptq, in the sequential calibration
only): after a layer's scales and input range are chosen, its weights are rounded by
GPTQ (Frantar et al. 2023) for the inputs the layer multiplies instead of to nearest,
if a cross-fitted check says this carries over to unseen images (`_round_weight`).

Sequential calibration (`sequential=True`, what `calibrate(method="mptq")` runs; not in
the paper): graph nodes (a patch embedding, an attention, an MLP: the residual branches
BRECQ calls blocks; a MobileViT block is one node) are calibrated in the order the
forward pass reaches them, and each node's searches run on the inputs the model
produces with every earlier node already quantized.  A linear or conv layer's output
error is measured against the float model's output (the float input through the float
weights: the block-wise reconstruction target of BRECQ, Li et al. 2021, §3.2, without
its rounding optimisation); the attention operands' against the attention output of the
operands as captured (a float reference there was worse on the digits models at 3 and
4 bits).  A layer's ranges then fit the inputs it will see, and a range can partly
make up for the error upstream: at 3 bits, where upstream error is largest, this
lowered the digits models' logit KL by 15-20% (docs/quantization.md).  The
mixed-precision search's trial calibrations use the float inputs (one forward per
trial is its cost already).

Ranges start from the minimum and maximum over every calibration image; the searches
run on a sample (seeded random tokens, evenly spaced images).  The search is
deterministic: ties go to the earlier candidate.

Overfitting guard: a search may leave the minmax setting (the full range, symmetric)
only for a candidate that lowers the output error on each half of the sample (even and
odd calibration images) separately, not just on their sum.  With a few dozen images a
gain smaller than the sample's own noise (typical at 8 bits) otherwise picks clipping
that does not carry over to unseen images.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .fake import AttnQuant, FakeQuant, QuantConv2d, QuantLinear, attn_quant_of
from .gptq import can_round, input_rows, quantize_columns

# Clipping factors of the observed range: 0.3 .. 0.9 by 0.1, then finer towards 1.0, where
# the optimum lies at high widths (a step from 1.0 straight to 0.9 clips more than 8 bits want).
CLIPS = tuple(round(0.3 + 0.1 * i, 1) for i in range(7)) + (0.95, 0.975, 1.0)
M_GRID = tuple(range(0, 6))
WCLIPS = tuple(round(0.5 + 0.025 * i, 3) for i in range(21))  # 0.5 .. 1.0 of a weight channel's largest magnitude
# At this width and above an activation keeps its full range (the search's baseline; the
# twin range after GELU is still searched): the rounding error a clip saves is small,
# and a clip fitted on a few dozen images cut unseen outliers.  Measured on the digits
# models over 5 cross-validation folds x 3 calibration sets (docs/quantization.md): at
# W8A8 the searched ranges raised the logit KL above minmax's on both models (4.1e-5 vs
# 3.9e-5, 1.15e-4 vs 1.11e-4) and the full range lowered it below (3.4e-5, 1.03e-4);
# at 6 and 5 bits the search lowers it.
FULL_RANGE_BITS = 8
MAX_ROWS = 512  # tokens (linear) kept per layer for the output-error search
KEEP_IMAGES = 8  # images kept (evenly spaced over the set) per conv input and attention
ROLES = ("q", "k", "probs", "v")  # AttnQuant.quantizers() order


class _Stop(Exception):
    """Ends a capture forward once the layers of interest have been seen."""


def _is_post_gelu(model: nn.Module, name: str) -> bool:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    return leaf == "fc2" and isinstance(getattr(parent, "act", None), nn.GELU)


class LayerCalibrator:
    """Holds each quantized layer's float inputs and sets its quantizer ranges by
    output error; reused by the mixed-precision search when a layer's width changes.

    A qkv layer owns its attention's operand quantizers (AttnQuant): they share its
    activation width and are calibrated with it."""

    def __init__(self, model: nn.Module, data: torch.Tensor, method: str = "mptq", sequential: bool = False):
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
        self.data = data
        self.inputs: dict[str, torch.Tensor] = {}
        self.attn_inputs: dict[str, dict[str, torch.Tensor]] = {}
        self.ranges: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # quantizer -> (min, max) over all images
        self.halves: dict[str, torch.Tensor] = {}  # layer -> which sample rows come from even calibration images
        self.order: list[str] = []  # layers in the order the forward pass reaches them
        # How much of its own scores each attention's softmax sees (α with ReViT residual
        # attention, Eq. 5; else 1), read from the attention module's inputs in this run.
        self.score_weight: dict[str, float] = {}
        # GPTQ weight rounding (vitdsl.quant.gptq) in the sequential calibration only (the
        # mixed-precision search's trials round to nearest): layer -> its whole input over
        # every calibration image, kept from a node's capture until the layer is calibrated.
        self.gptq = sequential and method == "mptq"
        self.whole_inputs: dict[str, torch.Tensor] = {}
        self._keep_whole = False
        from .calibrate import float_run

        with float_run(model):
            self._capture(list(self.layers))
        # The float inputs: the reference every output error is measured against.
        self.float_inputs = dict(self.inputs)
        self.sequential = sequential
        self.block = self._blocks()
        self.done: set[str] = set()  # layers whose ranges are set (quantized in a sequential capture)

    def _capture(self, names: list[str], stop_at: str | None = None) -> None:
        """Run the calibration images through the model and keep, for each layer in
        `names`, its input sample, its input range and (a qkv layer) its attention
        operands.  Quantizers run as they are set (bypassed ones pass through); a forward
        that reaches layer `stop_at` ends there."""
        model, data = self.model, self.data
        nimg = data.shape[0]
        stride = max(1, nimg // KEEP_IMAGES)
        picked = list(range(0, nimg, stride))[:KEEP_IMAGES]

        def images_of(x: torch.Tensor) -> torch.Tensor:  # rows of x that belong to the picked images
            per = max(1, x.shape[0] // nimg)
            return torch.cat([x[i * per:(i + 1) * per] for i in picked])

        def halves_of(x: torch.Tensor) -> torch.Tensor:  # the same rows: from an even-numbered picked image?
            per = max(1, x.shape[0] // nimg)
            return (torch.arange(len(picked) * per) // per) % 2 == 0

        hooks = []
        seen: list[str] = []
        for n in names:
            m = self.layers[n]

            def pre(mod, args, n=n):
                seen.append(n)
                x = args[0].detach()
                if getattr(mod, "pool", None) is not None:
                    from ..ops.io import _pool

                    x = _pool(x, mod.pool, mod.prefix)
                self.ranges[n] = (x.min(), x.max())
                if self._keep_whole and can_round(mod):
                    self.whole_inputs[n] = x.clone()
                if isinstance(mod, QuantConv2d):
                    self.inputs[n] = images_of(x).clone()
                    self.halves[n] = halves_of(x)
                else:
                    rows = x.reshape(-1, x.shape[-1])
                    idx = torch.arange(rows.shape[0])
                    if rows.shape[0] > MAX_ROWS:
                        g = torch.Generator().manual_seed(0)
                        idx = torch.randperm(rows.shape[0], generator=g)[:MAX_ROWS].sort().values
                    self.inputs[n] = rows[idx].clone()
                    self.halves[n] = (idx // max(1, rows.shape[0] // nimg)) % 2 == 0
            hooks.append(m.register_forward_pre_hook(pre))
        if stop_at is not None:
            def stop(mod, args):
                raise _Stop
            hooks.append(self.layers[stop_at].register_forward_pre_hook(stop))
        for n in names:
            if n not in self.attn:
                continue
            parent_name = n.rpartition(".")[0]
            parent = model.get_submodule(parent_name) if parent_name else model
            if hasattr(parent, "score_weight"):
                def weight(mod, args, n=n):
                    self.score_weight[n] = mod.score_weight(*args[1:])
                hooks.append(parent.register_forward_pre_hook(weight))
            for role, fq in zip(ROLES, self.attn[n].quantizers()):
                def keep(x, n=n, role=role):
                    self.ranges[f"{n}:{role}"] = (x.min(), x.max())
                    self.attn_inputs.setdefault(n, {})[role] = images_of(x.detach()).clone()
                    self.halves[f"{n}:attn"] = halves_of(x)
                fq.observer = keep
        try:
            with torch.no_grad():
                model.eval()(data)
        except _Stop:
            pass
        finally:
            for h in hooks:
                h.remove()
            for n in names:
                if n in self.attn:
                    for fq in self.attn[n].quantizers():
                        fq.observer = None
        if not self.order:
            self.order = list(dict.fromkeys(seen)) + [n for n in self.layers if n not in seen]

    def _blocks(self) -> dict[str, str]:
        """Layer -> the graph node it belongs to (the longest node name that prefixes it:
        `blocks.3.mlp` for `blocks.3.mlp.fc1`); each layer is its own node without a graph."""
        graph = getattr(self.model, "graph", None)
        nodes = [n.name for n in graph.nodes()] if graph is not None else []
        out = {}
        for name in self.layers:
            owners = [n for n in nodes if name == n or name.startswith(n + ".")]
            out[name] = max(owners, key=len) if owners else name
        return out

    def _recapture(self, name: str) -> None:
        """Sequential calibration, a graph node at a time (BRECQ, Li et al. 2021, §3.2:
        block granularity): when `name` is the first layer of its node, the inputs (and
        attention operands) of every layer of the node as the model produces them with
        every node before it quantized and the node itself float."""
        from .calibrate import float_run

        group = [n for n in self.order if self.block[n] == self.block[name]]
        if name != group[0]:
            return
        if group[0] == self.order[0] and not self.gptq:  # nothing upstream: the float capture is this node's input
            return
        i = self.order.index(group[-1])
        on = [q for n in self.done if n not in group for q in self.quantizers(n)]
        self._keep_whole = self.gptq
        try:
            with float_run(self.model):
                for q in on:
                    q.bypass = False
                self._capture(group, stop_at=self.order[i + 1] if i + 1 < len(self.order) else None)
        finally:
            self._keep_whole = False

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

    @staticmethod
    def _half_errors(e2: torch.Tensor, half: torch.Tensor, per_channel: bool = False) -> torch.Tensor:
        """Squared errors (sample rows first) summed over each half of the sample: shape
        (2,), or (2, channels) per output channel (dim 1; a conv's map summed)."""
        if not per_channel:
            r = e2.flatten(1).sum(1)
        else:
            r = e2.flatten(2).sum(2) if e2.dim() > 2 else e2
        return torch.stack([r[half].sum(0), r[~half].sum(0)])

    @staticmethod
    def _consistent(cand: torch.Tensor, base: torch.Tensor, half: torch.Tensor) -> torch.Tensor:
        """A candidate may replace the minmax setting only if it is better on both halves
        (on the whole sample when there is only one half)."""
        if half.all() or not half.any():
            return cand.sum(0) < base.sum(0)
        return (cand < base).all(0)

    def _search(self, fq: FakeQuant, key: str, out: Callable[[], torch.Tensor], ref: torch.Tensor,
                half: torch.Tensor, base: tuple[float, float] | None = None) -> float:
        """The clipping factor of the observed range that minimises the squared error of
        `out()` against `ref` on the kept sample, under the overfitting guard.  The baseline
        is `base` when given (the softmax output's known range [0, 1]), else the observed
        range itself (factor 1.0, minmax).  From FULL_RANGE_BITS up, the baseline only."""
        lo, hi = self.ranges[key]
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        cands = [(c * lo, c * hi) for c in CLIPS]  # CLIPS ends with 1.0: minmax, the default baseline
        if base is not None:
            cands.append((torch.tensor(base[0]), torch.tensor(base[1])))  # the baseline is the last candidate
        if fq.bits >= FULL_RANGE_BITS:
            cands = cands[-1:]
        errs = []
        for a, b in cands:
            fq.set_range(a.reshape(1), b.reshape(1))
            errs.append(self._half_errors((out() - ref).pow(2), half))
        best = min(range(len(cands)), key=lambda i: (errs[i].sum().item(), i))
        if not self._consistent(errs[best], errs[-1], half):
            best = len(cands) - 1
        fq.set_range(cands[best][0].reshape(1), cands[best][1].reshape(1))
        return errs[best].sum().item() / ref.numel()

    @torch.no_grad()
    def calibrate(self, name: str) -> float:
        """Set layer `name`'s weight and input ranges (and its attention's, for a qkv
        layer); returns the chosen output MSE of the layer."""
        err = self._calibrate(name)
        self.done.add(name)  # only a layer whose ranges are all set is quantized in later captures
        return err

    def _calibrate(self, name: str) -> float:
        m = self.layers[name]
        if self.sequential and self.method == "mptq":
            self._recapture(name)
        w = m.weight.flatten(1)
        m.weight_quant.set_range(w.min(dim=1).values, w.max(dim=1).values)
        if name in self.attn:
            self._calibrate_attn(name)
        x = self.inputs[name]
        if self.method != "mptq":
            self._fixed_range(m.input_quant, name, x)
            return 0.0
        ref = self._out(m, self.float_inputs[name], m.weight, quant_input=False)
        halves = self.halves[name]
        self._search_weight(m, x, ref, halves)
        err = self._search_input(name, m, x, ref, halves)
        if self.gptq and self._round_weight(name, m):
            err = (self._out(m, x, m.weight_quant(m.weight), True) - ref).pow(2).mean().item()
        return err

    def _search_input(self, name: str, m: nn.Module, x: torch.Tensor, ref: torch.Tensor, halves: torch.Tensor) -> float:
        """The input range (a twin range after GELU, OPT-m) for the weights as they are
        quantized now; returns the output MSE."""
        wq = m.weight_quant(m.weight)  # fixed during the input search
        q = m.input_quant
        if not _is_post_gelu(self.model, name):
            return self._search(q, name, lambda: self._out(m, x, wq, True), ref, halves)
        # OPT-m: twin range, m and Δ+ from a grid; the baseline is the plain minmax range
        lo, hi = self.ranges[name]
        q.set_range(lo.reshape(1), hi.reshape(1))
        base = self._half_errors((self._out(m, x, wq, True) - ref).pow(2), halves)
        qmax = 2 ** (q.bits - 1) - 1
        hi_pos = hi.clamp(min=0)
        best = (base.sum().item(), None, base)
        for c in CLIPS:
            delta = float(c * hi_pos / qmax)
            for mm in M_GRID:
                q.set_twin(delta, mm)
                e = self._half_errors((self._out(m, x, wq, True) - ref).pow(2), halves)
                if e.sum().item() < best[0]:
                    best = (e.sum().item(), (delta, mm), e)
        if best[1] is not None and self._consistent(best[2], base, halves):
            q.set_twin(*best[1])
            return best[0] / ref.numel()
        q.set_range(lo.reshape(1), hi.reshape(1))
        return base.sum().item() / ref.numel()

    def _search_weight(self, m: nn.Module, x: torch.Tensor, ref: torch.Tensor, halves: torch.Tensor) -> None:
        """Per output channel, the clipping factor of the largest magnitude that minimises
        that channel's output error (channels are independent, so one pass per factor
        searches them all), under the overfitting guard."""
        wq_ = m.weight_quant
        amax = m.weight.detach().flatten(1).abs().amax(dim=1).clamp_min(1e-12)
        best_err = torch.full((2, amax.numel()), float("inf"), device=amax.device)
        best_scale = amax / wq_.qmax
        for c in WCLIPS:  # ascending: c = 1.0 (minmax) is the last
            wq_.scale.copy_(c * amax / wq_.qmax)
            err = self._half_errors((self._out(m, x, wq_(m.weight), quant_input=False) - ref).pow(2), halves,
                                    per_channel=True)
            better = err.sum(0) < best_err.sum(0)
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, wq_.scale, best_scale)
        keep = self._consistent(best_err, err, halves)  # err: minmax's
        wq_.scale.copy_(torch.where(keep, best_scale, amax / wq_.qmax))

    def _round_weight(self, name: str, m: nn.Module) -> bool:
        """GPTQ on the chosen weight scales, for the inputs the layer multiplies (every
        calibration image, through its input quantizer).  Kept only if it generalises:
        GPTQ fitted on the even-numbered images must lower its objective ||(W - Q) X||²
        on the odd-numbered ones below rounding to nearest, and the other way round (the
        overfitting guard, cross-fitted).  The weight is then replaced by the result
        fitted on every image (on the grid: the weight quantizer leaves it as it is).
        Returns whether it was."""
        whole = self.whole_inputs.pop(name, None)
        nimg = self.data.shape[0]
        # dim 0 is image-major: images, or images x windows / patch positions (windowed
        # attention and MobileViT fold those into the batch)
        if whole is None or nimg < 2 or whole.shape[0] % nimg:
            return False
        even = (torch.arange(whole.shape[0]) // (whole.shape[0] // nimg)) % 2 == 0
        xq = m.input_quant(whole)
        del whole
        hs = []
        for part in (xq[even], xq[~even]):
            rows = input_rows(m, part)
            hs.append(rows.T @ rows)
        del xq
        wq_ = m.weight_quant
        w = m.weight.flatten(1)
        near = wq_(m.weight).flatten(1)

        def cost(q: torch.Tensor, h: torch.Tensor) -> float:
            d = (w - q).double()
            return float(((d @ h.double()) * d).sum())

        for fit, held in ((0, 1), (1, 0)):
            q = quantize_columns(w, hs[fit], wq_.scale, wq_.qmax)
            if not cost(q, hs[held]) < cost(near, hs[held]):
                return False
        m.weight.copy_(quantize_columns(w, hs[0] + hs[1], wq_.scale, wq_.qmax).view_as(m.weight))
        return True

    def _calibrate_attn(self, name: str) -> None:
        """Operands of S = q kᵀ, then of A·V, each range chosen by the error of the
        attention output A·V (the other operand float first, then quantized).  For q and
        k the scores' error is carried through the softmax (most score errors barely move
        the probabilities; those near a row's maximum do)."""
        aq, t = self.attn[name], self.attn_inputs[name]
        q, k, p, v = (t[r] for r in ROLES)
        key = {r: f"{name}:{r}" for r in ROLES}
        if self.method != "mptq":
            for role, fq in zip(ROLES, aq.quantizers()):
                self._fixed_range(fq, key[role], t[role])
            return
        half = self.halves[f"{name}:attn"]
        kt = k.transpose(-2, -1)
        s = q @ kt  # the observed q already carries the softmax scale
        ref = p @ v  # of the operands as captured (sequentially: upstream quantized); see the module docstring

        alpha = self.score_weight.get(name, 1.0)

        def through_softmax(s_q: torch.Tensor) -> torch.Tensor:
            # softmax(x + Δ) = P·exp(Δ) / Σ P·exp(Δ): the attention output when only the
            # scores move by Δ; P (observed) already holds the bias, masks and carried
            # scores, which the quantizers do not touch.  With ReViT's residual attention
            # the softmax input is α·S_l + (1 - α)·Ŝ_{l-1} (Eq. 5), so a change of S_l
            # moves it by α·(S_q - S); elsewhere α = 1.
            d = alpha * (s_q - s)
            w = p * (d - d.amax(dim=-1, keepdim=True)).exp()
            return (w / w.sum(dim=-1, keepdim=True).clamp_min(1e-30)) @ v

        self._search(aq.q, key["q"], lambda: through_softmax(aq.q(q) @ kt), ref, half)
        qq = aq.q(q)
        self._search(aq.k, key["k"], lambda: through_softmax(qq @ aq.k(k).transpose(-2, -1)), ref, half)
        self._search(aq.probs, key["probs"], lambda: aq.probs(p) @ v, ref, half, base=(0.0, 1.0))
        pq = aq.probs(p)
        self._search(aq.v, key["v"], lambda: pq @ aq.v(v), ref, half)

    def calibrate_all(self, progress: Callable[[int, int, str], None] | None = None) -> dict[str, float]:
        """Every layer in order; progress(layers done, layers, the layer's name)."""
        errs = {}
        for i, name in enumerate(self.order):
            errs[name] = self.calibrate(name)
            if progress:
                progress(i + 1, len(self.order), name)
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
        return kl_of_logits(model(data), ref_logits)


def kl_of_logits(logits: torch.Tensor, ref_logits: torch.Tensor) -> float:
    """Mean KL(softmax(ref_logits) || softmax(logits)) over the rows."""
    logq = F.log_softmax(logits, dim=-1)
    logp = F.log_softmax(ref_logits, dim=-1)
    return float((logp.exp() * (logp - logq)).sum(-1).mean())
