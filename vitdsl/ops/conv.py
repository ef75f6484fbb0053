"""Convolutions on images: `conv` (conv-norm-act) and `mv2` (MobileNetV2 inverted residual).

Module layouts follow timm so state_dict keys line up: a conv-norm-act is
`<node>.conv.weight` + `<node>.bn.*` (timm's ConvNormAct), and an inverted residual
holds three of them named `conv1_1x1`, `conv2_kxk`, `conv3_1x1` (timm's byobnet
BottleneckBlock, which timm's MobileViT uses as its MV2 block).
"""
from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn as nn
from pydantic import Field, field_validator

from ..interop.timm import RENAMES
from ..types import Cost, TensorType
from .base import REGISTRY, Attrs, OpDef, register_op
from .mlp import ACTIVATIONS

BN_EPS = 1e-5  # nn.BatchNorm2d's default, used by timm and the MobileViT reference code


def none_word(v: Any) -> Any:
    """`padding=none` in spec text is the word "none"; canonical text writes None that way."""
    return None if v == "none" else v


def make_act(act: str) -> nn.Module:
    return nn.Identity() if act == "none" else ACTIVATIONS[act]()


class ConvNormAct(nn.Module):
    """Conv2d -> BatchNorm2d (optional) -> activation; keys `conv.*` and `bn.*` as in timm."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, padding: int | None = None,
                 groups: int = 1, dilation: int = 1, bias: bool = False, norm: str = "bn",
                 eps: float = BN_EPS, act: str = "silu"):
        super().__init__()
        pad = kernel // 2 * dilation if padding is None else padding
        self.conv = nn.Conv2d(cin, cout, kernel, stride, pad, dilation=dilation, groups=groups, bias=bias)
        self.bn = nn.BatchNorm2d(cout, eps=eps) if norm == "bn" else nn.Identity()
        self.act = make_act(act)

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


def init_conv(m: nn.Module) -> nn.Module:
    """He (fan-out) init for convs, unit BN: the usual CNN init (timm byobnet does the same)."""
    for mod in m.modules():
        if isinstance(mod, nn.Conv2d):
            nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)
        elif isinstance(mod, nn.BatchNorm2d):
            nn.init.ones_(mod.weight)
            nn.init.zeros_(mod.bias)
    return m


def conv_out_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Output side of a convolution (the formula in torch.nn.Conv2d's docs)."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def conv_params(cin: int, cout: int, kernel: int, groups: int = 1, bias: bool = False, norm: bool = True) -> int:
    """Weights of a conv (+ bias) and the 2*cout affine parameters of its BatchNorm."""
    return cout * (cin // groups) * kernel * kernel + (cout if bias else 0) + (2 * cout if norm else 0)


def conv_macs(out_hw: int, cin: int, cout: int, kernel: int, groups: int = 1) -> int:
    """MACs of a conv: every output element sums (cin / groups) * k * k products."""
    return out_hw * cout * (cin // groups) * kernel * kernel


def need_image(node, t: TensorType) -> tuple[int, int, int]:
    if t.kind != "image":
        raise node.error(f"{node.op} needs an image (C x H x W), got {t.kind} {t}")
    return t.shape  # type: ignore[return-value]


# --------------------------------------------------------------------- conv
@register_op
class ConvOp(OpDef):
    """`conv out=16 kernel=3 stride=2`: Conv2d -> BatchNorm -> activation (timm ConvNormAct)."""

    kind = "conv"
    default_name = "conv"
    has_weights = True

    class Attrs(Attrs):
        out: int = Field(ge=1, le=1 << 20)
        kernel: int = Field(3, ge=1, le=1024)
        stride: int = Field(1, ge=1, le=1024)
        groups: int = Field(1, ge=1, le=1 << 20)
        dilation: int = Field(1, ge=1, le=1024)
        padding: int | None = Field(None, ge=0, le=1024)  # None: kernel // 2 * dilation ("same" at stride 1)
        bias: bool = False
        norm: Literal["bn", "none"] = "bn"
        eps: float = Field(BN_EPS, gt=0, lt=1)
        act: Literal["silu", "relu", "gelu", "none"] = "silu"

        _none = field_validator("padding", mode="before")(none_word)

    def padding(self, a) -> int:
        return a.kernel // 2 * a.dilation if a.padding is None else a.padding

    def infer(self, node, ins):
        a = node.attrs
        c, h, w = need_image(node, ins[0])
        if c % a.groups:
            raise node.error(f"groups={a.groups} does not divide the {c} input channels", "groups")
        if a.out % a.groups:
            raise node.error(f"groups={a.groups} does not divide out={a.out}", "groups")
        p = self.padding(a)
        oh, ow = (conv_out_size(s, a.kernel, a.stride, p, a.dilation) for s in (h, w))
        if oh < 1 or ow < 1:
            raise node.error(f"kernel {a.kernel} (dilation {a.dilation}, padding {p}) is larger than the {h}x{w} input", "kernel")
        return TensorType(kind="image", shape=(a.out, oh, ow))

    def cost(self, node, ins, out):
        a, cin = node.attrs, ins[0].channels
        _, oh, ow = out.shape
        return Cost(params=conv_params(cin, a.out, a.kernel, a.groups, a.bias, a.norm == "bn"),
                    macs=conv_macs(oh * ow, cin, a.out, a.kernel, a.groups), act_bytes=4 * out.numel)

    def build_torch(self, node, ins, out):
        a = node.attrs
        return init_conv(ConvNormAct(ins[0].channels, a.out, a.kernel, a.stride, a.padding, a.groups,
                                     a.dilation, a.bias, a.norm, a.eps, a.act))


# ---------------------------------------------------------------------- mv2
class InvertedResidual(nn.Module):
    """MobileNetV2 block (Sandler et al. 2018, Table 1): 1x1 expand -> kxk depthwise
    (stride) -> 1x1 linear projection, plus the input when stride 1 and in == out."""

    def __init__(self, cin: int, cout: int, hidden: int, kernel: int, stride: int, act: str):
        super().__init__()
        self.conv1_1x1 = ConvNormAct(cin, hidden, 1, act=act)
        self.conv2_kxk = ConvNormAct(hidden, hidden, kernel, stride, groups=hidden, act=act)
        self.conv3_1x1 = ConvNormAct(hidden, cout, 1, act="none")  # linear bottleneck: no activation
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.conv3_1x1(self.conv2_kxk(self.conv1_1x1(x)))
        return x + y if self.residual else y


@register_op
class Mv2Op(OpDef):
    """`mv2 out=64 stride=2 expand=4.0`: MobileNetV2 inverted residual (MobileViT's MV2)."""

    kind = "mv2"
    default_name = "mv2"
    has_weights = True

    class Attrs(Attrs):
        out: int = Field(ge=1, le=1 << 20)
        stride: int = Field(1, ge=1, le=1024)
        expand: float = Field(4.0, gt=0, le=1024)
        kernel: int = Field(3, ge=1, le=1024)
        act: Literal["silu", "relu", "gelu", "none"] = "silu"

    @staticmethod
    def hidden(a, cin: int) -> int:
        # int(inp * expansion) as in the MobileViT reference code (MV2Block); equal to timm's
        # make_divisible(in * 4, 8) whenever in * expand is a multiple of 8.
        return int(cin * a.expand)

    def infer(self, node, ins):
        a = node.attrs
        c, h, w = need_image(node, ins[0])
        if self.hidden(a, c) < 1:
            raise node.error(f"expand={a.expand} leaves no hidden channels for {c} input channels", "expand")
        if a.kernel % 2 == 0:  # padded kernel // 2 per side: only an odd kernel keeps the map size at stride 1
            raise node.error(f"kernel must be odd, got {a.kernel}", "kernel")
        oh, ow = (conv_out_size(s, a.kernel, a.stride, a.kernel // 2, 1) for s in (h, w))
        if oh < 1 or ow < 1:
            raise node.error(f"kernel {a.kernel} is larger than the {h}x{w} input", "kernel")
        return TensorType(kind="image", shape=(a.out, oh, ow))

    def cost(self, node, ins, out):
        a, (cin, h, w) = node.attrs, ins[0].shape
        _, oh, ow = out.shape
        m = self.hidden(a, cin)
        params = conv_params(cin, m, 1) + conv_params(m, m, a.kernel, groups=m) + conv_params(m, a.out, 1)
        macs = conv_macs(h * w, cin, m, 1) + conv_macs(oh * ow, m, m, a.kernel, m) + conv_macs(oh * ow, m, a.out, 1)
        return Cost(params=params, macs=macs, act_bytes=4 * out.numel)

    def build_torch(self, node, ins, out):
        a, cin = node.attrs, ins[0].channels
        return init_conv(InvertedResidual(cin, a.out, self.hidden(a, cin), a.kernel, a.stride, a.act))


# ------------------------------------------------------------------ timm keys
def timm_name(node, graph) -> str:
    """timm's module path for a node: the i-th stage of the spec is timm's `stages.{i}`
    (the byobnet / MobileViT layout: `s2.1` -> `stages.2.1` when s2 is the third stage);
    top-level nodes keep their names (`stem`, `final_conv`)."""
    if node.stage is None:
        return node.name
    stages = [s.name for s in graph.program if s.kind == "stage"]
    return f"stages.{stages.index(node.stage)}{node.name[len(node.stage):]}"


def node_state_keys(node, graph) -> list[str]:
    """The node's own state_dict keys (`<node>.<param>`), from a module built on the meta device."""
    with torch.device("meta"):
        m = REGISTRY[node.op].build_torch(node, [graph.node(i).out for i in node.inputs], node.out)
    return [f"{node.name}.{k}" for k in m.state_dict()]


def timm_stage_renames(node, graph) -> dict[str, str]:
    """RENAMES hook of the conv-family ops: {our key: timm key} with the stage prefix rewritten."""
    prefix = timm_name(node, graph)
    if prefix == node.name:
        return {}
    return {k: prefix + k[len(node.name):] for k in node_state_keys(node, graph)}


RENAMES["conv"] = RENAMES["mv2"] = timm_stage_renames
