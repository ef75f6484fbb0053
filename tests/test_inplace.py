"""In-place reuse of dead intermediates in inference (vitdsl.ops.inplace): it must happen
in a plain ViT, change no output bit, and never touch a tensor someone else can see."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import vitdsl

SPECS = ["vit_tiny_patch16_224", "digits_hybrid", "revit_base_patch16_224", "mobilevit_s"]


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def model_and_input(name: str, batch: int = 2):
    g = vitdsl.load(f"specs/{name}.vit")
    m = vitdsl.compile(g, seed=0).eval()
    x = torch.randn(batch, *g.input.out.shape, generator=torch.Generator().manual_seed(0))
    return g, m, x


@pytest.mark.parametrize("name", SPECS)
def test_outputs_are_bit_identical_with_and_without_reuse(name):
    _, m, x = model_and_input(name)
    with torch.enable_grad():
        ref = m(x).detach()  # autograd records: nothing is reused
    with torch.no_grad():
        a = m(x)
    with torch.inference_mode():
        b = m(x)
    assert torch.equal(a, ref) and torch.equal(b, ref)


def test_reuse_happens_in_a_plain_vit():
    g, m, x = model_and_input("vit_tiny_patch16_224")
    depth = sum(1 for n in g.nodes() if n.op == "mlp")
    counter = OpCounter()
    with torch.inference_mode(), counter:
        m(x)
    assert counter.ops["aten.add_"] == 2 * depth, counter.ops  # both residual sums of every block
    assert counter.ops["aten.gelu_"] == depth
    assert counter.ops["aten.gelu"] == 0
    # Under no_grad a linear layer's output is a view that keeps its 2-d base alive:
    # not reusable (its storage has another holder).  With autograd on: never.
    for ctx in (torch.no_grad, torch.enable_grad):
        counter = OpCounter()
        with ctx(), counter:
            m(x)
        assert counter.ops["aten.gelu_"] == 0 and counter.ops["aten.add_"] == 0, counter.ops


def test_tensors_kept_by_hooks_are_never_overwritten():
    g, m, x = model_and_input("vit_tiny_patch16_224")
    watched = ["blocks.0.attn", "blocks.0.mlp", "blocks.0.mlp.fc1", "blocks.0.res1", "blocks.5.res2"]
    with torch.enable_grad():
        want = {}
        hooks = [m.get_submodule(n).register_forward_hook(lambda mod, a, o, n=n: want.__setitem__(n, o.detach().clone()))
                 for n in watched]
        m(x)
        for h in hooks:
            h.remove()
    for ctx in (torch.no_grad, torch.inference_mode):
        kept = {}
        hooks = [m.get_submodule(n).register_forward_hook(lambda mod, a, o, n=n: kept.__setitem__(n, o)) for n in watched]
        with ctx():
            m(x)
        for h in hooks:
            h.remove()
        for n in watched:
            assert torch.equal(kept[n], want[n]), n


def test_views_kept_by_hooks_are_never_overwritten():
    _, m, x = model_and_input("vit_tiny_patch16_224")
    kept, snap = {}, {}

    def keep_view(mod, a, o):
        kept["v"] = o[0]  # a view: shares the storage of the output
        snap["v"] = o[0].clone()

    def keep_slice(mod, a, o):
        kept["f"] = o[:1]
        snap["f"] = o[:1].clone()

    for ctx in (torch.no_grad, torch.inference_mode):
        h = m.get_submodule("blocks.2.attn").register_forward_hook(keep_view)
        h2 = m.get_submodule("blocks.2.mlp.fc1").register_forward_hook(keep_slice)
        with ctx():
            m(x)
        h.remove()
        h2.remove()
        assert torch.equal(kept["v"], snap["v"]) and torch.equal(kept["f"], snap["f"])


def test_a_hooked_add_sees_its_inputs_unchanged():
    _, m, x = model_and_input("vit_tiny_patch16_224")
    seen = {}

    def hook(mod, args, out):
        seen["inputs"] = [a.clone() for a in args]
        seen["out"] = out
        seen["aliased"] = any(a is out for a in args)

    h = m.get_submodule("blocks.1.res1").register_forward_hook(hook)
    with torch.inference_mode():
        m(x)
    h.remove()
    assert not seen["aliased"]
    assert torch.equal(seen["inputs"][0] + seen["inputs"][1], seen["out"])


# Found in review: a view whose base someone else still holds (a hook, or a graph value
# read later) shares its storage, and adding into a tensor of another layout changes the
# order of later reductions.
VIEW_OF_LIVE_VALUE = """model viewbug {
  input image 3x8x8
  c: conv out=16 kernel=1
  t: to_tokens
  m: mlp ratio=2.0 from=t
  a: add from=(m, t)
  img: to_image from=a
  out: add from=(img, c)
  head pool=mean classes=10
}"""
LAYOUTS_DIFFER = """model layoutbug {
  input image 3x8x8
  s: conv out=16 kernel=1
  t: to_tokens
  m: mlp ratio=2.0
  img: to_image
  c: conv out=16 kernel=1 from=input
  out: add from=(img, c)
  head pool=mean classes=10
}"""


@pytest.mark.parametrize("text", [VIEW_OF_LIVE_VALUE, LAYOUTS_DIFFER], ids=["view_of_live_value", "layouts_differ"])
def test_views_of_live_values_and_other_layouts_are_not_written_into(text):
    g = vitdsl.loads(text)
    m = vitdsl.compile(g, seed=0).eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.enable_grad():
        ref = m(x).detach()
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx():
            assert torch.equal(m(x), ref)


def test_a_hook_kept_output_whose_view_is_donated_is_not_overwritten():
    _, m, x = model_and_input("digits_hybrid")
    for ctx in (torch.no_grad, torch.inference_mode):
        kept = {}
        h = m.get_submodule("stem").register_forward_hook(lambda mod, a, o: kept.__setitem__("o", o))
        with ctx():
            m(x)
        h.remove()
        with torch.enable_grad():
            want = m.get_submodule("stem")(x).detach()
        assert torch.equal(kept["o"], want)


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_vmap_runs_in_inference():
    from torch.func import vmap

    g = vitdsl.load("specs/digits_vit.vit")
    m = vitdsl.compile(g, seed=0).eval()
    x = torch.randn(3, 2, *g.input.out.shape, generator=torch.Generator().manual_seed(0))
    with torch.enable_grad():
        ref = vmap(m)(x).detach()
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx():
            assert torch.allclose(vmap(m)(x), ref, atol=1e-6)


def test_reuse_is_off_under_export_and_compile_tracing():
    _, m, x = model_and_input("vit_tiny_patch16_224", batch=1)
    with torch.no_grad():
        ep = torch.export.export(m, (x,))
    names = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any("add_" in t or "gelu_" in t for t in names), names
