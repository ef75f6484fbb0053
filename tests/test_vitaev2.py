"""ViTAEv2: the reduction / normal cells (vitdsl/ops/vitae.py) and specs/vitaev2_s.vit.

References: the official code's parameter count for ViTAEv2-S (19,355,688, 1000 classes),
the paper's 5.7 G MACs, and the cell equations of Zhang et al., IJCV 2023, §3, written
out below with plain torch ops."""
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import vitdsl
from helpers import err, where

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = os.path.join(ROOT, "specs", "vitaev2_s.vit")

OFFICIAL_PARAMS = 19_355_688  # sum of numels of ViTAEv2_S() in ViTAE-Transformer/Image-Classification/vitaev2
PAPER_MACS = 5.7e9  # the ViTAEv2 paper's figure for ViTAEv2-S at 224x224


@pytest.fixture(scope="module")
def graph():
    return vitdsl.load(SPEC)


@pytest.fixture(scope="module")
def model(graph):
    return vitdsl.compile(graph).eval()


# ------------------------------------------------------------------ the spec
def test_parameter_count(graph):
    assert graph.total().params == OFFICIAL_PARAMS
    with torch.device("meta"):
        built = vitdsl.compile(graph, seed=None)
    assert sum(p.numel() for p in built.parameters()) == OFFICIAL_PARAMS


def test_per_cell_parameters_follow_the_reference_arithmetic(graph):
    """docs/research/seed_architectures.md §3.6: RC and one NC per stage, and the head."""
    per_block: dict[str, int] = {}
    for n in graph.nodes():
        per_block[n.block] = per_block.get(n.block, 0) + n.cost.params
    assert [per_block[f"rc{i}"] for i in (1, 2, 3, 4)] == [176_256, 244_800, 709_632, 2_795_520]
    assert [per_block[f"s{i}.0"] for i in (1, 2, 3, 4)] == [382_784, 241_792, 876_800, 3_326_464]
    assert (per_block["rc1"] - graph.node("rc1.prm").cost.params - graph.node("rc1.pcm").cost.params) == 62_464
    assert per_block["head"] == 513_000


def test_macs_match_paper_and_flop_counter(graph, model):
    predicted = graph.total().macs
    assert abs(predicted - PAPER_MACS) <= 0.02 * PAPER_MACS
    counter = FlopCounterMode(display=False)
    # The CPU flash-attention kernel has no flop formula; the math backend spells SDPA
    # out as bmm, which the counter sees.
    with torch.no_grad(), counter, sdpa_kernel([SDPBackend.MATH]):
        y = model(torch.randn(1, 3, 224, 224))
    assert y.shape == (1, 1000) and torch.isfinite(y).all()
    measured = counter.get_total_flops() / 2  # flops = 2 * MACs
    assert abs(measured - predicted) <= 0.02 * measured, (measured, predicted)


def _forward_backward(model, x: torch.Tensor, keys: tuple[str, ...]) -> None:
    model.train()
    try:
        x.requires_grad_(True)
        model(x).logsumexp(-1).mean().backward()
    finally:
        model.eval()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    grads = dict((k, p.grad) for k, p in model.named_parameters())
    assert all(g is not None for g in grads.values())
    for key in keys:
        assert grads[key].abs().sum() > 0, key
    model.zero_grad(set_to_none=True)


@pytest.mark.slow
def test_forward_backward(model):
    _forward_backward(model, torch.randn(1, 3, 224, 224),
                      ("rc1.prm.convs.3.0.weight", "rc1.pcm.0.weight", "s1.1.pcm.6.weight", "rc3.attn.qkv.weight", "head.weight"))


def test_forward_backward_small():
    """Every op of both cells (window and global, v skip, relative bias) on a small input."""
    model = vitdsl.compile(vitdsl.loads(SMALL))
    _forward_backward(model, torch.randn(2, 3, 36, 36),
                      ("r1.prm.convs.2.0.weight", "r1.pcm.4.weight", "s1.0.attn.relative_position_bias_table",
                       "r2.attn.qkv.weight", "s2.0.pcm.6.bias", "head.weight"))


def test_roundtrip(graph):
    text = graph.to_vit()
    assert vitdsl.loads(text) == graph
    assert vitdsl.loads(text).to_vit() == text


