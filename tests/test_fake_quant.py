"""Fake quantization in the torch backend, and minmax/percentile calibration."""
import pytest
import torch
import torch.nn.functional as F

import vitdsl
from vitdsl.quant import calibrate
from vitdsl.quant.fake import FakeQuant, QuantConv2d, QuantLinear
from helpers import BASE


def spec(rules: str) -> str:
    return BASE.replace("  head pool=cls classes=10\n", "  head pool=cls classes=10\n  bits {\n" + rules + "  }\n")


def pair(rules: str):
    """(float model, quantized model) with the same weights."""
    f = vitdsl.compile(vitdsl.loads(BASE)).eval()
    q = vitdsl.compile(vitdsl.loads(spec(rules))).eval()
    missing, unexpected = q.load_state_dict(f.state_dict(), strict=False)
    assert not unexpected and all("_quant." in k for k in missing)
    return f, q


def test_layers_are_swapped_and_state_dict_holds_quant_params():
    _, q = pair("    default w8a8\n    blocks.*.mlp w4a6\n    head fp16\n")
    assert isinstance(q.get_submodule("blocks.0.mlp.fc1"), QuantLinear)
    assert isinstance(q.get_submodule("patch_embed.proj"), QuantConv2d)
    fc1 = q.get_submodule("blocks.0.mlp.fc1")
    assert (fc1.weight_quant.bits, fc1.input_quant.bits) == (4, 6)
    sd = q.state_dict()
    assert sd["blocks.0.mlp.fc1.weight_quant.scale"].shape == (256,)  # per output channel
    assert sd["blocks.0.mlp.fc1.input_quant.scale"].shape == (1,)     # per tensor
    assert sum(p.numel() for p in q.parameters()) == vitdsl.loads(BASE).total().params  # buffers, not parameters


def test_fake_quant_matches_the_formula():
    # activations: symmetric, zero point 0, narrow signed grid [-7, 7] at 4 bits
    fq = FakeQuant(4, signed=True)
    fq.set_range(torch.tensor([-1.0]), torch.tensor([2.0]))
    scale = 2.0 / 7
    x = torch.linspace(-2.5, 2.5, 41)
    want = torch.clamp(torch.round(x / scale), -7, 7) * scale
    torch.testing.assert_close(fq(x), want)
    # unsigned (softmax outputs): [0, 15] at 4 bits, scale from the top of the range
    u = FakeQuant(4, signed=False)
    u.set_range(torch.tensor([0.0]), torch.tensor([0.75]))
    x = torch.linspace(-0.1, 1.0, 23)
    torch.testing.assert_close(u(x), torch.clamp(torch.round(x / 0.05), 0, 15) * 0.05)
    w = FakeQuant(8, signed=True, channels=2)
    weight = torch.tensor([[0.5, -1.0], [0.1, 0.05]])
    w.set_range(weight.min(1).values, weight.max(1).values)
    s = torch.tensor([1.0 / 127, 0.1 / 127])[:, None]
    torch.testing.assert_close(w(weight), torch.clamp(torch.round(weight / s), -127, 127) * s)


