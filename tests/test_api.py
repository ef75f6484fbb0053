"""The programmatic API: graphs without text, and user-registered ops."""
import math
import pytest
import torch
import torch.nn as nn
from pydantic import Field

import vitdsl
from vitdsl import SpecError
from conftest import TINY


def build_tiny():
    b = vitdsl.Builder("tiny")
    b.input("image", (3, 32, 32))
    b.embed("patch", size=8, dim=64)
    b.tokens(cls=1)
    with b.stage("blocks", depth=2):
        b.transformer(heads=2, qkv_bias=True)
    b.norm("layernorm", eps=1e-6)
    b.head(pool="cls", classes=10)
    return b.build()


def test_builder_equals_text():
    g = build_tiny()
    assert g == vitdsl.loads(TINY)
    assert vitdsl.loads(g.to_vit()) == g
    assert g.total().params == vitdsl.loads(TINY).total().params


def test_builder_validates_like_text():
    b = vitdsl.Builder("bad")
    with pytest.raises(SpecError, match="unknown attribute 'haeds' for transformer"):
        b.transformer(haeds=2)
    with pytest.raises(SpecError, match="unknown op 'transfomer'"):
        b.transfomer(heads=2)


def test_builder_shape_errors():
    b = vitdsl.Builder("bad")
    b.input("image", (3, 30, 30))
    b.embed("patch", size=8, dim=64)
    b.head(pool="mean", classes=2)
    with pytest.raises(SpecError, match="not divisible by the patch size 8"):
        b.build()


class Scale(nn.Module):
    def __init__(self, dim, init):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x):
        return x * self.gamma


@vitdsl.register_op
class LayerScale(vitdsl.OpDef):
    """A user op: per-channel learnable scale (CaiT's LayerScale)."""

    kind = "layerscale"
    default_name = "ls"

    class Attrs(vitdsl.Attrs):
        init: float = Field(1e-5, gt=0)

    def cost(self, node, ins, out):
        return vitdsl.Cost(params=out.channels, act_bytes=4 * out.numel)

    def build_torch(self, node, ins, out):
        return Scale(out.channels, node.attrs.init)


def test_custom_op_in_a_spec():
    text = TINY.replace("  norm layernorm", "  layerscale init=0.5\n  norm layernorm")
    g = vitdsl.loads(text)
    assert g.node("ls").op == "layerscale"
    model = vitdsl.compile(g)
    assert torch.all(model.get_submodule("ls").gamma == 0.5)
    assert g.total().params == sum(p.numel() for p in model.parameters())
    assert vitdsl.loads(g.to_vit()) == g
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)


def test_custom_op_attribute_errors_are_diagnostics():
    text = TINY.replace("  norm layernorm", "  layerscale init=-1\n  norm layernorm")
    with pytest.raises(SpecError, match="invalid value -1 for 'init' of layerscale"):
        vitdsl.loads(text)


def test_graph_is_a_networkx_digraph_with_residual_edges():
    g = vitdsl.loads(TINY)
    assert g.nx.has_edge("blocks.0.attn", "blocks.0.res1")
    assert g.nx.has_edge("tokens", "blocks.0.res1")  # the residual (skip) edge
    assert g.nx.edges["tokens", "blocks.0.res1"]["slot"] == 0
    assert g.node("blocks.0.attn").out.shape == (17, 64)


class _Mixer(torch.nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.fc = torch.nn.Linear(c, c)  # left at PyTorch's default initialisation

    def forward(self, x):
        return self.fc(x)


@vitdsl.register_op
class DefaultInitMixer(vitdsl.OpDef):
    """A user op whose builder relies on nn.Linear's default initialisation."""

    kind = "definit"
    default_name = "mix"

    class Attrs(vitdsl.Attrs):
        pass

    def cost(self, node, ins, out):
        c = out.channels
        return vitdsl.Cost(params=c * c + c, macs=out.numel * c, act_bytes=4 * out.numel)

    def build_torch(self, node, ins, out):
        return _Mixer(out.channels)


def test_a_builder_that_relies_on_default_init_still_gets_it():
    """compile() skips PyTorch's default init for layers the builders overwrite; a layer
    nobody initialises must still get kaiming-uniform weights and a uniform bias
    (nn.Linear.reset_parameters' distribution), never uninitialised memory."""
    g = vitdsl.loads(TINY.replace("  norm layernorm", "  definit\n  norm layernorm"))
    fc = vitdsl.compile(g).get_submodule("mix.fc")
    c = fc.in_features
    bound = 1 / math.sqrt(c)  # kaiming_uniform_(a=sqrt(5)) gives U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    for t in (fc.weight, fc.bias):
        assert torch.isfinite(t).all()
        assert t.abs().max() <= bound and t.abs().max() > 0.5 * bound
        assert abs(t.std().item() - bound / math.sqrt(3)) < 0.35 * bound / math.sqrt(3)
    # the builders' own layers: timm's truncated normal, std 0.02, and no NaN left anywhere
    model = vitdsl.compile(vitdsl.loads(TINY))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert abs(model.get_submodule("blocks.0.mlp.fc1").weight.std().item() - 0.02) < 0.002
