"""The TensorRT backend: torch.export -> torch-tensorrt's dynamo compiler -> a serialized
engine, with explicit typing, so the program's types and Q/DQ decide every layer's
precision:

  - integer layers run through INT8 Q/DQ: each fake quantizer becomes one
    ``vitdsl::qdq`` (backends/qdq.py), converted below into TensorRT's
    IQuantizeLayer/IDequantizeLayer pair;
  - fp16/bf16 layers compute in that type (their casts are in the program);
  - everything else, LayerNorm and softmax included, stays fp32 (fp32 accumulation).

Before compiling, the exported program is checked against the spec's precision map
(backends/precision.py) and the build fails when they differ.  torch-tensorrt and
TensorRT are an optional extra (``pip install 'vitdsl[trt]'``), imported only here and
only when a CUDA GPU is present; everything up to the compiler runs, and is tested, on
the CPU.
"""
from __future__ import annotations

import importlib.util
import inspect
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from vitdsl.errors import SpecError
from vitdsl.graph import Graph

from . import qdq as _qdq  # noqa: F401  (registers vitdsl::qdq)
from .precision import bits_error, check_program, precision_map

MIN_CAPABILITY = {"int8": (6, 1), "fp16": (5, 3), "bf16": (8, 0)}  # TensorRT's floor per type (sm_XY)


def missing() -> list[str]:
    """What `--backend trt` lacks on this machine (empty when it can build)."""
    lacks = []
    if importlib.util.find_spec("torch_tensorrt") is None:
        lacks.append("torch-tensorrt is not installed")
    elif importlib.util.find_spec("tensorrt") is None:
        lacks.append("TensorRT (the tensorrt package) is not installed")
    if not torch.cuda.is_available():
        lacks.append("no CUDA GPU is visible to torch" + ("" if torch.version.cuda else " (this torch is a CPU-only build)"))
    return lacks


def require_trt(graph: Graph, out: str, batch: tuple[int, int, int]) -> None:
    """One message, before any work, when TensorRT or a GPU is missing: what, how to
    install it, and the ONNX route with the exact trtexec line."""
    lacks = missing()
    if not lacks:
        return
    from .onnx import trtexec_command

    c, h, w = graph.input.out.shape
    spec = graph.filename
    onnx_out = f"{out}_onnx"
    lo, opt, hi = batch
    raise SpecError(
        f"--backend trt cannot build here: {'; '.join(lacks)}. "
        f"Install it on a machine with an NVIDIA GPU: pip install 'vitdsl[trt]'. "
        f"Without it, `vitdsl build {spec} --backend onnx --batch {lo}:{opt}:{hi} -o {onnx_out}` writes a "
        f"TensorRT-ready model; on the target machine build the engine from it with: "
        f"{trtexec_command(f'{onnx_out}/model.onnx', (c, h, w), batch, f'{onnx_out}/model.engine')}",
        filename=spec)


def check_capability(graph: Graph, capability: tuple[int, int]) -> None:
    """Refuse widths this GPU cannot run (INT8 needs sm_61, fp16 sm_53, bf16 sm_80),
    pointing at the bits rule that asked for it."""
    for layer, spec in (graph.bits or {}).items():
        kind = spec.float_type if spec.float_type in ("fp16", "bf16") else ("int8" if spec.float_type is None else None)
        if kind and capability < MIN_CAPABILITY[kind]:
            need = "sm_%d%d" % MIN_CAPABILITY[kind]
            raise bits_error(graph, layer, f"layer '{layer}' is {spec}, but this GPU (sm_{capability[0]}{capability[1]}) "
                                           f"cannot run {kind} in TensorRT (needs {need} or newer)")


