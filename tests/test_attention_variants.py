"""Windowed attention (Swin) and residual attention (ReViT), against independent references."""
import os

import pytest
import torch
import torch.nn.functional as F

import vitdsl
from vitdsl import SpecError
from conftest import ROOT
from helpers import where

timm = pytest.importorskip("timm")

SWIN = os.path.join(ROOT, "specs", "swin_tiny_patch4_window7_224.vit")
REVIT = os.path.join(ROOT, "specs", "revit_base_patch16_224.vit")


# ----------------------------------------------------------------- Swin
def _swin_pair(size):
    from vitdsl.interop.timm import convert_state_dict

    g = vitdsl.loads(open(SWIN).read().replace("3x224x224", f"3x{size}x{size}"))
    torch.manual_seed(0)
    ref = timm.create_model("swin_tiny_patch4_window7_224", img_size=size).eval()
    model = vitdsl.compile(g).eval()
    model.load_state_dict(convert_state_dict(g, ref.state_dict()), strict=True)
    return g, ref, model


def test_swin_tiny_parameter_count():
    g = vitdsl.load(SWIN)
    assert g.total().params == 28_288_354  # published timm count
    assert sum(p.numel() for p in timm.create_model("swin_tiny_patch4_window7_224").parameters()) == 28_288_354


@pytest.mark.parametrize("size", [224, 256, 96])  # 256: every stage pads; 96: windows shrink to the grid
def test_swin_tiny_logits_match_timm(size):
    g, ref, model = _swin_pair(size)
    assert g.total().params == sum(p.numel() for p in ref.parameters())
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
    with torch.no_grad():
        assert (model(x) - ref(x)).abs().max().item() <= 1e-4


def test_window_shift_alternates_and_shrinks():
    g = vitdsl.load(SWIN)
    m = vitdsl.compile(g)
    assert m.get_submodule("s1.0.attn").shift == (0, 0)
    assert m.get_submodule("s1.1.attn").shift == (3, 3)
    assert m.get_submodule("s4.1.attn").window == (7, 7)
    assert m.get_submodule("s4.1.attn").shift == (0, 0)  # 7x7 grid = one window: no shift


@pytest.mark.parametrize("bad,msg", [
    ("window(0, shift=alternate)", "greater than or equal to 1"),
    ("window(7, shift=7)", "shift 7 must be at least 0 and smaller than the window size 7"),
    ("window(shift=2)", "window attention needs a size"),
    ("windw(7)", "unknown attention 'windw(...)'"),
])
def test_window_diagnostics(bad, msg):
    text = open(SWIN).read().replace("let win = window(7, shift=alternate)", f"let win = {bad}")
    with pytest.raises(SpecError) as info:
        vitdsl.loads(text)
    e = info.value
    assert msg in e.message
    assert (e.line, e.column) == where(text, "attn=win")


def test_window_attention_needs_a_grid():
    text = open(os.path.join(ROOT, "specs", "_vit.vit")).read().replace("template vit", "model v").replace(
        "qkv_bias eps=1e-6", "qkv_bias eps=1e-6 attn=window(7)")
    with pytest.raises(SpecError, match="windowed attention needs patch tokens on a grid, without class tokens") as info:
        vitdsl.loads(text)
    assert (info.value.line, info.value.column) == where(text, "attn=window(7)")


# ----------------------------------------------------------------- ReViT
def test_revit_base_parameter_count():
    g = vitdsl.load(REVIT)
    assert g.total().params == 86_566_121  # counted from the official code (DESIGN.md §4)
    with torch.device("meta"):
        assert sum(p.numel() for p in vitdsl.compile(g, seed=None).parameters()) == 86_566_121


def test_scores_are_graph_edges():
    g = vitdsl.load(REVIT)
    assert g.nx.edges["blocks.3.attn", "blocks.4.attn"]["kind"] == "scores"
    assert g.nx.edges["alpha", "blocks.4.attn"]["kind"] == "alpha"
    assert "blocks.0.attn#scores" not in g.node("blocks.0.attn").inputs  # the first block has no past
    assert g.node("blocks.4.attn").inputs[-1] == "blocks.3.attn#scores"


SMALL = """\
model small {
  input image 3x32x32
  embed patch size=8 dim=64
  tokens cls=0
  stage blocks depth=3 {
    transformer heads=4 qkv_bias RES
  }
  norm layernorm eps=1e-6
  head pool=mean classes=10
}
"""


def _small(res: str):
    return vitdsl.loads(SMALL.replace("RES", res))


