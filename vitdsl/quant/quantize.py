"""`vitdsl quantize`: a float spec + weights + calibration images -> a quantized spec
(its bits section filled), weights with quantization parameters, and a report."""
from __future__ import annotations

import json
import math
import os
from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import SpecError
from ..graph import Graph, Stmt

REPORT_FIELDS = ("layer", "bits", "output_mse")


def load_images(path: str, shape: tuple[int, int, int] | None = None, test_fraction: float | None = None,
                fold: int = 0) -> torch.Tensor:
    """Calibration images from a .safetensors (first tensor, or 'images') or .pt tensor file
    (N, C, H, W); `digits` or `digits:N` uses scikit-learn's digits (training images only,
    upsampled to `shape`, the model's input, normalised as for a model trained with
    `test_fraction`, default vitdsl.train's, and `fold`) via vitdsl.train."""
    if path == "digits" or path.startswith("digits:"):
        from ..train import TEST_FRACTION, calibration_images

        count = path.split(":", 1)[1] if ":" in path else "32"
        if not (count.isascii() and count.isdigit()):  # int() refuses '²', which isdigit() accepts
            raise SpecError(f"expected digits or digits:N with N a number of images, got '{path}'")
        if shape is None:
            raise SpecError("digits calibration needs the model's input shape")
        return calibration_images(int(count), shape, TEST_FRACTION if test_fraction is None else test_fraction, fold)
    if not os.path.exists(path):
        raise SpecError("calibration data not found", filename=path)
    expected = "images (N, C, H, W) in a .safetensors file or a .pt file written by torch.save"
    try:
        with open(path, "rb") as f:  # torch.load's error for an empty file has no text
            empty = not f.read(1)
    except OSError as e:
        raise SpecError(f"cannot read calibration data: {e.strerror or e}", filename=path) from None
    if empty:
        raise SpecError(f"calibration data is empty; expected {expected}", filename=path)
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            d = load_file(path)
            x = d.get("images", next(iter(d.values()), None))
        else:
            x = torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a user error here
        # safetensors says what is wrong in a line; torch.load's messages (empty, or a
        # paragraph about weights_only) do not, so they are replaced by what was expected
        reason = (f"not a safetensors file ({e})" if path.endswith(".safetensors")
                  else f"not a tensor file; expected {expected}")
        raise SpecError(f"cannot read calibration data: {reason}", filename=path) from None
    if not isinstance(x, torch.Tensor):
        raise SpecError("calibration data must hold one tensor of images (N, C, H, W)", filename=path)
    return x.float()


def with_bits(graph: Graph, rules: list[tuple[str, str]]) -> Graph:
    """The same model with a new bits section."""
    from ..api import run_passes
    from ..expand import build_graph

    program = [s for s in graph.program if s.kind != "bits"]
    program.append(Stmt(kind="bits", name="bits", attrs={"rules": rules}))
    return run_passes(build_graph(graph.name, program, graph.filename, graph.source), graph.max_params)


