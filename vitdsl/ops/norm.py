"""Normalisation layers."""
from __future__ import annotations

from typing import Literal

import torch.nn as nn
from pydantic import Field

from ..types import Cost
from .base import Attrs, OpDef, register_op


@register_op
class Norm(OpDef):
    """`norm layernorm eps=1e-6`: LayerNorm over the channel (last) dimension."""

    kind = "norm"
    default_name = "norm"
    positional = ("kind",)

    class Attrs(Attrs):
        kind: Literal["layernorm"] = "layernorm"
        eps: float = Field(1e-5, gt=0, lt=1)
        affine: bool = True

    def infer(self, node, ins):
        t = ins[0]
        if t.kind == "image":
            raise node.error(f"layernorm needs tokens or a vector, got an image {t}")
        return t

    def cost(self, node, ins, out):
        return Cost(params=2 * out.channels if node.attrs.affine else 0, act_bytes=4 * out.numel)

    def build_torch(self, node, ins, out):
        return nn.LayerNorm(out.channels, eps=node.attrs.eps, elementwise_affine=node.attrs.affine)
