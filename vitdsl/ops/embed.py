"""Image -> tokens: patch embedding, class tokens and position embeddings."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field

from ..types import Cost, TensorType
from .base import Attrs, OpDef, register_op
from .init import trunc_normal


class PatchEmbed(nn.Module):
    """Conv with kernel = stride = patch, then (B, C, h, w) -> (B, h*w, C)."""

    def __init__(self, cin: int, dim: int, patch: int, bias: bool, norm: str, eps: float):
        super().__init__()
        self.proj = nn.Conv2d(cin, dim, kernel_size=patch, stride=patch, bias=bias)
        self.norm = nn.LayerNorm(dim, eps=eps) if norm == "layernorm" else nn.Identity()

    def forward(self, x):
        x = self.proj(x)  # (B, D, h, w)
        return self.norm(x.flatten(2).transpose(1, 2))  # (B, h*w, D)


@register_op
class Embed(OpDef):
    """`embed patch size=16 dim=768`: non-overlapping patches projected to tokens."""

    kind = "embed"
    default_name = "patch_embed"
    positional = ("kind",)

    class Attrs(Attrs):
        kind: Literal["patch"] = "patch"
        size: int = Field(ge=1, le=4096)
        dim: int = Field(ge=1)
        norm: Literal["none", "layernorm"] = "none"
        eps: float = Field(1e-6, gt=0)
        bias: bool = True

    def infer(self, node, ins):
        t, p = ins[0], node.attrs.size
        if t.kind != "image":
            raise node.error(f"patch embedding needs an image, got {t.kind} {t}")
        c, h, w = t.shape
        if h % p or w % p:
            raise node.error(f"image size {h}x{w} is not divisible by the patch size {p}", "size")
        gh, gw = h // p, w // p
        return TensorType(kind="tokens", shape=(gh * gw, node.attrs.dim), grid=(gh, gw))

    def cost(self, node, ins, out):
        a, c = node.attrs, ins[0].channels
        params = c * a.size * a.size * a.dim + (a.dim if a.bias else 0) + (2 * a.dim if a.norm == "layernorm" else 0)
        return Cost(params=params, macs=out.shape[0] * a.dim * c * a.size * a.size, act_bytes=4 * out.numel)

    def build_torch(self, node, ins, out):
        a = node.attrs
        m = PatchEmbed(ins[0].channels, a.dim, a.size, a.bias, a.norm, a.eps)
        trunc_normal(m.proj.weight, std=0.02)
        if m.proj.bias is not None:
            nn.init.zeros_(m.proj.bias)
        return m


class Tokens(nn.Module):
    """Prepend class (and distillation) tokens, add a learned position embedding."""

    def __init__(self, dim: int, n: int, cls: int, dist: bool, pos: str, pos_prefix: bool):
        super().__init__()
        self.prefix = cls + int(dist)
        self.pos_prefix = pos_prefix
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cls else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, dim)) if dist else None
        npos = n + (self.prefix if pos_prefix else 0)
        self.pos_embed = nn.Parameter(torch.zeros(1, npos, dim)) if pos == "learned" else None

    def forward(self, x):
        B = x.shape[0]
        extra = [t.expand(B, -1, -1) for t in (self.cls_token, self.dist_token) if t is not None]
        if self.pos_embed is not None and not self.pos_prefix:
            x = x + self.pos_embed
        if extra:
            x = torch.cat(extra + [x], dim=1)  # (B, prefix + N, C)
        if self.pos_embed is not None and self.pos_prefix:
            x = x + self.pos_embed
        return x


@register_op
class TokensOp(OpDef):
    """`tokens cls=1 pos=learned`: class token(s) and a learned position embedding."""

    kind = "tokens"
    default_name = "tokens"

    class Attrs(Attrs):
        cls: int = Field(1, ge=0, le=1)
        dist: bool = False
        pos: Literal["learned", "none"] = "learned"
        pos_prefix: bool = True  # the embedding also covers class tokens (timm's default)

    def infer(self, node, ins):
        t = ins[0]
        if t.kind != "tokens" or t.prefix:
            raise node.error(f"tokens needs patch tokens without class tokens, got {t.kind} {t}")
        prefix = node.attrs.cls + int(node.attrs.dist)
        return TensorType(kind="tokens", shape=(t.shape[0] + prefix, t.channels), grid=t.grid, prefix=prefix)

    def cost(self, node, ins, out):
        a, c = node.attrs, ins[0].channels
        prefix = a.cls + int(a.dist)
        npos = ins[0].shape[0] + (prefix if a.pos_prefix else 0) if a.pos == "learned" else 0
        return Cost(params=(prefix + npos) * c, act_bytes=4 * out.numel)

    def build_torch(self, node, ins, out):
        a = node.attrs
        m = Tokens(ins[0].channels, ins[0].shape[0], a.cls, a.dist, a.pos, a.pos_prefix)
        if m.pos_embed is not None:
            trunc_normal(m.pos_embed, std=0.02)
        for t in (m.cls_token, m.dist_token):
            if t is not None:
                nn.init.normal_(t, std=1e-6)
        return m