def quantize(graph: Graph, state: dict, images: torch.Tensor, *, bits: str | None = None, budget: float | None = None,
             method: str = "mptq", candidates: tuple[int, ...] = (4, 5, 6, 8), weights_name: str = "<weights>",
             progress: Callable[[int, int, str], None] | None = None,
             images_name: str = "<calibration data>") -> tuple[Graph, torch.nn.Module, list[dict]]:
    """Calibrate `graph` at `bits` (uniform) or search per-layer widths for an average
    `budget`, then calibrate at them. progress(done, total, label), e.g. a
    `vitdsl.progress.Bar`: the search's way to the budget (in %), then the calibration's
    layers (mptq) or batches."""
    from ..api import compile
    from .bits import BitSpec, quant_layers
    from .calibrate import calibrate
    from .mixed import greedy_mixed_precision

    if (bits is None) == (budget is None):
        raise SpecError("give exactly one of --bits (e.g. w4a8) or --budget (an average width, e.g. 5.0)")
    if images.dim() != 4 or tuple(images.shape[1:]) != tuple(graph.input.out.shape):
        raise SpecError(f"calibration images have shape {tuple(images.shape)}; the model takes "
                        f"(N, {', '.join(map(str, graph.input.out.shape))})", filename=images_name)
    if images.shape[0] == 0:
        raise SpecError("the calibration set is empty", filename=images_name)
    if not torch.isfinite(images).all():
        raise SpecError(f"calibration images hold NaN or infinite values ({int((~torch.isfinite(images)).sum())} of "
                        f"{images.numel()})", filename=images_name)
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise SpecError(f"weights hold NaN or infinite values: {', '.join(bad[:5])}"
                        f"{f' and {len(bad) - 5} more' if len(bad) > 5 else ''}", filename=weights_name)
    if budget is not None and not math.isfinite(budget):
        raise SpecError(f"the budget must be a finite average width, got {budget}")
    if bits is not None and BitSpec.parse(bits).float_type is not None:
        raise SpecError(f"--bits {bits} keeps every layer in floating point: there is nothing to calibrate; give "
                        "integer widths such as w8a8 (a float type for single layers goes in the spec's bits section)")
    if budget is not None and budget < min(candidates):
        raise SpecError(f"budget {budget} is below the smallest candidate width {min(candidates)}")
    float_graph = with_bits(graph, []) if graph.bits else graph
    fmodel = compile(float_graph).eval()
    from ..build import load_state_strict

    load_state_strict(fmodel, state, weights_name)
    with torch.no_grad():
        ref = fmodel(images)
    layers = quant_layers(graph)

    def phase(label: str) -> Callable[[int, int, str], None] | None:
        return (lambda done, total, what: progress(done, total, f"{label}: {what}")) if progress else None

    if budget is not None:
        top = max(candidates)
        g8 = with_bits(graph, [("default", f"w{top}a{top}")])
        m8 = compile(g8)
        m8.load_state_dict(state, strict=False)
        if method == "mptq":  # SQ-b first, as calibrate(method="mptq") does; the search sets every range
            from .sqb import fold_sqb

            fold_sqb(m8, images)
        chosen = greedy_mixed_precision(m8, images, ref, budget, {q.name: (q.weights, q.act_elems) for q in layers},
                                        tuple(candidates), progress=phase("search"), method=method)
        rules = [("default", f"w{top}a{top}")] + [(n, f"w{w}a{a}") for n, (w, a) in chosen.items() if (w, a) != (top, top)]
    else:
        rules = [("default", bits)]
    qgraph = with_bits(graph, rules)
    qmodel = compile(qgraph)
    qmodel.load_state_dict(state, strict=False)
    calibrate(qmodel, images, method=method, progress=phase(f"calibrating ({method})"))
    report = _report(qgraph, qmodel, fmodel, images, ref)
    return qgraph, qmodel, report


@torch.no_grad()
def _report(qgraph: Graph, qmodel, fmodel, images, ref) -> list[dict]:
    """Per layer: bits and the MSE of its output against the float model's, same input."""
    rows = []
    outs: dict[str, list] = {}
    hooks = []
    for name in qgraph.bits:
        for tag, model in (("q", qmodel), ("f", fmodel)):
            mod = model.get_submodule(name)
            hooks.append(mod.register_forward_hook(lambda m, a, o, k=(name, tag): outs.setdefault(k[0], {}).__setitem__(k[1], o)))
    q_logits = qmodel.eval()(images[:8])
    fmodel(images[:8])
    for h in hooks:
        h.remove()
    for name, spec in qgraph.bits.items():
        o = outs.get(name, {})
        mse = float(F.mse_loss(o["q"], o["f"])) if "q" in o and "f" in o else float("nan")
        rows.append({"layer": name, "bits": str(spec), "output_mse": mse})
    logp, logq = F.log_softmax(ref[:8], -1), F.log_softmax(q_logits, -1)
    rows.append({"layer": "(logits)", "bits": "", "output_mse": float((logp.exp() * (logp - logq)).sum(-1).mean()),
                 "note": "KL(fp32 || quantized)"})
    return rows


def write_outputs(out: str, qgraph: Graph, qmodel, report: list[dict]) -> list[str]:
    from safetensors.torch import save_file

    from ..atomic import staged_dir
    from .bits import summary

    with staged_dir(out) as tmp:
        with open(os.path.join(tmp, "spec.vit"), "w") as f:
            f.write(qgraph.to_vit())
        save_file({k: v.contiguous() for k, v in qmodel.state_dict().items()}, os.path.join(tmp, "model.safetensors"))
        s = summary(qgraph)
        with open(os.path.join(tmp, "report.json"), "w") as f:
            json.dump({"model": qgraph.name, "avg_weight_bits": s["avg_weight_bits"], "avg_act_bits": s["avg_act_bits"],
                       "size_bytes": s["size_bytes"], "layers": report}, f, indent=1)
        files = sorted(os.listdir(tmp))
    return files
