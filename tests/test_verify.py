"""`vitdsl build --backend onnx` artifacts and `vitdsl verify`: a manifest in every
build directory, atomic writes, the comparison re-run from the directory alone, and
bad input (unsupported op, precision, unwritable output, batch range) as diagnostics
with exit 1 and nothing written."""
import json
import os
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import vitdsl  # noqa: E402
from vitdsl.quant import calibrate  # noqa: E402
from conftest import TINY  # noqa: E402
from helpers import where  # noqa: E402


def run(*args):
    """The CLI in this process (a subprocess would spend seconds importing torch and onnx)."""
    import contextlib
    import io
    import types

    from vitdsl.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse: --help, usage errors
            code = e.code
    return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def with_bits(text: str, rules: str) -> str:
    return text.rstrip()[:-1] + "  bits {\n" + rules + "  }\n}\n"


@pytest.fixture(scope="module")
def quantized_build(tmp_path_factory):
    """A calibrated w8a8 tiny model (one w4a8 layer) built with --backend onnx."""
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("q")
    text = with_bits(TINY, "    default w8a8\n    blocks.1.mlp.fc1 w4a8\n")
    spec, weights, out = d / "q.vit", d / "q.safetensors", d / "out"
    spec.write_text(text)
    model = vitdsl.compile(vitdsl.loads(text)).eval()
    calibrate(model, torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)), method="minmax")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    r = run("build", str(spec), "--backend", "onnx", "--weights", str(weights), "--batch", "1:4:32", "-o", str(out))
    assert r.returncode == 0, r.stderr
    return out, r


def test_build_writes_onnx_with_manifest(quantized_build):
    out, r = quantized_build
    files = sorted(os.listdir(out))
    assert files == ["manifest.json", "model.onnx", "model.safetensors", "spec.vit"]
    m = json.loads((out / "manifest.json").read_text())
    assert m["backend"] == "onnx" and m["files"] == files and len(m["spec_sha256"]) == 64
    assert m["input"]["batch"] == {"min": 1, "opt": 4, "max": 32} and m["opset"] == 21
    assert {"torch", "onnx", "onnxruntime", "vitdsl"} <= set(m["versions"])
    assert m["precision"]["layers"]["blocks.1.mlp.fc1"]["weights"] == "int4"
    assert m["precision"]["onnx_layers"]["blocks.1.mlp.fc1"] == "int8/int4"
    assert m["checked"]["passed"] and m["checked"]["ran"]
    assert m["trtexec"].startswith("trtexec --onnx=model.onnx --stronglyTyped --minShapes=image:1x3x32x32")
    assert "--maxShapes=image:32x3x32x32" in m["trtexec"]
    assert any(n["quantizer"] == "blocks.0.attn.matmul_quant.probs.shifted" for n in m["not_native"])
    assert "trtexec --onnx=model.onnx" in r.stdout and "note: blocks.0.attn.matmul_quant.probs.shifted" in r.stdout
    assert not [p for p in os.listdir(out.parent) if p.startswith(".")]  # no staging directory left


def test_verify_passes_and_prints_a_table(quantized_build):
    out, _ = quantized_build
    r = run("verify", str(out), "--batch", "1", "5")
    assert r.returncode == 0, r.stderr
    assert "PASS" in r.stdout and "FAIL" not in r.stdout
    rows = [ln.split() for ln in r.stdout.splitlines() if ln.strip().startswith(("1 ", "5 "))]
    assert [row[0] for row in rows] == ["1", "5"]


def test_verify_catches_a_changed_model(quantized_build, tmp_path):
    """Scale one weight's DequantizeLinear: verify must fail (exit 1)."""
    import shutil

    out, _ = quantized_build
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    proto = onnx.load(str(bad / "model.onnx"))
    scale = next(t for t in proto.graph.initializer if t.name == "blocks.0.mlp.fc2.weight_quant.scale")
    arr = onnx.numpy_helper.to_array(scale) * 1.5
    scale.CopyFrom(onnx.numpy_helper.from_array(arr, scale.name))
    onnx.save(proto, str(bad / "model.onnx"))
    r = run("verify", str(bad))
    assert r.returncode == 1 and "FAIL" in r.stdout and "Traceback" not in r.stderr


