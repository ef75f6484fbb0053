"""`prepack` (vitdsl.ops.linear): opt-in; the packed CPU paths are taken in gradient-free
float32 CPU inference only, equals F.linear up to rounding, is rebuilt when the weight
changes, is never seen by graph capture, copies, pickles or quantization, and `unpack`
undoes it.  Cases from an independent review are marked (review)."""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import vitdsl
from vitdsl.ops.linear import packed_path_allowed, prepack, unpack

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN (mkldnn)")
PACKED = "mkldnn._linear_pointwise"
MKL = "mkl._mkl_linear"


class Calls(torch.utils._python_dispatch.TorchDispatchMode):
    """Which aten/mkldnn ops run."""

    def __init__(self):
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.fixture(autouse=True)
def two_threads():
    """oneDNN's packed path is for two or more intra-op threads (one: MKL's, tested below)."""
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


def ops_of(fn) -> set[str]:
    calls = Calls()
    with calls:
        fn()
    return calls.ops


def layer(seed: int = 0, packed: bool = True) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(48, 80)
    if packed:
        assert prepack(lin) == 1
    return lin


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def plain(lin, x):
    return F.linear(x, lin.weight, lin.bias).detach()


def tiny_vit():
    g = vitdsl.load("specs/vit_tiny_patch16_224.vit")
    m = vitdsl.compile(g, seed=0).eval()
    x = torch.randn(2, *g.input.out.shape, generator=torch.Generator().manual_seed(0))
    return m, x


