"""Model boundary ops: the input image, pooling (tokens or image) and the classifier head."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field

from ..interop.timm import RENAMES
from ..types import Cost, TensorType
from .base import Attrs, OpDef, register_op
from .init import trunc_normal


@register_op
class Input(OpDef):
    """`input image 3x224x224`: the model's one input, channels x height x width."""

    kind = "input"
    default_name = "input"
    positional = ("kind", "size")
    size_fields = ("size",)
    inputs = (0, 0)

    class Attrs(Attrs):
        kind: Literal["image"] = "image"
        size: tuple[int, int, int]

    def infer(self, node, ins):
        c, h, w = node.attrs.size
        if min(c, h, w) < 1:
            raise node.error(f"input size {c}x{h}x{w} must be positive in every dimension", "size")
        if c * h * w > 2**31:
            raise node.error(f"input size {c}x{h}x{w} is too large", "size")
        return TensorType(kind="image", shape=(c, h, w))

    def build_torch(self, node, ins, out):
        return nn.Identity()


def _pool(x: torch.Tensor, how: str, prefix: int) -> torch.Tensor:
    if x.dim() == 4:
        return x.mean(dim=(2, 3))  # (B, C, H, W) -> (B, C): global average pooling
    if how == "cls":
        return x[:, 0]  # (B, N, C) -> (B, C): the first class token
    return x[:, prefix:].mean(dim=1)  # mean over patch tokens, class tokens excluded


def _pooled(node, t: TensorType, how: str | None, attr: str) -> TensorType:
    if t.kind == "image":
        if how != "mean":
            raise node.error(f"an image ({t}) pools with pool=mean (global average), not {how}", attr)
    elif t.kind != "tokens":
        raise node.error(f"{node.op} pool={how} needs tokens or an image, but its input is {t.kind} {t}", attr)
    elif how == "cls" and t.prefix < 1:
        raise node.error("pool=cls needs a class token; add `tokens cls=1` or use pool=mean", attr)
    return TensorType(kind="vector", shape=(t.channels,))


class _Pool(nn.Module):
    def __init__(self, how: str, prefix: int):
        super().__init__()
        self.how, self.prefix = how, prefix

    def forward(self, x):
        return _pool(x, self.how, self.prefix)


@register_op
class Pool(OpDef):
    """`pool mean`: tokens or an image -> one vector (class token, mean of patch tokens,
    or the global average over H and W)."""

    kind = "pool"
    default_name = "pool"
    positional = ("kind",)

    class Attrs(Attrs):
        kind: Literal["cls", "mean"]

    def infer(self, node, ins):
        return _pooled(node, ins[0], node.attrs.kind, "kind")

    def cost(self, node, ins, out):
        return Cost(act_bytes=4 * out.numel)

    def build_torch(self, node, ins, out):
        return _Pool(node.attrs.kind, ins[0].prefix)


class HeadLinear(nn.Linear):
    """Pool (optional) then a linear classifier; weights sit at `head.weight` as in timm."""

    def __init__(self, cin: int, classes: int, bias: bool, pool: str | None, prefix: int):
        super().__init__(cin, classes, bias=bias)
        self.pool, self.prefix = pool, prefix

    def forward(self, x):
        if self.pool is not None:
            x = _pool(x, self.pool, self.prefix)
        return super().forward(x)


@register_op
class Head(OpDef):
    """`head pool=cls classes=1000`: the classifier (on tokens, an image or a vector)."""

    kind = "head"
    default_name = "head"

    class Attrs(Attrs):
        classes: int = Field(ge=1, le=10**7)
        pool: Literal["cls", "mean"] | None = None
        bias: bool = True

    def infer(self, node, ins):
        t = ins[0]
        if t.kind in ("tokens", "image"):
            if node.attrs.pool is None:
                raise node.error(f"head on {t.kind} needs pool=" + ("cls or pool=mean" if t.kind == "tokens" else "mean"))
            t = _pooled(node, t, node.attrs.pool, "pool")
        elif node.attrs.pool is not None:
            raise node.error(f"head input is already a {t.kind} ({t}); drop pool=", "pool")
        return TensorType(kind="vector", shape=(node.attrs.classes,))

    def cost(self, node, ins, out):
        cin, k = ins[0].channels, node.attrs.classes
        return Cost(params=cin * k + (k if node.attrs.bias else 0), macs=cin * k, act_bytes=4 * k)

    def build_torch(self, node, ins, out):
        a = node.attrs
        m = HeadLinear(ins[0].channels, a.classes, a.bias, a.pool, ins[0].prefix if ins[0].kind == "tokens" else 0)
        trunc_normal(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
        return m


def _head_renames(n, g) -> dict[str, str]:
    # timm's CNN-style models (MobileViT, byobnet) pool an image in a ClassifierHead whose
    # linear layer is `head.fc`; its ViTs keep a bare Linear at `head` (our layout).
    if g.node(n.inputs[0]).out.kind != "image":
        return {}
    return {f"{n.name}.{k}": f"{n.name}.fc.{k}" for k in ("weight", "bias")}


RENAMES["head"] = _head_renames
