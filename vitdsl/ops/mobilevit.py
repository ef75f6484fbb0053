"""The MobileViT block (Mehta & Rastegari, "MobileViT", ICLR 2022, section 3.1, Fig. 1b).

    local:  kxk conv-bn-act (C -> C), 1x1 conv (C -> d)
    global: unfold into patches of ph x pw pixels, `depth` pre-norm transformer layers
            over each patch position's sequence, optional LayerNorm, fold back
    fusion: 1x1 conv-bn-act (d -> C), concat with the block input, kxk conv-bn-act (2C -> C)

Two codebases define it, and every difference is an attribute of this one op:

| attribute      | timm `mobilevit_s` (= Apple's ml-cvnets) | EmPasLab/ExMobileVIT basic_block.py |
| -------------- | ---------------------------------------- | ----------------------------------- |
| `head_dim`     | none: dim / heads                        | 8 (inner width heads*8 = 32)        |
| `qkv_bias`     | true                                     | false                               |
| `mlp`          | 2.0 in every stage                       | 2.0, 4.0, 4.0 by stage              |
| `conv_1x1_bn`  | false: plain 1x1 conv into the transformer | true: conv_1x1_bn (BN + SiLU)     |
| `norm_after`   | true: LayerNorm after the last layer     | false                               |
| `fuse_order`   | input_first: cat((input, local))         | local_first: cat((local, input))    |

The defaults are timm's, except `qkv_bias` (false, as for `transformer` and `attention`).
Keys follow timm's MobileVitBlock: conv_kxk, conv_1x1, transformer.{j}.{norm1,attn,norm2,mlp},
norm, conv_proj, conv_fusion.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, field_validator

from ..interop.timm import RENAMES
from ..types import Cost
from .base import Attrs, OpDef, register_op
from .init import trunc_normal
from .conv import ConvNormAct, conv_macs, conv_params, init_conv, need_image, none_word, timm_stage_renames
from .mlp import Mlp

LN_EPS = 1e-5  # nn.LayerNorm's default: timm's MobileViT and the ExMobileViT code both use it


class PatchAttention(nn.Module):
    """Multi-head self-attention whose inner width (heads * head_dim) may differ from the
    token width, as in the ExMobileViT code (to_qkv: dim -> 3*32, to_out: 32 -> dim).
    Scale head_dim^-0.5 (SDPA's default) in both codebases."""

    def __init__(self, dim: int, heads: int, head_dim: int, qkv_bias: bool):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        self.proj = nn.Linear(inner, dim)
        self.matmul_quant = None  # vitdsl.quant.fake.AttnQuant when the qkv layer is integer-quantized

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.matmul_quant is None:
            x = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, head_dim)
        else:
            x = self.matmul_quant(q, k, v, None, self.head_dim ** -0.5)
        return self.proj(x.transpose(1, 2).reshape(B, N, self.heads * self.head_dim))


