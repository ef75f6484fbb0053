"""LayerScale (Touvron et al., "Going deeper with image transformers", 2021, §2.1):
a learned per-channel scale on a residual branch, initialised to a small value."""
from __future__ import annotations

import torch
import torch.nn as nn
from pydantic import Field

from ..types import Cost
from .base import Attrs, OpDef, register_op


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x):
        return x * self.gamma


@register_op
class LayerScaleOp(OpDef):
    """`layer_scale init=1e-5`: x * gamma, gamma per channel."""

    kind = "layer_scale"
    default_name = "ls"

    class Attrs(Attrs):
        init: float = Field(1e-5, gt=0, le=1e6)

    def infer(self, node, ins):
        t = ins[0]
        if t.kind == "image":
            raise node.error(f"layer_scale needs tokens or a vector, got an image {t}")
        return t

    def cost(self, node, ins, out):
        return Cost(params=out.channels, act_bytes=4 * out.numel)

    def build_torch(self, node, ins, out):
        return LayerScale(out.channels, node.attrs.init)
