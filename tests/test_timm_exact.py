"""Exactness against timm: parameter counts (published numbers, DESIGN.md section 4)
and logits with timm's own random-init weights loaded through convert_state_dict."""
import os

import pytest
import torch

import vitdsl
from vitdsl.interop.timm import convert_state_dict

timm = pytest.importorskip("timm")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Independent reference: timm 1.0.31 parameter counts at 1000 classes.
EXPECTED = {
    "vit_tiny_patch16_224": 5_717_416,
    "vit_small_patch16_224": 22_050_664,
    "vit_base_patch16_224": 86_567_656,
    "deit_small_patch16_224": 22_050_664,
}
SLOW: set[str] = set()  # eager logits of every spec run by default (ViT-B: ~15 s)
COMPILE_FAST = {"vit_tiny_patch16_224"}  # torch.compile takes ~1 min per model on 2 cores


def _params(slow):
    return [pytest.param(n, marks=pytest.mark.slow) if n in slow else n for n in EXPECTED]


def _load(name):
    g = vitdsl.load(os.path.join(ROOT, "specs", f"{name}.vit"))
    torch.manual_seed(0)
    ref = timm.create_model(name, pretrained=False).eval()
    model = vitdsl.compile(g).eval()
    model.load_state_dict(convert_state_dict(g, ref.state_dict()), strict=True)
    return g, ref, model


@pytest.mark.parametrize("name", list(EXPECTED))
def test_parameter_count_matches_timm(name):
    g = vitdsl.load(os.path.join(ROOT, "specs", f"{name}.vit"))
    ref = timm.create_model(name, pretrained=False)
    timm_count = sum(p.numel() for p in ref.parameters())
    assert timm_count == EXPECTED[name]
    assert g.total().params == EXPECTED[name]
    assert sum(p.numel() for p in vitdsl.compile(g).parameters()) == EXPECTED[name]


@pytest.mark.parametrize("name", _params(SLOW))
def test_logits_match_timm(name):
    g, ref, model = _load(name)
    x = torch.randn(2, *g.input.out.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = ref(x), model(x)
    assert got.shape == (2, 1000)
    assert (got - want).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", [n if n in COMPILE_FAST else pytest.param(n, marks=pytest.mark.slow) for n in EXPECTED])
def test_logits_match_timm_after_torch_compile(name):
    g, ref, model = _load(name)
    x = torch.randn(2, *g.input.out.shape, generator=torch.Generator().manual_seed(2))
    compiled = torch.compile(model)
    with torch.no_grad():
        want, got = ref(x), compiled(x)
    assert (got - want).abs().max().item() <= 1e-4


def test_convert_names_every_missing_and_unexpected_tensor():
    g = vitdsl.load(os.path.join(ROOT, "specs", "vit_tiny_patch16_224.vit"))
    sd = timm.create_model("vit_tiny_patch16_224").state_dict()
    sd.pop("blocks.3.attn.qkv.bias")
    sd["blocks.99.extra"] = torch.zeros(1)
    with pytest.raises(KeyError) as info:
        convert_state_dict(g, sd)
    assert "missing blocks.3.attn.qkv.bias" in str(info.value)
    assert "unexpected blocks.99.extra" in str(info.value)


def test_convert_rejects_shape_mismatch():
    g = vitdsl.load(os.path.join(ROOT, "specs", "vit_tiny_patch16_224.vit"))
    sd = timm.create_model("vit_small_patch16_224").state_dict()
    with pytest.raises(ValueError, match="shape"):
        convert_state_dict(g, sd)
