"""Deploy artifacts (ONNX, TensorRT engine): writing them with their manifest, and
checking them against the torch backend (`vitdsl verify`).

The check follows Polygraphy's `run --onnxrt` comparison: seeded random inputs, the
artifact and the reference run on the same inputs, every output compared elementwise
(|a - b| <= atol + rtol |b|) with the max/mean absolute error reported; for ONNX, every
quantized tensor (each DequantizeLinear output, like Polygraphy's `--onnx-outputs mark
all`) is compared too, in units of its own quantization step.
"""
from __future__ import annotations

import json
import os
import platform
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from vitdsl.atomic import staged_dir
from vitdsl.errors import SpecError
from vitdsl.graph import Graph

FLOAT_ATOL = 1e-4  # float models: the artifact matches the torch backend within 1e-4
STEP_SLACK = 1e-3  # below this fraction of a step, two quantized values are the same grid point
MAX_TIES = 1e-3  # of a Q/DQ pair's values that may round the other way (float noise at a tie)


def tolerance(graph: Graph) -> dict[str, Any]:
    """How close an artifact must be to the torch backend.  Float models: within 1e-4.
    Models with integer or fp16/bf16 layers: the output within one quantization step as
    seen at the output (output_step), and every Q/DQ pair equal to the torch backend's
    quantizer on the same input (but for a rare tie).  Quantized tensors of the two runs
    are not compared with each other: a tie rounded the other way in one layer (float
    sums in another order) moves later values by a step or more."""
    reduced = any(b.float_type != "fp32" for b in (graph.bits or {}).values())
    if not reduced:
        return {"kind": "float", "atol": FLOAT_ATOL, "rtol": 0.0}
    return {"kind": "quantized",
            "output": "one quantization step of the last layer's input, through its weights: s * max_j sum_i |W_ji|",
            "qdq_pairs": "each Q/DQ pair equals the torch quantizer on the same input, but for ties (<= 0.1%)"}


def output_step(graph: Graph, model: nn.Module, x: torch.Tensor) -> float:
    """One quantization step, seen at the output: how much the logits move when every
    input of the last layer moves by one step of its grid, s * max_j sum_i |W_ji|.
    s is the last layer's input step (for a float last layer: its input range / 127)."""
    from vitdsl.quant.bits import quant_layers

    last = quant_layers(graph)[-1].name
    layer = model.get_submodule(last)
    fq = getattr(layer, "input_quant", None)
    if fq is not None and fq._ready:
        step = float(fq.scale.max()) * (2 if fq._twin else 1)
    else:
        seen = {}
        hook = layer.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0].detach()))
        with torch.no_grad():
            model(x)
        hook.remove()
        step = float(seen["x"].abs().max()) / 127
    wq = getattr(layer, "weight_quant", None)
    with torch.no_grad():
        w = (wq(layer.weight) if wq is not None and wq._ready else layer.weight).float()
    return step * float(w.abs().flatten(1).sum(dim=1).max())


def _atol(tol: dict, ref: np.ndarray, step: float | None = None) -> float:
    return tol["atol"] if tol["kind"] == "float" else float(step)


def sample_inputs(graph: Graph, batch: int, seed: int) -> torch.Tensor:
    """Seeded images, the same for the artifact and the reference (a Polygraphy-style data loader)."""
    gen = torch.Generator().manual_seed(seed * 1000 + batch)
    return torch.randn(batch, *graph.input.out.shape, generator=gen)


def _versions(extra: dict[str, str]) -> dict[str, str]:
    from vitdsl import __version__

    return {"vitdsl": __version__, "torch": torch.__version__, "python": platform.python_version(), **extra}


