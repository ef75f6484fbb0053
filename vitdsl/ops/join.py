"""Where paths join: residual additions."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import SpecError
from ..types import Cost, TensorType
from .base import Attrs, OpDef, register_op
from .inplace import same_layout


class Add(nn.Module):
    """Elementwise sum.  In inference the executor may hand over an input that nothing
    else holds (`into=k`; vitdsl.ops.inplace): the sum is then written into it instead
    of a new tensor.  Same additions in the same order, so bit-identical."""

    def forward(self, *xs, into: int | None = None):
        if into is not None and _can_write_into(xs, into):
            out = xs[into]
            for j, x in enumerate(xs):
                if j != into:
                    out.add_(x)  # into is 0, or the other of two inputs: a + b == b + a exactly
            return out
        out = xs[0]
        for x in xs[1:]:
            out = out + x
        return out


def _can_write_into(xs: tuple, k: int) -> bool:
    return (k == 0 or len(xs) == 2) and same_layout(xs)


@register_op
class AddOp(OpDef):
    """`add from=(a, b)`: elementwise sum; every input must have the same shape."""

    kind = "add"
    default_name = "add"
    inputs = (2, None)
    reuses_dead_input = True  # its module takes `into=k` (vitdsl.ops.inplace)

    class Attrs(Attrs):
        pass

    def infer(self, node, ins):
        first = ins[0]
        for src, t in zip(node.inputs[1:], ins[1:]):
            if t.kind != first.kind or t.shape != first.shape:
                where = node.input_spans[0] if node.input_spans else node.span
                raise SpecError(
                    f"shape mismatch where paths join: '{node.inputs[0]}' gives {first.kind} {first}, "
                    f"'{src}' gives {t.kind} {t}", where)
        return first

    def cost(self, node, ins, out):
        return Cost(act_bytes=4 * out.numel)

    def build_torch(self, node, ins, out):
        return Add()


class Concat(nn.Module):
    def forward(self, *xs):
        return torch.cat(xs, dim=-1 if xs[0].dim() != 4 else 1)


@register_op
class ConcatOp(OpDef):
    """`concat from=(a, b)`: join along channels; vectors, tokens of one length, or images
    of one size."""

    kind = "concat"
    default_name = "cat"
    inputs = (2, None)

    class Attrs(Attrs):
        pass

    def infer(self, node, ins):
        first = ins[0]
        for src, t in zip(node.inputs[1:], ins[1:]):
            same = t.kind == first.kind and (t.shape[1:] if t.kind == "image" else t.shape[:-1]) == (
                first.shape[1:] if first.kind == "image" else first.shape[:-1])
            if not same:
                where = node.input_spans[0] if node.input_spans else node.span
                raise SpecError(f"cannot concatenate: '{node.inputs[0]}' gives {first.kind} {first}, "
                                f"'{src}' gives {t.kind} {t}", where)
        c = sum(t.channels for t in ins)
        if first.kind == "image":
            return TensorType(kind="image", shape=(c, *first.shape[1:]))
        if first.kind == "tokens":
            return first.model_copy(update={"shape": (first.shape[0], c)})
        return TensorType(kind="vector", shape=(c,))

    def cost(self, node, ins, out):
        return Cost(act_bytes=4 * out.numel)

    def build_torch(self, node, ins, out):
        return Concat()
