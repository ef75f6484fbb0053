"""`vitdsl import timm:NAME`: specs read off timm models reproduce timm's logits."""
import subprocess
import sys

import pytest
import torch

import vitdsl
from vitdsl.interop.timm import convert_state_dict
from vitdsl.interop.timm_import import Unsupported, spec_from_timm

timm = pytest.importorskip("timm")

MODELS = [
    "vit_tiny_patch16_224",         # ViT, class token
    "deit_tiny_patch16_224",        # DeiT
    "vit_small_patch32_224",        # another patch size
    pytest.param("vit_medium_patch16_gap_256", marks=pytest.mark.slow),  # mean pool, LayerScale, no class token
    pytest.param("vit_base_patch32_clip_224", marks=pytest.mark.slow),   # CLIP: pre-norm, fc_norm
    "swin_tiny_patch4_window7_224",
    "mobilevit_xxs",
    "mobilevit_xs",
]


@pytest.mark.parametrize("name", MODELS)
def test_import_reproduces_timm(name):
    text, model = spec_from_timm(name)
    g = vitdsl.loads(text)
    assert vitdsl.loads(g.to_vit()) == g
    ours = vitdsl.compile(g).eval()
    ours.load_state_dict(convert_state_dict(g, model.state_dict()), strict=True)
    assert g.total().params == sum(p.numel() for p in model.parameters())
    x = torch.randn(2, *g.input.out.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(x) - model.eval()(x)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name,what", [
    ("resnet18", "is a ResNet; vitdsl imports the ViT/DeiT"),
    ("vit_base_patch16_reg4_gap_256", "uses register tokens, which vitdsl cannot express yet"),
    ("no_such_model_xyz", "timm has no model 'no_such_model_xyz'"),
])
def test_unsupported_models_are_named(name, what):
    with pytest.raises(vitdsl.SpecError) as info:
        spec_from_timm(name)
    assert what in info.value.message


def test_cli_import_writes_spec_and_weights(tmp_path):
    spec, weights = tmp_path / "m.vit", tmp_path / "m.safetensors"
    r = subprocess.run([sys.executable, "-m", "vitdsl", "import", "timm:vit_tiny_patch16_224", "-o", str(spec),
                        "--weights", str(weights)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    g = vitdsl.load(spec)
    assert g.total().params == 5_717_416
    from safetensors.torch import load_file

    vitdsl.compile(g).load_state_dict(load_file(str(weights)), strict=True)
    r = subprocess.run([sys.executable, "-m", "vitdsl", "import", "timm:resnet18", "-o", str(tmp_path / "r.vit")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "is a ResNet" in r.stderr and not (tmp_path / "r.vit").exists()
