"""Whole-graph checks that no single op's shape rule can see."""
from __future__ import annotations

from ..errors import SpecError
from ..graph import Graph


def validate(g: Graph) -> Graph:
    if not len(g):
        raise SpecError(f"model '{g.name}' has no statements")
    first = g.input
    if first.op != "input":
        raise SpecError("the first statement of a model must be 'input', e.g. `input image 3x224x224`", first.span)
    for n in g.nodes():
        if n.op == "input" and n is not first:
            raise SpecError("a model has one 'input'", n.span)
    out = g.output
    for n in g.nodes():
        if n is not out and g.nx.out_degree(n.name) == 0:
            raise SpecError(f"the output of '{n.name}' is never used; the model's output is '{out.name}'", n.span)
    return g
