"""The ONNX backend: a compiled vitdsl model -> a TensorRT-ready ONNX model.

    export_onnx(graph, model, opset=None) -> (onnx.ModelProto, info)

The model is exported once in float by torch.onnx's TorchScript-based exporter (about
5x faster here than the dynamo-based one, and its output is the same for these
models), with a dynamic batch dimension and LayerNorm as ``LayerNormalization``
(opset >= 17).  Quantized models are exported in their deploy form (backends/qdq.py):
every fake quantizer is one ``vitdsl::qdq`` call, exported as a placeholder node and
then lowered here into what TensorRT's explicit quantization expects:

  - activations: QuantizeLinear -> DequantizeLinear, INT8, zero point 0, per tensor,
    on the input of every MatMul, Gemm and Conv (never on outputs);
  - weights: an INT8 constant -> DequantizeLinear (per output channel); 4-bit weights
    of MatMul/Gemm become an INT4 constant with a blocked DequantizeLinear (opset 21,
    one block per output channel), which TensorRT runs as INT4 weight-only.

Node names follow the project's naming scheme: each MatMul/Gemm/Conv is named after
its layer (``blocks.0.mlp.fc1``), attention products ``<attn>.scores`` / ``<attn>.mix``,
Q/DQ nodes ``<quantizer>.quantize`` / ``.dequantize``.
"""
from __future__ import annotations

import io
import warnings
from collections import defaultdict
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from vitdsl.errors import SpecError
from vitdsl.graph import Graph

from . import qdq as _qdq  # noqa: F401  (registers the vitdsl::qdq and vitdsl::tag ops)
from .qdq import deploy_form

MIN_OPSET, MAX_OPSET = 17, 21
INT4_OPSET = 21  # INT4 and blocked DequantizeLinear
DEFAULT_OPSET = 17  # every TensorRT 8.6+ parses it
INPUT, OUTPUT = "image", "logits"
LINEAR_OPS = ("MatMul", "Gemm", "Conv")
# Ops a quantized value may pass through between its DequantizeLinear and the product reading it.
_LAYOUT = ("Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Gather", "Slice", "Split", "Concat",
           "ReduceMean", "Pad", "Identity", "Cast")


# ------------------------------------------------------------------ export
def _register_symbolics(opset: int) -> None:
    """vitdsl::qdq and vitdsl::tag -> placeholder nodes in the `vitdsl` domain (lowered below)."""
    from torch.onnx import register_custom_op_symbolic, symbolic_helper as sh

    def qdq(g, x, scale, axis, name):
        return g.op("vitdsl::QDQ", x, scale, axis_i=sh._maybe_get_const(axis, "i"),
                    name_s=sh._maybe_get_const(name, "s")).setType(x.type())

    def tag(g, x, name):
        return g.op("vitdsl::Tag", x, name_s=sh._maybe_get_const(name, "s")).setType(x.type())

    register_custom_op_symbolic("vitdsl::qdq", qdq, opset)
    register_custom_op_symbolic("vitdsl::tag", tag, opset)


def _torch_export(model: nn.Module, example: torch.Tensor, opset: int) -> bytes:
    _register_symbolics(min(opset, 20))
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), buf, dynamo=False, opset_version=min(opset, 20),
                          input_names=[INPUT], output_names=[OUTPUT], do_constant_folding=True,
                          dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
                          custom_opsets={"vitdsl": 1})
    return buf.getvalue()


def export_onnx(graph: Graph, model: nn.Module, opset: int | None = None) -> tuple[Any, dict]:
    """Export `model` (the torch backend's module for `graph`, calibrated if quantized).
    Returns the checked ONNX model and what the export decided (opset, Q/DQ placement,
    what TensorRT runs each quantizer as)."""
    import onnx

    bits = graph.bits or {}
    int4 = any(b.weight is not None and b.weight <= 4 for b in bits.values())
    if opset is None:
        opset = INT4_OPSET if int4 else DEFAULT_OPSET
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise SpecError(f"opset {opset} is not supported: LayerNormalization needs opset {MIN_OPSET} or higher, "
                        f"and vitdsl writes at most opset {MAX_OPSET}", filename=graph.filename)
    check_precisions(graph, opset)
    deploy = deploy_form(model, tags=True)
    c, h, w = graph.input.out.shape
    example = torch.randn(2, c, h, w)
    try:
        data = _torch_export(deploy, example, opset)
    except Exception as e:  # noqa: BLE001 - find the node whose op does not export
        raise _unsupported(graph, model, opset, e) from None
    proto = onnx.load_from_string(data)
    info = lower(proto, deploy, opset)
    proto.producer_name, proto.doc_string = "vitdsl", f"{graph.name}: exported by vitdsl from {graph.filename}"
    onnx.checker.check_model(proto, full_check=True)
    return proto, info


