"""Layout changes between token sequences and feature maps, for hybrid models."""
from __future__ import annotations

import torch.nn as nn

from ..types import Cost, TensorType
from .base import Attrs, OpDef, register_op


class ToImage(nn.Module):
    def __init__(self, grid: tuple[int, int]):
        super().__init__()
        self.grid = grid

    def forward(self, x):
        B, N, C = x.shape
        return x.transpose(1, 2).reshape(B, C, *self.grid)  # (B, N, C) -> (B, C, h, w)


class ToTokens(nn.Module):
    def forward(self, x):
        return x.flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, h*w, C)


@register_op
class ToImageOp(OpDef):
    """`to_image`: patch tokens on a grid -> a C x h x w feature map."""

    kind = "to_image"
    default_name = "to_image"

    class Attrs(Attrs):
        pass

    def infer(self, node, ins):
        t = ins[0]
        if t.kind != "tokens" or t.grid is None or t.prefix:
            raise node.error(f"to_image needs patch tokens on a grid without class tokens, got {t.kind} {t}")
        return TensorType(kind="image", shape=(t.channels, *t.grid))

    def build_torch(self, node, ins, out):
        return ToImage(ins[0].grid)


@register_op
class ToTokensOp(OpDef):
    """`to_tokens`: a C x h x w feature map -> h*w tokens on that grid."""

    kind = "to_tokens"
    default_name = "to_tokens"

    class Attrs(Attrs):
        pass

    def infer(self, node, ins):
        t = ins[0]
        if t.kind != "image":
            raise node.error(f"to_tokens needs an image, got {t.kind} {t}")
        c, h, w = t.shape
        return TensorType(kind="tokens", shape=(h * w, c), grid=(h, w))

    def build_torch(self, node, ins, out):
        return ToTokens()