class TransformerLayer(nn.Module):
    """Pre-norm layer: x + attn(norm1(x)), then x + mlp(norm2(x)) (names as timm's Block)."""

    def __init__(self, dim: int, heads: int, head_dim: int, hidden: int, qkv_bias: bool, act: str, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = PatchAttention(dim, heads, head_dim, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, hidden, act, True)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def unfold(x: torch.Tensor, ph: int, pw: int) -> torch.Tensor:
    """(B, d, H, W) -> (B*P, N, d): P = ph*pw pixel offsets inside a patch, each its own
    sequence of N = (H/ph)*(W/pw) patches, row-major (the MobileViT paper's unfolding;
    sequence b*P + p holds offset p = py*pw + px of sample b, as in timm and ExMobileViT)."""
    B, d, H, W = x.shape
    nh, nw = H // ph, W // pw
    x = x.reshape(B, d, nh, ph, nw, pw).permute(0, 3, 5, 2, 4, 1)  # (B, ph, pw, nh, nw, d)
    return x.reshape(B * ph * pw, nh * nw, d)


def fold(x: torch.Tensor, B: int, ph: int, pw: int, H: int, W: int) -> torch.Tensor:
    """The exact inverse of unfold."""
    d = x.shape[-1]
    x = x.reshape(B, ph, pw, H // ph, W // pw, d).permute(0, 5, 3, 1, 4, 2)  # (B, d, nh, ph, nw, pw)
    return x.reshape(B, d, H, W)


class MobileViTBlock(nn.Module):
    def __init__(self, c: int, a, head_dim: int, hidden: int):
        super().__init__()
        self.patch, self.input_first = a.patch, a.fuse_order == "input_first"
        self.conv_kxk = ConvNormAct(c, c, a.kernel, act=a.act)
        self.conv_1x1 = ConvNormAct(c, a.dim, 1, act=a.act) if a.conv_1x1_bn else nn.Conv2d(c, a.dim, 1, bias=False)
        self.transformer = nn.Sequential(
            *[TransformerLayer(a.dim, a.heads, head_dim, hidden, a.qkv_bias, a.act, a.eps) for _ in range(a.depth)])
        self.norm = nn.LayerNorm(a.dim, eps=a.eps) if a.norm_after else nn.Identity()
        self.conv_proj = ConvNormAct(a.dim, c, 1, act=a.act)
        self.conv_fusion = ConvNormAct(2 * c, c, a.kernel, act=a.act)

    def forward(self, x):
        B, _, H, W = x.shape
        y = self.conv_1x1(self.conv_kxk(x))
        y = self.norm(self.transformer(unfold(y, self.patch, self.patch)))
        y = self.conv_proj(fold(y, B, self.patch, self.patch, H, W))
        return self.conv_fusion(torch.cat((x, y) if self.input_first else (y, x), dim=1))


@register_op
class MobileViTOp(OpDef):
    """`mobilevit dim=144 depth=2 heads=4 mlp=2.0 qkv_bias`: one MobileViT block on an image."""

    kind = "mobilevit"
    default_name = "mobilevit"
    has_weights = True

    class Attrs(Attrs):
        dim: int = Field(ge=1, le=1 << 16)  # transformer width d
        depth: int = Field(ge=1, le=4096)  # transformer layers L
        heads: int = Field(4, ge=1, le=4096)
        head_dim: int | None = Field(None, ge=1, le=1 << 16)  # None: dim / heads
        mlp: float = Field(2.0, gt=0, le=1024)  # FFN hidden int(dim * mlp)
        qkv_bias: bool = False
        patch: int = Field(2, ge=1, le=1024)  # patch side (ph = pw), paper: 2
        kernel: int = Field(3, ge=1, le=1024)  # local and fusion convs
        act: Literal["silu", "relu", "gelu"] = "silu"  # convs and the FFN
        eps: float = Field(LN_EPS, gt=0, lt=1)  # LayerNorm
        conv_1x1_bn: bool = False  # BN + act after the 1x1 conv into the transformer
        norm_after: bool = True  # LayerNorm after the transformer layers
        fuse_order: Literal["input_first", "local_first"] = "input_first"

        _none = field_validator("head_dim", mode="before")(none_word)

    @staticmethod
    def head_dim(a) -> int:
        return a.dim // a.heads if a.head_dim is None else a.head_dim

    @staticmethod
    def hidden(a) -> int:
        return int(a.dim * a.mlp)

    def infer(self, node, ins):
        a = node.attrs
        c, h, w = need_image(node, ins[0])
        if a.kernel % 2 == 0:  # the local and fusion convs pad kernel // 2 per side to keep the map size
            raise node.error(f"kernel must be odd, got {a.kernel}", "kernel")
        if h % a.patch or w % a.patch:
            raise node.error(f"feature map {h}x{w} is not divisible by the patch size {a.patch}", "patch")
        if a.head_dim is None and a.dim % a.heads:
            raise node.error(f"dim {a.dim} is not divisible by heads {a.heads} (or set head_dim)", "heads")
        if self.hidden(a) < 1:
            raise node.error(f"mlp={a.mlp} leaves no hidden units", "mlp")
        return ins[0]

    def cost(self, node, ins, out):
        a, (c, h, w) = node.attrs, ins[0].shape
        d, k, m, hw = a.dim, a.kernel, self.hidden(a), h * w
        inner = a.heads * self.head_dim(a)
        p = a.patch * a.patch  # sequences per sample
        n = hw // p  # tokens per sequence
        layer_params = (2 * d + d * 3 * inner + (3 * inner if a.qkv_bias else 0) + inner * d + d  # norm1, attn
                        + 2 * d + d * m + m + m * d + d)  # norm2, mlp
        # every layer: qkv and proj over all h*w tokens, q k^T and A v inside each of the p sequences, MLP
        layer_macs = hw * d * 3 * inner + p * 2 * n * n * inner + hw * inner * d + 2 * hw * d * m
        params = (conv_params(c, c, k) + conv_params(c, d, 1, norm=a.conv_1x1_bn) + a.depth * layer_params
                  + (2 * d if a.norm_after else 0) + conv_params(d, c, 1) + conv_params(2 * c, c, k))
        macs = (conv_macs(hw, c, c, k) + conv_macs(hw, c, d, 1) + a.depth * layer_macs
                + conv_macs(hw, d, c, 1) + conv_macs(hw, 2 * c, c, k))
        return Cost(params=params, macs=macs, act_bytes=4 * out.numel)

    def build_torch(self, node, ins, out):
        a = node.attrs
        m = MobileViTBlock(ins[0].channels, a, self.head_dim(a), self.hidden(a))
        init_conv(m)
        for mod in m.transformer.modules():
            if isinstance(mod, nn.Linear):
                trunc_normal(mod.weight, std=0.02)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)
        return m


RENAMES["mobilevit"] = timm_stage_renames
