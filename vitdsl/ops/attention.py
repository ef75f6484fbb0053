"""Multi-head self-attention over tokens."""
from __future__ import annotations

from typing import Literal

import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from ..types import Cost
from .base import Attrs, OpDef, register_op


class Attention(nn.Module):
    """qkv projection, scaled dot-product attention (fused SDPA), output projection."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool, proj_bias: bool):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, nh, N, hs)
        x = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(hs)) v
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


@register_op
class AttentionOp(OpDef):
    """`attention heads=6 qkv_bias`: global multi-head self-attention."""

    kind = "attention"
    default_name = "attn"

    class Attrs(Attrs):
        heads: int = Field(ge=1, le=4096)
        attn: Literal["global"] = "global"
        qkv_bias: bool = False
        proj_bias: bool = True
        dim: int | None = Field(None, ge=1)  # optional check of the input width

    def infer(self, node, ins):
        t, a = ins[0], node.attrs
        if t.kind != "tokens":
            raise node.error(f"attention needs tokens, got {t.kind} {t}")
        c = t.channels
        if a.dim is not None and a.dim != c:
            raise node.error(f"dim={a.dim} but the input has {c} channels", "dim")
        if c % a.heads:
            raise node.error(f"dim {c} is not divisible by heads {a.heads}", "heads")
        return t

    def cost(self, node, ins, out):
        a = node.attrs
        n, c = out.shape
        params = 3 * c * c + (3 * c if a.qkv_bias else 0) + c * c + (c if a.proj_bias else 0)
        macs = n * c * 3 * c + 2 * n * n * c + n * c * c  # qkv, q k^T and A v, proj
        return Cost(params=params, macs=macs, act_bytes=4 * out.numel)

    def build_torch(self, node, ins, out):
        a = node.attrs
        m = Attention(out.channels, a.heads, a.qkv_bias, a.proj_bias)
        for lin in (m.qkv, m.proj):
            nn.init.trunc_normal_(lin.weight, std=0.02)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        return m
