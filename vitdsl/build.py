"""`vitdsl build`: a spec -> a directory of artifacts, written atomically.

torch backend output:
  model.safetensors  weights (state_dict keys = node names)
  spec.vit           the canonical spec the weights belong to
  model.pt2          torch.export program (dynamic batch)
  summary.json       per-layer table and totals
  manifest.json      what is here, spec hash, versions

onnx backend output (backends/onnx.py, docs/deploy.md):
  model.onnx         TensorRT-ready: dynamic batch, LayerNormalization, Q/DQ where quantized
  model.safetensors, spec.vit   the torch-backend reference `vitdsl verify` compares against
  manifest.json      also opset, batch range, precision map, what TensorRT runs each width
                     as, tolerances and the trtexec command line

trt backend output (backends/trt.py): model.engine (serialized TensorRT engine),
model.pt2 (the program handed to torch-tensorrt), model.safetensors, spec.vit and
manifest.json (also torch-tensorrt and TensorRT versions, batch range, precision map).
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
from typing import Callable

from .atomic import check_replaceable, staged_dir, writable_parent
from .errors import SpecError
from .graph import Graph

BACKENDS = ("torch", "onnx", "trt")
DEFAULT_BATCH = (1, 8, 64)  # min, opt, max: the engine's dynamic batch range


def spec_hash(graph: Graph) -> str:
    return hashlib.sha256(graph.to_vit().encode()).hexdigest()


def load_weights(model, path: str) -> None:
    """Load safetensors weights strictly, naming every missing or unexpected tensor."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise SpecError(f"cannot read weights: {e}", filename=path) from None
    load_state_strict(model, state, path)


def load_state_strict(model, state: dict, filename: str = "<weights>") -> None:
    """load_state_dict that reports every missing, unexpected or mis-shaped tensor as a SpecError."""
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        detail = "; ".join(ln.strip() for ln in str(e).splitlines()[1:] if ln.strip())
        raise SpecError(f"weights do not match the spec: {detail}", filename=filename) from None
    problems = []
    if result.missing_keys:
        problems.append("missing " + ", ".join(result.missing_keys))
    if result.unexpected_keys:
        problems.append("unexpected " + ", ".join(result.unexpected_keys))
    if problems:
        raise SpecError("weights do not match the spec: " + "; ".join(problems), filename=filename)


def parse_batch(text: str) -> tuple[int, int, int]:
    """`MIN:OPT:MAX` (or `MIN:MAX`, opt = max, or one number) -> the dynamic batch range."""
    parts = text.split(":")
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        raise SpecError(f"batch range '{text}' is not MIN:OPT:MAX with whole numbers (e.g. 1:8:64)", filename="--batch") from None
    if len(nums) == 1:
        nums = nums * 3
    elif len(nums) == 2:
        nums = [nums[0], nums[1], nums[1]]
    elif len(nums) != 3:
        raise SpecError(f"batch range '{text}' has {len(nums)} parts; write MIN:OPT:MAX (e.g. 1:8:64)", filename="--batch")
    lo, opt, hi = nums
    if lo < 1:
        raise SpecError(f"batch range '{text}': the smallest batch must be at least 1, got {lo}", filename="--batch")
    if lo > hi:
        raise SpecError(f"batch range '{text}': min {lo} is larger than max {hi}", filename="--batch")
    if not lo <= opt <= hi:
        raise SpecError(f"batch range '{text}': opt {opt} is outside [{lo}, {hi}]", filename="--batch")
    if hi > 4096:
        raise SpecError(f"batch range '{text}': max {hi} is over 4096", filename="--batch")
    return lo, opt, hi


def check_writable(out: str) -> None:
    """Refuse before any work when OUT cannot be created: its nearest existing ancestor
    must be a writable directory (and OUT itself, if it exists, a directory that vitdsl
    wrote).  An empty OUT is refused: it would resolve to the current directory, which the
    output replaces."""
    if not out:
        raise SpecError("the output path is empty", filename="-o")
    path = os.path.abspath(out)
    if os.path.exists(path) and not os.path.isdir(path):
        raise SpecError(f"output {out} exists and is not a directory", filename=out)
    check_replaceable(path)
    writable_parent(out, "output directory")


def build(graph: Graph, out: str, backend: str = "torch", seed: int = 0, weights: str | None = None,
          progress: Callable[[str], None] = lambda s: None, batch: tuple[int, int, int] | None = None,
          opset: int | None = None) -> dict:
    if backend not in BACKENDS:
        raise SpecError(f"unknown backend '{backend}'; available: {', '.join(BACKENDS)}")
    check_writable(out)
    if backend == "trt":  # before any work: a missing TensorRT or GPU is one clear message
        from .backends.trt import require_trt

        require_trt(graph, out, batch or DEFAULT_BATCH)
    import torch
    from safetensors.torch import save_file

    from .api import compile

    progress("building module")
    model = compile(graph, seed=seed).eval()
    if weights:
        load_weights(model, weights)
    from .quant.fake import require_ranges

    require_ranges(model, graph, "vitdsl build" + (" with these weights" if weights else " without --weights"))
    if backend in ("onnx", "trt"):
        from .backends.deploy import write_deploy

        return write_deploy(graph, model, out, backend, batch or DEFAULT_BATCH, opset=opset, seed=seed,
                            weights=weights, progress=progress)
    with staged_dir(out) as tmp:
        progress("writing weights")
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"spec_sha256": spec_hash(graph)})
        with open(os.path.join(tmp, "spec.vit"), "w") as f:
            f.write(graph.to_vit())
        progress("exporting with torch.export")
        c, h, w = graph.input.out.shape
        example = torch.randn(2, c, h, w)
        batch = torch.export.Dim("batch", min=1, max=4096)
        with torch.no_grad():
            program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
        torch.export.save(program, os.path.join(tmp, "model.pt2"))
        total = graph.total()
        summary = {"model": graph.name, "params": total.params, "macs": total.macs,
                   "act_bytes": total.act_bytes, "input": [c, h, w], "layers": graph.summary()}
        with open(os.path.join(tmp, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        manifest = {
            "model": graph.name, "backend": backend, "spec_sha256": spec_hash(graph),
            "files": sorted(os.listdir(tmp) + ["manifest.json"]),
            "input_shape": {"min": [1, c, h, w], "max": [4096, c, h, w]},
            "versions": {"vitdsl": _version(), "torch": torch.__version__, "python": platform.python_version()},
            "seed": seed, "weights": os.path.basename(weights) if weights else None,
        }
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1)
        progress("done")
    return manifest


def _version() -> str:
    from . import __version__

    return __version__