def reference_revit(model, x, alpha):
    """ReViT forward written out from the paper (Eq. 5-6), reusing the modules' weights."""
    x = model.get_submodule("tokens")(model.get_submodule("patch_embed")(x))
    prev = None
    for i in range(3):
        b = f"blocks.{i}"
        h = model.get_submodule(f"{b}.norm1")(x)
        attn = model.get_submodule(f"{b}.attn")
        B, N, C = h.shape
        q, k, v = attn.qkv(h).reshape(B, N, 3, 4, C // 4).permute(2, 0, 3, 1, 4)
        s = q @ k.transpose(-2, -1) / (C // 4) ** 0.5
        if prev is not None:
            s = alpha * s + (1 - alpha) * prev
        prev = s
        y = (s.softmax(-1) @ v).transpose(1, 2).reshape(B, N, C)
        x = x + attn.proj(y)
        x = x + model.get_submodule(f"{b}.mlp")(model.get_submodule(f"{b}.norm2")(x))
    return model.get_submodule("head")(model.get_submodule("norm")(x))


@pytest.mark.parametrize("res,alpha", [("residual(alpha=0.3)", 0.3), ("residual(alpha=0.5, learnable)", 0.5),
                                       ("residual(alpha=0.7, per_block)", 0.7)])
def test_residual_attention_matches_the_paper(res, alpha):
    model = vitdsl.compile(_small(res)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_revit(model, x, alpha), atol=1e-5, rtol=1e-5)


def test_alpha_one_equals_plain_attention():
    plain = vitdsl.compile(_small("")).eval()
    res = vitdsl.compile(_small("residual(alpha=1.0)")).eval()
    res.load_state_dict(plain.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a, b = plain(x), res(x)
    assert torch.equal(a, b)
    assert not torch.equal(vitdsl.compile(_small("residual(alpha=0.5)")).eval()(x), a)


@pytest.mark.parametrize("res,params", [("residual(alpha=0.5, learnable)", ["alpha.value"]),
                                        ("residual(alpha=0.5, per_block)", [f"blocks.{i}.attn.alpha" for i in range(3)])])
def test_gradients_reach_alpha(res, params):
    model = vitdsl.compile(_small(res))
    model(torch.randn(2, 3, 32, 32)).logsumexp(-1).sum().backward()
    named = dict(model.named_parameters())
    for p in params[1:] if "per_block" in res else params:  # block 0 has no past scores, so no gradient
        assert named[p].grad is not None and named[p].grad.abs().item() > 0


def test_residual_alpha_out_of_range():
    text = SMALL.replace("RES", "residual(alpha=1.5)")
    with pytest.raises(SpecError) as info:
        vitdsl.loads(text)
    assert (info.value.line, info.value.column) == where(text, "residual(alpha=1.5)")
    assert "less than or equal to 1" in info.value.message


def test_residual_attention_across_a_join_is_an_error():
    text = SMALL.replace("RES", "residual(alpha=0.5)").replace(
        "  norm layernorm eps=1e-6\n",
        "  side: transformer heads=4 residual(alpha=0.5) from=tokens\n  j: add from=(blocks, side)\n"
        "  last: transformer heads=4 residual(alpha=0.5)\n  norm layernorm eps=1e-6\n")
    with pytest.raises(SpecError) as info:
        vitdsl.loads(text)
    assert info.value.message == ("residual attention in 'last.attn' would have to merge scores from 2 paths "
                                  "(blocks.2.attn, side.attn); residual attention cannot cross a join")
    assert (info.value.line, info.value.column) == where(text, "residual(alpha=0.5)", 2)


RESWIN = """\
model reswin {
  input image 3x64x64
  embed patch size=4 dim=32 norm=layernorm
  stage s1 depth=2 {
    transformer heads=2 attn=window(4, shift=alternate) qkv_bias residual(alpha=0.5, learnable)
  }
  stage s2 depth=2 downsample=merge {
    transformer heads=4 attn=window(4, shift=alternate) qkv_bias residual(alpha=0.5, learnable)
  }
  norm layernorm
  head pool=mean classes=5
}
"""


def test_residual_windowed_attention_trains_one_step():
    g = vitdsl.loads(RESWIN)
    assert g.nx.edges["s1.1.attn", "s2.0.attn"]["kind"] == "scores"  # across the merge: heads and windows change
    model = vitdsl.compile(g)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    assert model.get_submodule("alpha").value.grad.abs().item() > 0
    opt.step()
    assert torch.isfinite(loss)
    assert not torch.equal(before["alpha.value"], model.state_dict()["alpha.value"])
    assert g.total().params == sum(p.numel() for p in model.parameters())


def test_global_scores_are_pooled_on_the_token_grid_like_the_official_code():
    """Official ReViT `downsample`: heads averaged, then 2x2 average pooling of the query
    and key grids; written out here by hand on a 4x4 grid."""
    from vitdsl.ops.attention import adapt_scores

    prev = torch.randn(1, 2, 16, 16)
    got = adapt_scores(prev, torch.Size([1, 4, 4, 4]), batch=1)
    m = prev.mean(1)[0]  # (16 queries, 16 keys)
    want = torch.zeros(4, 4)
    for qi in range(4):
        for ki in range(4):
            qs = [(2 * (qi // 2) + dy) * 4 + 2 * (qi % 2) + dx for dy in (0, 1) for dx in (0, 1)]
            ks = [(2 * (ki // 2) + dy) * 4 + 2 * (ki % 2) + dx for dy in (0, 1) for dx in (0, 1)]
            want[qi, ki] = m[qs][:, ks].mean()
    assert got.shape == (1, 1, 4, 4)
    torch.testing.assert_close(got[0, 0], want)
    up = adapt_scores(torch.randn(1, 1, 4, 4), torch.Size([1, 1, 4, 16]), batch=1)  # keys grow: nearest
    assert up.shape == (1, 1, 4, 16)


def test_residual_options_are_exclusive():
    with pytest.raises(SpecError, match="residual takes one of learnable, per_block or fixed"):
        _small("residual(alpha=0.5, learnable, fixed)")
