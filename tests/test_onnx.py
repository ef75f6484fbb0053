"""The ONNX backend: every spec, float and quantized, exported with a dynamic batch,
LayerNormalization and TensorRT-style Q/DQ; checked with onnx.checker and run on
onnxruntime (CPU) against the torch backend at batch 1 and 3.

The comparisons here are written independently of backends/deploy.py: onnxruntime's
InferenceSession and the torch backend, compared in this file.  Q/DQ placement is
checked by walking the ONNX graph.
"""
import functools
import os

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import vitdsl  # noqa: E402
from vitdsl import SpecError  # noqa: E402
from vitdsl.backends.onnx import export_onnx  # noqa: E402
from vitdsl.quant import calibrate  # noqa: E402
from vitdsl.quant.bits import quant_layers  # noqa: E402
from vitdsl.quant.fake import FakeQuant  # noqa: E402
from conftest import SPECS, TINY, spec_id  # noqa: E402
from helpers import where  # noqa: E402

# The big specs take 10-40 s each here (export, calibration and onnxruntime on 224x224
# inputs, float and quantized); they run with -m slow.  The default run covers the digits
# specs (conv stem, patch embedding, windowed and residual attention, merge, global
# attention, heads on the class token and on pooled tokens) and the tiny models below.
SLOW = {"vit_base_patch16_224", "revit_base_patch16_224", "vitaev2_s", "swin_tiny_patch4_window7_224",
        "deit_small_patch16_224", "vit_small_patch16_224", "hybrid", "exmobilevit_928", "exmobilevit_s_timm",
        "mobilevit_s_official", "mobilevit_s", "vit_tiny_patch16_224"}
LAYOUT = {"Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Gather", "Slice", "Split", "Concat",
          "ReduceMean", "Pad", "Identity"}


def spec_params():
    return [pytest.param(p, marks=pytest.mark.slow) if spec_id(p) in SLOW else p for p in SPECS]


def with_bits(text: str, rules: str) -> str:
    """Add a bits section inside the spec's model (its last closing brace)."""
    body = text.rstrip()
    assert body.endswith("}")
    return body[:-1] + "  bits {\n" + rules + "  }\n}\n"


def quantized_text(path: str) -> str:
    """w8a8 everywhere, one linear layer w4a8 (INT4 weights at opset 21), one more w6a6."""
    text = open(path).read()
    linears = [q.name for q in quant_layers(vitdsl.loads(text, path)) if q.kind == "linear"]
    return with_bits(text, f"    default w8a8\n    {linears[1]} w4a8\n    {linears[2]} w6a6\n")


def images(graph, b: int, seed: int) -> torch.Tensor:
    return torch.randn(b, *graph.input.out.shape, generator=torch.Generator().manual_seed(seed))


@functools.lru_cache(maxsize=6)  # the default specs, float and quantized
def exported(path: str, quantized: bool):
    text = quantized_text(path) if quantized else open(path).read()
    g = vitdsl.loads(text, path)
    model = vitdsl.compile(g).eval()
    if quantized:
        calibrate(model, images(g, 4, 0), method="minmax")
    proto, info = export_onnx(g, model)
    return g, model, proto, info


def step_at_output(model, last: str) -> float:
    """How far the logits move when every input of the last layer moves by one step of its
    grid: s * max_j sum_i |W_ji| (the quantized network's outputs differ by that much when
    a tie rounds the other way upstream and ripples on)."""
    layer = model.get_submodule(last)
    with torch.no_grad():
        w = layer.weight_quant(layer.weight) if hasattr(layer, "weight_quant") else layer.weight
    return float(layer.input_quant.scale) * float(w.abs().sum(dim=1).max())


def run_ort(proto, x: np.ndarray, extra: list[str] = ()) -> list[np.ndarray]:
    if extra:
        proto = onnx.ModelProto.FromString(proto.SerializeToString())
        for v in extra:
            proto.graph.output.append(onnx.helper.make_tensor_value_info(v, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})


def producers(proto) -> dict:
    return {o: n for n in proto.graph.node for o in n.output}


def traces_to_dq(proto, value: str, prod: dict) -> bool:
    """Does `value` come from a DequantizeLinear, through layout ops only?"""
    for _ in range(10):
        p = prod.get(value)
        if p is None:
            return False
        if p.op_type == "DequantizeLinear":
            return True
        if p.op_type not in LAYOUT:
            return False
        value = p.input[0]
    return False


# ------------------------------------------------------------------ every spec, float
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("path", spec_params(), ids=spec_id)
def test_float_export_matches_torch(path, batch):
    g, model, proto, info = exported(path, False)
    onnx.checker.check_model(proto, full_check=True)
    opsets = {o.domain: o.version for o in proto.opset_import}
    assert opsets[""] >= 17 and "vitdsl" not in opsets
    ops = {n.op_type for n in proto.graph.node}
    if any(isinstance(m, torch.nn.LayerNorm) for m in model.modules()):
        assert "LayerNormalization" in ops
    assert not ops & {"QuantizeLinear", "DequantizeLinear"}
    dim0 = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.dim_value  # dynamic batch
    x = images(g, batch, 1)
    got = run_ort(proto, x.numpy())[0]
    with torch.no_grad():
        want = model(x).numpy()
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-4


