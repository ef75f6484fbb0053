"""Named shortcuts (ExMobileViT's ExShortcut) on any backbone."""
import pytest
import torch

import vitdsl
from vitdsl import SpecError
from helpers import where

SC = """\
model sc {
  input image 3x64x64
  embed patch size=4 dim=32 norm=layernorm
  stage s1 depth=2 {
    transformer heads=2 attn=window(4, shift=alternate) qkv_bias
  }
  stage s2 depth=2 downsample=merge {
    transformer heads=4 attn=window(4, shift=alternate) qkv_bias
  }
  norm layernorm
  pool mean
  head classes=5
  shortcut ex from s1 -> 16, s2 -> 24 act=silu into head
}
"""


def test_shortcut_builds_taps_and_concat():
    g = vitdsl.loads(SC)
    assert g.node("ex.0").inputs == ["s1.1.res2"] and g.node("ex.1").inputs == ["s2.1.res2"]
    assert g.node("ex.cat").inputs == ["ex.0", "ex.1", "pool"]  # taps first, then the main path
    assert g.node("head").inputs == ["ex.cat"]
    assert g.node("ex.cat").out.shape == (16 + 24 + 64,)
    assert vitdsl.loads(g.to_vit()) == g


def test_shortcut_matches_a_hand_written_forward():
    g = vitdsl.loads(SC)
    m = vitdsl.compile(g).eval()
    x = torch.randn(2, 3, 64, 64)
    feats = {}
    hooks = [m.get_submodule(n).register_forward_hook(lambda mod, i, o, n=n: feats.__setitem__(n, o))
             for n in ("s1.1.res2", "s2.1.res2", "pool")]
    with torch.no_grad():
        out = m(x)
    for h in hooks:
        h.remove()

    def tap(name, t, grid):
        conv, bn = m.get_submodule(f"{name}.conv"), m.get_submodule(f"{name}.bn")
        img = t.transpose(1, 2).reshape(t.shape[0], t.shape[2], *grid)
        return torch.nn.functional.silu(bn(conv(img))).mean(dim=(2, 3))

    cat = torch.cat([tap("ex.0", feats["s1.1.res2"], (16, 16)), tap("ex.1", feats["s2.1.res2"], (8, 8)), feats["pool"]], 1)
    head = m.get_submodule("head")
    torch.testing.assert_close(out, torch.nn.functional.linear(cat, head.weight, head.bias))


def test_shortcut_params_and_macs_are_predicted():
    g = vitdsl.loads(SC)
    m = vitdsl.compile(g)
    assert g.total().params == sum(p.numel() for p in m.parameters())
    # tap: conv 1x1 without bias + BN affine
    assert g.node("ex.0").cost.params == 32 * 16 + 2 * 16
    assert g.node("ex.1").cost.params == 64 * 24 + 2 * 24


def test_tap_of_unknown_stage():
    text = SC.replace("from s1 -> 16", "from sx1 -> 16")
    with pytest.raises(SpecError) as info:
        vitdsl.loads(text)
    assert info.value.message == "shortcut taps unknown stage 'sx1' (did you mean 's1'?)"
    assert (info.value.line, info.value.column) == where(text, "sx1 -> 16")


def test_tap_after_the_destination():
    text = SC.replace("into head", "into pool")
    text = text.replace("  pool mean\n  head classes=5\n", "  pool mean\n  extra: norm layernorm\n  head classes=5\n")
    text = text.replace("s2 -> 24", "extra -> 24")
    with pytest.raises(SpecError) as info:
        vitdsl.loads(text)
    assert info.value.message == "shortcut taps 'extra', which comes after 'pool'"
    assert (info.value.line, info.value.column) == where(text, "extra -> 24")


def test_shortcut_into_unknown_node():
    text = SC.replace("into head", "into haed")
    with pytest.raises(SpecError) as info:
        vitdsl.loads(text)
    assert info.value.message == "unknown name 'haed' after into (did you mean 'head'?)"
    assert (info.value.line, info.value.column) == where(text, "haed")


def test_shortcut_needs_pooled_destination_input():
    text = SC.replace("  pool mean\n  head classes=5\n", "  head pool=mean classes=5\n")
    with pytest.raises(SpecError) as info:
        vitdsl.loads(text)
    assert "cannot concatenate" in info.value.message