def _unsupported(graph: Graph, model: nn.Module, opset: int, err: Exception) -> SpecError:
    """Export each node's module alone, in order, to find the one that fails: its op and
    its spec line are the diagnostic."""
    from .precision import node_inputs

    inputs = node_inputs(graph, model)
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    for n in graph.nodes():
        if n.name not in inputs:
            continue
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(model.get_submodule(n.name), inputs[n.name], io.BytesIO(), dynamo=False,
                                  opset_version=min(opset, 20))
        except Exception as e:  # noqa: BLE001
            text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            return n.error(f"op '{n.op}' cannot be exported to ONNX (opset {opset}): {text}").located(
                graph.filename, graph.source)
    return SpecError(f"the ONNX export failed: {reason}", filename=graph.filename)


def check_precisions(graph: Graph, opset: int) -> None:
    """Refuse widths the format cannot express: bf16 Conv exists only from opset 22."""
    from .precision import bits_error, layer_kind

    for layer, spec in (graph.bits or {}).items():
        if spec.float_type == "bf16" and layer_kind(graph, layer) == "conv":
            raise bits_error(graph, layer, f"layer '{layer}' is bf16, but ONNX opset {opset} has no bf16 Conv "
                                                f"(it arrives in opset 22); make it fp16 or fp32 for --backend onnx")


# ------------------------------------------------------------------ lowering
class _Graph:
    """Producer/consumer index over an onnx GraphProto, kept up to date by the edits below."""

    def __init__(self, g):
        self.g = g
        self.init = {t.name: t for t in g.initializer}
        self.producer = {o: n for n in g.node for o in n.output}
        self.consumers: dict[str, list] = defaultdict(list)
        for n in g.node:
            for i in n.input:
                self.consumers[i].append(n)

    def rewire(self, old: str, new: str) -> None:
        """Every reader of `old` reads `new` instead (graph outputs too)."""
        for n in self.consumers.pop(old, []):
            for k, i in enumerate(n.input):
                if i == old:
                    n.input[k] = new
            self.consumers[new].append(n)
        for o in self.g.output:
            if o.name == old:
                raise AssertionError("a marker produces a graph output")

    def reached(self, start: str, depth: int = 12) -> list:
        """The MatMul/Gemm/Conv nodes reached from value `start` through layout ops."""
        found, frontier, seen = [], [start], set()
        for _ in range(depth):
            nxt = []
            for v in frontier:
                for n in self.consumers.get(v, []):
                    if id(n) in seen:
                        continue
                    seen.add(id(n))
                    if n.op_type in LINEAR_OPS:
                        found.append(n)
                    elif n.domain == "vitdsl" or n.op_type in _LAYOUT + ("QuantizeLinear", "DequantizeLinear"):
                        nxt.extend(n.output)
            frontier = nxt
        return found

    def add_init(self, name: str, array: np.ndarray, dtype: int | None = None) -> str:
        from onnx import helper, numpy_helper

        if dtype is None:
            t = numpy_helper.from_array(array, name)
        else:  # INT4: packed two to a byte by the helper
            t = helper.make_tensor(name, dtype, array.shape, array.flatten().tolist())
        if name in self.init:
            self.g.initializer.remove(self.init[name])
        self.g.initializer.append(t)
        self.init[name] = t
        return name


def _array(gr: _Graph, name: str) -> np.ndarray | None:
    from onnx import numpy_helper

    if name in gr.init:
        return numpy_helper.to_array(gr.init[name])
    p = gr.producer.get(name)
    if p is not None and p.op_type == "Constant":
        return numpy_helper.to_array(p.attribute[0].t)
    if p is not None and p.op_type == "Identity":  # the exporter shares equal initializers this way
        return _array(gr, p.input[0])
    return None


def _layer_of(quantizer: str) -> tuple[str, str]:
    """Quantizer path -> (the product it feeds, which operand)."""
    base, _, leaf = quantizer.rpartition(".")
    if leaf in ("neg", "pos", "shifted"):  # twin-range branches, the shifted softmax output
        return _layer_of(base)
    if leaf in ("weight_quant", "input_quant"):
        return base, leaf
    attn, _, _ = base.rpartition(".")  # <attn>.matmul_quant.{q,k,v,probs}
    return (f"{attn}.scores" if leaf in ("q", "k") else f"{attn}.mix"), leaf


