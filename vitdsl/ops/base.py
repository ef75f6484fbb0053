"""The op registry: one OpDef per op kind holds its schema, shape rule, cost rule
and torch builder.  Built-in ops live in sibling modules; users register their own
with :func:`register_op`, and specs can use them at once."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from ..errors import Span, SpecError, did_you_mean
from ..types import Cost, TensorType

if TYPE_CHECKING:  # pragma: no cover
    import torch.nn as nn

    from ..graph import Node


class Attrs(BaseModel):
    """Base of every op's attribute schema: immutable, no unknown fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class SubNode(BaseModel):
    """One primitive node produced when a composite op expands."""

    suffix: str  # appended to the composite's name: "norm1" -> blocks.3.norm1
    op: str
    attrs: dict[str, Any]
    inputs: list[str]  # suffixes of earlier sub-nodes, or "<in>" for the composite's input
    spans_from: dict[str, str] = {}  # sub-attr -> composite attr whose span it inherits


class OpDef:
    """Definition of one op kind.  Subclass, set the class attributes, override rules."""

    kind: ClassVar[str]
    Attrs: ClassVar[type[Attrs]]
    doc: ClassVar[str] = ""
    positional: ClassVar[tuple[str, ...]] = ()  # fields that bare values fill, in order
    default_name: ClassVar[str | None] = None  # node name when the statement has no label
    inputs: ClassVar[tuple[int, int | None]] = (1, 1)  # min, max (None: unbounded)
    word_fields: ClassVar[tuple[str, ...]] = ()  # fields a bare word of the same name sets
    composite: ClassVar[bool] = False
    has_weights: ClassVar[bool] = False
    # In inference the module may write its output into an input that dies at its step
    # (it then takes `into=k`; vitdsl.ops.inplace): the executor and the memory model ask.
    reuses_dead_input: ClassVar[bool] = False

    # -- rules ---------------------------------------------------------------
    def infer(self, node: "Node", ins: list[TensorType]) -> TensorType:
        """Shape rule: output type from input types.  Raise node.error(...) on misuse."""
        return ins[0]

    def cost(self, node: "Node", ins: list[TensorType], out: TensorType) -> Cost:
        """Cost rule: params and MACs per sample.  Must equal what build_torch makes."""
        return Cost(act_bytes=4 * out.numel)

    def workspace(self, node: "Node", ins: list[TensorType], out: TensorType) -> int:
        """Working-memory rule: fp32 bytes per sample that the op's forward holds *beyond
        its output* (``cost(...).act_bytes``) at its own high-water mark, its inputs not
        counted (they are alive anyway).  So while the op runs, memory in use peaks at
        live inputs + output + workspace.  Temporaries count in full if they are alive
        at that moment, even when freed before the output is allocated (the MLP's two
        hidden activations, for instance).  Default 0: the op allocates only its
        output.  Used by :mod:`vitdsl.passes.memory`."""
        return 0

    def build_torch(self, node: "Node", ins: list[TensorType], out: TensorType) -> "nn.Module":
        raise NotImplementedError(f"op '{self.kind}' has no torch builder")

    def expand(self, attrs: Attrs) -> list[SubNode]:
        """Composite ops only: the primitive nodes this op stands for."""
        raise NotImplementedError

    def defaults_for(self, name: str) -> dict[str, Any]:
        return {}


REGISTRY: dict[str, OpDef] = {}


def register_op(cls: type[OpDef]) -> type[OpDef]:
    """Class decorator: make an op kind usable in specs, the builder API and backends."""
    if not getattr(cls, "kind", None):
        raise TypeError("an OpDef needs a 'kind'")
    REGISTRY[cls.kind] = cls()
    return cls


def get_op(kind: str, span: Span | None = None) -> OpDef:
    if kind not in REGISTRY:
        raise SpecError(f"unknown op '{kind}'{did_you_mean(kind, set(REGISTRY))}", span)
    return REGISTRY[kind]


def validate_attrs(op: OpDef, values: dict[str, Any], spans: dict[str, Span], where: Span | None) -> Attrs:
    """Check values against the op's schema; errors point at the offending attribute."""
    fields = op.Attrs.model_fields
    for key in values:
        if key not in fields:
            raise SpecError(
                f"unknown attribute '{key}' for {op.kind}{did_you_mean(key, set(fields))}",
                spans.get(key, where),
            )
    try:
        return op.Attrs.model_validate(values)
    except ValidationError as e:
        err = e.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else ""
        got = values.get(field, None)
        msg = err["msg"]
        if err["type"] == "missing":
            raise SpecError(f"{op.kind} needs attribute '{field}'", where) from None
        msg = msg[0].lower() + msg[1:]
        raise SpecError(f"invalid value {format_value(got)} for '{field}' of {op.kind}: {msg}", spans.get(field, where)) from None


def format_value(v: Any) -> str:
    """A value as it would be written in a spec."""
    from ..canon import value_text

    return value_text(v)
