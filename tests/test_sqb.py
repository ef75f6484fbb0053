"""SQ-b (MPTQ-ViT §3.1): shift and smoothing folded into LayerNorm and the next linear."""
import copy

import torch

import vitdsl
from vitdsl.quant.sqb import fold_sqb, sqb_pairs
from helpers import BASE


def test_pairs_are_the_norms_before_qkv_and_fc1():
    g = vitdsl.loads(BASE)
    assert sqb_pairs(g) == [("blocks.0.norm1", "blocks.0.attn.qkv"), ("blocks.0.norm2", "blocks.0.mlp.fc1"),
                            ("blocks.1.norm1", "blocks.1.attn.qkv"), ("blocks.1.norm2", "blocks.1.mlp.fc1")]


def test_folded_model_computes_the_same_function():
    torch.manual_seed(0)
    model = vitdsl.compile(vitdsl.loads(BASE)).eval()
    with torch.no_grad():  # make the LayerNorm affines non-trivial
        for n in ("blocks.0.norm1", "blocks.1.norm2"):
            model.get_submodule(n).weight.normal_(1.0, 0.5)
            model.get_submodule(n).bias.normal_(0.5, 0.5)
    ref = copy.deepcopy(model)
    calib, test = torch.randn(8, 3, 32, 32), torch.randn(4, 3, 32, 32)
    folded = fold_sqb(model, calib, alpha=0.5)
    assert len(folded) == 4
    assert not torch.equal(model.get_submodule("blocks.0.attn.qkv").weight, ref.get_submodule("blocks.0.attn.qkv").weight)
    with torch.no_grad():
        torch.testing.assert_close(model(test), ref(test), atol=1e-5, rtol=1e-5)


def test_folded_activations_are_centred_per_channel():
    model = vitdsl.compile(vitdsl.loads(BASE)).eval()
    with torch.no_grad():
        model.get_submodule("blocks.1.norm2").bias.normal_(2.0, 1.0)  # a strong per-channel offset
    calib = torch.randn(8, 3, 32, 32)
    seen = []
    h = model.get_submodule("blocks.1.norm2").register_forward_hook(lambda m, a, o: seen.append(o.reshape(-1, o.shape[-1])))
    with torch.no_grad():
        model(calib)
    fold_sqb(model, calib)
    with torch.no_grad():
        model(calib)
    h.remove()
    before, after = seen[0], seen[-1]  # (fold_sqb runs its own forward in between)
    assert before.mean(0).abs().max() > 1.0
    assert after.mean(0).abs().max() < 1e-4  # the calibration mean is removed exactly


def test_a_linear_without_bias_gets_the_scale_only_and_keeps_its_keys():
    """A spec without qkv_bias: no bias to fold W μ into, so SQ-b scales only; the model
    computes the same function, its state-dict keys do not change, and the spec
    `vitdsl quantize` writes loads the quantized weights strictly."""
    from vitdsl.quant.quantize import quantize

    text = BASE.replace(" qkv_bias", "")
    torch.manual_seed(0)
    model = vitdsl.compile(vitdsl.loads(text)).eval()
    with torch.no_grad():
        model.get_submodule("blocks.0.norm1").bias.normal_(2.0, 1.0)  # an offset the shift would have removed
    ref, keys = copy.deepcopy(model), set(model.state_dict())
    calib, test = torch.randn(8, 3, 32, 32), torch.randn(4, 3, 32, 32)
    fold_sqb(model, calib)
    assert model.get_submodule("blocks.0.attn.qkv").bias is None and set(model.state_dict()) == keys
    with torch.no_grad():
        torch.testing.assert_close(model(test), ref(test), atol=1e-5, rtol=1e-5)
    qgraph, qmodel, _ = quantize(vitdsl.loads(text), ref.state_dict(), calib, bits="w8a8", method="mptq")
    vitdsl.compile(qgraph).load_state_dict(qmodel.state_dict(), strict=True)
