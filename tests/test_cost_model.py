"""The cost pass against measurement: parameters exactly, MACs against torch's
FlopCounterMode (which counts 2 flops per multiply-accumulate), for every spec."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import vitdsl
from conftest import SPECS, spec_id


def measured(g):
    with torch.device("meta"):  # shapes only: no memory, no arithmetic
        model = vitdsl.compile(g, seed=None).eval()
        x = torch.randn(1, *g.input.out.shape)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return sum(p.numel() for p in model.parameters()), counter.get_total_flops() / 2


@pytest.mark.parametrize("path", SPECS, ids=spec_id)
def test_predicted_cost_matches_measurement(path):
    g = vitdsl.load(path)
    params, macs = measured(g)
    assert g.total().params == params
    assert abs(g.total().macs - macs) <= 0.02 * macs


def test_per_node_macs_match():
    """Per node, not only in total: measure each leaf module on its own."""
    g = vitdsl.load(SPECS[0])
    with torch.device("meta"):
        model = vitdsl.compile(g, seed=None).eval()
        x = torch.randn(1, *g.input.out.shape)
    counter = FlopCounterMode(display=False, depth=None)
    with counter, torch.no_grad():
        model(x)
    per_module = counter.get_flop_counts()
    for n in g.nodes():
        if n.cost.macs:
            got = sum(per_module.get(f"VitModel.{n.name}", {}).values()) / 2
            assert abs(got - n.cost.macs) <= 0.02 * got, n.name