def export_program(graph: Graph, model: nn.Module, batch: tuple[int, int, int], device: str = "cpu"):
    """torch.export of the deploy form (fake quantizers as INT8 Q/DQ) with a dynamic
    batch dimension over [min, max]."""
    from .qdq import deploy_form

    deploy = deploy_form(model).to(device)
    c, h, w = graph.input.out.shape
    lo, opt, hi = batch
    example = torch.randn(max(opt, 2), c, h, w, device=device)
    shapes = ({0: torch.export.Dim("batch", min=lo, max=hi)},) if hi > lo else None
    try:
        with torch.no_grad():
            return torch.export.export(deploy, (example,), dynamic_shapes=shapes)
    except Exception as e:  # noqa: BLE001 - report which node does not export
        raise _export_error(graph, model, e) from None


def _export_error(graph: Graph, model: nn.Module, err: Exception) -> SpecError:
    """The node whose module does not go through torch.export, located in the spec."""
    from .precision import node_inputs

    inputs = node_inputs(graph, model)
    for n in graph.nodes():
        if n.name not in inputs:
            continue
        try:
            torch.export.export(model.get_submodule(n.name), inputs[n.name])
        except Exception as e:  # noqa: BLE001
            return n.error(f"op '{n.op}' cannot be compiled for TensorRT (torch.export fails): "
                           f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}").located(
                graph.filename, graph.source)
    return SpecError(f"torch.export failed: {str(err).strip().splitlines()[0]}", filename=graph.filename)


def compiler_settings(batch: tuple[int, int, int], shape: tuple[int, int, int]) -> dict[str, Any]:
    """What is handed to torch-tensorrt besides the program (recorded in the manifest)."""
    lo, opt, hi = batch
    return {"inputs": {"min_shape": [lo, *shape], "opt_shape": [opt, *shape], "max_shape": [hi, *shape],
                       "dtype": "float32"},
            "use_explicit_typing": True, "require_full_compilation": True, "min_block_size": 1}


def build_engine(graph: Graph, model: nn.Module, batch: tuple[int, int, int]) -> tuple[bytes, Any, dict]:
    """Compile to a serialized engine.  Needs torch-tensorrt and a CUDA GPU (require_trt)."""
    import tensorrt as trt
    import torch_tensorrt

    check_capability(graph, torch.cuda.get_device_capability())
    pmap = precision_map(graph)
    program = export_program(graph, model, batch, device="cuda")
    check_program(graph, program, pmap)
    register_converter()
    settings = compiler_settings(batch, tuple(graph.input.out.shape))
    i = settings["inputs"]
    inputs = [torch_tensorrt.Input(min_shape=i["min_shape"], opt_shape=i["opt_shape"], max_shape=i["max_shape"],
                                   dtype=torch.float32)]
    convert = torch_tensorrt.dynamo.convert_exported_program_to_serialized_trt_engine
    kwargs: dict[str, Any] = {"arg_inputs": inputs, "require_full_compilation": True, "min_block_size": 1}
    if "use_explicit_typing" in inspect.signature(convert).parameters:  # newer releases are always explicitly typed
        kwargs["use_explicit_typing"] = True
    engine = convert(program, **kwargs)
    versions = {"torch_tensorrt": torch_tensorrt.__version__, "tensorrt": trt.__version__,
                "cuda": torch.version.cuda or "", "gpu": torch.cuda.get_device_name()}
    check_engine(graph, engine, pmap)
    return bytes(engine), program, {"versions": versions, "precision": pmap, "settings": settings}


