"""Multi-head self-attention over tokens: global or windowed (Swin), optionally with
residual attention (ReViT).

Windowed attention follows Liu et al., "Swin Transformer" (2021), §3.2: attention
inside non-overlapping w x w windows, the grid cyclically shifted by w/2 in every
other block (with a mask so that tokens from different image regions do not attend
to each other), and a learned relative position bias B (Eq. 4).  As in timm, the
grid is rolled, then padded at the bottom/right to a multiple of the window; a
window larger than the grid shrinks to the grid and then does not shift.

Residual attention follows Diko et al., "ReViT" (2024), Eq. 5-6: the scaled
pre-softmax scores S_l are mixed with the previous block's mixed scores,
Ŝ_l = α·S_l + (1-α)·Ŝ_{l-1}, A_l = softmax(Ŝ_l); Ŝ_l travels to the next block
as an explicit graph edge (port `#scores`).
"""
from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import SpecError
from ..types import Cost, TensorType
from ..values import CallValue
from .base import Attrs, OpDef, register_op


# ------------------------------------------------------------------ attribute values
class AttnKind(BaseModel):
    """`global` or `window(SIZE, shift=alternate|none|N, relpos=table|none)`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["global", "window"] = "global"
    size: int = Field(7, ge=1, le=1024)
    shift: int | Literal["alternate", "none"] = "none"
    relpos: Literal["table", "none"] = "table"

    @model_validator(mode="before")
    @classmethod
    def _from_spec(cls, v: Any) -> Any:
        if isinstance(v, str):
            if v == "window":
                raise ValueError("window attention needs a size: window(7)")
            return {"kind": v}
        if isinstance(v, CallValue):
            if v.name != "window":
                raise ValueError(f"unknown attention '{v.name}(...)'; expected global or window(...)")
            if len(v.args) > 1:
                raise ValueError("window takes one positional value, the window size")
            d = {"kind": "window", **v.kwargs}
            if v.args:
                d["size"] = v.args[0]
            elif "size" not in d:
                raise ValueError("window attention needs a size: window(7)")
            return d
        return v

    @model_validator(mode="after")
    def _check(self) -> "AttnKind":
        if self.kind == "window" and isinstance(self.shift, int) and not 0 <= self.shift < self.size:
            raise ValueError(f"shift {self.shift} must be at least 0 and smaller than the window size {self.size}")
        return self

    def to_value(self) -> Any:
        if self.kind == "global":
            return "global"
        kw: dict[str, Any] = {}
        if self.shift != "none":
            kw["shift"] = self.shift
        if self.relpos != "table":
            kw["relpos"] = self.relpos
        return CallValue(name="window", args=(self.size,), kwargs=kw)


class Residual(BaseModel):
    """`residual(alpha=0.5, learnable)`: α shared by all blocks and learned (the paper's
    setting); `residual(alpha=0.5)`: α fixed; `residual(alpha=0.5, per_block)`: one α per block."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    alpha: float = Field(0.5, ge=0.0, le=1.0)
    mode: Literal["fixed", "learnable", "per_block"] = "fixed"

    @model_validator(mode="before")
    @classmethod
    def _from_spec(cls, v: Any) -> Any:
        if v == "residual":
            return {}
        if isinstance(v, CallValue):
            if v.name != "residual":
                raise ValueError(f"expected residual(...), got {v.name}(...)")
            d = dict(v.kwargs)
            for a in v.args:
                if a in ("learnable", "per_block", "fixed"):
                    d["mode"] = a
                else:
                    raise ValueError(f"unknown residual option {a!r}; expected learnable, per_block or alpha=...")
            return d
        return v

    def to_value(self) -> Any:
        args = () if self.mode == "fixed" else (self.mode,)
        return CallValue(name="residual", args=args, kwargs={"alpha": self.alpha})  # residual(learnable, alpha=0.5)


