"""The graph IR: a networkx DiGraph whose nodes are typed ops with pydantic attributes.

Every node has a hierarchical name (``blocks.3.attn``) used everywhere: diagnostics,
state_dict keys, summaries and pictures.  Edges carry data flow, residuals included;
an edge's ``slot`` is the input position at the consumer.

A Graph also keeps its *program*: the resolved statements it was expanded from
(no variables, no templates).  ``to_vit`` prints the program; the nodes and edges are
what passes and backends read.
"""
from __future__ import annotations

from typing import Any, Iterator

import networkx as nx
from pydantic import BaseModel, ConfigDict, Field

from .errors import Span, SpecError
from .ops.base import Attrs
from .types import Cost, TensorType


class Stmt(BaseModel):
    """A resolved statement: an op (maybe composite) or a stage holding a body."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    kind: str  # "op" | "stage"
    name: str  # the node or stage name it defines
    label: str | None = None  # explicit label as written (ops only)
    op: str | None = None
    attrs: Any = None  # the op's Attrs (ops) or {"depth": n} (stages)
    inputs: list[str] | None = None  # explicit from= references, as written
    body: list["Stmt"] = []
    span: Span = Field(default_factory=Span)


class Node(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    name: str
    op: str
    attrs: Attrs
    inputs: list[str] = []
    block: str | None = None  # the statement this node was expanded from (blocks.3)
    stage: str | None = None
    span: Span = Field(default_factory=Span)
    attr_spans: dict[str, Span] = {}
    input_spans: list[Span] = []
    index: int = 0  # position within its stage (alternating window shifts use it)
    out: TensorType | None = None
    scores: TensorType | None = None  # second output (port #scores) of residual attention
    cost: Cost | None = None

    def span_of(self, attr: str) -> Span:
        return self.attr_spans.get(attr, self.span)

    def error(self, message: str, attr: str | None = None) -> SpecError:
        return SpecError(message, self.span_of(attr) if attr else self.span)

    def key(self) -> tuple:
        """What makes two nodes equal: spans and inferred facts are left out."""
        return (self.name, self.op, self.attrs.model_dump(), tuple(self.inputs), self.block, self.stage)


class Graph:
    """A validated model: nodes in execution order, plus the program they came from."""

    def __init__(self, name: str, program: list[Stmt], filename: str = "<string>", source: str | None = None):
        self.name = name
        self.program = program
        self.filename = filename
        self.source = source
        self.nx = nx.DiGraph()
        self.order: list[str] = []
        self.aliases: dict[str, str] = {}  # stage/block name -> its output node
        self.max_params: int | None = None
        self.bits: dict | None = None  # layer name -> BitSpec, from the bits section

    # -- construction --------------------------------------------------------
    def add_node(self, node: Node) -> None:
        self.nx.add_node(node.name, node=node)
        self.order.append(node.name)

    def node(self, name: str) -> Node:
        return self.nx.nodes[name]["node"]

    def value_type(self, ref: str) -> TensorType:
        """Type of an input reference: `node` or `node#scores`."""
        name, _, port = ref.partition("#")
        n = self.node(name)
        return n.scores if port == "scores" else n.out

    def __contains__(self, name: str) -> bool:
        return name in self.nx

    def nodes(self) -> Iterator[Node]:
        for n in self.order:
            yield self.node(n)

    def __iter__(self) -> Iterator[Node]:
        return self.nodes()

    def __len__(self) -> int:
        return len(self.order)

    @property
    def output(self) -> Node:
        return self.node(self.order[-1])

    @property
    def input(self) -> Node:
        return self.node(self.order[0])

    # -- facts ---------------------------------------------------------------
    def total(self) -> Cost:
        p = m = a = 0
        for n in self.nodes():
            if n.cost:
                p, m, a = p + n.cost.params, m + n.cost.macs, a + n.cost.act_bytes
        return Cost(params=p, macs=m, act_bytes=a)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Graph):
            return NotImplemented
        return (self.name == other.name and [n.key() for n in self] == [n.key() for n in other]
                and self.bits == other.bits)

    def __repr__(self) -> str:
        t = self.total()
        return f"<vitdsl.Graph {self.name}: {len(self)} nodes, {t.params:,} params>"

    def to_vit(self) -> str:
        """Canonical text: ``vitdsl.loads(g.to_vit()) == g``."""
        from .canon import program_text

        return program_text(self.name, self.program)

    def summary(self) -> list[dict[str, Any]]:
        """One row per node: what `vitdsl check` prints and `build` saves as JSON."""
        rows = []
        for n in self:
            c = n.cost or Cost()
            rows.append(
                {"name": n.name, "op": n.op, "shape": str(n.out) if n.out else "?",
                 "params": c.params, "macs": c.macs, "act_bytes": c.act_bytes}
            )
        return rows
