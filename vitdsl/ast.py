"""The AST of a .vit file: pydantic models, each carrying the span it came from.

The AST keeps what the user wrote (variables, templates, expressions);
`vitdsl.expand` turns it into a graph with every value resolved.
"""
from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, Field

from .errors import Span


class _Node(BaseModel):
    span: Span = Field(default_factory=Span)


# ---------------------------------------------------------------- expressions
class Num(_Node):
    kind: Literal["num"] = "num"
    value: Union[int, float]
    text: str = ""  # as written, so `fmt` keeps 1e-6 rather than 1e-06


class Str(_Node):
    kind: Literal["str"] = "str"
    value: str


class Size(_Node):
    kind: Literal["size"] = "size"
    dims: tuple[int, ...]


class Ref(_Node):
    """A bare word or dotted name: a variable, an enum word, or a node name."""

    kind: Literal["ref"] = "ref"
    parts: tuple[str, ...]

    @property
    def dotted(self) -> str:
        return ".".join(self.parts)


class BinOp(_Node):
    kind: Literal["binop"] = "binop"
    op: Literal["+", "-", "*", "/", "//"]
    left: "Expr"
    right: "Expr"


class Neg(_Node):
    kind: Literal["neg"] = "neg"
    operand: "Expr"


class TupleExpr(_Node):
    kind: Literal["tuple"] = "tuple"
    items: list["Expr"]


class Call(_Node):
    """`window(7, shift=alternate)`: a structured attribute value."""

    kind: Literal["call"] = "call"
    name: str
    args: list["Arg"]


Expr = Union[Num, Str, Size, Ref, BinOp, Neg, TupleExpr, Call]


class Arg(_Node):
    """`key=value` (key set) or a positional value / flag (key None)."""

    key: str | None = None
    value: Expr


# ---------------------------------------------------------------- statements
class LetStmt(_Node):
    kind: Literal["let"] = "let"
    name: str
    value: Expr


class OpStmt(_Node):
    kind: Literal["op"] = "op"
    label: str | None = None
    op: str
    op_span: Span = Field(default_factory=Span)
    args: list[Arg] = []


class StageStmt(_Node):
    kind: Literal["stage"] = "stage"
    name: str
    args: list[Arg] = []
    body: list["Stmt"] = []


class BitsRule(_Node):
    selector: str
    spec: str


class BitsBlock(_Node):
    kind: Literal["bits"] = "bits"
    rules: list[BitsRule] = []


class Tap(_Node):
    ref: Ref
    width: Expr


class ShortcutStmt(_Node):
    kind: Literal["shortcut"] = "shortcut"
    name: str
    taps: list[Tap]
    args: list[Arg] = []
    into: Ref | None = None


Stmt = Union[LetStmt, OpStmt, StageStmt, BitsBlock, ShortcutStmt]


class ModelDef(_Node):
    kind: Literal["model"] = "model"
    name: str
    template: bool = False
    extends: str | None = None
    extends_span: Span | None = None
    body: list[Stmt] = []


class ImportStmt(_Node):
    kind: Literal["import"] = "import"
    path: str


class Comment(BaseModel):
    line: int
    text: str
    own_line: bool  # True when nothing but whitespace precedes it


class SpecFile(BaseModel):
    filename: str = "<string>"
    source: str = ""
    items: list[Union[ImportStmt, LetStmt, ModelDef]] = []
    comments: list[Comment] = []


for _m in (BinOp, Neg, TupleExpr, Call, Arg, StageStmt, ModelDef):
    _m.model_rebuild()
