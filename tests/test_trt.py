"""The TensorRT backend.  Everything up to the engine runs on the CPU: the message when
TensorRT or a GPU is missing, the exported program handed to torch-tensorrt (its Q/DQ
ops, dtypes and dynamic batch) and the precision map it is checked against.  The real
engine test skips, with the reason, where torch-tensorrt or CUDA is absent."""
import os
import subprocess
import sys

import pytest
import torch

import vitdsl
from vitdsl import SpecError
from vitdsl.backends import trt
from vitdsl.backends.precision import check_program, precision_map, program_precisions
from vitdsl.quant import calibrate
from conftest import TINY
from helpers import where

RULES = "    default w8a8\n    blocks.1.mlp w4a8\n    head fp16\n"


def with_bits(text: str, rules: str) -> str:
    return text.rstrip()[:-1] + "  bits {\n" + rules + "  }\n}\n"


def quantized(rules: str = RULES):
    text = with_bits(TINY, rules)
    g = vitdsl.loads(text, "spec.vit")
    model = vitdsl.compile(g).eval()
    calibrate(model, torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)), method="minmax")
    return text, g, model


def run(*args):
    return subprocess.run([sys.executable, "-m", "vitdsl", *args], capture_output=True, text=True)


@pytest.mark.skipif(not trt.missing(), reason="torch-tensorrt and a CUDA GPU are present")
def test_missing_tensorrt_is_one_message_and_no_output(tmp_path):
    spec = tmp_path / "tiny.vit"
    spec.write_text(TINY)
    out = tmp_path / "out"
    r = run("build", str(spec), "--backend", "trt", "--batch", "1:4:16", "-o", str(out))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    msg = r.stderr.strip()
    assert msg.count("error:") == 1
    assert msg.startswith(f"{spec}:1:1: error: --backend trt cannot build here: ")
    for what in trt.missing():
        assert what in msg  # what is missing
    assert "pip install 'vitdsl[trt]'" in msg  # how to install it
    assert "--backend onnx" in msg and "TensorRT-ready" in msg  # the ONNX route
    assert (f"trtexec --onnx={out}_onnx/model.onnx --stronglyTyped --minShapes=image:1x3x32x32 "
            f"--optShapes=image:4x3x32x32 --maxShapes=image:16x3x32x32 --saveEngine={out}_onnx/model.engine") in msg
    assert not out.exists() and os.listdir(tmp_path) == ["tiny.vit"]


def test_exported_program_has_qdq_and_dynamic_batch():
    _, g, model = quantized()
    program = trt.export_program(g, model, (1, 4, 16))
    targets = [n for n in program.graph.nodes if n.op == "call_function" and n.target is torch.ops.vitdsl.qdq.default]
    names = {n.args[3] for n in targets}
    assert "blocks.0.mlp.fc1.input_quant" in names and "blocks.0.mlp.fc1.weight_quant" in names
    assert "blocks.0.attn.matmul_quant.probs.shifted" in names  # softmax output on INT8, shifted
    assert not any(n.startswith("head.") for n in names)  # the fp16 head has no Q/DQ
    for b in (1, 3, 16):  # one program for the whole batch range
        x = torch.randn(b, 3, 32, 32)
        with torch.no_grad():
            want = model(x)
        got = program.module()(x)
        assert got.shape == want.shape
        assert (got - want).abs().max() <= 2e-2 * want.abs().max()


def test_precision_map_follows_the_spec():
    _, g, _ = quantized()
    pmap = precision_map(g)
    assert pmap["layers"]["blocks.0.mlp.fc1"] == {"bits": "w8a8", "kind": "linear", "weights": "int8",
                                                  "inputs": "int8", "compute": "int8"}
    assert pmap["layers"]["blocks.1.mlp.fc2"]["bits"] == "w4a8"
    assert pmap["layers"]["head"]["compute"] == "fp16"
    assert pmap["attention"]["blocks.0.attn.mix"] == {"inputs": "int8", "compute": "int8"}
    assert pmap["layernorm"].startswith("fp32") and pmap["softmax"].startswith("fp32")
    float_map = precision_map(vitdsl.loads(TINY))
    assert {e["compute"] for e in float_map["layers"].values()} == {"fp32"}


def test_program_honours_the_precision_map():
    """What is handed to the compiler: integer layers read Q/DQ outputs, the fp16 head
    computes in fp16, LayerNorm and softmax in fp32."""
    _, g, model = quantized()
    program = trt.export_program(g, model, (1, 4, 16))
    seen = program_precisions(program)
    assert seen["layers"]["blocks.0.mlp.fc1"] == {"inputs": "int8", "weights": "int8"}
    assert seen["layers"]["head"] == {"inputs": "fp16", "weights": "fp16"}
    assert seen["layernorm"] == ["fp32"] and seen["softmax"] == ["fp32"]
    check_program(g, program, precision_map(g))


def test_a_program_that_would_not_honour_the_spec_fails_at_the_bits_line():
    text, g, model = quantized()
    program = trt.export_program(g, model, (1, 4, 16))
    pmap = precision_map(g)
    pmap["layers"]["head"].update(inputs="int8", weights="int8")  # what a w8a8 head would need
    with pytest.raises(SpecError) as info:
        check_program(g, program, pmap)
    assert "runs 'head' with fp16 inputs" in info.value.message
    assert (info.value.line, info.value.column) == where(text, "head fp16")


def test_gpu_capability_is_checked_against_the_bits():
    text, g, _ = quantized("    default w8a8\n    head bf16\n")
    trt.check_capability(g, (8, 0))
    with pytest.raises(SpecError) as info:
        trt.check_capability(g, (7, 5))
    assert "cannot run bf16" in info.value.message and "sm_80" in info.value.message
    assert (info.value.line, info.value.column) == where(text, "head bf16")
    with pytest.raises(SpecError, match="cannot run int8"):
        trt.check_capability(g, (6, 0))


def test_compiler_settings_are_explicitly_typed():
    s = trt.compiler_settings((1, 8, 64), (3, 224, 224))
    assert s["use_explicit_typing"] is True and s["require_full_compilation"] is True
    assert s["inputs"]["min_shape"] == [1, 3, 224, 224] and s["inputs"]["max_shape"] == [64, 3, 224, 224]


def test_real_engine(tmp_path):
    """Build an engine from a quantized spec and verify it against the torch backend."""
    if trt.missing():
        pytest.skip("needs torch-tensorrt, TensorRT and a CUDA GPU: " + "; ".join(trt.missing()))
    from safetensors.torch import save_file

    text, g, model = quantized("    default w8a8\n    head fp16\n")
    spec, weights = tmp_path / "q.vit", tmp_path / "q.safetensors"
    spec.write_text(text)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    out = tmp_path / "engine"
    r = run("build", str(spec), "--backend", "trt", "--weights", str(weights), "--batch", "1:4:8", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert {"model.engine", "manifest.json", "model.safetensors", "spec.vit"} <= set(os.listdir(out))
    r = run("verify", str(out))
    assert r.returncode == 0 and "PASS" in r.stdout, r.stdout + r.stderr