def test_graph_shows_the_parallel_branches(graph):
    """The PCM starts from the cell input, beside norm1 -> attn, and joins at res1."""
    assert graph.node("s2.0.pcm").inputs == ["rc2.res2"]
    assert graph.node("s2.0.res1").inputs == ["rc2.res2", "s2.0.attn", "s2.0.pcm"]
    assert graph.node("rc2.pcm").inputs == ["s1.1.res2"]  # not the PRM tokens
    assert graph.node("rc2.res1").inputs == ["rc2.attn", "rc2.pcm"]  # no residual from the PRM
    assert graph.node("rc1.prm").out.shape == (56 * 56, 4 * 64)
    assert [graph.node(f"rc{i}.res2").out.grid for i in (1, 2, 3, 4)] == [(56, 56), (28, 28), (14, 14), (7, 7)]


# ------------------------------------------------------------------ cell math
SMALL = """\
model m {
  input image 3x36x36
  r1: reduction out=16 embed=8 kernel=7 stride=4 dilations=(1, 2, 3) heads=2 attn=window(4, relpos=none) qkv_bias
  stage s1 depth=1 {
    normal heads=2 attn=window(4) qkv_bias groups=4
  }
  r2: reduction out=32 embed=16 dilations=(1, 2) heads=2 vskip groups=4
  stage s2 depth=1 {
    normal heads=4 qkv_bias groups=8
  }
  head pool=mean classes=5
}
"""


def img2seq(f):
    """(B, C, H, W) -> (B, H*W, C), row-major."""
    B, C, H, W = f.shape
    return f.permute(0, 2, 3, 1).reshape(B, H * W, C)


def seq2img(x, h, w):
    B, N, C = x.shape
    return x.reshape(B, h, w, C).permute(0, 3, 1, 2)