# ------------------------------------------------------------------ geometry
def window_geometry(kind: AttnKind, grid: tuple[int, int], index: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Effective (window, shift) per axis for a block at `index` in its stage."""
    size = (kind.size, kind.size)
    if kind.shift == "alternate":
        s = (kind.size // 2) if index % 2 else 0
    elif kind.shift == "none":
        s = 0
    else:
        s = kind.shift
    window = tuple(min(g, w) for g, w in zip(grid, size))
    shift = tuple(0 if g <= w else s for g, w in zip(grid, window))
    return window, shift  # type: ignore[return-value]


def padded(grid: tuple[int, int], window: tuple[int, int]) -> tuple[int, int]:
    return (math.ceil(grid[0] / window[0]) * window[0], math.ceil(grid[1] / window[1]) * window[1])


def relative_position_index(wh: int, ww: int) -> torch.Tensor:
    """Index into the (2wh-1)(2ww-1) bias table for every pair of window positions (Swin Eq. 4)."""
    ys, xs = torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()])  # (2, wh*ww)
    rel = coords[:, :, None] - coords[:, None, :]  # (2, n, n)
    return (rel[0] + wh - 1) * (2 * ww - 1) + (rel[1] + ww - 1)


def shift_mask(padded_hw: tuple[int, int], window: tuple[int, int], shift: tuple[int, int]) -> torch.Tensor | None:
    """(nW, n, n) additive mask: -100 between tokens of different regions after the cyclic shift."""
    if not any(shift):
        return None
    H, W = padded_hw
    region = torch.zeros(H, W)
    label = 0
    # The three bands per axis, as in the reference implementation (a zero shift on
    # one axis makes its middle band empty and its last band the whole axis).
    for hs in (slice(0, -window[0]), slice(-window[0], -shift[0]), slice(-shift[0], None)):
        for ws in (slice(0, -window[1]), slice(-window[1], -shift[1]), slice(-shift[1], None)):
            region[hs, ws] = label
            label += 1
    win = _partition(region[None, :, :, None], window).squeeze(-1)  # (nW, n)
    diff = win[:, None, :] - win[:, :, None]
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


def _partition(x: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """(B, H, W, C) -> (B*nW, wh*ww, C), windows in row-major order."""
    B, H, W, C = x.shape
    wh, ww = window
    x = x.view(B, H // wh, wh, W // ww, ww, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, wh * ww, C)


def _reverse(x: torch.Tensor, window: tuple[int, int], H: int, W: int) -> torch.Tensor:
    """(B*nW, wh*ww, C) -> (B, H, W, C)."""
    wh, ww = window
    C = x.shape[-1]
    x = x.view(-1, H // wh, W // ww, wh, ww, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, H, W, C)


# ------------------------------------------------------------------ modules
class Attention(nn.Module):
    """qkv projection, attention (global or in windows), output projection.

    forward(x[, alpha][, prev_scores]) -> x, or (x, scores) with residual attention.
    Without residual attention the fused SDPA kernel is used; with it the scores must
    be materialised, so the product is written out.
    """

    def __init__(self, dim: int, heads: int, qkv_bias: bool, proj_bias: bool, *,
                 grid: tuple[int, int] | None = None, prefix: int = 0,
                 window: tuple[int, int] | None = None, shift: tuple[int, int] = (0, 0), relpos: bool = False,
                 residual: Residual | None = None, has_prev: bool = False):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.grid, self.prefix, self.window, self.shift = grid, prefix, window, shift
        self.residual, self.has_prev = residual, has_prev
        if residual is not None and residual.mode == "per_block":
            self.alpha = nn.Parameter(torch.full((1,), residual.alpha))
        if window is not None:
            n = window[0] * window[1]
            if relpos:
                self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window[0] - 1) * (2 * window[1] - 1), heads))
                self.register_buffer("relative_position_index", relative_position_index(*window), persistent=False)
            else:
                self.relative_position_bias_table = None
            mask = shift_mask(padded(grid, window), window, shift)
            self.register_buffer("attn_mask", mask, persistent=False)
            self.window_tokens = n

    # -- the attention product ---------------------------------------------
    def _bias(self) -> torch.Tensor | None:
        if self.window is None or self.relative_position_bias_table is None:
            return None
        n = self.window_tokens
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        return bias.permute(2, 0, 1).unsqueeze(0)  # (1, nh, n, n)

    def _mask(self, B_: int) -> torch.Tensor | None:
        if self.window is None or self.attn_mask is None:
            return None
        nw, n = self.attn_mask.shape[0], self.attn_mask.shape[1]
        m = self.attn_mask.view(1, nw, 1, n, n).expand(B_ // nw, -1, self.heads, -1, -1)
        return m.reshape(B_, self.heads, n, n)

    def _attend(self, x: torch.Tensor, alpha, prev, batch: int):
        B_, N, C = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B_, nh, N, hs)
        bias, mask = self._bias(), self._mask(B_)
        if self.residual is None:
            add = bias if mask is None else (mask if bias is None else bias + mask)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=add)  # softmax(q k^T/sqrt(hs) + B + M) v
            return out.transpose(1, 2).reshape(B_, N, C), None
        s = (q * self.scale) @ k.transpose(-2, -1)  # S_l: (B_, nh, N, N)
        if bias is not None:
            s = s + bias
        if prev is not None:  # ReViT Eq. 5: Ŝ_l = α S_l + (1 - α) Ŝ_{l-1}
            a = alpha if alpha is not None else getattr(self, "alpha", None)
            a = self.residual.alpha if a is None else a
            s = a * s + (1 - a) * adapt_scores(prev, s.shape, batch)
        mixed = s  # handed on without the shift mask, as in the official ReSwin code
        if mask is not None:
            s = s + mask
        out = s.softmax(dim=-1) @ v
        return out.transpose(1, 2).reshape(B_, N, C), mixed

    def forward(self, x, *extra):
        alpha = prev = None
        rest = list(extra)
        if self.residual is not None and self.residual.mode == "learnable":
            alpha = rest.pop(0)
        if self.has_prev:
            prev = rest.pop(0)
        if self.window is None:
            y, scores = self._attend(x, alpha, prev, x.shape[0])
        else:
            y, scores = self._windowed(x, alpha, prev)
        y = self.proj(y)
        return y if self.residual is None else (y, scores)

    def _windowed(self, x, alpha, prev):
        B, N, C = x.shape
        H, W = self.grid
        x = x.view(B, H, W, C)
        if any(self.shift):
            x = torch.roll(x, shifts=(-self.shift[0], -self.shift[1]), dims=(1, 2))
        Hp, Wp = padded(self.grid, self.window)
        x = F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H))
        windows = _partition(x, self.window)  # (B*nW, n, C)
        y, scores = self._attend(windows, alpha, prev, B)
        x = _reverse(y, self.window, Hp, Wp)[:, :H, :W, :]
        if any(self.shift):
            x = torch.roll(x, shifts=self.shift, dims=(1, 2))
        return x.reshape(B, N, C), scores


def adapt_scores(prev: torch.Tensor, shape: torch.Size, batch: int) -> torch.Tensor:
    """Bring the previous block's scores to this block's shape (ReViT official code):
    mean over heads when the head count changes; nearest resizing of the
    (windows x heads, tokens, tokens) volume when windows or tokens change, or average
    pooling when the token count shrinks in global attention."""
    if prev.shape == shape:
        return prev
    B_, h, n, m = shape
    if prev.shape[1] != h and prev.shape[-2:] == shape[-2:] and prev.shape[0] == B_:
        return prev.mean(dim=1, keepdim=True)
    if prev.shape[-1] > m and prev.shape[0] == B_ and prev.shape[1] in (h, 1):
        return F.adaptive_avg_pool2d(prev, (n, m))
    # windows/heads/tokens changed together (ReSwin): nearest over the whole
    # (windows*heads, n, m) volume of each image; prev is (B*nW', h', n', m').
    vol = prev.reshape(batch, 1, -1, prev.shape[-2], prev.shape[-1])
    vol = F.interpolate(vol, size=(B_ // batch * h, n, m), mode="nearest")
    return vol.reshape(B_, h, n, m)


# ------------------------------------------------------------------ the op
@register_op
class AttentionOp(OpDef):
    """`attention heads=6 qkv_bias [attn=window(7, shift=alternate)] [residual(...)]`."""

    kind = "attention"
    default_name = "attn"
    inputs = (1, 3)
    word_fields = ("residual",)

    class Attrs(Attrs):
        heads: int = Field(ge=1, le=4096)
        attn: AttnKind = AttnKind()
        residual: Residual | None = None
        qkv_bias: bool = False
        proj_bias: bool = True
        dim: int | None = Field(None, ge=1)  # optional check of the input width

    def geometry(self, node, t: TensorType):
        kind = node.attrs.attn
        if kind.kind != "window":
            return None, (0, 0)
        return window_geometry(kind, t.grid, node.index)

    def infer(self, node, ins):
        t, a = ins[0], node.attrs
        if t.kind != "tokens":
            raise node.error(f"attention needs tokens, got {t.kind} {t}")
        c = t.channels
        if a.dim is not None and a.dim != c:
            raise node.error(f"dim={a.dim} but the input has {c} channels", "dim")
        if c % a.heads:
            raise node.error(f"dim {c} is not divisible by heads {a.heads}", "heads")
        if a.attn.kind == "window":
            if t.grid is None or t.prefix:
                raise node.error("windowed attention needs patch tokens on a grid, without class tokens", "attn")
            window, _ = self.geometry(node, t)
            hp, wp = padded(t.grid, window)
            nw = (hp // window[0]) * (wp // window[1])
            n = window[0] * window[1]
            node.scores = TensorType(kind="tokens", shape=(nw * a.heads, n, n))
        else:
            node.scores = TensorType(kind="tokens", shape=(a.heads, t.shape[0], t.shape[0]))
        if a.residual is None:
            node.scores = None
        return t

    def cost(self, node, ins, out):
        a, t = node.attrs, out
        n, c = t.shape
        params = 3 * c * c + (3 * c if a.qkv_bias else 0) + c * c + (c if a.proj_bias else 0)
        if a.residual is not None and a.residual.mode == "per_block":
            params += 1
        if a.attn.kind == "window":
            window, _ = self.geometry(node, t)
            hp, wp = padded(t.grid, window)
            tokens = hp * wp  # qkv/proj run on the padded grid
            if a.attn.relpos == "table":
                params += (2 * window[0] - 1) * (2 * window[1] - 1) * a.heads
            macs = tokens * c * 4 * c + 2 * tokens * window[0] * window[1] * c
        else:
            macs = n * c * 3 * c + 2 * n * n * c + n * c * c  # qkv, q k^T and A v, proj
        act = 4 * out.numel + (4 * node.scores.numel if node.scores is not None else 0)
        return Cost(params=params, macs=macs, act_bytes=act)

    def build_torch(self, node, ins, out):
        a, t = node.attrs, ins[0]
        window, shift = self.geometry(node, t)
        m = Attention(t.channels, a.heads, a.qkv_bias, a.proj_bias, grid=t.grid, prefix=t.prefix,
                      window=window, shift=shift, relpos=a.attn.relpos == "table",
                      residual=a.residual, has_prev=any(i.endswith("#scores") for i in node.inputs))
        for lin in (m.qkv, m.proj):
            nn.init.trunc_normal_(lin.weight, std=0.02)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        if getattr(m, "relative_position_bias_table", None) is not None:
            nn.init.trunc_normal_(m.relative_position_bias_table, std=0.02)
        return m