# ------------------------------------------------------------------ every spec, quantized
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("path", spec_params(), ids=spec_id)
def test_quantized_export_matches_torch_within_one_step(path, batch):
    g, model, proto, info = exported(path, True)
    onnx.checker.check_model(proto, full_check=True)
    x = images(g, batch, 2)  # not the calibration images: ranges can be exceeded
    quantizers = {n: m for n, m in model.named_modules()
                  if isinstance(m, FakeQuant) and not n.endswith("weight_quant") and not m._twin}
    with torch.no_grad():
        want = model(x).numpy()
    # Each Q/DQ pair against the torch backend's quantizer on the same input: its Q's input
    # and its DQ's output become outputs.  (Comparing the tensors of the two runs instead
    # would compare different inputs: a tie rounded the other way in one layer ripples
    # through every later one.)  An unsigned 8-bit softmax output is stored as A - 128 s.
    qnodes = {n.name[: -len(".quantize")]: n for n in proto.graph.node if n.op_type == "QuantizeLinear"}
    pairs = []
    for name, fq in quantizers.items():
        key = name if name in qnodes else name + ".shifted"
        assert key in qnodes, name  # every activation quantizer is one named Q/DQ pair
        pairs.append((fq, key, qnodes[key].input[0], key))
    outs = run_ort(proto, x.numpy(), [v for p in pairs for v in p[2:]])
    got = outs[0]
    for k, (fq, key, _, _) in enumerate(pairs):
        pre, dq = outs[1 + 2 * k], outs[2 + 2 * k]
        shift = 128 * float(fq.scale) if key.endswith(".shifted") else 0.0
        with torch.no_grad():
            ref = fq(torch.from_numpy(pre + shift)).numpy()
        off = np.abs(dq + shift - ref) / float(fq.scale.max())
        assert off.max() <= 1 + 1e-3 and (off > 1e-3).mean() <= 1e-3, key  # at most a rare tie
    # the output: within one quantization step, seen at the output
    assert np.abs(got - want).max() <= step_at_output(model, "head")


@pytest.mark.parametrize("path", spec_params(), ids=spec_id)
def test_qdq_placement(path):
    """Q/DQ on both inputs of every MatMul/Gemm/Conv (weights included), never on
    outputs; INT8 with zero point 0; the 4-bit layer as blocked INT4 weights."""
    g, model, proto, info = exported(path, True)
    prod = producers(proto)
    inits = {t.name: t for t in proto.graph.initializer}
    consumers: dict[str, list] = {}
    for n in proto.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    products = [n for n in proto.graph.node if n.op_type in ("MatMul", "Gemm", "Conv")]
    assert products
    for n in products:
        assert traces_to_dq(proto, n.input[0], prod) and traces_to_dq(proto, n.input[1], prod), n.name
    for n in proto.graph.node:
        if n.op_type == "QuantizeLinear":  # Q feeds exactly its DQ
            assert [c.op_type for c in consumers[n.output[0]]] == ["DequantizeLinear"], n.name
            zp = inits[n.input[2]]
            assert zp.data_type == onnx.TensorProto.INT8 and not onnx.numpy_helper.to_array(zp).any()
        if n.op_type == "DequantizeLinear":  # DQ feeds products (through layout ops), not other ops
            frontier, ok = [n.output[0]], True
            for _ in range(10):
                nxt = []
                for v in frontier:
                    for c in consumers.get(v, []):
                        if c.op_type in LAYOUT:
                            nxt.extend(c.output)
                        elif c.op_type not in ("MatMul", "Gemm", "Conv"):
                            # the one exception: V's sum in the shifted A·V (unsigned 8-bit softmax output)
                            ok = ok and c.op_type == "ReduceSum" and n.name.endswith("matmul_quant.v.dequantize")
                frontier = nxt
            assert ok, n.name
            if n.input[0] in inits:  # a weight: an integer constant
                assert inits[n.input[0]].data_type in (onnx.TensorProto.INT8, onnx.TensorProto.INT4)
    int4 = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
            and inits[n.input[0]].data_type == onnx.TensorProto.INT4]
    linears = [q.name for q in quant_layers(g) if q.kind == "linear"]
    assert [n.name for n in int4] == [f"{linears[1]}.weight_quant.dequantize"]
    assert {a.name for a in int4[0].attribute} == {"axis", "block_size"}
    assert {o.domain: o.version for o in proto.opset_import}[""] == 21
    assert info["quantizers"][f"{linears[2]}.weight_quant"]["runs_as"].startswith("INT8")
    assert "clipped to the 6-bit grid" in info["quantizers"][f"{linears[2]}.input_quant"]["runs_as"]