@pytest.mark.parametrize("kind", ["tensor", "channel", "twin", "unsigned"])
def test_without_autograd_the_grid_is_the_same_to_the_bit(kind):
    """Evaluation and calibration run the grid in place (no autograd): the result must be
    bit for bit the straight-through path's, and the input must be left alone."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 33, generator=g) * 3
    x[0, :4] = torch.tensor([0.5, 1.5, -2.5, 1e-8])  # ties and a tiny value
    fq = FakeQuant(4, signed=kind != "unsigned", channels=64 if kind == "channel" else 1)
    if kind == "channel":
        fq.set_range(x.min(1).values, x.max(1).values)
    elif kind == "twin":
        fq.set_twin(0.4, m=3)
    else:
        fq.set_range(torch.tensor([-2.0]), torch.tensor([2.0]))
    keep = x.clone()
    with torch.no_grad():
        fast = fq(x)
    assert torch.equal(x, keep)
    slow = fq(x.clone().requires_grad_(True))
    assert slow.requires_grad and slow.grad_fn is not None
    assert torch.equal(fast, slow.detach())  # values (a zero's sign may differ)


def test_without_autograd_an_infinite_input_saturates_as_a_qdq_pair_does():
    fq = FakeQuant(4, signed=True)
    fq.set_range(torch.tensor([-1.4]), torch.tensor([1.4]))  # step 0.2, grid [-7, 7]
    with torch.no_grad():
        out = fq(torch.tensor([float("inf"), -float("inf"), 0.31]))
    torch.testing.assert_close(out, torch.tensor([1.4, -1.4, 0.4]))


@pytest.mark.parametrize("method", ["minmax", "percentile", "mptq"])
def test_an_empty_tensor_of_images_is_an_empty_calibration_set(method):
    _, q = pair("    default w8a8\n")
    with pytest.raises(ValueError, match="the calibration set is empty"):
        calibrate(q, torch.empty(0, 3, 32, 32), method=method)


def test_mptq_calibration_folds_sqb_first(monkeypatch):
    """calibrate(method="mptq") runs SQ-b (MPTQ-ViT §3.1) on the calibration images before
    its searches, and the LayerNorms feeding qkv and fc1 carry the fold afterwards."""
    import vitdsl.quant.sqb as sqb

    f, q = pair("    default w4a4\n")
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    seen = []
    real = sqb.fold_sqb

    def spy(model, images, *a, **kw):
        seen.append((model, images))
        assert all(not m.calibrated for n, m in model.named_modules() if n.endswith("input_quant"))  # first
        return real(model, images, *a, **kw)

    monkeypatch.setattr(sqb, "fold_sqb", spy)
    before = {k: v.clone() for k, v in q.state_dict().items() if ".norm" in k}
    calibrate(q, x, method="mptq")
    assert len(seen) == 1 and seen[0][0] is q and torch.equal(seen[0][1], x)
    after = q.state_dict()
    for k in ("blocks.0.norm1.weight", "blocks.0.norm1.bias", "blocks.1.norm2.weight", "blocks.1.norm2.bias"):
        assert not torch.equal(before[k], after[k]), k


def test_uncalibrated_model_says_what_to_do():
    _, q = pair("    default w8a8\n")
    with pytest.raises(RuntimeError, match="vitdsl.quant.calibrate"):
        q(torch.randn(1, 3, 32, 32))


def test_minmax_calibration_sets_ranges_from_the_data():
    _, q = pair("    default w8a8\n")
    x = torch.randn(8, 3, 32, 32)
    seen = {}
    h = q.get_submodule("blocks.1.mlp.fc2").register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0].clone()))
    calibrate(q, x, method="minmax")
    h.remove()
    fc2 = q.get_submodule("blocks.1.mlp.fc2")
    amax = seen["x"].abs().max().item()
    assert fc2.input_quant.scale.item() == pytest.approx(amax / 127, rel=1e-6)
    w = fc2.weight.detach()
    torch.testing.assert_close(fc2.weight_quant.scale, w.abs().max(dim=1).values / 127)


def test_percentile_clips_outliers():
    _, a = pair("    default w8a8\n")
    _, b = pair("    default w8a8\n")
    x = torch.randn(8, 3, 32, 32)
    x[0, 0, 0, 0] = 100.0  # one outlier pixel
    calibrate(a, x, method="minmax")
    calibrate(b, x, method="percentile", percentile=99.9)
    sa = a.get_submodule("patch_embed.proj").input_quant.scale.item()
    sb = b.get_submodule("patch_embed.proj").input_quant.scale.item()
    assert sb < sa / 10


def test_error_grows_as_bits_shrink():
    x = torch.randn(16, 3, 32, 32)
    errs = []
    for bits in ("w8a8", "w6a6", "w4a4", "w3a3"):
        f, q = pair(f"    default {bits}\n")
        calibrate(q, x)
        with torch.no_grad():
            errs.append(((q(x) - f(x)).norm() / f(x).norm()).item())
    assert errs[0] < 0.05
    assert errs == sorted(errs)


def test_straight_through_estimator_lets_a_quantized_model_train():
    _, q = pair("    default w4a4\n")
    x = torch.randn(8, 3, 32, 32)
    calibrate(q, x)
    q.train()
    loss = F.cross_entropy(q(x), torch.arange(8) % 10)
    loss.backward()
    g = q.get_submodule("blocks.0.mlp.fc1").weight.grad
    assert g is not None and g.abs().sum() > 0
    assert q.get_submodule("patch_embed.proj").weight.grad.abs().sum() > 0


def test_fp16_layer_computes_in_half_precision():
    f, q = pair("    head fp16\n")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = f.get_submodule("norm")
        out = {}
        feats.register_forward_hook(lambda m, a, o: out.setdefault("t", o))
        ref = f(x)
        head = f.get_submodule("head")
        want = F.linear(out["t"][:, 0].half(), head.weight.half(), head.bias.half()).float()
        got = q(x)
    torch.testing.assert_close(got, want)
    assert not torch.equal(got, ref)


def test_calibration_bad_input():
    _, q = pair("    default w8a8\n")
    with pytest.raises(ValueError, match="empty"):
        calibrate(q, [])
    with pytest.raises(ValueError, match=r"images \(B, C, H, W\)"):
        calibrate(q, torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="calibration images are 1x32x32, the model's input is 3x32x32"):
        calibrate(q, torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="unknown calibration method 'mptq2'"):
        calibrate(q, torch.randn(1, 3, 32, 32), method="mptq2")
    f, _ = pair("    default w8a8\n")
    with pytest.raises(ValueError, match="no quantized layers"):
        calibrate(f, torch.randn(1, 3, 32, 32))


def _attention_operands(model, x):
    """The float inputs of q kᵀ and A·V in blocks.0.attn, recomputed from its qkv output."""
    attn = model.get_submodule("blocks.0.attn")
    seen = {}
    h = attn.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0].clone()))
    with torch.no_grad():
        model(x)
    h.remove()
    B, N, C = seen["x"].shape
    q, k, v = attn.qkv(seen["x"]).reshape(B, N, 3, attn.heads, C // attn.heads).permute(2, 0, 3, 1, 4)
    p = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1)
    return q * attn.scale, k, p, v


def test_attention_operands_are_quantized_with_the_qkv_width():
    f, q = pair("    default w8a8\n    blocks.*.attn.qkv w8a4\n")
    mq = q.get_submodule("blocks.0.attn.matmul_quant")
    assert [fq.bits for fq in (mq.q, mq.k, mq.probs, mq.v)] == [4, 4, 4, 4]
    assert (mq.q.signed, mq.probs.signed) == (True, False)  # the softmax output is unsigned
    assert "blocks.0.attn.matmul_quant.probs.scale" in q.state_dict()
    x = torch.randn(8, 3, 32, 32)
    calibrate(q, x, method="minmax")
    qs, k, p, v = _attention_operands(f, x)  # same weights: the float model's operands
    assert mq.q.scale.item() == pytest.approx(qs.abs().max().item() / 7, rel=1e-5)
    assert mq.k.scale.item() == pytest.approx(k.abs().max().item() / 7, rel=1e-5)
    assert mq.v.scale.item() == pytest.approx(v.abs().max().item() / 7, rel=1e-5)
    assert mq.probs.scale.item() == pytest.approx(p.max().item() / 15, rel=1e-5)
    # in the quantized model, softmax sees q kᵀ on those grids (its own operands)
    got = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, r=r: got.setdefault(r, a[0].clone()))
             for r, m in (("q", mq.q), ("k", mq.k), ("p", mq.probs))]
    with torch.no_grad():
        q(x)
    for h in hooks:
        h.remove()
    grid = lambda t, s, lo, hi: torch.clamp(torch.round(t / s), lo, hi) * s
    want_p = (grid(got["q"], mq.q.scale, -7, 7) @ grid(got["k"], mq.k.scale, -7, 7).transpose(-2, -1)).softmax(-1)
    torch.testing.assert_close(got["p"], want_p, atol=1e-6, rtol=1e-5)
    assert torch.unique(mq.probs(got["p"]) / mq.probs.scale).round().min() >= 0  # unsigned grid


def test_float_qkv_keeps_the_fused_kernel():
    _, q = pair("    default w8a8\n    blocks.*.attn.qkv fp16\n")
    assert q.get_submodule("blocks.0.attn").matmul_quant is None


@pytest.mark.parametrize("method", ["minmax", "percentile", "mptq"])
def test_attention_quantization_costs_accuracy_at_low_width(method):
    x = torch.randn(8, 3, 32, 32)
    f, a = pair("    default w8a8\n")
    _, b = pair("    default w8a8\n    blocks.*.attn.qkv w8a3\n")
    calibrate(a, x, method=method)
    calibrate(b, x, method=method)
    with torch.no_grad():
        ref = f(x)
        ea, eb = (a(x) - ref).norm() / ref.norm(), (b(x) - ref).norm() / ref.norm()
    assert eb > ea  # 3-bit operands of q kᵀ and A·V (and the qkv input) lose more


def _small_specs():
    import test_attention_variants as av
    import test_mobilevit as mv
    import test_vitaev2 as vt
    from conftest import ROOT

    with open(f"{ROOT}/specs/digits_hybrid.vit") as f:
        hybrid = f.read()
    return {"residual": av.SMALL.replace("RES", "residual(alpha=0.5)"), "reswin": av.RESWIN, "vitae": vt.SMALL, "mobilevit": mv.SMALL, "digits_hybrid": hybrid}


@pytest.mark.parametrize("kind", ["residual", "reswin", "vitae", "mobilevit", "digits_hybrid"])
def test_every_attention_kind_quantizes_its_operands(kind):
    """Windowed, residual, ViTAE cell and MobileViT attention all get operand quantizers
    and, at w8a8, stay close to the float model after calibration."""
    text = _small_specs()[kind]
    body = text.rstrip()
    qtext = body[:-1] + "  bits {\n    default w8a8\n  }\n}\n"
    f = vitdsl.compile(vitdsl.loads(text)).eval()
    qm = vitdsl.compile(vitdsl.loads(qtext)).eval()
    qm.load_state_dict(f.state_dict(), strict=False)
    owners = [n for n, m in qm.named_modules() if hasattr(m, "matmul_quant") and isinstance(getattr(m, "qkv", None), QuantLinear)]
    assert owners and all(qm.get_submodule(n).matmul_quant is not None for n in owners)
    shape = f.graph.input.out.shape
    x = torch.randn(4, *shape)
    calibrate(qm, x, method="minmax")
    with torch.no_grad():
        ref, got = f(x), qm(x)
    assert ((got - ref).norm() / ref.norm()).item() < 0.1


def test_calibration_over_batches_ends_its_progress_bar_once(capsys):
    """A generator of batches (length unknown) and a list ending in an empty batch: one
    finished bar line each, at the end."""
    from vitdsl.progress import Bar

    _, q = pair("    default w8a8\n")
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for data in ((b for b in x.split(2)), [x[:3], x[3:], x[:0]]):
        calls = []
        calibrate(q, data, progress=lambda *a: calls.append(a))
        assert calls[-1][0] == calls[-1][1] and all(d < t for d, t, _ in calls[:-1])
    bar = Bar(True)
    calibrate(q, [x[:3], x[3:]], progress=bar)
    calibrate(q, x, progress=bar)
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and err.count("2/2 observing ranges") == 1 and err.count("1/1 observing ranges") == 1