def test_verify_float_build_and_wrong_directories(tmp_path):
    spec = tmp_path / "tiny.vit"
    spec.write_text(TINY)
    out = tmp_path / "f"
    assert run("build", str(spec), "--backend", "onnx", "-o", str(out)).returncode == 0
    r = run("verify", str(out))
    assert r.returncode == 0 and "PASS" in r.stdout and "(tolerance 0.0001)" in r.stdout
    r = run("verify", str(tmp_path / "nowhere"))
    assert r.returncode == 1 and "no manifest.json" in r.stderr and "Traceback" not in r.stderr
    torch_out = tmp_path / "t"
    assert run("build", str(spec), "-o", str(torch_out)).returncode == 0
    r = run("verify", str(torch_out))
    assert r.returncode == 1 and "this is a torch build" in r.stderr
    r = run("verify", str(out), "--batch", "100")
    assert r.returncode == 1 and "outside the artifact's range 1..64" in r.stderr


def test_verify_help():
    r = run("verify", "--help")
    assert r.returncode == 0 and "Polygraphy" in r.stdout


# ------------------------------------------------------------------ bad input
def _nothing_written(tmp_path, out):
    assert not os.path.exists(out)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_batch_range_min_above_max(tmp_path):
    spec = tmp_path / "tiny.vit"
    spec.write_text(TINY)
    out = tmp_path / "out"
    for bad, msg in [("8:4:2", "min 8 is larger than max 2"), ("1:9:4", "opt 9 is outside [1, 4]"),
                     ("0:1:2", "at least 1"), ("a:b", "whole numbers")]:
        r = run("build", str(spec), "--backend", "onnx", "--batch", bad, "-o", str(out))
        assert r.returncode == 1 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr
        _nothing_written(tmp_path, out)


def test_unwritable_output_directory(tmp_path):
    spec = tmp_path / "tiny.vit"
    spec.write_text(TINY)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = run("build", str(spec), "--backend", "onnx", "-o", str(blocker / "out"))
    assert r.returncode == 1 and "is not writable" in r.stderr and "Traceback" not in r.stderr
    assert blocker.read_text() == "x"


def test_precision_the_backend_cannot_honour(tmp_path):
    text = with_bits(TINY, "    patch_embed bf16\n")
    spec = tmp_path / "bf16.vit"
    spec.write_text(text)
    out = tmp_path / "out"
    r = run("build", str(spec), "--backend", "onnx", "-o", str(out))
    line, col = where(text, "patch_embed bf16")
    assert r.returncode == 1 and r.stderr.startswith(f"{spec}:{line}:{col}: error: layer 'patch_embed.proj' is bf16")
    assert "patch_embed bf16" in r.stderr and "^" in r.stderr
    _nothing_written(tmp_path, out)


class Warp(torch.nn.Module):
    def forward(self, x):
        return torch.special.i0(x)  # no ONNX symbolic at opset 17


@vitdsl.register_op
class WarpOp(vitdsl.OpDef):
    """A user op that runs in torch but has no ONNX export."""

    kind = "warp"
    default_name = "warp"

    class Attrs(vitdsl.Attrs):
        pass

    def cost(self, node, ins, out):
        return vitdsl.Cost(act_bytes=4 * out.numel)

    def build_torch(self, node, ins, out):
        return Warp()


def test_unsupported_op_names_the_op_and_the_line(tmp_path):
    text = TINY.replace("  norm layernorm", "  warp\n  norm layernorm")
    spec = tmp_path / "warp.vit"
    spec.write_text(text)
    out = tmp_path / "out"
    r = run("build", str(spec), "--backend", "onnx", "-o", str(out))
    line, col = where(text, "warp")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith(f"{spec}:{line}:{col}: error: op 'warp' cannot be exported to ONNX (opset 17)")
    assert "aten::i0" in r.stderr
    _nothing_written(tmp_path, out)
