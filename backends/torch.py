"""The torch backend: a validated Graph -> an nn.Module.

Each node's module sits at the node's own name (``blocks.3.attn``), so state_dict keys,
diagnostics and summaries share one naming scheme.  The forward pass runs the nodes
in the graph's execution order; under torch.compile / torch.export the loop unrolls.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from vitdsl.graph import Graph
from vitdsl.ops.base import REGISTRY


class VitModel(nn.Module):
    """A compiled vitdsl graph.  ``model.graph`` is the graph it came from."""

    def __init__(self, graph: Graph):
        super().__init__()
        self.graph_name = graph.name
        plan: list[tuple[str, tuple[int, ...]]] = []
        slot = {name: i for i, name in enumerate(graph.order)}
        for n in graph.nodes():
            ins = [graph.node(i).out for i in n.inputs]
            module = REGISTRY[n.op].build_torch(n, ins, n.out)
            _place(self, n.name, module)
            plan.append((n.name, tuple(slot[i] for i in n.inputs)))
        # Plain attributes (not registered twice): the modules in execution order.
        self._steps = [(self.get_submodule(name), ins) for name, ins in plan]
        self.__dict__["graph"] = graph

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values: list[torch.Tensor] = []
        for module, ins in self._steps:
            values.append(module(*[values[i] for i in ins]) if ins else module(x))
        return values[-1]


def _place(root: nn.Module, name: str, module: nn.Module) -> None:
    """Register `module` at dotted path `name`, creating plain containers on the way."""
    parent = root
    *path, leaf = name.split(".")
    for part in path:
        child = parent._modules.get(part)
        if child is None:
            child = nn.Module()
            parent.add_module(part, child)
        parent = child
    parent.add_module(leaf, module)


def compile_torch(graph: Graph, seed: int | None = 0, **options) -> VitModel:
    """Build the module; with a seed, initialisation is the same on every call."""
    if options:
        raise TypeError(f"unknown option(s) for the torch backend: {', '.join(sorted(options))}")
    if seed is None:
        return VitModel(graph)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return VitModel(graph)
