"""Where paths join: residual additions."""
from __future__ import annotations

import torch.nn as nn

from ..errors import SpecError
from ..types import Cost
from .base import Attrs, OpDef, register_op


class Add(nn.Module):
    def forward(self, *xs):
        out = xs[0]
        for x in xs[1:]:
            out = out + x
        return out


@register_op
class AddOp(OpDef):
    """`add from=(a, b)`: elementwise sum; every input must have the same shape."""

    kind = "add"
    default_name = "add"
    inputs = (2, None)

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
