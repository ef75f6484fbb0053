"""Cost: params, MACs and activation bytes per node, and the parameter budget."""
from __future__ import annotations

from ..errors import SpecError
from ..graph import Graph
from ..ops.base import REGISTRY

DEFAULT_MAX_PARAMS = 10**10


def cost(g: Graph) -> Graph:
    for n in g.nodes():
        n.cost = REGISTRY[n.op].cost(n, [g.value_type(i) for i in n.inputs], n.out)
    return g


def check_budget(g: Graph, max_params: int | None = DEFAULT_MAX_PARAMS) -> Graph:
    """Refuse a model over budget before any tensor is allocated."""
    if max_params is None:
        return g
    total = g.total().params
    if total > max_params:
        worst = max(g.nodes(), key=lambda n: n.cost.params if n.cost else 0)
        raise SpecError(
            f"model has {total:,} parameters, over the budget of {max_params:,} "
            f"(largest: '{worst.name}' with {worst.cost.params:,}); raise it with max_params= or --max-params",
            worst.span,
        )
    g.max_params = max_params
    return g