def register_converter() -> None:
    """Teach torch-tensorrt ``vitdsl::qdq``: an INT8 IQuantizeLayer + IDequantizeLayer
    with the op's scale (per tensor, or per channel along the op's axis)."""
    import tensorrt as trt
    from torch_tensorrt.dynamo.conversion import dynamo_tensorrt_converter
    from torch_tensorrt.dynamo.conversion.converter_utils import get_trt_tensor

    target = torch.ops.vitdsl.qdq.default
    if getattr(register_converter, "done", False):
        return

    @dynamo_tensorrt_converter(target, supports_dynamic_shapes=True)
    def _qdq(ctx, target, args, kwargs, name):  # noqa: ANN001 - torch-tensorrt's converter signature
        x, scale, axis = args[0], args[1], args[2]
        x = get_trt_tensor(ctx, x, name + "_input")
        s = scale.detach().cpu().float().reshape(-1) if isinstance(scale, torch.Tensor) else torch.tensor([float(scale)])
        per_channel = s.numel() > 1
        s_t = get_trt_tensor(ctx, s if per_channel else s.reshape(()), name + "_scale", dtype=torch.float32)
        q = ctx.net.add_quantize(x, s_t, trt.int8)
        if per_channel:
            q.axis = int(axis)
        q.name = name + "_quantize"
        dq = ctx.net.add_dequantize(q.get_output(0), s_t, x.dtype)
        if per_channel:
            dq.axis = int(axis)
        dq.name = name + "_dequantize"
        return dq.get_output(0)

    register_converter.done = True


def check_engine(graph: Graph, engine: bytes, pmap: dict) -> None:
    """After the build: with the engine inspector, every INT8 layer of the precision map
    must have become an INT8 layer in the engine (TensorRT may fuse, never demote)."""
    import tensorrt as trt

    runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))
    eng = runtime.deserialize_cuda_engine(engine)
    if eng is None:
        raise SpecError("TensorRT could not deserialize the engine it just built", filename=graph.filename)
    try:
        info = eng.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
    except Exception:  # noqa: BLE001 - older TensorRT without detailed layer information
        return
    text = str(info)
    if any(e["inputs"] == "int8" for e in pmap["layers"].values()) and "Int8" not in text and "INT8" not in text:
        raise SpecError("TensorRT built no INT8 layer although the spec quantizes layers to 8 bits; "
                        "the engine would not honour the bits section", filename=graph.filename)


# ------------------------------------------------------------------ verify on a GPU
def run_engine(path: str, images: torch.Tensor) -> np.ndarray:
    """Run a serialized engine on the GPU with TensorRT's runtime."""
    import tensorrt as trt

    with open(path, "rb") as f:
        engine = trt.Runtime(trt.Logger(trt.Logger.ERROR)).deserialize_cuda_engine(f.read())
    ctx = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inp = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT][0]
    out = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT][0]
    x = images.cuda().contiguous()
    ctx.set_input_shape(inp, tuple(x.shape))
    y = torch.empty(tuple(ctx.get_tensor_shape(out)), device="cuda", dtype=torch.float32)
    ctx.set_tensor_address(inp, x.data_ptr())
    ctx.set_tensor_address(out, y.data_ptr())
    stream = torch.cuda.Stream()
    ctx.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    return y.cpu().numpy()


def compare_engine(graph: Graph, model: nn.Module, path: str, tol: dict, batches: list[int], seed: int = 0) -> dict:
    """The engine (GPU) against the torch backend (CPU) on the same seeded inputs."""
    from .deploy import _atol, output_step, sample_inputs

    lacks = [m for m in missing() if "torch-tensorrt" not in m]
    if lacks:
        raise SpecError(f"verifying a TensorRT engine needs TensorRT and a CUDA GPU: {'; '.join(lacks)}; "
                        "pip install 'vitdsl[trt]' on the target machine", filename=path)
    rows, passed = [], True
    for b in batches:
        x = sample_inputs(graph, b, seed)
        with torch.no_grad():
            ref = model(x).numpy()
        got = run_engine(path, x)
        err = np.abs(got - ref)
        atol = _atol(tol, ref, None if tol["kind"] == "float" else output_step(graph, model, x))
        ok = bool(np.all(err <= atol))
        rows.append({"batch": b, "output": "logits", "max_abs": float(err.max()), "mean_abs": float(err.mean()),
                     "atol": atol, "passed": ok})
        passed = passed and ok
    worst = max(rows, key=lambda r: r["max_abs"])
    return {"passed": passed, "ran": True, "rows": rows,
            "summary": f"max |Δ| {worst['max_abs']:.3g} at batch {worst['batch']} (tolerance {worst['atol']:.3g})"}