def lower(proto, deploy: nn.Module, opset: int) -> dict:
    """Lower the vitdsl placeholder nodes into Q/DQ, name the products, and report."""
    from onnx import TensorProto, helper

    g = proto.graph
    gr = _Graph(g)
    info: dict = {"quantizers": {}, "layers": {}}
    names: dict[int, str] = {}  # id(product node) -> name
    int4: list[tuple] = []
    new_nodes: dict[int, list] = {}  # id(placeholder) -> replacement nodes
    zp_cache: dict[tuple, str] = {}

    def zero_point(shape: tuple, dtype: int) -> str:
        key = (shape, dtype)
        if key not in zp_cache:
            name = f"vitdsl.zero_point.{'int4' if dtype == TensorProto.INT4 else 'int8'}" + (f".{shape[0]}" if shape else "")
            gr.add_init(name, np.zeros(shape, np.int8), dtype if dtype == TensorProto.INT4 else None)
            zp_cache[key] = name
        return zp_cache[key]

    for node in list(g.node):
        if node.domain != "vitdsl":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        name = attrs["name"].decode() if isinstance(attrs["name"], bytes) else attrs["name"]
        if node.op_type == "Tag":  # names the layer reading this value; then disappears
            for p in gr.reached(node.output[0]):
                names.setdefault(id(p), name)
            gr.rewire(node.output[0], node.input[0])
            new_nodes[id(node)] = []
            continue
        x, scale_name = node.input[0], node.input[1]
        scale = _array(gr, scale_name)
        assert scale is not None, f"scale of {name} is not a constant"
        layer, operand = _layer_of(name)
        products = gr.reached(node.output[0])
        for p in products:
            if operand != "weight_quant":
                names.setdefault(id(p), layer)
        w = _array(gr, x)
        if w is not None:  # a weight: fold Q into an integer constant, keep DQ
            axis = attrs["axis"]
            s = scale.reshape(-1, *([1] * (w.ndim - 1 - axis))) if scale.size > 1 else scale.reshape(())
            q = np.clip(np.round(w / s), -128, 127).astype(np.int8)
            out, dq_axis = node.output[0], axis
            users = gr.consumers.get(out, [])
            if (len(users) == 1 and users[0].op_type == "Transpose" and q.ndim == 2
                    and [a.ints for a in users[0].attribute if a.name == "perm"] == [[1, 0]]):
                tr = users[0]  # MatMul reads Wᵀ: store the transposed constant
                q, dq_axis = q.T.copy(), 1 - axis
                gr.consumers[out].remove(tr)
                gr.rewire(tr.output[0], out)
                g.node.remove(tr)
            wname = gr.add_init(layer + ".weight", q)
            sname = gr.add_init(name + ".scale", scale.astype(np.float32).reshape(-1) if scale.size > 1
                                else scale.astype(np.float32).reshape(()))
            dq = helper.make_node("DequantizeLinear", [wname, sname, zero_point(scale.shape if scale.size > 1 else (), TensorProto.INT8)],
                                  [out], name=name + ".dequantize", axis=dq_axis)
            new_nodes[id(node)] = [dq]
            wbits = _weight_bits(deploy, layer)
            kinds = {p.op_type for p in products}
            entry = {"role": "weight", "bits": wbits, "layer": layer, "axis": dq_axis}
            if wbits <= 4 and opset >= INT4_OPSET and kinds <= {"MatMul", "Gemm"} and q.shape[-1] % 2 == 0:
                int4.append((dq, wname, q, dq_axis))
                entry["storage"] = "INT4"
                entry["runs_as"] = "INT4 weight-only (blocked DequantizeLinear; the product runs in the layer's float type)"
            else:
                entry["storage"] = "INT8"
                if wbits < 8:
                    why = ("TensorRT has no INT4 Conv" if wbits == 4 and "Conv" in kinds else
                           f"opset {opset} has no INT4 (use --opset 21)" if wbits == 4 and opset < INT4_OPSET else
                           "INT4 packing needs an even last dimension" if wbits == 4 else
                           f"TensorRT has no {wbits}-bit integer type")
                    entry["runs_as"] = f"INT8 ({why}): values stay on the {wbits}-bit grid, stored and computed as INT8"
                else:
                    entry["runs_as"] = "INT8"
            info["quantizers"][name] = entry
        else:  # an activation: QuantizeLinear -> DequantizeLinear, per tensor
            s = float(scale.reshape(-1)[0])
            sname = gr.add_init(name + ".scale", np.array(s, np.float32))
            zp = zero_point((), TensorProto.INT8)
            qv = name + ".q"
            gr.rewire(node.output[0], name)  # the dequantized value carries the quantizer's name
            qn = helper.make_node("QuantizeLinear", [x, sname, zp], [qv], name=name + ".quantize")
            dqn = helper.make_node("DequantizeLinear", [qv, sname, zp], [name], name=name + ".dequantize")
            new_nodes[id(node)] = [qn, dqn]
            info["quantizers"][name] = _activation_entry(deploy, name, operand)
    for n in g.node:  # before the rebuild below, which copies the nodes
        if id(n) in names:
            n.name = names[id(n)]
    # Replace placeholders in place (keeps a topological order).
    order = [new_nodes.get(id(n), [n]) for n in g.node]
    order = [n for group in order for n in group]
    copies = [type(n)() for n in order]
    for c, n in zip(copies, order):
        c.CopyFrom(n)
    del g.node[:]
    g.node.extend(copies)
    del g.value_info[:]  # shapes of rewritten values are stale; shape inference redoes them
    used = {i for n in g.node for i in n.input}
    for t in [t for t in g.initializer if t.name not in used]:
        g.initializer.remove(t)
    _unique_names(g)
    keep = [o for o in proto.opset_import if o.domain != "vitdsl"]
    del proto.opset_import[:]
    proto.opset_import.extend(keep)
    if any(o.domain == "" and o.version < opset for o in proto.opset_import):
        from onnx import version_converter

        converted = version_converter.convert_version(proto, opset)
        proto.CopyFrom(converted)
    if int4:
        _to_int4(proto, int4)
    info["opset"] = opset
    info["layers"] = _layer_precisions(proto)
    return info


