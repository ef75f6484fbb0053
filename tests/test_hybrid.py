"""specs/hybrid.vit: the four ideas in one model, trained a step, costs predicted exactly."""
import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import vitdsl
from conftest import ROOT

HYBRID = os.path.join(ROOT, "specs", "hybrid.vit")


def test_hybrid_combines_all_four_parts():
    g = vitdsl.load(HYBRID)
    ops = {n.op for n in g.nodes()}
    assert {"attention", "cell_attention", "pcm", "tap", "concat", "scalar"} <= ops
    assert g.node("s1.0.attn").attrs.attn.kind == "window" and g.node("s1.0.attn").attrs.residual is not None
    assert g.node("s4.0.attn").attrs.attn.kind == "global"
    assert g.nx.edges["s1.1.attn", "s2.0.attn"]["kind"] == "scores"
    assert g.node("ex.cat").inputs == ["ex.0", "ex.1", "pool"]
    assert vitdsl.loads(g.to_vit()) == g


def test_hybrid_forward_backward_and_measured_costs():
    g = vitdsl.load(HYBRID)
    model = vitdsl.compile(g)
    x = torch.randn(2, 3, 224, 224)
    loss = F.cross_entropy(model(x), torch.tensor([1, 2]))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters())
    assert g.total().params == sum(p.numel() for p in model.parameters())
    counter = FlopCounterMode(display=False)
    # torch has no flop formula for the CPU flash-attention kernel: count the math path.
    with counter, torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
        model.eval()(x[:1])
    assert g.total().macs == counter.get_total_flops() // 2
