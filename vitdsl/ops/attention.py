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
from .init import trunc_normal


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
                    if "mode" in d:
                        raise ValueError(f"residual takes one of learnable, per_block or fixed, got both {d['mode']} and {a}")
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
        self.matmul_quant = None  # vitdsl.quant.fake.AttnQuant when the qkv layer is integer-quantized
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
        mq = self.matmul_quant
        if self.residual is None:
            add = bias if mask is None else (mask if bias is None else bias + mask)
            out = self._sdpa(q, k, v, add)  # softmax(q k^T/sqrt(hs) + B + M) v
            return out.transpose(1, 2).reshape(B_, N, C), None
        s = (q * self.scale) @ k.transpose(-2, -1) if mq is None else mq.scores(q, k, self.scale)  # S_l: (B_, nh, N, N)
        if bias is not None:
            s = s + bias
        if prev is not None:  # ReViT Eq. 5: Ŝ_l = α S_l + (1 - α) Ŝ_{l-1}
            a = self._alpha(alpha)
            s = a * s + (1 - a) * adapt_scores(prev, s.shape, batch)
        mixed = s  # handed on without the shift mask, as in the official ReSwin code
        if self.residual.mode == "fixed" and self.residual.alpha == 1.0:  # Ŝ_l = S_l: plain attention, exactly
            add = bias if mask is None else (mask if bias is None else bias + mask)
            out = self._sdpa(q, k, v, add)
            return out.transpose(1, 2).reshape(B_, N, C), mixed
        if mask is not None:
            s = s + mask
        out = s.softmax(dim=-1) @ v if mq is None else mq.mix(s.softmax(dim=-1), v)
        return out.transpose(1, 2).reshape(B_, N, C), mixed

    def _sdpa(self, q, k, v, add):
        """The fused kernel, or the quantized product written out."""
        if self.matmul_quant is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=add)
        return self.matmul_quant(q, k, v, add, self.scale)

    def _alpha(self, alpha):
        """α of Eq. 5: the shared learnable one passed in, this block's own, or the fixed value."""
        a = alpha if alpha is not None else getattr(self, "alpha", None)
        return self.residual.alpha if a is None else a

    def _extra(self, extra: tuple) -> tuple:
        """forward's optional inputs -> (alpha, prev_scores), each None when absent."""
        alpha = prev = None
        rest = list(extra)
        if self.residual is not None and self.residual.mode == "learnable":
            alpha = rest.pop(0)
        if self.has_prev:
            prev = rest.pop(0)
        return alpha, prev

    def score_weight(self, *extra) -> float:
        """The weight of this block's own scores S_l in what its softmax sees, for forward's
        optional inputs `extra`: α when earlier scores are mixed in (ReViT Eq. 5), else 1.
        A change Δ of S_l (e.g. quantizing q or k) moves the softmax input by α·Δ."""
        if self.residual is None:
            return 1.0
        alpha, prev = self._extra(extra)
        return 1.0 if prev is None else float(self._alpha(alpha))

    def forward(self, x, *extra):
        alpha, prev = self._extra(extra)
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
    """Bring the previous block's scores to this block's shape, as the official code does.

    Global attention (ADiko1997/ReViT, model/attention.py `downsample`): mean over heads
    when the head count changes, then, on the square token grid, average-pool the query
    axis and average-pool or nearest-upsample the key axis.  Windowed attention (ReSwin):
    nearest resizing of each image's (windows x heads, tokens, tokens) volume."""
    if prev.shape == shape:
        return prev
    B_, h, n, m = shape
    if B_ == batch and prev.shape[0] == batch:  # global attention on both sides
        if prev.shape[1] != h:
            prev = prev.mean(dim=1, keepdim=True)
        if prev.shape[-2] != n:
            prev = _resample_grid(prev.transpose(-2, -1), n).transpose(-2, -1)
        if prev.shape[-1] != m:
            prev = _resample_grid(prev, m)
        return prev
    vol = prev.reshape(batch, 1, -1, prev.shape[-2], prev.shape[-1])
    vol = F.interpolate(vol, size=(B_ // batch * h, n, m), mode="nearest")
    return vol.reshape(B_, h, n, m)


def _resample_grid(t: torch.Tensor, n_new: int) -> torch.Tensor:
    """Resample the last axis of t, a square grid of tokens, to n_new tokens: average
    pooling with kernel = stride = side ratio when shrinking, nearest when growing."""
    n_old = t.shape[-1]
    s_old, s_new = math.isqrt(n_old), math.isqrt(n_new)
    if s_old * s_old != n_old or s_new * s_new != n_new:
        raise RuntimeError(f"residual attention scores cannot be resampled from {n_old} to {n_new} tokens (grids must be square)")
    x = t.reshape(-1, 1, s_old, s_old)
    if s_old > s_new:
        x = F.avg_pool2d(x, kernel_size=s_old // s_new)
    else:
        x = F.interpolate(x, scale_factor=s_new // s_old, mode="nearest")
    return x.reshape(*t.shape[:-1], n_new)


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
            trunc_normal(lin.weight, std=0.02)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        if getattr(m, "relative_position_bias_table", None) is not None:
            trunc_normal(m.relative_position_bias_table, std=0.02)
        return m

    def workspace(self, node, ins, out):
        """Working memory of Attention.forward (fp32 bytes per sample beyond the output):
        the tensors it allocates, replayed in program order, and their high-water mark.

        T tokens are attended (the padded grid for windows), n per window (T for
        global attention), h heads, C channels, S = h*T*n score elements:

        * windows: torch.roll on shifted blocks (one copy per rolled axis), F.pad (a
          copy even without padding), the partition into windows (a copy unless there
          is one window per row or the window is one row high: then a view); afterwards
          the reverse (likewise), and a copy by the roll back or by the crop of a
          padded grid;
        * the qkv projection (3TC), alive until the attention product returns;
        * fused SDPA (without residual attention; torch's CPU flash kernel, which never
          materialises the scores): its output TC (laid out so that merging the heads
          is a view), the log-sum-exp h*T, and a copy of the additive mask when its
          last axis is strided (the permuted relative position bias, h*n*n, or bias +
          shift mask, S, which keeps that layout; the shift mask alone is not copied).
          The kernel's per-thread blocks do not scale with the batch: not counted;
        * residual attention (materialised): q*scale (TC), with several windows copies
          of q*scale, k and v for the batched products (TC each), the scores S, + bias (S),
          the mix a*S + (1-a)*prev (three more S while the unmixed scores are alive),
          the masked scores (S), softmax (S), A@v (TC) and the head-merge copy (TC);
          with a fixed alpha = 1 the output comes from the fused kernel instead (as
          above), the scores being still computed, mixed and handed on;
        * the output projection (TC) while its input is alive.

        The bias gathered from its table (h*n*n) is per call; it is counted as per sample."""
        a = node.attrs
        N, C = ins[0].shape
        h = a.heads
        bufs: dict[str, int] = {}
        level = [0, 0]  # in use, high-water mark (elements)

        def alloc(name: str, k: int) -> None:
            bufs[name] = bufs.get(name, 0) + k
            level[0] += k
            level[1] = max(level[1], level[0])

        def free(*names: str) -> None:
            for name in names:
                level[0] -= bufs.pop(name, 0)

        windowed = a.attn.kind == "window"
        if windowed:
            window, shift = self.geometry(node, ins[0])
            hp, wp = padded(ins[0].grid, window)
            T, n = hp * wp, window[0] * window[1]
            shifted, relpos = any(shift), a.attn.relpos == "table"
            regroup = wp // window[1] > 1 and window[0] > 1  # partition/reverse permute data: a copy
            if shifted:
                alloc("roll_tmp", N * C), alloc("x", N * C), free("roll_tmp")
            alloc("padded", T * C)
            free("x")  # the rolled grid, rebound
            if regroup:
                alloc("windows", T * C)
        else:
            T, n, shifted, relpos, regroup = N, N, False, False, False
        S = h * T * n
        # -- _attend
        alloc("qkv", 3 * T * C)
        if relpos:
            alloc("bias", h * n * n)
        if a.residual is None:
            if relpos and shifted:
                alloc("bias+mask", S)
            alloc("y", T * C), alloc("lse", h * T)
            # SDPA copies a mask whose last axis is not contiguous: the permuted bias
            # (alone, or bias + mask, which takes the bias's layout); not the shift mask
            alloc("mask_copy", (S if shifted else h * n * n) if relpos else 0)
            free("lse", "mask_copy")
            kept = 0
        else:
            # With several windows, matmul folds (windows, heads) into one batch axis:
            # q*scale (which keeps q's strides), k^T and v are copied (TC each) for it.
            fold = T * C if T > n else 0
            alloc("qs", T * C), alloc("q", fold), alloc("k", fold), alloc("s", S), free("qs", "q", "k")
            if relpos:
                alloc("s+bias", S)
                free("s")
                bufs["s"] = bufs.pop("s+bias")
            prev = next((t for t, r in zip(ins, node.inputs) if r.endswith("#scores")), None)
            if prev is not None:
                resized = prev.shape != (T // n * h, n, n)
                if resized:
                    alloc("adapted", S)  # adapt_scores
                alloc("a*s", S), alloc("(1-a)*prev", S), alloc("mixed", S)
                free("a*s", "(1-a)*prev", "s", "adapted")
                bufs["s"] = bufs.pop("mixed")
            if a.residual.mode == "fixed" and a.residual.alpha == 1.0:
                # alpha = 1: the output is plain attention, from the fused kernel, as above;
                # the scores are still written out (an output)
                if relpos and shifted:
                    alloc("bias+mask", S)
                alloc("y", T * C), alloc("lse", h * T)
                alloc("mask_copy", (S if shifted else h * n * n) if relpos else 0)
                free("lse", "mask_copy")
            else:
                if shifted:
                    alloc("masked", S)  # s + mask; the mixed scores stay (an output)
                alloc("softmax", S), alloc("v", fold), alloc("av", T * C), free("softmax", "v")
                alloc("y", T * C)  # transpose + reshape: a copy
                free("av", "masked")
            kept = S
        free("qkv", "bias", "bias+mask")  # _attend returns: y (and the mixed scores) remain
        if windowed:
            x = "y"  # what _reverse returns: a copy, or a view of y
            if regroup:
                alloc("reverse", T * C)
                free("padded")  # rebound (without regrouping, the windows view keeps it)
                x = "reverse"
            if shifted:
                alloc("roll_tmp", N * C), alloc("pre", N * C), free("roll_tmp")
                if x == "reverse":
                    free("reverse")  # rebound
                x = "pre"
            elif T != N:
                alloc("pre", N * C)  # reshape of the cropped (non-contiguous) grid: a copy
                x = "pre"
            free(*[b for b in ("windows", "padded", "reverse", "y") if b != x])  # _windowed returns
        else:
            x = "y"
        alloc("out", N * C)  # proj
        free(x)
        assert level[0] == N * C + kept == sum(bufs.values()), (level, bufs)
        return 4 * max(0, level[1] - (N * C + kept))