def write_deploy(graph: Graph, model: nn.Module, out: str, backend: str, batch: tuple[int, int, int],
                 opset: int | None = None, seed: int = 0, weights: str | None = None,
                 progress: Callable[[str], None] = lambda s: None) -> dict:
    """Write an ONNX model or a TensorRT engine, with the reference weights, the spec and
    a manifest, atomically: on any error nothing is left at `out`."""
    from safetensors.torch import save_file

    from vitdsl.build import spec_hash

    from .precision import precision_map

    c, h, w = graph.input.out.shape
    tol = tolerance(graph)
    manifest: dict[str, Any] = {
        "model": graph.name, "backend": backend, "spec_sha256": spec_hash(graph),
        "input": {"name": "image", "shape": [c, h, w], "batch": dict(zip(("min", "opt", "max"), batch))},
        "output": "logits", "seed": seed, "weights": os.path.basename(weights) if weights else None,
        "tolerance": tol,
    }
    if backend == "onnx":
        import onnx
        import onnxruntime

        from .onnx import export_onnx, trtexec_command

        progress("exporting to ONNX")
        proto, info = export_onnx(graph, model, opset)
        pmap = precision_map(graph, weight_int4=any(q.get("storage") == "INT4" for q in info["quantizers"].values()))
        progress("checking with onnxruntime")
        check = compare_onnx(graph, model, proto.SerializeToString(), tol, batches=sorted({batch[0], batch[0] + 1}),
                             seed=seed)
        if not check["passed"]:
            raise SpecError("the ONNX model does not match the torch backend: " + check["summary"], filename=graph.filename)
        manifest.update(
            opset=info["opset"], versions=_versions({"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}),
            precision={**pmap, "onnx_layers": info["layers"]},
            quantizers=info["quantizers"], not_native=not_native(info["quantizers"]),
            checked=check, trtexec=trtexec_command("model.onnx", (c, h, w), batch))
        artifact = ("model.onnx", proto.SerializeToString())
    else:
        from .trt import build_engine

        progress("compiling with torch-tensorrt")
        engine, program, extra = build_engine(graph, model, batch)
        manifest.update(versions=_versions(extra["versions"]), precision=extra["precision"],
                        compiler=extra["settings"])
        artifact = ("model.engine", engine)
    progress("writing")
    with staged_dir(out) as tmp:
        name, data = artifact
        with open(os.path.join(tmp, name), "wb") as f:
            f.write(data)
        if backend == "trt":
            torch.export.save(program, os.path.join(tmp, "model.pt2"))
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"spec_sha256": manifest["spec_sha256"]})
        with open(os.path.join(tmp, "spec.vit"), "w") as f:
            f.write(graph.to_vit())
        manifest["files"] = sorted(os.listdir(tmp) + ["manifest.json"])
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1)
    progress("done")
    return manifest


def not_native(quantizers: dict[str, dict]) -> list[dict]:
    """The widths TensorRT cannot execute as written, and what they run as."""
    out = []
    for name, q in quantizers.items():
        runs = q.get("runs_as", "INT8")
        if runs != "INT8":
            out.append({"quantizer": name, "bits": q.get("bits"), "runs_as": runs})
    return out


# ------------------------------------------------------------------ comparison
def compare_onnx(graph: Graph, model: nn.Module, onnx_bytes: bytes, tol: dict, batches: list[int],
                 seed: int = 0) -> dict[str, Any]:
    """Run the ONNX model on onnxruntime (CPU) and the torch backend on the same inputs."""
    import onnx

    from .onnx import run_onnxruntime

    if any(b.float_type == "bf16" for b in (graph.bits or {}).values()):
        return {"passed": True, "ran": False,
                "summary": "not run: onnxruntime has no CPU kernels for bf16 products; verify on the target GPU "
                           "(vitdsl build --backend trt, then vitdsl verify)"}
    from vitdsl.quant.fake import FakeQuant

    proto = onnx.load_from_string(onnx_bytes)
    quantizers = {n: m for n, m in model.named_modules()
                  if isinstance(m, FakeQuant) and not n.endswith("weight_quant") and not m._twin}
    qnodes = {n.name[: -len(".quantize")]: n for n in proto.graph.node if n.op_type == "QuantizeLinear"}
    pairs = []  # (torch quantizer, shift, Q input, DQ output)
    for name, fq in quantizers.items():
        key = name if name in qnodes else name + ".shifted"
        if key in qnodes:
            pairs.append((fq, key.endswith(".shifted"), qnodes[key].input[0], key))
    extra = list(dict.fromkeys(v for p in pairs for v in p[2:]))
    for v in extra:
        proto.graph.output.append(onnx.helper.make_tensor_value_info(v, onnx.TensorProto.FLOAT, None))
    data = proto.SerializeToString()
    rows, passed = [], True
    for b in batches:
        x = sample_inputs(graph, b, seed)
        with torch.no_grad():
            ref = model(x).numpy()
        outs = run_onnxruntime(data, x.numpy())
        got = dict(zip(["logits"] + extra, outs))
        err = np.abs(got["logits"] - ref)
        atol = _atol(tol, ref, None if tol["kind"] == "float" else output_step(graph, model, x))
        ok = bool(np.all(err <= atol + tol.get("rtol", 0.0) * np.abs(ref)))
        row = {"batch": b, "output": "logits", "max_abs": float(err.max()), "mean_abs": float(err.mean()),
               "atol": atol, "passed": ok}
        worst, ties = 0.0, 0.0
        for fq, shifted, pre_name, dq_name in pairs:
            step = float(fq.scale.max())
            shift = 128 * float(fq.scale) if shifted else 0.0
            with torch.no_grad():
                want = fq(torch.from_numpy(got[pre_name] + shift)).numpy()
            d = np.abs(got[dq_name] + shift - want) / step
            worst = max(worst, float(d.max()))
            ties = max(ties, float((d > STEP_SLACK).mean()))
        if pairs:
            row.update(qdq_pairs=len(pairs), max_steps=worst, ties=ties)
            ok = ok and worst <= 1 + STEP_SLACK and ties <= MAX_TIES
            row["passed"] = ok
        rows.append(row)
        passed = passed and ok
    worst_row = max(rows, key=lambda r: r["max_abs"])
    summary = (f"max |Δ| {worst_row['max_abs']:.3g} at batch {worst_row['batch']} (tolerance {worst_row['atol']:.3g})"
               + (f"; {rows[0]['qdq_pairs']} Q/DQ pairs equal to the torch quantizers within "
                  f"{max(r['max_steps'] for r in rows):.3g} steps" if pairs else ""))
    return {"passed": passed, "ran": True, "rows": rows, "summary": summary}