# ------------------------------------------------------------------ single features
def tiny_quant(rules: str):
    g = vitdsl.loads(with_bits(TINY, rules))
    model = vitdsl.compile(g).eval()
    calibrate(model, images(g, 4, 0), method="minmax")
    return g, model


def test_twin_range_exports_two_branches_exactly():
    """MPTQ's twin range: two Q/DQ branches added; the layer after it reads a float input."""
    g, model = tiny_quant("    default w8a8\n")
    fc2 = model.get_submodule("blocks.0.mlp.fc2").input_quant
    fc2.set_twin(float(fc2.scale) * 2, 2)
    proto, info = export_onnx(g, model)
    names = {n.name for n in proto.graph.node}
    assert {"blocks.0.mlp.fc2.input_quant.neg.quantize", "blocks.0.mlp.fc2.input_quant.pos.quantize"} <= names
    assert "float product" in info["quantizers"]["blocks.0.mlp.fc2.input_quant.neg"]["runs_as"]
    x = images(g, 3, 5)
    with torch.no_grad():
        want = model(x).numpy()
    got = run_ort(proto, x.numpy())[0]
    assert np.abs(got - want).max() <= step_at_output(model, "head")


def test_narrow_activations_and_unsigned_probs_below_8_bits():
    """w8a6: inputs and attention operands clipped to 6-bit grids; the softmax output on
    [0, 63] fits INT8 without a shift."""
    g, model = tiny_quant("    default w8a6\n")
    proto, info = export_onnx(g, model)
    assert "ReduceSum" not in {n.op_type for n in proto.graph.node}
    assert "clipped" in info["quantizers"]["blocks.0.attn.matmul_quant.probs"]["runs_as"]
    x = images(g, 3, 6)
    with torch.no_grad():
        want = model(x).numpy()
    assert np.abs(run_ort(proto, x.numpy())[0] - want).max() <= step_at_output(model, "head")


def test_8_bit_softmax_output_is_shifted_onto_int8():
    g, model = tiny_quant("    default w8a8\n")
    proto, info = export_onnx(g, model)
    assert "shifted by 128 steps" in info["quantizers"]["blocks.0.attn.matmul_quant.probs.shifted"]["runs_as"]
    mix = next(n for n in proto.graph.node if n.name == "blocks.0.attn.mix")
    assert mix.op_type == "MatMul"


def test_nodes_carry_vitdsl_names():
    g = vitdsl.loads(TINY)
    proto, info = export_onnx(g, vitdsl.compile(g).eval())
    names = {n.name for n in proto.graph.node if n.op_type in ("MatMul", "Gemm", "Conv")}
    assert {"patch_embed.proj", "blocks.0.attn.qkv", "blocks.1.mlp.fc2", "head"} <= names
    assert info["layers"]["blocks.0.mlp.fc1"] == "fp32/fp32"


def test_fp16_layer_is_cast_and_matches():
    g = vitdsl.loads(with_bits(TINY, "    head fp16\n    blocks.0.mlp fp16\n"))
    model = vitdsl.compile(g).eval()
    proto, info = export_onnx(g, model)
    assert info["layers"]["head"] == "fp16/fp16" and info["layers"]["blocks.0.mlp.fc1"] == "fp16/fp16"
    x = images(g, 3, 7)
    with torch.no_grad():
        want = model(x).numpy()
    assert np.abs(run_ort(proto, x.numpy())[0] - want).max() <= 1e-2 * np.abs(want).max()  # fp16: ~10 ulps


def test_bf16_conv_is_a_precision_onnx_cannot_honour():
    text = with_bits(TINY, "    default w8a8\n    patch_embed bf16\n")
    g = vitdsl.loads(text, "spec.vit")
    with pytest.raises(SpecError) as info:
        export_onnx(g, vitdsl.compile(g).eval())
    assert "bf16" in info.value.message and "opset 22" in info.value.message
    assert (info.value.line, info.value.column) == where(text, "patch_embed bf16")


def test_opset_out_of_range():
    g = vitdsl.loads(TINY)
    with pytest.raises(SpecError, match="LayerNormalization needs opset 17"):
        export_onnx(g, vitdsl.compile(g).eval(), opset=16)


def test_uncalibrated_model_is_refused():
    g = vitdsl.loads(with_bits(TINY, "    default w8a8\n"))
    with pytest.raises(SpecError, match="has no range: calibrate"):
        export_onnx(g, vitdsl.compile(g).eval())


def test_int8_opset_17_when_no_4_bit_weights():
    g, model = tiny_quant("    default w8a8\n")
    proto, _ = export_onnx(g, model)
    assert {o.domain: o.version for o in proto.opset_import}[""] == 17
    g4, m4 = tiny_quant("    default w8a8\n    blocks.0.mlp.fc1 w4a8\n")
    proto4, info4 = export_onnx(g4, m4, opset=17)  # INT4 needs 21: stored as INT8, and said so
    assert "opset 17 has no INT4" in info4["quantizers"]["blocks.0.mlp.fc1.weight_quant"]["runs_as"]