def conv_bn_act(x, conv, bn=None, act=None, stride=1):
    y = F.conv2d(x, conv.weight, conv.bias, stride, conv.kernel_size[0] // 2, 1, conv.groups)
    if bn is not None:  # eval: (x - mean) / sqrt(var + eps) * gamma + beta
        y = (y - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
        y = y * bn.weight[:, None, None] + bn.bias[:, None, None]
    return act(y) if act is not None else y


def ref_pcm(f, pcm, strides):
    """PCM: conv-BN-SiLU, conv-BN-SiLU, conv (three convolutions, §3)."""
    f = conv_bn_act(f, pcm[0], pcm[1], F.silu, strides[0])
    f = conv_bn_act(f, pcm[3], pcm[4], F.silu, strides[1])
    return conv_bn_act(f, pcm[6], stride=strides[2])


def ref_mhsa(x, attn, heads, grid=None, window=None, vskip=False):
    """softmax(q kᵀ / sqrt(d) + B) v per head, windows taken one by one after padding the
    grid with zeros (remainder at the bottom/right), relative bias B from its definition."""
    B, N, _ = x.shape
    dim = attn.proj.in_features
    d = dim // heads

    def mhsa(t):  # (B, n, Cin) -> (B, n, dim)
        q, k, v = F.linear(t, attn.qkv.weight, attn.qkv.bias).split(dim, dim=-1)
        outs = []
        for h in range(heads):
            s = q[..., h * d:(h + 1) * d] @ k[..., h * d:(h + 1) * d].transpose(1, 2) / math.sqrt(d)
            if attn.relative_position_bias_table is not None:
                n = t.shape[1]
                bias = torch.empty(n, n)
                for i in range(n):
                    for j in range(n):
                        dy, dx = i // window - j // window, i % window - j % window
                        bias[i, j] = attn.relative_position_bias_table[(dy + window - 1) * (2 * window - 1) + dx + window - 1, h]
                s = s + bias
            outs.append(torch.softmax(s, -1) @ v[..., h * d:(h + 1) * d])
        y = F.linear(torch.cat(outs, -1), attn.proj.weight, attn.proj.bias)
        return y + v if vskip else y

    if window is None:
        return mhsa(x)
    H, W = grid
    ph, pw = (-H) % window, (-W) % window
    top, left = ph // 2, pw // 2
    canvas = x.new_zeros(B, H + ph, W + pw, x.shape[-1])
    canvas[:, top:top + H, left:left + W] = x.reshape(B, H, W, -1)
    out = x.new_zeros(B, H + ph, W + pw, dim)
    for i in range(0, H + ph, window):
        for j in range(0, W + pw, window):
            win = canvas[:, i:i + window, j:j + window].reshape(B, window * window, -1)
            out[:, i:i + window, j:j + window] = mhsa(win).reshape(B, window, window, dim)
    return out[:, top:top + H, left:left + W].reshape(B, H * W, dim)


def ln(x, norm):
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def ffn(x, cell):
    """f' = f + FFN(LN(f))."""
    h = F.gelu(F.linear(ln(x, cell.norm2), cell.mlp.fc1.weight, cell.mlp.fc1.bias))
    return x + F.linear(h, cell.mlp.fc2.weight, cell.mlp.fc2.bias)


def ref_reduction(f, cell, kernel, stride, dilations, heads, window, vskip):
    """f_ms = Img2Seq(Cat_j GELU(Conv(f; s, r_j))); f_lg = MHSA(LN(f_ms)) + Img2Seq(PCM(f));
    f' = f_lg + FFN(LN(f_lg))."""
    branches = []
    for conv, r in zip(cell.prm.convs, dilations):
        pad = math.ceil(((kernel - 1) * r + 1 - stride) / 2)
        branches.append(F.gelu(F.conv2d(f, conv[0].weight, conv[0].bias, stride, pad, r)))
    f_ms = img2seq(torch.cat(branches, dim=1))
    h, w = branches[0].shape[-2:]
    f_g = ref_mhsa(ln(f_ms, cell.norm1), cell.attn, heads, (h, w), window, vskip)
    strides = {4: (2, 2, 1), 2: (2, 1, 1)}[stride]
    return ffn(f_g + img2seq(ref_pcm(f, cell.pcm, strides)), cell), (h, w)


def ref_normal(x, grid, cell, heads, window):
    """f_lg = f + MHSA(LN(f)) + Img2Seq(PCM(Seq2Img(f))); f' = f_lg + FFN(LN(f_lg))."""
    f_g = ref_mhsa(ln(x, cell.norm1), cell.attn, heads, grid, window)
    return ffn(x + f_g + img2seq(ref_pcm(seq2img(x, *grid), cell.pcm, (1, 1, 1))), cell)


def test_cells_match_the_paper_equations():
    g = vitdsl.loads(SMALL)
    model = vitdsl.compile(g).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # every parameter and BN statistic random, so no term hides
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if p.dim() > 1 else 0.5))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=gen) + 0.5)
    seen: dict[str, torch.Tensor] = {}
    for block in ("r1", "s1.0", "r2", "s2.0"):
        model.get_submodule(f"{block}.res2").register_forward_hook(lambda m, i, o, block=block: seen.__setitem__(block, o))
    x = torch.randn(2, 3, 36, 36, generator=gen)
    with torch.no_grad():
        model(x)
        cell = model.get_submodule
        y1, grid1 = ref_reduction(x, cell("r1"), 7, 4, (1, 2, 3), 2, 4, False)
        assert grid1 == (9, 9)  # 9 is no multiple of the window 4: padding 1 above, 2 below
        y2 = ref_normal(seen["r1"], grid1, cell("s1.0"), 2, 4)
        y3, grid3 = ref_reduction(seq2img(seen["s1.0"], *grid1), cell("r2"), 3, 2, (1, 2), 2, None, True)
        y4 = ref_normal(seen["r2"], grid3, cell("s2.0"), 4, None)
    for block, want in zip(("r1", "s1.0", "r2", "s2.0"), (y1, y2, y3, y4)):
        assert want.abs().max() > 1e-2
        torch.testing.assert_close(seen[block], want, atol=1e-5, rtol=1e-5, msg=block)


@pytest.mark.parametrize("change", [
    ("r1: reduction out=16", "r1: reduction pcm=false out=16"),
    ("normal heads=2 attn", "normal heads=2 pcm=false attn"),
    ("dilations=(1, 2, 3)", "dilations=(1, 2, 3) fuse=sum"),
    ("dilations=(1, 2) heads=2", "dilations=2 heads=2"),
    ("normal heads=4 qkv_bias groups=8", "normal heads=4 qkv_bias pcm_ratio=2.0 groups=8"),
])
def test_variants_cost_equals_module(change):
    text = SMALL.replace(*change)
    assert text != SMALL
    g = vitdsl.loads(text)
    model = vitdsl.compile(g).eval()
    assert g.total().params == sum(p.numel() for p in model.parameters())
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter, sdpa_kernel([SDPBackend.MATH]):
        assert model(torch.randn(1, 3, 36, 36)).shape == (1, 5)
    assert abs(counter.get_total_flops() / 2 - g.total().macs) <= 0.02 * g.total().macs
    assert vitdsl.loads(g.to_vit()) == g


