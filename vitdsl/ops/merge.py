"""Patch merging (Swin, Liu et al. 2021, §3.1): 2x2 neighbouring tokens are concatenated
(4C), normalised and linearly reduced (to 2C by default); the grid halves."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from ..types import Cost, TensorType
from .base import Attrs, OpDef, register_op
from .init import trunc_normal


class PatchMerging(nn.Module):
    def __init__(self, dim: int, out: int, grid: tuple[int, int], eps: float):
        super().__init__()
        self.grid = grid
        self.norm = nn.LayerNorm(4 * dim, eps=eps)
        self.reduction = nn.Linear(4 * dim, out, bias=False)

    def forward(self, x):
        B, N, C = x.shape
        H, W = self.grid
        x = x.view(B, H, W, C)
        x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))  # odd sides: pad bottom/right
        H2, W2 = x.shape[1] // 2, x.shape[2] // 2
        # (B, H2, 2[dy], W2, 2[dx], C) -> order (dx, dy, C): x0=(0,0) x1=(1,0) x2=(0,1) x3=(1,1)
        x = x.view(B, H2, 2, W2, 2, C).permute(0, 1, 3, 4, 2, 5).reshape(B, H2 * W2, 4 * C)
        return self.reduction(self.norm(x))


@register_op
class Merge(OpDef):
    """`merge [out=C]`: the downsampling between Swin stages (stage attribute downsample=merge)."""

    kind = "merge"
    default_name = "downsample"

    class Attrs(Attrs):
        out: int | None = Field(None, ge=1)
        norm: Literal["layernorm"] = "layernorm"
        eps: float = Field(1e-5, gt=0, lt=1)

    def infer(self, node, ins):
        t = ins[0]
        if t.kind != "tokens" or t.grid is None or t.prefix:
            raise node.error(f"patch merging needs patch tokens on a grid without class tokens, got {t.kind} {t}")
        h, w = (t.grid[0] + 1) // 2, (t.grid[1] + 1) // 2
        out = node.attrs.out or 2 * t.channels
        return TensorType(kind="tokens", shape=(h * w, out), grid=(h, w))

    def cost(self, node, ins, out):
        c4 = 4 * ins[0].channels
        return Cost(params=2 * c4 + c4 * out.channels, macs=out.shape[0] * c4 * out.channels, act_bytes=4 * out.numel)

    def build_torch(self, node, ins, out):
        m = PatchMerging(ins[0].channels, out.channels, ins[0].grid, node.attrs.eps)
        trunc_normal(m.reduction.weight, std=0.02)
        return m

    def workspace(self, node, ins, out):
        """PatchMerging.forward: F.pad copies the grid (even without padding), the 2x2
        regrouping copies it again (P elements, the padded grid) and drops the padded
        copy; then LayerNorm's output (P) and its per-token mean and rstd, and the
        reduction's output while the regrouped grid and the normalised one are alive."""
        h, w = ins[0].grid
        P = (h + h % 2) * (w + w % 2) * ins[0].channels
        tokens, cout = out.shape
        peak = max(2 * P, 2 * P + 2 * tokens, 2 * P + tokens * cout)
        return 4 * (peak - tokens * cout)
