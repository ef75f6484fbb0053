"""A learnable scalar shared by several nodes (ReViT's α)."""
from __future__ import annotations

import torch
import torch.nn as nn
from pydantic import Field

from ..types import Cost, TensorType
from .base import Attrs, OpDef, register_op


class Scalar(nn.Module):
    def __init__(self, init: float):
        super().__init__()
        self.value = nn.Parameter(torch.full((1,), init))

    def forward(self):
        return self.value


@register_op
class ScalarOp(OpDef):
    """`alpha: scalar init=0.5`: one learnable number; its users take it as an input."""

    kind = "scalar"
    default_name = "scalar"
    inputs = (0, 0)

    class Attrs(Attrs):
        init: float = Field(0.0, ge=-1e6, le=1e6)

    def infer(self, node, ins):
        return TensorType(kind="vector", shape=(1,))

    def cost(self, node, ins, out):
        return Cost(params=1, act_bytes=4)

    def build_torch(self, node, ins, out):
        return Scalar(node.attrs.init)