def load_reference(out: str) -> tuple[Graph, nn.Module, dict]:
    """The torch backend's model for a build directory: its spec and weights."""
    from vitdsl.api import compile, load
    from vitdsl.build import load_weights, spec_hash

    path = os.path.join(out, "manifest.json")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise SpecError(f"{out} has no manifest.json: not a vitdsl build directory", filename=out) from None
    except (OSError, ValueError) as e:
        raise SpecError(f"cannot read the manifest: {e}", filename=path) from None
    if manifest.get("backend") not in ("onnx", "trt", "torch"):
        raise SpecError(f"unknown backend {manifest.get('backend')!r} in the manifest", filename=path)
    graph = load(os.path.join(out, "spec.vit"))
    if spec_hash(graph) != manifest.get("spec_sha256"):
        raise SpecError("spec.vit does not match the manifest's spec hash (the directory was edited)", filename=path)
    model = compile(graph, seed=0).eval()
    load_weights(model, os.path.join(out, "model.safetensors"))
    return graph, model, manifest


def verify(out: str, batches: list[int] | None = None, seed: int = 0) -> dict[str, Any]:
    """Re-run the comparison of a build directory's artifact against the torch backend."""
    graph, model, manifest = load_reference(out)
    rng = manifest["input"]["batch"] if "input" in manifest else {"min": 1, "max": 64}
    if batches is None:
        batches = sorted({rng["min"], min(rng["min"] + 2, rng["max"])})
    for b in batches:
        if not rng["min"] <= b <= rng["max"]:
            raise SpecError(f"batch {b} is outside the artifact's range {rng['min']}..{rng['max']}", filename=out)
    tol = manifest.get("tolerance") or tolerance(graph)
    backend = manifest["backend"]
    if backend == "onnx":
        path = os.path.join(out, "model.onnx")
        with open(path, "rb") as f:
            data = f.read()
        import onnx

        try:
            onnx.checker.check_model(onnx.load_from_string(data), full_check=True)
        except Exception as e:  # noqa: BLE001 - a damaged artifact is a finding, not a crash
            raise SpecError(f"model.onnx fails onnx.checker: {str(e).splitlines()[0]}", filename=path) from None
        result = compare_onnx(graph, model, data, tol, batches, seed)
    elif backend == "trt":
        from .trt import compare_engine

        result = compare_engine(graph, model, os.path.join(out, "model.engine"), tol, batches, seed)
    else:
        raise SpecError("verify compares deploy artifacts (--backend onnx or trt); this is a torch build", filename=out)
    result["backend"] = backend
    return result