def test_switches_change_the_graph():
    g = vitdsl.loads(SMALL.replace("r1: reduction out=16", "r1: reduction pcm=false out=16"))
    assert "r1.pcm" not in g and g.node("r1.norm2").inputs == ["r1.attn"]
    g = vitdsl.loads(SMALL.replace("dilations=(1, 2, 3)", "dilations=(1, 2, 3) fuse=sum"))
    assert g.node("r1.prm").out.shape == (81, 8)
    g = vitdsl.loads(SMALL.replace("dilations=(1, 2) heads=2", "dilations=2 heads=2"))
    assert g.node("r2.prm").attrs.dilations == (2,)


# ------------------------------------------------------------------ diagnostics
def test_prm_dilations_that_disagree():
    text = """\
model m {
  input image 3x57x57
  r1: reduction out=16 kernel=4 dilations=(1, 2)
  head pool=mean classes=5
}
"""
    e = err(text)
    assert (e.line, e.column) == where(text, "dilations=(1, 2)")
    assert e.message == ("dilations (1, 2) give PRM branches of different sizes (dilation 1 -> 28x28, "
                         "dilation 2 -> 29x29; kernel 4, stride 2, input 57x57), so they cannot be concatenated")


def test_prm_dilation_must_be_positive():
    text = SMALL.replace("dilations=(1, 2, 3)", "dilations=(1, 0)")
    e = err(text)
    assert (e.line, e.column) == where(text, "dilations=(1, 0)")
    assert e.message.startswith("invalid value (1, 0) for 'dilations' of reduction:")


def test_reduction_cell_on_class_tokens():
    text = """\
model m {
  input image 3x32x32
  embed patch size=8 dim=16
  tokens cls=1
  r1: reduction out=32
  head pool=mean classes=5
}
"""
    e = err(text)
    assert (e.line, e.column) == where(text, "r1: reduction")
    assert e.message == ("prm in 'r1' needs an image or patch tokens on a grid without class tokens, "
                         "got tokens 17x16 with 1 class token")


def test_reduction_cell_on_a_vector():
    text = SMALL.replace("  head pool=mean classes=5", "  pool mean\n  r3: reduction out=8")
    e = err(text)
    assert (e.line, e.column) == where(text, "r3: reduction")
    assert e.message == "prm in 'r3' needs an image or patch tokens on a grid without class tokens, got vector 32"


def test_normal_cell_on_an_image():
    text = """\
model m {
  input image 3x32x32
  stage s1 depth=2 {
    normal heads=1
  }
  head pool=mean classes=5
}
"""
    e = err(text)
    assert (e.line, e.column) == where(text, "normal heads=1")
    assert e.message == "layernorm needs tokens or a vector, got an image 3x32x32"


@pytest.mark.parametrize("old, new, needle, message", [
    ("normal heads=4 qkv_bias groups=8", "normal heads=4 qkv_bias groups=3", "groups=3",
     "groups=3 does not divide the PCM width 32 (widths 32 -> 128 -> 32 -> 32)"),
    ("normal heads=4 qkv_bias", "normal heads=5 qkv_bias", "heads=5", "dim 32 is not divisible by heads 5"),
    ("r2: reduction out=32 embed=16 dilations=(1, 2)", "r2: reduction out=32 embed=16 stride=3 dilations=(1, 2)",
     "stride=3", "stride 3 is not a power of two (1, 2, 4 or 8): the PCM strides by 2 in its first convolutions"),
    ("normal heads=2 attn=window(4)", "normal heads=2 attn=window(4, shift=alternate)", "attn=window(4, shift=alternate)",
     "ViTAEv2 cells do not shift their windows; drop shift="),
    ("r2: reduction out=32 embed=16 dilations=(1, 2)", "r2: reduction out=32 embed=16 kernel=1 stride=8 dilations=(1, 2)",
     "kernel=1", "kernel 1 (dilation 1) spans 1 pixels, too few for stride 8: the PRM padding ceil((span - stride) / 2) would be -3"),
    ("normal heads=2 attn", "normal heads=2 dim=24 attn", "dim=24", "dim=24 but the input has 16 channels"),
])
def test_attribute_diagnostics(old, new, needle, message):
    text = SMALL.replace(old, new)
    assert text != SMALL
    e = err(text)
    assert (e.line, e.column) == where(text, needle)
    assert e.message == message