def _weight_bits(deploy: nn.Module, layer: str) -> int:
    """The spec's weight width of a quantized layer (its QDQ keeps the grid's range)."""
    q = deploy.get_submodule(layer).weight_quant
    return int(np.log2(q.hi + 1)) + 1


def _activation_entry(deploy: nn.Module, name: str, operand: str) -> dict:
    base = name.rsplit(".", 1)[0] if name.endswith((".neg", ".pos", ".shifted")) else name
    mod = deploy.get_submodule(base)
    from .qdq import QDQ, DeployAttnQuant, TwinQDQ

    if isinstance(mod, TwinQDQ):
        return {"role": "input", "bits": mod.bits, "twin": True,
                "runs_as": "two INT8 Q/DQ branches (negative and positive steps) added in float: the layer "
                           "reads a float input, so TensorRT runs it as a float product with INT8 weights"}
    assert isinstance(mod, QDQ)
    parent = deploy.get_submodule(base.rsplit(".", 1)[0]) if "." in base else None
    if isinstance(parent, DeployAttnQuant) and operand == "probs" and parent.shift:
        return {"role": "probs", "bits": 8, "signed": False,
                "runs_as": "INT8 shifted by 128 steps (TensorRT has no UINT8): A·V = (A - 128s)·V + 128s·ΣV, "
                           "an INT8 product plus a float correction"}
    signed = mod.lo < 0
    bits = (int(np.log2(mod.hi + 1)) + 1) if signed else int(np.log2(mod.hi + 1))
    entry = {"role": operand.replace("_quant", ""), "bits": bits, "signed": signed}
    if bits < 8:
        entry["runs_as"] = f"INT8 (TensorRT has no {bits}-bit type): clipped to the {bits}-bit grid first"
    else:
        entry["runs_as"] = "INT8"  # the narrow grid [-127, 127]: a Clip before Q keeps -128 out
    return entry


def _unique_names(g) -> None:
    seen: dict[str, int] = {}
    for n in g.node:
        if not n.name:
            continue
        k = seen.get(n.name, 0)
        seen[n.name] = k + 1
        if k:
            n.name = f"{n.name}_{k}"


