"""ViTAEv2 cells (Zhang, Xu, Zhang & Tao, "ViTAEv2: Vision Transformer Advanced by
Exploring Inductive Bias for Image Recognition and Beyond", IJCV 2023, §3).

Primitive ops:

    prm             pyramid reduction module (§3, "Reduction cell"): parallel strided
                    convolutions with different dilation rates r_j, concatenated,
                    F_ms = Cat[GELU(Conv(f; s, r_j)) for r_j in R]  -> tokens (Img2Seq)
    pcm             parallel convolutional module (§3, "Reduction cell" / "Normal cell"):
                    three convolutions (conv-BN-SiLU, conv-BN-SiLU, conv) on the feature
                    map, beside the attention branch                  -> tokens
    cell_attention  multi-head self-attention whose qkv projection may change the width
                    (in -> out), global or in windows, optionally with the T2T "v skip"

Composite ops (the cells; their sub-nodes make the parallel branches explicit edges):

    reduction  f_ms = PRM(f);  f_g = MHSA(LN(f_ms));  f_lg = f_g + PCM(f);
               f' = f_lg + FFN(LN(f_lg))
               sub-nodes prm, norm1, attn, pcm, res1 (= attn + pcm), norm2, mlp, res2
    normal     f_g = MHSA(LN(f));  f_lg = f + f_g + PCM(f);  f' = f_lg + FFN(LN(f_lg))
               sub-nodes norm1, attn, pcm, res1 (= in + attn + pcm), norm2, mlp, res2

Details the paper leaves open follow the official code (ViTAE-Transformer/ViTAE-Transformer,
Image-Classification/vitaev2/, see docs/research/seed_architectures.md §3): the PRM padding
ceil(((k-1)r + 1 - s) / 2) and its dilation-major channel order; the PCM strides
(stride 4 -> 2, 2, 1; stride 2 -> 2, 1, 1); the reduction cell has no residual from the
PRM tokens; window attention pads the grid *centred* (top = pad // 2) and never shrinks
the window to the grid; no shifted windows.  Token sequences are row-major over (H, W).
"""
from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, field_validator

from ..types import Cost, TensorType
from .attention import AttnKind, _partition, _reverse, relative_position_index
from .base import Attrs, OpDef, SubNode, format_value, register_op
from .init import trunc_normal
from .conv import BN_EPS, conv_macs, conv_out_size, conv_params, init_conv, make_act, none_word

Act = Literal["silu", "relu", "gelu", "none"]
Dilations = tuple[Annotated[int, Field(ge=1, le=1024)], ...]


def _tuple(v: Any) -> Any:
    """`dilations=2` means the one-element tuple (2,)."""
    return (v,) if isinstance(v, int) and not isinstance(v, bool) else v


def _tuple_text(v: tuple) -> str:
    return format_value(tuple(v))


def _who(node) -> str:
    """How a message names the node: `prm`, or `prm in 'r1'` inside a cell."""
    return node.op if node.block in (None, node.name) else f"{node.op} in '{node.block}'"


def _describe(t: TensorType) -> str:
    extra = f" with {t.prefix} class token{'s' if t.prefix > 1 else ''}" if t.prefix else ""
    return f"{t.kind} {t}{extra}"


def _feature_map(node, t: TensorType) -> tuple[int, int, int]:
    """(C, H, W) of an image, or of patch tokens read as a map (the paper's Seq2Img)."""
    if t.kind == "image":
        return t.shape  # type: ignore[return-value]
    if t.kind == "tokens" and t.grid is not None and not t.prefix:
        return (t.channels, *t.grid)
    raise node.error(f"{_who(node)} needs an image or patch tokens on a grid without class tokens, got {_describe(t)}")


def _as_image(x: torch.Tensor, grid: tuple[int, int] | None) -> torch.Tensor:
    """(B, N, C) tokens -> (B, C, h, w); an image passes through."""
    if grid is None:
        return x
    B, N, C = x.shape
    return x.transpose(1, 2).reshape(B, C, grid[0], grid[1])


