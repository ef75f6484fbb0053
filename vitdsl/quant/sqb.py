"""SQ-b: shift and smooth the post-LayerNorm activations before quantization
(MPTQ-ViT, Tai et al. 2024, §3.1 "SmoothQuant with bias reparameterization").

For a LayerNorm whose output y = γ·x̂ + β feeds a linear layer W y + b (the qkv
projection or the first MLP layer), pick per channel c a shift μ_c (the channel mean
on calibration data) and a smoothing scale s_c (SmoothQuant, Xiao et al. 2023, Eq. 4):

    s_c = max|y_c - μ_c|^α / max|W_{:,c}|^(1-α)

and rewrite, exactly in real arithmetic,

    y' = (y - μ) / s        ->  LayerNorm γ' = γ / s,  β' = (β - μ) / s
    W y + b = W' y' + b'    ->  W' = W · diag(s),       b' = b + W μ

so the activations the quantizer sees are centred and flattened across channels,
while the model computes the same function.  A linear layer without a bias (a spec
without `qkv_bias`) has nowhere to fold W μ: it gets the smoothing scale only (μ = 0),
so the quantized spec keeps the float spec's architecture and state-dict keys.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..graph import Graph

TARGETS = {"attention": "qkv", "mlp": "fc1"}


def sqb_pairs(graph: Graph) -> list[tuple[str, str]]:
    """(LayerNorm node, linear layer) pairs where the norm's only consumer is a qkv or fc1."""
    pairs = []
    for n in graph.nodes():
        if n.op != "norm" or not n.attrs.affine:
            continue
        users = list(graph.nx.successors(n.name))
        if len(users) == 1 and graph.node(users[0]).op in TARGETS:
            pairs.append((n.name, f"{users[0]}.{TARGETS[graph.node(users[0]).op]}"))
    return pairs


@torch.no_grad()
def fold_sqb(model: nn.Module, data: torch.Tensor, alpha: float = 0.5) -> list[tuple[str, str]]:
    """Fold SQ-b into every eligible LayerNorm + linear pair of a compiled vitdsl model,
    in place.  `data`: calibration images, run through the float model (any fake
    quantizers bypassed).  Returns the pairs folded."""
    from .calibrate import float_run

    graph: Graph = model.graph
    pairs = sqb_pairs(graph)
    stats: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for norm, _ in pairs:
        def hook(mod, args, out, norm=norm):
            stats.setdefault(norm, []).append(out.detach().reshape(-1, out.shape[-1]))
        hooks.append(model.get_submodule(norm).register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with float_run(model):
            model(data)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    for norm, lin in pairs:
        y = torch.cat(stats[norm])
        ln, fc = model.get_submodule(norm), model.get_submodule(lin)
        mu = y.mean(dim=0) if fc.bias is not None else torch.zeros_like(y[0])
        act = (y - mu).abs().amax(dim=0).clamp_min(1e-5)
        wmax = fc.weight.abs().amax(dim=0).clamp_min(1e-5)
        s = (act.pow(alpha) / wmax.pow(1 - alpha)).clamp_min(1e-5)
        if fc.bias is not None:
            fc.bias.add_(fc.weight @ mu)  # b' = b + W μ (with the original W)
        fc.weight.mul_(s)  # W' = W diag(s): column c scaled by s_c
        ln.weight.div_(s)
        ln.bias.sub_(mu).div_(s)
    return pairs
