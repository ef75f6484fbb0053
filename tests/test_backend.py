"""The torch backend: naming, SDPA, seeded init, torch.export."""
import pytest
import torch
import torch.nn.functional as F

import vitdsl
from conftest import TINY


@pytest.fixture(scope="module")
def graph():
    return vitdsl.loads(TINY)


def test_submodule_names_are_node_names(graph):
    model = vitdsl.compile(graph)
    names = dict(model.named_modules())
    for n in graph.nodes():
        assert n.name in names, n.name
    assert "blocks.1.attn.qkv.weight" in model.state_dict()
    assert isinstance(names["blocks.0.attn"], torch.nn.Module)


def test_global_attention_calls_sdpa(graph, monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention

    def spy(*a, **k):
        calls.append(a[0].shape)
        return real(*a, **k)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = vitdsl.compile(graph).eval()
    model(torch.randn(1, 3, 32, 32))
    assert calls == [torch.Size([1, 2, 17, 32])] * 2  # (B, heads, tokens, head dim), one per block


def test_attention_equals_explicit_softmax(graph):
    """SDPA against the textbook formula softmax(q k^T / sqrt(d)) v."""
    model = vitdsl.compile(graph).eval()
    attn = model.get_submodule("blocks.0.attn")
    x = torch.randn(2, 17, 64)
    B, N, C = x.shape
    q, k, v = attn.qkv(x).reshape(B, N, 3, 2, C // 2).permute(2, 0, 3, 1, 4)
    a = torch.softmax(q @ k.transpose(-2, -1) / (C // 2) ** 0.5, dim=-1)
    want = attn.proj((a @ v).transpose(1, 2).reshape(B, N, C))
    torch.testing.assert_close(attn(x), want, atol=1e-5, rtol=1e-5)


def test_init_is_deterministic_under_a_seed(graph):
    a = vitdsl.compile(graph, seed=3).state_dict()
    b = vitdsl.compile(graph, seed=3).state_dict()
    c = vitdsl.compile(graph, seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_seeded_compile_leaves_global_rng_alone(graph):
    torch.manual_seed(11)
    before = torch.rand(1)
    torch.manual_seed(11)
    vitdsl.compile(graph, seed=5)
    assert torch.equal(torch.rand(1), before)


def test_torch_export_matches_eager_with_dynamic_batch(graph):
    model = vitdsl.compile(graph).eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(model, (torch.randn(2, 3, 32, 32),), dynamic_shapes=({0: batch},))
    for b in (1, 5):
        x = torch.randn(b, 3, 32, 32)
        torch.testing.assert_close(ep.module()(x), model(x))


def test_torch_compile_matches_eager(graph):
    model = vitdsl.compile(graph).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model)(x), model(x), atol=1e-5, rtol=1e-5)


def test_mean_pool_excludes_class_token():
    g = vitdsl.loads(TINY.replace("pool=cls", "pool=mean"))
    model = vitdsl.compile(g).eval()
    x = torch.randn(2, 17, 64)
    head = model.get_submodule("head")
    torch.testing.assert_close(head(x), torch.nn.functional.linear(x[:, 1:].mean(1), head.weight, head.bias))


def test_unknown_backend_and_option(graph):
    with pytest.raises(ValueError, match="unknown backend"):
        vitdsl.compile(graph, backend="tpu")
    with pytest.raises(TypeError, match="unknown option"):
        vitdsl.compile(graph, fp8=True)


RESIDUAL = TINY.replace("transformer heads=2 qkv_bias", "transformer heads=2 qkv_bias residual(alpha=0.5, learnable)")


@pytest.mark.parametrize("text", [TINY, RESIDUAL, "specs/digits_hybrid.vit"], ids=["vit", "residual", "hybrid"])
def test_run_from_any_step_equals_the_forward(text):
    """run_from reuses the values of the steps before `start` (the mixed-precision search
    reruns only the nodes after the layer it changed): every start gives the forward's
    output bit for bit, and the reused values are left as they were."""
    from vitdsl.backends.torch import output_of

    g = vitdsl.load(text) if text.endswith(".vit") else vitdsl.loads(text)
    m = vitdsl.compile(g, seed=0).eval()
    x = torch.randn(3, *g.input.out.shape, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():  # where the forward writes into dead values
        out = m(x)
        full = m.run_from(x)
        kept = [v.clone() if isinstance(v, torch.Tensor) else tuple(t.clone() for t in v) for v in full]
        assert len(full) == len(g.order) and torch.equal(output_of(full), out)
        for start in range(len(g.order)):
            again = m.run_from(x, start, full)
            assert torch.equal(output_of(again), out) and all(again[i] is full[i] for i in range(start)), g.order[start]
            dropped = m.run_from(x, start, full, keep=False)  # a trial's run: values dropped after their last reader
            assert torch.equal(output_of(dropped), out), g.order[start]
            assert start >= len(g.order) - 2 or dropped.count(None) > 0, g.order[start]
        assert None not in full  # the kept run is untouched by the runs that reused it
    for a, b in zip(full, kept):
        assert all(torch.equal(p, q) for p, q in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)))


def test_run_from_sees_a_change_after_start_but_not_before(graph):
    """The point of reusing a prefix: a change in a node at or after `start` shows in the
    output; one before it does not (its kept value stands)."""
    from vitdsl.backends.torch import output_of

    m = vitdsl.compile(graph, seed=0).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = m.run_from(x)
        m.get_submodule("blocks.1.mlp").fc1.weight.mul_(1.5)
        changed = m(x)
        at = graph.order.index("blocks.1.mlp")
        assert torch.equal(output_of(m.run_from(x, at, full)), changed)
        assert torch.equal(output_of(m.run_from(x, at + 1, full)), output_of(full))
        assert not torch.equal(changed, output_of(full))
