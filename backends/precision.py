"""Per-layer precision: what the spec's bits section asks of a deploy backend, where a
layer's width came from (for diagnostics), and what an exported program really does.

The precision map is the contract between the spec and the engine: the ONNX and
TensorRT backends write it into their manifest, the TensorRT backend checks the
exported program it hands to the compiler against it, and fails when they differ.
"""
from __future__ import annotations

from typing import Any

from vitdsl.errors import SpecError
from vitdsl.graph import Graph


def node_inputs(graph: Graph, model) -> dict[str, tuple]:
    """Each node's module inputs on one image: what a backend needs to try a node alone
    when the whole model fails to export, and so to name the node (and spec line) at fault."""
    import torch

    inputs: dict[str, tuple] = {}
    hooks = [model.get_submodule(n.name).register_forward_pre_hook(
        lambda m, a, name=n.name: inputs.setdefault(name, a)) for n in graph.nodes() if n.op != "input"]
    try:
        with torch.no_grad():
            model(torch.randn(1, *graph.input.out.shape))
    finally:
        for hk in hooks:
            hk.remove()
    return inputs


def layer_kind(graph: Graph, layer: str) -> str:
    from vitdsl.quant.bits import quant_layers

    return next((q.kind for q in quant_layers(graph) if q.name == layer), "linear")


def bits_rule_span(graph: Graph, layer: str):
    """The span of the bits rule that gave `layer` its width (most specific match, else default)."""
    from vitdsl.quant.bits import _parts_match, specificity

    st = next((s for s in graph.program if s.kind == "bits"), None)
    if st is None:
        return None
    rules = st.attrs["rules"]
    spans = st.__dict__.get("_rule_spans") or [(st.span, st.span)] * len(rules)
    hits = [(specificity(sel), span) for (sel, _), span in zip(rules, spans) if sel != "default" and _parts_match(sel, layer)]
    if hits:
        return max(hits, key=lambda h: h[0])[1][0]
    default = [span for (sel, _), span in zip(rules, spans) if sel == "default"]
    return default[0][0] if default else st.span


def bits_error(graph: Graph, layer: str, message: str) -> SpecError:
    """A diagnostic at the bits rule that chose `layer`'s width."""
    return SpecError(message, bits_rule_span(graph, layer)).located(graph.filename, graph.source)


def _dtype(spec) -> str:
    return spec.float_type if spec.float_type else "int8"


def precision_map(graph: Graph, weight_int4: bool = False) -> dict[str, Any]:
    """Layer -> what it runs in: the spec's width, the weights' and inputs' types, and the
    compute type.  Integer layers run through INT8 Q/DQ (narrower widths on their grid);
    with `weight_int4`, 4-bit linear weights are INT4 (weight-only).  LayerNorm and
    softmax are not quantized and stay fp32 (fp32 accumulation)."""
    from vitdsl.quant.bits import FP32, quant_layers

    bits = graph.bits or {}
    layers: dict[str, Any] = {}
    for q in quant_layers(graph):
        spec = bits.get(q.name, FP32)
        entry = {"bits": str(spec), "kind": q.kind}
        if spec.float_type:
            entry.update(weights=spec.float_type, inputs=spec.float_type, compute=spec.float_type)
        else:
            w4 = weight_int4 and spec.weight <= 4 and q.kind == "linear"
            entry.update(weights="int4" if w4 else "int8", inputs="int8",
                         compute="int8" if not w4 else "int4 weight-only, float product")
        layers[q.name] = entry
    attention = {}
    for name, entry in layers.items():
        if name.endswith(".qkv") and entry["inputs"] == "int8":
            attn = name.rsplit(".", 1)[0]
            attention[f"{attn}.scores"] = {"inputs": "int8", "compute": "int8"}
            attention[f"{attn}.mix"] = {"inputs": "int8", "compute": "int8"}
    return {"layers": layers, "attention": attention,
            "layernorm": "fp32 (fp32 accumulation)", "softmax": "fp32 (fp32 accumulation)"}


# ------------------------------------------------------------------ exported programs
_FLOAT = {"torch.float32": "fp32", "torch.float16": "fp16", "torch.bfloat16": "bf16"}


def _module_path(node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    for prefix in ("L['self'].", "L__self__."):
        path = path.removeprefix(prefix)
    return path


def _operand_type(node) -> str:
    """int8 when the value comes from a vitdsl::qdq (maybe through views), else its float type."""
    import torch

    seen = 0
    while node is not None and seen < 8:
        if getattr(node, "target", None) is torch.ops.vitdsl.qdq.default:
            return "int8"
        if node.op == "call_function" and node.target in (torch.ops.aten.t.default, torch.ops.aten.transpose.int,
                                                          torch.ops.aten.permute.default, torch.ops.aten.view.default,
                                                          torch.ops.aten.reshape.default, torch.ops.aten.expand.default,
                                                          torch.ops.aten.clone.default, torch.ops.aten._unsafe_view.default):
            node = node.args[0]
            seen += 1
            continue
        break
    val = node.meta.get("val") if node is not None else None
    return _FLOAT.get(str(getattr(val, "dtype", "")), str(getattr(val, "dtype", "?")))


def program_precisions(program) -> dict[str, Any]:
    """What an exported program computes in: for each linear/conv (by module path) the
    types of its input and weight; the input types of every LayerNorm and softmax."""
    import torch

    aten = torch.ops.aten
    linear = {aten.linear.default, aten.conv2d.default, aten.convolution.default}
    norms = {aten.layer_norm.default, aten.native_layer_norm.default}
    softmax = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
    layers, other = {}, {"layernorm": set(), "softmax": set()}
    for n in program.graph.nodes:
        if n.op != "call_function":
            continue
        if n.target in linear:
            path = _module_path(n)
            if path:
                layers.setdefault(path, {"inputs": _operand_type(n.args[0]), "weights": _operand_type(n.args[1])})
        elif n.target in norms:
            other["layernorm"].add(_operand_type(n.args[0]))
        elif n.target in softmax:
            other["softmax"].add(_operand_type(n.args[0]))
    return {"layers": layers, "layernorm": sorted(other["layernorm"]), "softmax": sorted(other["softmax"])}


def check_program(graph: Graph, program, pmap: dict[str, Any]) -> None:
    """Fail when the program handed to the compiler would not run a layer in the precision
    the spec asks for, or runs a LayerNorm/softmax below fp32."""
    seen = program_precisions(program)
    for layer, want in pmap["layers"].items():
        got = seen["layers"].get(layer)
        if got is None:
            continue  # folded away (e.g. a layer whose output is unused)
        want_in = want["inputs"]
        want_w = "int8" if want["weights"] in ("int8", "int4") else want["weights"]
        if got["inputs"] != want_in or got["weights"] != want_w:
            raise bits_error(graph, layer, f"the exported program runs '{layer}' with {got['inputs']} inputs and "
                                           f"{got['weights']} weights, but the spec asks for {want['bits']}")
    for what in ("layernorm", "softmax"):
        low = [t for t in seen[what] if t != "fp32"]
        if low:
            raise SpecError(f"the exported program runs a {what} in {', '.join(low)}; vitdsl keeps "
                            f"{what} in fp32 (fp32 accumulation)", filename=graph.filename)
