"""ExMobileViT: ExShortcut on the official and timm MobileViT-S backbones."""
import os

import pytest
import torch

import vitdsl
from conftest import ROOT


def load(name):
    return vitdsl.load(os.path.join(ROOT, "specs", f"{name}.vit"))


def test_exmobilevit_928_parameter_count():
    assert load("mobilevit_s_official").total().params == 5_636_720  # counted from the official code
    g = load("exmobilevit_928")
    assert g.total().params == 5_958_064
    with torch.device("meta"):
        assert sum(p.numel() for p in vitdsl.compile(g, seed=None).parameters()) == 5_958_064


def test_exmobilevit_928_classifier_is_928_wide():
    g = load("exmobilevit_928")
    assert g.node("ex.cat").out.shape == (928,)
    assert g.node("ex.cat").inputs == ["ex.0", "ex.1", "pool"]
    assert g.node("ex.0").inputs[0].startswith("s2.") and g.node("ex.1").inputs[0].startswith("s3.")
    m = vitdsl.compile(g)
    assert m.get_submodule("head").weight.shape == (1000, 928) and m.get_submodule("head").bias is None


def test_exshortcut_on_timm_backbone_adds_exactly_the_taps():
    timm = pytest.importorskip("timm")
    base = sum(p.numel() for p in timm.create_model("mobilevit_s").parameters())
    taps = (96 * 128 + 2 * 128) + (128 * 160 + 2 * 160)  # conv1x1 (no bias) + BN, per tap
    wider_fc = (128 + 160) * 1000  # the classifier reads 928 instead of 640 features
    assert load("exmobilevit_s_timm").total().params == base + taps + wider_fc


@pytest.mark.parametrize("name", ["exmobilevit_928", "exmobilevit_s_timm"])
def test_forward_backward_and_roundtrip(name):
    g = load(name)
    assert vitdsl.loads(g.to_vit()) == g
    m = vitdsl.compile(g)
    out = m(torch.randn(2, 3, 256, 256))
    assert out.shape == (2, 1000)
    out.logsumexp(-1).sum().backward()
    assert m.get_submodule("ex.0.conv").weight.grad.abs().sum() > 0
