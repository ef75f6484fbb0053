"""The per-tap transform of a named shortcut (ExMobileViT's ExShortcut, Yang et al. 2023, §3.2):
a stage's output goes through conv1x1-BN-act to the tap's width, then a global mean pool."""
from __future__ import annotations

from typing import Literal

import torch.nn as nn
from pydantic import Field

from ..types import Cost, TensorType
from .base import Attrs, OpDef, register_op
from .conv import make_act


class Tap(nn.Module):
    def __init__(self, cin: int, out: int, grid: tuple[int, int] | None, norm: str, act: str):
        super().__init__()
        self.grid = grid  # tokens on a grid are laid out as a map first
        self.conv = nn.Conv2d(cin, out, 1, bias=norm == "none")
        self.bn = nn.BatchNorm2d(out) if norm == "bn" else nn.Identity()
        self.act = make_act(act)

    def forward(self, x):
        if self.grid is not None:
            B, N, C = x.shape
            x = x.transpose(1, 2).reshape(B, C, *self.grid)
        return self.act(self.bn(self.conv(x))).mean(dim=(2, 3))  # (B, out)


@register_op
class TapOp(OpDef):
    """`tap out=128 act=silu`: what `shortcut NAME from STAGE -> 128 ...` creates per tap."""

    kind = "tap"
    default_name = "tap"

    class Attrs(Attrs):
        out: int = Field(ge=1)
        act: Literal["silu", "relu", "gelu", "none"] = "silu"
        norm: Literal["bn", "none"] = "bn"
        pool: Literal["mean"] = "mean"

    def infer(self, node, ins):
        t = ins[0]
        if t.kind == "vector" or (t.kind == "tokens" and (t.grid is None or t.prefix)):
            raise node.error(f"a shortcut taps a feature map or patch tokens on a grid; '{node.inputs[0]}' gives {t.kind} {t}")
        return TensorType(kind="vector", shape=(node.attrs.out,))

    def cost(self, node, ins, out):
        t, a = ins[0], node.attrs
        c, hw = t.channels, (t.shape[1] * t.shape[2] if t.kind == "image" else t.shape[0])
        params = c * a.out + (2 * a.out if a.norm == "bn" else a.out)
        return Cost(params=params, macs=hw * c * a.out, act_bytes=4 * a.out)

    def build_torch(self, node, ins, out):
        t, a = ins[0], node.attrs
        return Tap(t.channels, a.out, t.grid if t.kind == "tokens" else None, a.norm, a.act)
