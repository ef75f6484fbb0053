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
    fq = FakeQuant(4, signed=False)
    fq.set_range(torch.tensor([-1.0]), torch.tensor([2.0]))
    scale = 3.0 / 15
    zp = round(1.0 / scale)
    x = torch.linspace(-1.5, 2.5, 41)
    want = (torch.clamp(torch.round(x / scale) + zp, 0, 15) - zp) * scale
    torch.testing.assert_close(fq(x), want)
    w = FakeQuant(8, signed=True, channels=2)
    weight = torch.tensor([[0.5, -1.0], [0.1, 0.05]])
    w.set_range(weight.min(1).values, weight.max(1).values)
    s = torch.tensor([1.0 / 127, 0.1 / 127])[:, None]
    torch.testing.assert_close(w(weight), torch.clamp(torch.round(weight / s), -127, 127) * s)


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
    lo, hi = min(seen["x"].min().item(), 0.0), max(seen["x"].max().item(), 0.0)
    assert fc2.input_quant.scale.item() == pytest.approx((hi - lo) / 255, rel=1e-6)
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
