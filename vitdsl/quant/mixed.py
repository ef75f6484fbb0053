"""Greedy mixed precision (MPTQ-ViT §3.3): start every layer at the widest candidate,
then repeatedly narrow the layer (its weights or its inputs) whose step costs the
least calibration loss per byte saved, until the average widths meet the budget.

Loss: KL of the quantized model's logits against the FP32 logits on the calibration
images.  Budget: an average bit width, weighted by parameter count for weights and by
input elements per image for activations; both averages must reach it.  A step's cost
is measured from the current configuration, one layer at a time; a layer's entries
are re-measured after it changes (the others are kept, an approximation that keeps the
search to O(layers x steps) forward passes), and the loss a new entry is measured
against is always the current configuration's own.  A trial reruns the model only from
the changed layer's graph node on (the nodes before it compute what they did).
Deterministic: ties go to the earlier layer, weights before inputs.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from ..errors import InputError
from .mptq import LayerCalibrator, kl_of_logits, kl_to_reference

CANDIDATES = (4, 5, 6, 8)


def averages(state: dict[str, list[int]], sizes: dict[str, tuple[int, int]]) -> tuple[float, float]:
    wsum = sum(w for w, _ in sizes.values()) or 1
    asum = sum(a for _, a in sizes.values()) or 1
    avg_w = sum(state[n][0] * sizes[n][0] for n in state) / wsum
    avg_a = sum(state[n][1] * sizes[n][1] for n in state) / asum
    return avg_w, avg_a


KEEP_LIMIT_BYTES = 4 * 2**30
"""The most memory the search spends on kept node values; beyond it, whole forwards."""


def kept_bytes(graph, images: torch.Tensor) -> int:
    """One copy of every node's value for `images`: the ops' cost rules' act_bytes per
    image (fp32 output, and residual attention's scores), as the memory model counts them."""
    return sum(n.cost.act_bytes for n in graph.nodes() if n.cost) * images.shape[0]


class _KL:
    """The KL of the model's logits against the reference, rerunning only the nodes
    from a changed layer's on: the values of the nodes before it stay those of the current
    configuration's last run (about half a forward pass per trial, bit-identical to a
    whole one).  Memory: one copy of every node's value plus a forward's live set; a
    model without ``run_from`` (any nn.Module), or one whose values would take more than
    KEEP_LIMIT_BYTES, runs whole."""

    def __init__(self, model: nn.Module, data: torch.Tensor, ref_logits: torch.Tensor, node_of: dict[str, str]):
        self.model, self.data, self.ref = model, data, ref_logits
        graph = getattr(model, "graph", None)
        order = list(getattr(graph, "order", None) or [])
        self.resumable = (hasattr(model, "run_from") and bool(order)
                          and kept_bytes(graph, data) <= KEEP_LIMIT_BYTES)
        self.start = {layer: order.index(node) for layer, node in node_of.items() if node in order}
        self.values: list | None = None  # the current configuration's run

    def _run(self, layer: str | None, keep: bool) -> float:
        if not self.resumable:
            return kl_to_reference(self.model, self.data, self.ref)
        from ..backends.torch import output_of

        start = self.start.get(layer, 0) if layer is not None and self.values is not None else 0
        prefix = self.values[:start] if start else []
        if keep:
            self.values = None  # the old suffix goes before the new one is computed
        with torch.no_grad():
            values = self.model.run_from(self.data, start, prefix, keep=keep)
        if keep:
            self.values = values
        return kl_of_logits(output_of(values), self.ref)

    def trial(self, layer: str) -> float:
        """With `layer` changed (and nothing else since the last commit)."""
        return self._run(layer, keep=False)

    def commit(self, layer: str | None = None) -> float:
        """The current configuration's KL, its run kept; `layer`: the one changed since
        the last commit (None: run whole)."""
        return self._run(layer, keep=True)


def greedy_mixed_precision(model: nn.Module, data: torch.Tensor, ref_logits: torch.Tensor, budget: float,
                           sizes: dict[str, tuple[int, int]], candidates: tuple[int, ...] = CANDIDATES,
                           progress: Callable[[int, int, str], None] | None = None, method: str = "mptq") -> dict[str, tuple[int, int]]:
    """sizes: layer -> (weight count, input elements per image).  Returns layer -> (wbits, abits).

    progress(done, 100, label) after every step: done is the share (in %) of the way from
    the widest candidate down to the budget that the weight and input averages have gone
    (their mean)."""
    cands = sorted(candidates)
    if budget < cands[0]:
        raise InputError(f"budget {budget} is below the smallest candidate width {cands[0]}")
    cal = LayerCalibrator(model, data, method)
    names = [n for n in cal.layers if n in sizes]
    state = {n: [cands[-1], cands[-1]] for n in names}
    for n in names:
        cal.set_bits(n, cands[-1], cands[-1])
        cal.calibrate(n)
    kl = _KL(model, data, ref_logits, cal.block)
    loss = kl.commit()  # always the current configuration's own KL
    cost: dict[tuple[str, int], tuple[float, float, tuple]] = {}  # (Δloss, bytes saved, trial state)

    def apply(n: str) -> None:
        cal.set_bits(n, state[n][0], state[n][1])
        cal.calibrate(n)

    def measure(n: str, k: int) -> tuple[float, float, tuple]:
        old = state[n][k]
        new = cands[cands.index(old) - 1]
        snap = cal.snapshot(n)
        state[n][k] = new
        apply(n)
        trial = kl.trial(n)
        trial_state = cal.snapshot(n)  # reused if this step is taken
        state[n][k] = old
        cal.restore(n, snap)
        saved = sizes[n][k] * (old - new) / 8  # bytes per image (inputs) or in the model (weights)
        return trial - loss, saved, trial_state

    def way_done() -> float:  # the two averages' shares of their way down to the budget, averaged
        return sum(min(1.0, (cands[-1] - avg) / max(cands[-1] - budget, 1e-9)) for avg in averages(state, sizes)) / 2

    def report_step(done: int) -> None:
        avg_w, avg_a = averages(state, sizes)
        progress(done, 100, f"w{avg_w:.2f} a{avg_a:.2f} KL {loss:.3g}")

    while True:
        avg_w, avg_a = averages(state, sizes)
        over = [k for k, avg in ((0, avg_w), (1, avg_a)) if avg > budget + 1e-9]
        if not over:
            break
        best = None
        moves = [(n, k) for n in names for k in over if state[n][k] != cands[0] and sizes[n][k] != 0]
        unmeasured = sum(move not in cost for move in moves)
        tried = 0
        for n, k in moves:
            if (n, k) not in cost:
                tried += 1
                if progress:  # the first round measures every layer: minutes on a large model
                    progress(min(99, int(100 * way_done())), 100, f"trying {n} ({tried}/{unmeasured})")
                cost[(n, k)] = measure(n, k)
            dloss, saved = cost[(n, k)][:2]
            score = dloss / saved
            if best is None or score < best[0]:
                best = (score, n, k)
        if best is None:  # cannot narrow further
            break
        _, n, k = best
        state[n][k] = cands[cands.index(state[n][k]) - 1]
        cal.restore(n, cost[(n, k)][2])
        # Measured again, not the old loss plus the entry's Δ: an entry measured before
        # other steps were taken is stale, and adding stale Δs drifted (a "KL" below 0).
        loss = kl.commit(n)
        cost.pop((n, 0), None)
        cost.pop((n, 1), None)
        if progress:
            report_step(min(99, int(100 * way_done())))
    if progress:
        report_step(100)
    return {n: (state[n][0], state[n][1]) for n in names}
