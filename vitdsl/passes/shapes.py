"""Shape inference: give every node its output type, in execution order."""
from __future__ import annotations

from ..graph import Graph
from ..ops.base import REGISTRY


def infer_shapes(g: Graph) -> Graph:
    for n in g.nodes():
        ins = [g.value_type(i) for i in n.inputs]
        n.out = REGISTRY[n.op].infer(n, ins)
    return g