def _to_int4(proto, items: list[tuple]) -> None:
    """Turn the marked INT8 weight constants into INT4 with a blocked DequantizeLinear:
    one block per output channel (block_size = the input dimension), so per-channel
    scales are kept exactly."""
    from onnx import TensorProto, helper, numpy_helper

    g = proto.graph
    byname = {n.name: n for n in g.node}
    inits = {t.name: t for t in g.initializer}
    for dq_old, wname, q, axis in items:
        dq = byname[dq_old.name]
        k_axis = 1 - axis  # the blocked (reduction) dimension
        block = q.shape[k_axis]
        scale = numpy_helper.to_array(inits[dq.input[1]])
        sshape = [1, 1]
        sshape[axis] = q.shape[axis]
        g.initializer.remove(inits[wname])
        g.initializer.append(helper.make_tensor(wname, TensorProto.INT4, q.shape, q.flatten().tolist()))
        g.initializer.remove(inits[dq.input[1]])
        g.initializer.append(numpy_helper.from_array(scale.reshape(sshape).astype(np.float32), dq.input[1]))
        zp = dq.input[1].rsplit(".scale", 1)[0] + ".zero_point"
        g.initializer.append(helper.make_tensor(zp, TensorProto.INT4, sshape, [0] * int(np.prod(sshape))))
        dq.input[2] = zp
        del dq.attribute[:]
        dq.attribute.extend([helper.make_attribute("axis", k_axis), helper.make_attribute("block_size", block)])


def _layer_precisions(proto) -> dict[str, str]:
    """Each named MatMul/Gemm/Conv and the type of its inputs: int8/int4 (read through
    DequantizeLinear) or the float type."""
    g = proto.graph
    producer = {o: n for n in g.node for o in n.output}
    inits = {t.name: t for t in g.initializer}
    from onnx import TensorProto

    def kind(v: str) -> str:
        for _ in range(8):
            p = producer.get(v)
            if p is None:
                t = inits.get(v)
                return {TensorProto.FLOAT16: "fp16", TensorProto.BFLOAT16: "bf16"}.get(t.data_type, "fp32") if t else "fp32"
            if p.op_type == "DequantizeLinear":
                src = inits.get(p.input[0])
                return "int4" if src is not None and src.data_type == TensorProto.INT4 else "int8"
            if p.op_type == "Cast":
                to = [a.i for a in p.attribute if a.name == "to"][0]
                return {TensorProto.FLOAT16: "fp16", TensorProto.BFLOAT16: "bf16"}.get(to, "fp32")
            if p.op_type not in _LAYOUT:
                return "fp32"
            v = p.input[0]
        return "fp32"

    out = {}
    for n in g.node:
        if n.op_type in LINEAR_OPS and n.name and not n.name.startswith("/"):
            out[n.name] = "/".join(kind(i) for i in n.input[:2])
    return out


# ------------------------------------------------------------------ checks
def qdq_placement(proto) -> dict[str, list[str]]:
    """For every MatMul/Gemm/Conv: which of its two inputs come from a DequantizeLinear
    (possibly through layout ops).  The tests and `vitdsl verify` read this."""
    g = proto.graph
    producer = {o: n for n in g.node for o in n.output}

    def from_dq(v: str) -> bool:
        for _ in range(8):
            p = producer.get(v)
            if p is None:
                return False
            if p.op_type == "DequantizeLinear":
                return True
            if p.op_type not in _LAYOUT:
                return False
            v = p.input[0]
        return False

    return {n.name: [i for i in n.input[:2] if from_dq(i)] for n in g.node if n.op_type in LINEAR_OPS}


def run_onnxruntime(path_or_bytes, images: np.ndarray, outputs: list[str] | None = None) -> list[np.ndarray]:
    """Run the model on onnxruntime's CPU provider (graph optimisations off, so what
    runs is the graph as written)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    sess = ort.InferenceSession(path_or_bytes, opts, providers=["CPUExecutionProvider"])
    return sess.run(outputs, {sess.get_inputs()[0].name: images.astype(np.float32)})


def trtexec_command(onnx_path: str, shape: tuple[int, int, int], batch: tuple[int, int, int],
                    engine_path: str | None = None) -> str:
    """The trtexec line that builds the engine on the target machine: strongly typed, so
    the Q/DQ and float types in the model decide every layer's precision."""
    c, h, w = shape
    lo, opt, hi = batch
    engine_path = engine_path or onnx_path.rsplit(".", 1)[0] + ".engine"
    return (f"trtexec --onnx={onnx_path} --stronglyTyped "
            f"--minShapes={INPUT}:{lo}x{c}x{h}x{w} --optShapes={INPUT}:{opt}x{c}x{h}x{w} "
            f"--maxShapes={INPUT}:{hi}x{c}x{h}x{w} --saveEngine={engine_path}")