def _as_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h*w, C), row-major (the paper's Img2Seq)."""
    return x.flatten(2).transpose(1, 2)


def _init_linears(m: nn.Module) -> nn.Module:
    for mod in m.modules():
        if isinstance(mod, nn.Linear):
            trunc_normal(mod.weight, std=0.02)
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)
    return m


# ====================================================================== prm
def prm_padding(kernel: int, stride: int, dilation: int) -> int:
    """The official PRM padding, ceil(((k-1)r + 1 - s) / 2): every branch then keeps
    H / s outputs when s divides H (a "same"-style padding for the dilated kernel)."""
    return -(-((kernel - 1) * dilation + 1 - stride) // 2)


class PRM(nn.Module):
    """One strided conv (+ activation) per dilation; outputs concatenated on channels in
    dilation-major order (channel j*C + c is branch j's channel c), or summed."""

    def __init__(self, cin: int, out: int, kernel: int, stride: int, dilations: tuple[int, ...],
                 act: str, bias: bool, fuse: str, grid: tuple[int, int] | None):
        super().__init__()
        self.grid, self.fuse = grid, fuse
        self.convs = nn.ModuleList(
            nn.Sequential(nn.Conv2d(cin, out, kernel, stride, prm_padding(kernel, stride, r), dilation=r, bias=bias),
                          make_act(act))
            for r in dilations)

    def forward(self, x):
        x = _as_image(x, self.grid)
        ys = [conv(x) for conv in self.convs]
        if self.fuse == "cat":
            y = torch.cat(ys, dim=1)
        else:
            y = ys[0]
            for z in ys[1:]:
                y = y + z
        return _as_tokens(y)


@register_op
class PrmOp(OpDef):
    """`prm out=64 kernel=7 stride=4 dilations=(1, 2, 3, 4)`: image (or token map) -> tokens
    of width len(dilations) * out (fuse=cat) or out (fuse=sum)."""

    kind = "prm"
    default_name = "prm"
    has_weights = True

    class Attrs(Attrs):
        out: int = Field(ge=1, le=1 << 20)  # channels per branch (the paper's embedding width)
        kernel: int = Field(3, ge=1, le=1024)
        stride: int = Field(2, ge=1, le=1024)  # the cell's downsampling ratio
        dilations: Dilations = Field((1, 2), min_length=1, max_length=64)
        fuse: Literal["cat", "sum"] = "cat"
        act: Act = "gelu"
        bias: bool = True

        _one = field_validator("dilations", mode="before")(_tuple)

    def branch_sizes(self, node, h: int, w: int) -> list[tuple[int, int, int]]:
        """(dilation, out_h, out_w) per branch; raises on a negative padding or an empty output."""
        a, sizes = node.attrs, []
        for r in a.dilations:
            p, span = prm_padding(a.kernel, a.stride, r), (a.kernel - 1) * r + 1
            if p < 0:
                raise node.error(f"kernel {a.kernel} (dilation {r}) spans {span} pixels, too few for stride "
                                 f"{a.stride}: the PRM padding ceil((span - stride) / 2) would be {p}", "kernel")
            oh, ow = (conv_out_size(s, a.kernel, a.stride, p, r) for s in (h, w))
            if oh < 1 or ow < 1:
                raise node.error(f"the {h}x{w} input is too small for stride {a.stride} "
                                 f"(dilation {r} leaves no output)", "stride")
            sizes.append((r, oh, ow))
        return sizes

    def infer(self, node, ins):
        a = node.attrs
        _, h, w = _feature_map(node, ins[0])
        sizes = self.branch_sizes(node, h, w)
        if len({s[1:] for s in sizes}) > 1:
            each = ", ".join(f"dilation {r} -> {oh}x{ow}" for r, oh, ow in sizes)
            raise node.error(f"dilations {_tuple_text(a.dilations)} give PRM branches of different sizes "
                             f"({each}; kernel {a.kernel}, stride {a.stride}, input {h}x{w}), "
                             f"so they cannot be concatenated", "dilations")
        _, oh, ow = sizes[0]
        width = a.out * (len(a.dilations) if a.fuse == "cat" else 1)
        return TensorType(kind="tokens", shape=(oh * ow, width), grid=(oh, ow))

    def cost(self, node, ins, out):
        a, cin, n = node.attrs, _feature_map(node, ins[0])[0], len(node.attrs.dilations)
        return Cost(params=n * conv_params(cin, a.out, a.kernel, bias=a.bias, norm=False),
                    macs=n * conv_macs(out.shape[0], cin, a.out, a.kernel), act_bytes=4 * out.numel)

    def build_torch(self, node, ins, out):
        a, t = node.attrs, ins[0]
        return init_conv(PRM(_feature_map(node, t)[0], a.out, a.kernel, a.stride, a.dilations, a.act, a.bias,
                             a.fuse, t.grid if t.kind == "tokens" else None))


# ====================================================================== pcm
def pcm_strides(stride: int) -> tuple[int, int, int]:
    """Per-conv strides for a total stride (official ReductionCell: 4 -> 2, 2, 1; 2 -> 2, 1, 1)."""
    k = stride.bit_length() - 1
    return tuple(2 if i < k else 1 for i in range(3))  # type: ignore[return-value]


class PCM(nn.Sequential):
    """conv-BN-act, conv-BN-act, conv on the feature map; keys 0, 1, 3, 4, 6 as in the
    official code (BN is an Identity placeholder with norm=none, so the indices hold)."""

    def __init__(self, widths: tuple[int, int, int, int], kernel: int, strides: tuple[int, int, int],
                 groups: int, act: str, norm: str, bias: bool, eps: float, grid: tuple[int, int] | None):
        layers: list[nn.Module] = []
        for i in range(3):
            layers.append(nn.Conv2d(widths[i], widths[i + 1], kernel, strides[i], kernel // 2, groups=groups, bias=bias))
            if i < 2:
                layers += [nn.BatchNorm2d(widths[i + 1], eps=eps) if norm == "bn" else nn.Identity(), make_act(act)]
        super().__init__(*layers)
        self.grid = grid

    def forward(self, x):
        x = _as_image(x, self.grid)
        for layer in self:
            x = layer(x)
        return _as_tokens(x)


@register_op
class PcmOp(OpDef):
    """`pcm ratio=4.0 groups=32`: the convolutional branch beside attention; image (or token
    map) -> tokens.  Widths in -> hidden -> mid -> out; hidden = int(in * ratio) unless set,
    mid = out unless set, out = in unless set."""

    kind = "pcm"
    default_name = "pcm"
    has_weights = True

    class Attrs(Attrs):
        hidden: int | None = Field(None, ge=1, le=1 << 20)
        ratio: float = Field(1.0, gt=0, le=1024)
        mid: int | None = Field(None, ge=1, le=1 << 20)
        out: int | None = Field(None, ge=1, le=1 << 20)
        stride: int = Field(1, ge=1, le=8)  # total: 1, 2, 4 or 8 (stride 2 in the first convs)
        kernel: int = Field(3, ge=1, le=1024)
        groups: int = Field(1, ge=1, le=1 << 20)
        act: Act = "silu"
        norm: Literal["bn", "none"] = "bn"
        eps: float = Field(BN_EPS, gt=0, lt=1)
        bias: bool = True

        _none = field_validator("hidden", "mid", "out", mode="before")(none_word)

    def widths(self, node, cin: int) -> tuple[int, int, int, int]:
        a = node.attrs
        out = a.out or cin
        hidden = a.hidden or int(cin * a.ratio)
        if hidden < 1:
            raise node.error(f"ratio={a.ratio} leaves no hidden channels for {cin} input channels", "ratio")
        return cin, hidden, a.mid or out, out

    def infer(self, node, ins):
        a = node.attrs
        c, h, w = _feature_map(node, ins[0])
        if a.stride & (a.stride - 1):
            raise node.error(f"stride {a.stride} is not a power of two (1, 2, 4 or 8): the PCM strides by 2 "
                             f"in its first convolutions", "stride")
        widths = self.widths(node, c)
        bad = next((x for x in widths if x % a.groups), None)
        if bad is not None:
            raise node.error(f"groups={a.groups} does not divide the PCM width {bad} (widths {' -> '.join(map(str, widths))})", "groups")
        for s in pcm_strides(a.stride):
            h, w = (conv_out_size(x, a.kernel, s, a.kernel // 2, 1) for x in (h, w))
        if h < 1 or w < 1:
            raise node.error(f"kernel {a.kernel} is larger than the input", "kernel")
        return TensorType(kind="tokens", shape=(h * w, widths[3]), grid=(h, w))

    def cost(self, node, ins, out):
        a = node.attrs
        c, h, w = _feature_map(node, ins[0])
        widths, params, macs = self.widths(node, c), 0, 0
        for i, s in enumerate(pcm_strides(a.stride)):
            h, w = (conv_out_size(x, a.kernel, s, a.kernel // 2, 1) for x in (h, w))
            params += conv_params(widths[i], widths[i + 1], a.kernel, a.groups, a.bias, norm=i < 2 and a.norm == "bn")
            macs += conv_macs(h * w, widths[i], widths[i + 1], a.kernel, a.groups)
        return Cost(params=params, macs=macs, act_bytes=4 * out.numel)

    def build_torch(self, node, ins, out):
        a, t = node.attrs, ins[0]
        return init_conv(PCM(self.widths(node, _feature_map(node, t)[0]), a.kernel, pcm_strides(a.stride), a.groups,
                             a.act, a.norm, a.bias, a.eps, t.grid if t.kind == "tokens" else None))


# ====================================================================== attention
def centred_pad(size: int, window: int) -> tuple[int, int]:
    """(before, after) padding to a multiple of the window, the remainder after (official code)."""
    pad = (window - size % window) % window
    return pad // 2, pad - pad // 2


class CellAttention(nn.Module):
    """softmax(q kᵀ / sqrt(d) + B) v with q, k, v = x W_qkv (width in -> out), then proj;
    optionally + v (T2T's skip, used where the width changes).  Not attention.Attention:
    that one keeps the width, pads windows at the end and shrinks them to the grid."""

    def __init__(self, cin: int, dim: int, heads: int, qkv_bias: bool, proj_bias: bool, *,
                 grid: tuple[int, int] | None, window: int | None, relpos: bool, vskip: bool):
        super().__init__()
        self.heads, self.grid, self.vskip = heads, grid, vskip
        self.window = None if window is None else (window, window)
        self.qkv = nn.Linear(cin, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.relative_position_bias_table = None
        self.matmul_quant = None  # vitdsl.quant.fake.AttnQuant when the qkv layer is integer-quantized
        if window is not None:
            self.pads = (centred_pad(grid[0], window), centred_pad(grid[1], window))
            if relpos:  # Swin Eq. 4, as in the official WindowAttention with relative_pos=True
                self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
                self.register_buffer("relative_position_index", relative_position_index(window, window), persistent=False)

    def _bias(self) -> torch.Tensor | None:
        if self.relative_position_bias_table is None:
            return None
        n = self.window[0] * self.window[1]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        return bias.permute(2, 0, 1).unsqueeze(0)

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        B_, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B_, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        if self.matmul_quant is None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=self._bias())  # scale d^-1/2, d = out / heads
        else:
            y = self.matmul_quant(q, k, v, self._bias(), q.shape[-1] ** -0.5)
        y = self.proj(y.transpose(1, 2).reshape(B_, N, -1))
        if self.vskip:  # v merged back head-major, as the official Token_transformer does
            y = y + v.transpose(1, 2).reshape(B_, N, -1)
        return y

    def forward(self, x):
        if self.window is None:
            return self._attend(x)
        B, N, C = x.shape
        H, W = self.grid
        (top, bottom), (left, right) = self.pads
        x = F.pad(x.reshape(B, H, W, C), (0, 0, left, right, top, bottom))
        y = self._attend(_partition(x, self.window))
        y = _reverse(y, self.window, H + top + bottom, W + left + right)
        return y[:, top:top + H, left:left + W].reshape(B, N, -1)


@register_op
class CellAttentionOp(OpDef):
    """`cell_attention heads=2 out=128 attn=window(7, relpos=none) qkv_bias [vskip]`."""

    kind = "cell_attention"
    default_name = "attn"

    class Attrs(Attrs):
        heads: int = Field(ge=1, le=4096)
        out: int | None = Field(None, ge=1, le=1 << 20)  # output width; none: the input's
        attn: AttnKind = AttnKind()
        qkv_bias: bool = False
        proj_bias: bool = True
        vskip: bool = False
        dim: int | None = Field(None, ge=1)  # optional check of the input width

        _none = field_validator("out", mode="before")(none_word)

    def infer(self, node, ins):
        t, a = ins[0], node.attrs
        if t.kind != "tokens":
            raise node.error(f"{_who(node)} needs tokens, got {_describe(t)}")
        if a.dim is not None and a.dim != t.channels:
            raise node.error(f"dim={a.dim} but the input has {t.channels} channels", "dim")
        out = a.out or t.channels
        if out % a.heads:
            raise node.error(f"dim {out} is not divisible by heads {a.heads}", "heads")
        if a.attn.kind == "window":
            if t.grid is None or t.prefix:
                raise node.error("windowed attention needs patch tokens on a grid, without class tokens", "attn")
            if a.attn.shift not in ("none", 0):
                raise node.error("ViTAEv2 cells do not shift their windows; drop shift=", "attn")
        return TensorType(kind="tokens", shape=(t.shape[0], out), grid=t.grid, prefix=t.prefix)

    def cost(self, node, ins, out):
        a, cin = node.attrs, ins[0].channels
        n, c = out.shape
        params = cin * 3 * c + (3 * c if a.qkv_bias else 0) + c * c + (c if a.proj_bias else 0)
        if a.attn.kind == "window":
            ws = a.attn.size
            tokens = math.prod(g + sum(centred_pad(g, ws)) for g in out.grid)  # qkv and proj run on the padded grid
            if a.attn.relpos == "table":
                params += (2 * ws - 1) ** 2 * a.heads
            macs = tokens * (cin * 3 * c + c * c) + 2 * tokens * ws * ws * c
        else:
            macs = n * (cin * 3 * c + c * c) + 2 * n * n * c  # projections, q kᵀ and A v
        return Cost(params=params, macs=macs, act_bytes=4 * out.numel)

    def build_torch(self, node, ins, out):
        a, t = node.attrs, ins[0]
        window = a.attn.size if a.attn.kind == "window" else None
        m = CellAttention(t.channels, out.channels, a.heads, a.qkv_bias, a.proj_bias, grid=t.grid, window=window,
                          relpos=a.attn.relpos == "table", vskip=a.vskip)
        if m.relative_position_bias_table is not None:
            trunc_normal(m.relative_position_bias_table, std=0.02)
        return _init_linears(m)


# ====================================================================== the cells
@register_op
class ReductionCell(OpDef):
    """`reduction out=64 kernel=7 stride=4 dilations=(1, 2, 3, 4) heads=1 attn=window(7, relpos=none) qkv_bias`:
    downsample by `stride` and embed into `out`-wide tokens (image or token map in)."""

    kind = "reduction"
    default_name = "rc"
    composite = True

    class Attrs(Attrs):
        out: int = Field(ge=1, le=1 << 20)  # token width
        embed: int | None = Field(None, ge=1, le=1 << 20)  # PRM/PCM width per branch; none: out
        kernel: int = Field(3, ge=1, le=1024)  # PRM kernel
        stride: int = Field(2, ge=1, le=1024)  # downsampling ratio (the PCM allows 1, 2, 4, 8)
        dilations: Dilations = Field((1, 2), min_length=1, max_length=64)
        fuse: Literal["cat", "sum"] = "cat"
        heads: int = Field(1, ge=1, le=4096)
        attn: AttnKind = AttnKind()
        qkv_bias: bool = False
        vskip: bool = False
        mlp: float = Field(1.0, gt=0, le=1024)
        act: Literal["gelu", "gelu_tanh", "relu", "silu"] = "gelu"
        eps: float = Field(1e-5, gt=0, lt=1)
        pcm: bool = True
        groups: int = Field(1, ge=1, le=1 << 20)  # PCM groups

        _one = field_validator("dilations", mode="before")(_tuple)
        _none = field_validator("embed", mode="before")(none_word)

    def expand(self, a):
        e = a.embed or a.out
        subs = [
            SubNode(suffix="prm", op="prm", attrs={"out": e, "kernel": a.kernel, "stride": a.stride,
                                                   "dilations": a.dilations, "fuse": a.fuse},
                    inputs=["<in>"], spans_from={"out": "embed", "kernel": "kernel", "stride": "stride",
                                                 "dilations": "dilations", "fuse": "fuse"}),
            SubNode(suffix="norm1", op="norm", attrs={"eps": a.eps}, inputs=["prm"], spans_from={"eps": "eps"}),
            SubNode(suffix="attn", op="cell_attention",
                    attrs={"heads": a.heads, "out": a.out, "attn": a.attn, "qkv_bias": a.qkv_bias, "vskip": a.vskip},
                    inputs=["norm1"], spans_from={"heads": "heads", "out": "out", "attn": "attn"}),
        ]
        last = "attn"
        if a.pcm:  # f_lg = f_g + PCM(f): the branch starts from the cell's input
            subs += [
                SubNode(suffix="pcm", op="pcm", attrs={"hidden": e, "mid": e, "out": a.out, "stride": a.stride, "groups": a.groups},
                        inputs=["<in>"], spans_from={"groups": "groups", "stride": "stride"}),
                SubNode(suffix="res1", op="add", attrs={}, inputs=["attn", "pcm"]),
            ]
            last = "res1"
        return subs + _ffn(last, a)


@register_op
class NormalCell(OpDef):
    """`normal heads=2 attn=window(7, relpos=none) qkv_bias groups=32`: attention and a PCM
    in parallel, both added to the input, then the MLP."""

    kind = "normal"
    default_name = "nc"
    composite = True

    class Attrs(Attrs):
        heads: int = Field(ge=1, le=4096)
        dim: int | None = Field(None, ge=1)  # check only
        mlp: float = Field(4.0, gt=0, le=1024)
        act: Literal["gelu", "gelu_tanh", "relu", "silu"] = "gelu"
        attn: AttnKind = AttnKind()
        qkv_bias: bool = False
        eps: float = Field(1e-6, gt=0, lt=1)
        pcm: bool = True
        pcm_ratio: float | None = Field(None, gt=0, le=1024)  # PCM hidden width / dim; none: mlp
        groups: int = Field(1, ge=1, le=1 << 20)  # PCM groups

        _none = field_validator("pcm_ratio", mode="before")(none_word)

    def expand(self, a):
        subs = [
            SubNode(suffix="norm1", op="norm", attrs={"eps": a.eps}, inputs=["<in>"], spans_from={"eps": "eps"}),
            SubNode(suffix="attn", op="cell_attention",
                    attrs={"heads": a.heads, "attn": a.attn, "qkv_bias": a.qkv_bias, "dim": a.dim},
                    inputs=["norm1"], spans_from={"heads": "heads", "attn": "attn", "dim": "dim"}),
        ]
        if a.pcm:  # PCM on the un-normalised input, hidden width int(dim * ratio) as the MLP's
            ratio = a.pcm_ratio if a.pcm_ratio is not None else a.mlp
            subs += [
                SubNode(suffix="pcm", op="pcm", attrs={"ratio": ratio, "groups": a.groups}, inputs=["<in>"],
                        spans_from={"groups": "groups", "ratio": "pcm_ratio" if a.pcm_ratio is not None else "mlp"}),
                SubNode(suffix="res1", op="add", attrs={}, inputs=["<in>", "attn", "pcm"]),
            ]
        else:
            subs.append(SubNode(suffix="res1", op="add", attrs={}, inputs=["<in>", "attn"]))
        return subs + _ffn("res1", a)


def _ffn(src: str, a) -> list[SubNode]:
    """x + MLP(LN(x)), the feed-forward half of both cells."""
    return [
        SubNode(suffix="norm2", op="norm", attrs={"eps": a.eps}, inputs=[src], spans_from={"eps": "eps"}),
        SubNode(suffix="mlp", op="mlp", attrs={"ratio": a.mlp, "act": a.act}, inputs=["norm2"],
                spans_from={"ratio": "mlp", "act": "act"}),
        SubNode(suffix="res2", op="add", attrs={}, inputs=[src, "mlp"]),
    ]
