"""The transformer MLP: fc1 -> activation -> fc2."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field

from ..types import Cost
from .base import Attrs, OpDef, register_op
from .inplace import held_only_by_caller, inference_reuse_allowed, unhooked
from .init import trunc_normal


class GELU(nn.GELU):
    """nn.GELU that can overwrite its input (`inplace=True`, used by Mlp in inference)."""

    def forward(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        if inplace:
            return torch.ops.aten.gelu_(x, approximate=self.approximate)
        return super().forward(x)


INPLACE_ACTS = ("gelu", "gelu_tanh")  # built as GELU, which Mlp runs in place in inference
ACTIVATIONS = {
    "gelu": lambda: GELU(),
    "gelu_tanh": lambda: GELU(approximate="tanh"),
    "relu": lambda: nn.ReLU(),
    "silu": lambda: nn.SiLU(),
}


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str, bias: bool):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.act = ACTIVATIONS[act]()
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x):
        h = self.fc1(x)
        if isinstance(self.act, GELU) and inference_reuse_allowed() and unhooked(self.act) and held_only_by_caller(h):
            return self.fc2(self.act(h, inplace=True))  # the hidden activation dies here: no new buffer
        return self.fc2(self.act(h))


@register_op
class MlpOp(OpDef):
    """`mlp ratio=4.0 act=gelu`: hidden width int(dim * ratio), as in timm."""

    kind = "mlp"
    default_name = "mlp"

    class Attrs(Attrs):
        ratio: float = Field(4.0, gt=0, le=1024)
        act: Literal["gelu", "gelu_tanh", "relu", "silu"] = "gelu"
        bias: bool = True

    def hidden(self, node, c: int) -> int:
        return int(c * node.attrs.ratio)

    def infer(self, node, ins):
        t = ins[0]
        if t.kind == "image":
            raise node.error(f"mlp needs tokens or a vector, got an image {t}")
        if self.hidden(node, t.channels) < 1:
            raise node.error(f"ratio={node.attrs.ratio} leaves no hidden units", "ratio")
        return t

    def cost(self, node, ins, out):
        c = out.channels
        h, b = self.hidden(node, c), node.attrs.bias
        tokens = out.shape[0] if out.kind == "tokens" else 1
        return Cost(params=2 * c * h + ((h + c) if b else 0), macs=2 * tokens * c * h, act_bytes=4 * out.numel)

    def build_torch(self, node, ins, out):
        c = out.channels
        m = Mlp(c, self.hidden(node, c), node.attrs.act, node.attrs.bias)
        for lin in (m.fc1, m.fc2):
            trunc_normal(lin.weight, std=0.02)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        return m

    def workspace(self, node, ins, out):
        """fc1's output and the activation's are both alive while the activation runs
        (2 hidden), then the activation's and fc2's (hidden + output): the larger,
        beyond the output.  GELU runs in place in inference (Mlp.forward): 1 hidden."""
        c = out.channels
        tokens = out.shape[0] if out.kind == "tokens" else 1
        hidden = self.hidden(node, c)
        during_act = hidden if node.attrs.act in INPLACE_ACTS else 2 * hidden
        return 4 * tokens * (max(during_act, hidden + c) - c)
