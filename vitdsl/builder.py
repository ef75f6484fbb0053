"""Build a graph from Python, without text.

    b = vitdsl.Builder("tiny")
    b.input("image", (3, 32, 32))
    b.embed("patch", size=8, dim=64)
    b.tokens(cls=1)
    with b.stage("blocks", depth=2):
        b.transformer(heads=2, qkv_bias=True)
    b.norm("layernorm", eps=1e-6)
    b.head(pool="cls", classes=10)
    g = b.build()          # the same Graph as the equivalent .vit text

Every registered op kind, custom ones included, is a method.  Values go through the
same schema checks as spec text.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

from .errors import SpecError
from .expand import StageAttrs, build_graph
from .graph import Graph, Stmt
from .ops.base import get_op, validate_attrs
from .passes.cost import DEFAULT_MAX_PARAMS


class Builder:
    def __init__(self, name: str):
        self.name = name
        self.program: list[Stmt] = []
        self._body: list[Stmt] = self.program

    def add(self, op: str, *positional: Any, label: str | None = None, inputs: "str | list[str] | None" = None, **attrs: Any) -> "Builder":
        """Append one op statement; `inputs` is the spec's from=."""
        opdef = get_op(op)
        if len(positional) > len(opdef.positional):
            raise SpecError(f"{op} takes {len(opdef.positional)} positional value(s), got {len(positional)}")
        values = dict(zip(opdef.positional, positional))
        values.update(attrs)
        validated = validate_attrs(opdef, values, {}, None)
        refs = [inputs] if isinstance(inputs, str) else list(inputs) if inputs else None
        self._body.append(Stmt(kind="op", name=label or "", label=label, op=op, attrs=validated, inputs=refs))
        return self

    def __getattr__(self, op: str):
        if op.startswith("_"):
            raise AttributeError(op)
        return lambda *p, **kw: self.add(op, *p, **kw)

    @contextlib.contextmanager
    def stage(self, name: str, depth: int = 1, **attrs: Any) -> Iterator["Builder"]:
        """Statements added inside the block form the stage's body, repeated `depth` times."""
        if self._body is not self.program:
            raise SpecError("stages cannot nest")
        sa = StageAttrs(depth=depth, **attrs)
        st = Stmt(kind="stage", name=name, attrs=sa.model_dump(exclude_defaults=True) | {"depth": sa.depth})
        self.program.append(st)
        self._body = st.body
        try:
            yield self
        finally:
            self._body = self.program

    def build(self, max_params: int | None = DEFAULT_MAX_PARAMS) -> Graph:
        from .api import run_passes

        return run_passes(build_graph(self.name, self.program), max_params)