@pytest.mark.parametrize("ctx", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("shape", [(5, 48), (2, 7, 48), (2, 3, 4, 48)])
def test_packed_path_equals_f_linear_up_to_rounding(ctx, shape):
    lin, x = layer(), torch.randn(*shape)
    with ctx():
        assert PACKED in ops_of(lambda: lin(x))
        got = lin(x)
    assert got.shape == (*shape[:-1], 80)
    close(got, plain(lin, x))


def test_it_is_opt_in_and_unpack_undoes_it():
    lin, x = layer(packed=False), torch.randn(3, 48)
    with torch.no_grad():
        assert PACKED not in ops_of(lambda: lin(x))
        prepack(lin)
        assert PACKED in ops_of(lambda: lin(x))
        assert unpack(lin) == 1 and unpack(lin) == 0
        assert PACKED not in ops_of(lambda: lin(x))
    assert list(lin.state_dict()) == ["weight", "bias"]


def test_autograd_and_other_inputs_take_plain_f_linear():
    lin, x = layer(), torch.randn(3, 48)
    with torch.enable_grad():
        assert lin(x).requires_grad and "aten.addmm" in ops_of(lambda: lin(x))
    with torch.no_grad():
        assert packed_path_allowed(lin, x, lin.weight)
        non_contiguous = torch.randn(48, 3).t()
        for other in (x.double(), non_contiguous, x[0]):  # dtype, layout, a single vector
            assert not packed_path_allowed(lin, other, lin.weight)
        close(lin(non_contiguous), plain(lin, non_contiguous))
        with torch.inference_mode():
            frozen = layer()  # created in inference mode: no version counter to watch
        assert not packed_path_allowed(frozen, x, frozen.weight)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_is_respected(dtype):  # (review)
    lin, x = layer(), torch.randn(3, 48)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        y = lin(x)
    assert y.dtype == dtype


def test_forward_ad_tangents_survive():  # (review)
    import torch.autograd.forward_ad as fwAD

    lin, x, t = layer(), torch.randn(3, 48), torch.randn(3, 48)
    with torch.no_grad(), fwAD.dual_level():
        out = fwAD.unpack_dual(lin(fwAD.make_dual(x, t)))
    assert out.tangent is not None
    close(out.tangent, t @ lin.weight.detach().t())


def test_odd_biases_and_empty_weights_fall_back():  # (review)
    x = torch.randn(3, 48)
    strided = layer()
    strided.bias = nn.Parameter(torch.randn(160)[::2])
    empty = nn.Linear(0, 5)
    prepack(empty)
    with torch.no_grad():
        assert not strided.bias.is_contiguous()
        close(strided(x), plain(strided, x))
        assert empty(torch.randn(3, 0)).shape == (3, 5)


def test_a_changed_weight_is_repacked():
    lin, x = layer(0), torch.randn(4, 48)
    with torch.no_grad():
        lin(x)
        lin.load_state_dict(layer(1, packed=False).state_dict())  # in place: the version counter moves
        close(lin(x), plain(lin, x))
        lin.weight = nn.Parameter(torch.randn(80, 48))  # a new tensor
        close(lin(x), plain(lin, x))
        lin.weight.mul_(2)
        close(lin(x), plain(lin, x))


def test_new_weight_tensors_at_a_reused_address_are_repacked():  # (review)
    from torch.func import functional_call

    lin, x = layer(), torch.randn(4, 48)
    with torch.no_grad():
        for seed in range(6):  # each weight is freed after its call: its address is reused
            g = torch.Generator().manual_seed(seed)
            w, b = torch.randn(80, 48, generator=g), torch.randn(80, generator=g)
            close(functional_call(lin, {"weight": w, "bias": b}, (x,)), F.linear(x, w, b))


def test_parametrized_weights_take_plain_f_linear():  # (review)
    from torch.nn.utils import parametrizations

    lin, x = layer(), torch.randn(4, 48)
    parametrizations.weight_norm(lin)
    with torch.no_grad():
        for _ in range(5):
            lin.parametrizations.weight.original0.mul_(1.1)
            close(lin(x), plain(lin, x))


def test_copies_pickles_and_saves_after_a_packed_forward():  # (review)
    m, x = tiny_vit()
    assert prepack(m) == 4 * 12  # qkv, proj, fc1, fc2 per block (the head is a HeadLinear: it pools first)
    with torch.inference_mode():
        ref = m(x)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for other in (copy.deepcopy(m), pickle.loads(pickle.dumps(m)), loaded):
        with torch.inference_mode():
            assert PACKED in ops_of(lambda: other(x))  # still prepacked, bound to its own layers
            close(other(x), ref)
        with torch.no_grad():
            other.get_submodule("blocks.0.attn.qkv").weight.zero_()
            assert not torch.equal(other(x), ref)  # the copy's weights are its own
    with torch.inference_mode():
        close(m(x), ref)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
def test_quantization_replaces_prepacked_layers():  # (review)
    m, x = tiny_vit()
    prepack(m)
    q = torch.ao.quantization.quantize_dynamic(m, {nn.Linear}, dtype=torch.qint8)
    assert sum(type(mod).__name__ == "Linear" and "quantized" in type(mod).__module__ for mod in q.modules()) == 48
    from vitdsl.quant.fake import QuantLinear

    qkv = m.get_submodule("blocks.0.attn.qkv")
    ql = QuantLinear(qkv, 8, 8)
    assert "forward" not in ql.__dict__  # the prepacked forward is not carried over


def test_a_whole_model_matches_autograd_and_capture_sees_plain_linear():
    m, x = tiny_vit()
    with torch.enable_grad():
        ref = m(x).detach()
    prepack(m)
    with torch.inference_mode():
        ops = ops_of(lambda: m(x))
        got = m(x)
    assert "aten.addmm" not in ops and PACKED in ops, ops
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        ep = torch.export.export(m, (x,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any("mkldnn" in t for t in targets) and any("linear" in t for t in targets), targets


def test_vmap_falls_back():
    from torch.func import vmap

    lin, x = layer(), torch.randn(3, 2, 48)
    with torch.no_grad():
        close(vmap(lin)(x), plain(lin, x))


def test_flop_counter_sees_the_packed_op():
    from torch.utils.flop_counter import FlopCounterMode

    lin, x = layer(), torch.randn(2, 7, 48)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        assert PACKED in ops_of(lambda: lin(x))
        lin(x)
    assert fc.get_total_flops() == 2 * (2 * 7) * 48 * 80 * 2  # two forwards of 2·M·K·N


needs_mkl = pytest.mark.skipif(not (torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")),
                               reason="needs MKL")


@needs_mkl
@pytest.mark.parametrize("shape", [(5, 48), (2, 7, 48), (2, 3, 4, 48)])
def test_one_thread_takes_mkls_packed_gemm(shape):
    """One intra-op thread: MKL's GEMM on a weight packed for the input's row count
    (oneDNN is not faster there); two: oneDNN."""
    lin, x = layer(), torch.randn(*shape)
    torch.set_num_threads(1)
    with torch.no_grad():
        ops = ops_of(lambda: lin(x))
        assert MKL in ops and PACKED not in ops and "aten.addmm" not in ops
        got = lin(x)
    assert got.shape == (*shape[:-1], 80)
    close(got, plain(lin, x))
    torch.set_num_threads(2)
    with torch.no_grad():
        assert PACKED in ops_of(lambda: lin(x))


@needs_mkl
def test_mkl_copies_follow_the_row_count_and_the_weight():
    from vitdsl.ops.linear import _MKL_CACHE, MKL_SHAPES

    lin = layer()
    torch.set_num_threads(1)
    with torch.no_grad():
        for rows in range(1, MKL_SHAPES + 3):  # more row counts than copies kept
            x = torch.randn(rows, 48)
            close(lin(x), plain(lin, x))
            assert (MKL in ops_of(lambda: lin(x))) == (rows <= MKL_SHAPES)  # later ones: F.linear, no repacking
        assert sorted(_MKL_CACHE[lin][2]) == list(range(1, MKL_SHAPES + 1))
        lin.weight.mul_(2)  # in place: every copy is stale
        x = torch.randn(3, 48)
        close(lin(x), plain(lin, x))
        assert list(_MKL_CACHE[lin][2]) == [3]
        empty = torch.randn(0, 48)
        assert lin(empty).shape == (0, 80)  # no rows: F.linear
    assert unpack(lin) == 1 and lin not in _MKL_CACHE


@needs_mkl
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("width", [47, 96, 0])
def test_a_wrong_input_width_is_f_linears_error(threads, width):  # (review)
    """MKL's op ran a (3, 47) input against a 48-wide weight, reading past the input."""
    lin = layer()
    torch.set_num_threads(threads)
    with torch.no_grad(), pytest.raises(RuntimeError, match="cannot be multiplied"):
        lin(torch.randn(3, width))


@needs_mkl
def test_python_threads_share_the_mkl_copies():  # (review)
    import threading

    from vitdsl.ops.linear import _MKL_CACHE, MKL_SHAPES

    lin = layer()
    torch.set_num_threads(1)
    errors = []

    def run(seed):
        try:
            with torch.no_grad():
                for rows in range(1, 9):
                    x = torch.randn(rows + seed % 3, 48)
                    close(lin(x), plain(lin, x))
        except Exception as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)

    ts = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert errors == [] and len(_MKL_CACHE[lin][2]) == MKL_SHAPES


@needs_mkl
def test_a_whole_model_on_one_thread_matches_f_linear():
    m, x = tiny_vit()
    ref_model, _ = tiny_vit()
    torch.set_num_threads(1)
    prepack(m)
    with torch.inference_mode():
        assert MKL in ops_of(lambda: m(x))
        close(m(x), ref_model(x))
    with torch.no_grad(), torch.utils.flop_counter.FlopCounterMode(display=False) as fc:
        m(x)
    with torch.no_grad(), torch.utils.flop_counter.FlopCounterMode(display=False) as fr:
        ref_model(x)
    assert fc.get_total_flops() == fr.get_total_flops()
