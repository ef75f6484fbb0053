"""The packed CPU linear (vitdsl.ops.linear): taken in gradient-free CPU inference only,
equal to F.linear up to rounding, rebuilt when the weight changes, never seen by the
graph capturers, and off on request."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vitdsl
from vitdsl.ops.linear import Linear, drop_packed, packed_path_allowed, packing

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN (mkldnn)")


class Calls(torch.utils._python_dispatch.TorchDispatchMode):
    """Which aten/mkldnn ops run."""

    def __init__(self):
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def layer(seed: int = 0) -> Linear:
    torch.manual_seed(seed)
    return Linear(48, 80)


def ops_of(fn) -> set[str]:
    calls = Calls()
    with calls:
        fn()
    return calls.ops


@pytest.mark.parametrize("ctx", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("shape", [(5, 48), (2, 7, 48), (2, 3, 4, 48)])
def test_packed_path_equals_f_linear_up_to_rounding(ctx, shape):
    lin, x = layer(), torch.randn(*shape)
    want = F.linear(x, lin.weight, lin.bias).detach()
    with ctx():
        assert "mkldnn._linear_pointwise" in ops_of(lambda: lin(x))
        got = lin(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_autograd_and_other_inputs_take_plain_f_linear():
    lin, x = layer(), torch.randn(3, 48)
    with torch.enable_grad():
        y = lin(x)
        assert y.requires_grad and "aten.addmm" in ops_of(lambda: lin(x))
    with torch.no_grad():
        assert packed_path_allowed(x, lin.weight)
        non_contiguous = torch.randn(48, 3).t()
        for other in (x.double(), non_contiguous, x[0]):  # dtype, layout, a single vector
            assert not packed_path_allowed(other, lin.weight)
        torch.testing.assert_close(lin(non_contiguous), F.linear(non_contiguous, lin.weight, lin.bias))
        assert "mkldnn._linear_pointwise" not in ops_of(lambda: layer().double()(x.double()))
        with packing(False):
            assert not packed_path_allowed(x, lin.weight)
            assert "mkldnn._linear_pointwise" not in ops_of(lambda: lin(x))
        with torch.inference_mode():
            frozen = layer()  # created in inference mode: no version counter to watch
        assert not packed_path_allowed(x, frozen.weight)


def test_a_changed_weight_is_repacked():
    lin, x = layer(0), torch.randn(4, 48)
    with torch.no_grad():
        lin(x)
        lin.load_state_dict(layer(1).state_dict())  # in place: the version counter moves
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
        lin.weight = torch.nn.Parameter(torch.randn(80, 48))  # a new tensor
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
        lin.weight.mul_(2)
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
    assert drop_packed(lin) == 1 and drop_packed(lin) == 0


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.trace is deprecated, still used by ONNX export
def test_a_whole_model_in_inference_matches_autograd_and_export_sees_plain_linear():
    g = vitdsl.load("specs/vit_tiny_patch16_224.vit")
    m = vitdsl.compile(g, seed=0).eval()
    x = torch.randn(2, *g.input.out.shape, generator=torch.Generator().manual_seed(0))
    with torch.enable_grad():
        ref = m(x).detach()
    with torch.inference_mode():
        ops = ops_of(lambda: m(x))
        got = m(x)
    assert "aten.addmm" not in ops and "mkldnn._linear_pointwise" in ops, ops
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        ep = torch.export.export(m, (x,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any("mkldnn" in t for t in targets) and any("linear" in t for t in targets), targets
    with torch.no_grad():
        traced = torch.jit.trace(m, (x,), check_trace=False)
    assert "mkldnn" not in str(traced.inlined_graph)


def test_vmap_falls_back():
    from torch.func import vmap

    lin, x = layer(), torch.randn(3, 2, 48)
    with torch.no_grad():
        torch.testing.assert_close(vmap(lin)(x), F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)


def test_flop_counter_sees_the_packed_op():
    from torch.utils.flop_counter import FlopCounterMode

    lin, x = layer(), torch.randn(2, 7, 48)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        assert "mkldnn._linear_pointwise" in ops_of(lambda: lin(x))
        lin(x)
    assert fc.get_total_flops() == 2 * (2 * 7) * 48 * 80 * 2  # two forwards of 2·M·K·N
