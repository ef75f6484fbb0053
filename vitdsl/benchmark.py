"""`vitdsl bench SPEC`: forward latency and throughput of a compiled spec, side by side
with timm's model of the same architecture (same weights, outputs checked first).

Method: every contender gets the same input tensor; warm-up forwards first (the first
call is timed on its own: for `--backend compile` it includes compilation), then
`--runs` timed forwards of each, interleaved and alternating which goes first, so
that a slow phase of a shared machine hits all contenders alike.  On CUDA every timed
forward is bracketed by `torch.cuda.synchronize()`, so a time is the latency a caller
sees (launches included), not just kernel time.  Reported per setting: median and
interquartile range of the times, images/s (batch / median), achieved TFLOP/s from
the graph's MACs (2 FLOPs per MAC) with the fraction of the GPU's dense fp16/bf16
tensor-core peak where the GPU is known, and the ratio median(vitdsl)/median(timm)
(<= 1.00: vitdsl at least as fast).

The comparison: a spec named after a timm model (specs/vit_small_patch16_224.vit) is
compared with that model; a spec whose architecture timm lacks may name a baseline in
`BASELINES` (ReViT -> timm's ViT-B/16 without a class token).  timm's random-init
weights are copied into the vitdsl module (`vitdsl.interop.timm.convert_state_dict`)
and the outputs must agree before any ratio is reported.

Execution backends live in `BACKENDS` (name -> function turning a module and an
example input into a callable), so another runtime (ONNX Runtime, TensorRT) is one
`@register_backend` function away.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .errors import SpecError

WHERE = "vitdsl bench"  # the "file" of diagnostics about options rather than a spec

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}

# ------------------------------------------------------------------ backends
Runner = Callable[[Any], Any]
Backend = Callable[[Any, Any], Runner]
"""(module in eval mode on its device and dtype, example input) -> a callable x -> logits."""

BACKENDS: dict[str, Backend] = {}


def register_backend(name: str) -> Callable[[Backend], Backend]:
    """Make an execution backend available as `--backend NAME`."""

    def deco(fn: Backend) -> Backend:
        BACKENDS[name] = fn
        return fn

    return deco


@register_backend("torch")
def _eager(module, example):
    return module


@register_backend("compile")
def _compiled(module, example):
    # Static shapes: each batch size gets kernels specialised to it, as a deployment would.
    import torch

    return torch.compile(module, dynamic=False)


# ------------------------------------------------------------------ GPU peaks
# Dense (no structured sparsity) fp16/bf16 tensor-core peaks in TFLOP/s.  Vendor
# datasheets quote the sparse figure with a footnote; dense is half of it.
#   H100 SXM5 1979/2, H100 PCIe 1513/2, H100 NVL 1671/2: "NVIDIA H100 Tensor Core GPU" datasheet.
#   H200 SXM 1979/2, H200 NVL 1671/2: "NVIDIA H200 Tensor Core GPU" datasheet.
#   A100 (SXM4 and PCIe, 40/80 GB) 312: "NVIDIA A100 Tensor Core GPU" datasheet.
#   L40S 733/2 (362.05 listed): "NVIDIA L40S" datasheet.  L4 242/2: "NVIDIA L4" datasheet.
#   A10 250/2: "NVIDIA A10 Tensor Core GPU" datasheet.
#   T4 65 (fp16 mixed precision, no bf16): "NVIDIA T4" datasheet.
#   V100 SXM2 125, PCIe 112 (fp16 only): "NVIDIA V100 Tensor Core GPU" datasheet.
# Order matters: more specific names first.  A MIG slice has a fraction of the peak: unknown.
_PEAKS: list[tuple[str, str, float, bool]] = [
    # (regex on torch.cuda.get_device_name(), label, fp16/bf16 dense TFLOP/s, bf16 supported)
    (r"\bH200 NVL\b", "H200 NVL", 835.5, True),
    (r"\bH200\b", "H200 SXM", 989.5, True),
    (r"\bH100 NVL\b", "H100 NVL", 835.5, True),
    (r"\bH100 PCIe\b", "H100 PCIe", 756.5, True),
    (r"\bH100\b.*(HBM3|SXM)", "H100 SXM", 989.5, True),
    (r"\bA100\b", "A100", 312.0, True),
    (r"\bL40S\b", "L40S", 362.05, True),
    (r"\bL4\b", "L4", 121.0, True),
    (r"\bA10\b", "A10", 125.0, True),
    (r"\bT4\b", "T4", 65.0, False),
    (r"\bV100\b.*PCI", "V100 PCIe", 112.0, False),
    (r"\bV100\b", "V100 SXM2", 125.0, False),
]


def peak_tflops(device_name: str, dtype: str) -> tuple[float, str] | None:
    """(dense tensor-core peak TFLOP/s, the GPU it was matched as) for fp16/bf16 on a
    known GPU, else None (CPU, fp32, MIG slices, unknown GPUs)."""
    if dtype not in ("fp16", "bf16") or "MIG" in device_name:
        return None
    for pattern, label, peak, bf16 in _PEAKS:
        if re.search(pattern, device_name, re.IGNORECASE):
            return (peak, label) if dtype == "fp16" or bf16 else None
    return None


# ------------------------------------------------------------------ the comparison
@dataclass(frozen=True)
class Counterpart:
    """The timm model a spec is compared with."""

    timm_name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    same: bool = True  # the same architecture (else a baseline: outputs compared only with `neutral` set)
    note: str = ""
    neutral: dict[str, float] = field(default_factory=dict)
    """vitdsl state_dict entries that, set to these values, make the spec compute the
    baseline's function, so that the weight copy can still be checked."""

    def describe(self) -> str:
        """The exact timm call, e.g. timm:vit_base_patch16_224(class_token=False)."""
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        return f"timm:{self.timm_name}" + (f"({args})" if args else "")

    @property
    def label(self) -> str:
        """The short name in tables."""
        return f"timm:{self.timm_name}" + ("" if self.same else " (baseline)")


BASELINES: dict[str, Counterpart] = {
    "revit_base_patch16_224": Counterpart(
        "vit_base_patch16_224", {"class_token": False, "global_pool": "avg", "fc_norm": False}, same=False,
        note="ReViT has no timm model; the baseline is timm's ViT-B/16 without a class token, mean-pooled after "
             "the final norm (class_token=False, global_pool='avg', fc_norm=False), with the same weights. The one "
             "difference is ReViT's residual attention: each block mixes its scores with the previous block's, "
             "so the N x N scores are written out instead of using the fused attention kernel. Outputs were "
             "checked equal with alpha = 1 (plain attention); timed with the spec's alpha.",
        neutral={"alpha.value": 1.0}),
}


def find_counterpart(graph) -> tuple[Counterpart | None, str]:
    """The timm model to compare with, and a sentence saying what is compared."""
    if graph.name in BASELINES:
        c = BASELINES[graph.name]
        return c, f"{c.describe()}. {c.note}"
    try:
        import timm
    except ImportError:
        return None, "timm is not installed: vitdsl timed alone"
    if timm.is_model(graph.name):
        return Counterpart(graph.name), f"timm's {graph.name}: the same architecture, with the same weights"
    return None, f"timm has no model named '{graph.name}': vitdsl timed alone"


def _agree(ours, theirs, dtype: str) -> dict[str, Any]:
    """Maximum absolute difference of two outputs and whether it is within the
    rounding expected of `dtype` (relative to the reference's largest logit)."""
    import torch

    a, b = ours.float(), theirs.float()
    diff = (a - b).abs().max().item() if a.shape == b.shape else float("inf")
    scale = b.abs().max().item()
    tol = {"fp32": 1e-4 + 1e-3 * scale, "fp16": 2e-2 + 2e-2 * scale, "bf16": 5e-2 + 5e-2 * scale}[dtype]
    ok = bool(a.shape == b.shape and torch.isfinite(a).all().item() and diff <= tol)
    return {"dtype": dtype, "max_abs_diff": diff, "ref_max_abs": scale, "tolerance": tol, "agree": ok}


@dataclass
class Prepared:
    """A compiled spec, its timm counterpart (or None) with the same weights, in fp32 on the device."""

    graph: Any
    ours: Any
    theirs: Any | None
    counterpart: Counterpart | None
    note: str
    check: dict[str, Any] | None  # the fp32 output check of the weight copy
    theirs_macs: int | None


def _count_macs(module, shape: Sequence[int], device) -> int:
    """MACs per image of a module we hold no graph for (torch's FLOP counter / 2)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, *shape, device=device)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        module(x)
    return counter.get_total_flops() // 2


def prepare(graph, device: str = "cpu", *, timm: bool = True, seed: int = 0,
            counterpart: Counterpart | None = None) -> Prepared:
    """Compile the spec and (with `timm`) build its counterpart with the same weights
    (found by the spec's model name unless given); check in fp32 that both compute the
    same function."""
    import torch

    from .api import compile as vcompile

    torch.manual_seed(seed)
    ours = vcompile(graph, seed=seed).eval()
    if counterpart is not None:
        note = f"{counterpart.describe()}" + (f". {counterpart.note}" if counterpart.note else
                                              ": the same architecture, with the same weights")
    elif timm:
        counterpart, note = find_counterpart(graph)
    else:
        note = "timm comparison turned off (--no-timm)"
    theirs = check = theirs_macs = None
    shape = graph.input.out.shape
    if counterpart is not None:
        import timm as timm_mod

        from .interop.timm import convert_state_dict

        torch.manual_seed(seed)
        own = ours.state_dict()
        keep = {k: own[k].clone() for k in counterpart.neutral if k in own}
        try:
            theirs = timm_mod.create_model(counterpart.timm_name, pretrained=False, **counterpart.kwargs).eval()
            state = dict(theirs.state_dict())
            state.update({k: torch.full_like(v, counterpart.neutral[k]) for k, v in keep.items()})
            ours.load_state_dict(convert_state_dict(graph, state), strict=True)
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            msg = str(e).strip("'\"")
            note = f"{counterpart.describe()} does not match the spec ({msg[:300]}): vitdsl timed alone"
            counterpart = theirs = None
    ours.to(device)
    if theirs is not None:
        theirs.to(device)
        x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(seed)).to(device)
        with torch.inference_mode():
            check = _agree(ours(x), theirs(x), "fp32")
        with torch.no_grad():  # back to the spec's own values for timing
            live = ours.state_dict()  # shares storage with the parameters
            for k, v in keep.items():
                live[k].copy_(v)
        theirs_macs = graph.total().macs if counterpart.same else _count_macs(theirs, shape, device)
        if not check["agree"]:
            note += (f"; OUTPUTS DISAGREE after copying the weights (max |diff| {check['max_abs_diff']:.3g} > "
                     f"{check['tolerance']:.3g}): no ratio is reported")
    return Prepared(graph, ours, theirs, counterpart, note, check, theirs_macs)


# ------------------------------------------------------------------ timing
@dataclass
class Contender:
    label: str
    run: Runner
    macs: int  # per image


def contenders(prep: Prepared, dtype: str, backend: str, prepack: bool = False) -> list[Contender]:
    """The prepared modules cast to `dtype` (copies; fp32 uses the originals) and
    wrapped by `backend`; with `prepack`, vitdsl's linear layers get their packed CPU
    inference path first (vitdsl.ops.linear.prepack; timm's model is left as it is)."""
    import torch

    if backend not in BACKENDS:
        raise SpecError(f"unknown backend '{backend}'; available: {', '.join(BACKENDS)}", filename=WHERE)
    td = getattr(torch, DTYPES[dtype])
    shape = prep.graph.input.out.shape
    out = []
    pairs = [("vitdsl", prep.ours, prep.graph.total().macs)]
    if prep.theirs is not None:
        pairs.append((prep.counterpart.label, prep.theirs, prep.theirs_macs))
    for label, module, macs in pairs:
        m = module if dtype == "fp32" else copy.deepcopy(module).to(td)
        if prepack and label == "vitdsl":
            from .ops.linear import prepack as pack

            pack(m)
        dev = next(m.parameters()).device
        out.append(Contender(label, BACKENDS[backend](m, torch.zeros(1, *shape, device=dev, dtype=td)), macs))
    return out


def _stats(times: list[float]) -> dict[str, float]:
    qs = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else [times[0]] * 3
    return {"median_s": statistics.median(times), "q25_s": qs[0], "q75_s": qs[2], "iqr_s": qs[2] - qs[0],
            "min_s": min(times)}


def median_ci(xs: Sequence[float]) -> tuple[float, float]:
    """Distribution-free ~95% interval of the median (order statistics of a binomial(n, 1/2),
    normal approximation); the whole range when there are too few values."""
    s = sorted(xs)
    n = len(s)
    k = int(n / 2 - 0.98 * n ** 0.5)  # 1.96 * sqrt(n) / 2
    if k < 1:
        return s[0], s[-1]
    return s[k - 1], s[n - k]


def measure(cs: list[Contender], batch: int, shape: Sequence[int], device: str, dtype: str, *,
            warmup: int, runs: int, check: bool = True, seed: int = 1,
            progress: Callable[[int, str], None] | None = None) -> dict[str, Any]:
    """Time the contenders on one input, interleaved; returns per-contender statistics,
    the output check of the contenders against each other in this setting, and the ratio."""
    import torch

    td = getattr(torch, DTYPES[dtype])
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed)).to(device=device, dtype=td)
    cuda = torch.device(device).type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    step = progress or (lambda n, msg: None)
    times: list[list[float]] = [[] for _ in cs]
    first: list[float] = []
    result: dict[str, Any] = {"batch": batch, "dtype": dtype}
    with torch.inference_mode():
        outs = []
        for c in cs:  # first call alone: compilation, lazy initialisation, autotuning
            sync()
            t0 = time.perf_counter()
            try:
                outs.append(c.run(x))
                sync()
            except (RuntimeError, NotImplementedError, TypeError) as e:
                head = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise SpecError(f"{c.label} cannot run in {dtype} on {device} (torch {torch.__version__}): "
                                f"{head[:300]}", filename=WHERE) from None
            first.append(time.perf_counter() - t0)
            step(1, c.label)
        if check and len(outs) == 2:
            result["agreement"] = _agree(outs[0], outs[1], dtype)
        del outs
        for i in range(warmup):
            for c in (cs if i % 2 == 0 else cs[::-1]):
                c.run(x)
                step(1, c.label)
        sync()
        gc.collect()
        for i in range(runs):
            order = list(range(len(cs)))
            for j in (order if i % 2 == 0 else order[::-1]):
                sync()
                t0 = time.perf_counter()
                cs[j].run(x)
                sync()
                times[j].append(time.perf_counter() - t0)
                step(1, cs[j].label)
    result["contenders"] = {}
    for c, ts, f in zip(cs, times, first):
        s = _stats(ts)
        flops = 2 * c.macs * batch / s["median_s"]
        result["contenders"][c.label] = {**s, "first_call_s": f, "images_per_s": batch / s["median_s"],
                                         "tflops": flops / 1e12, "times_s": ts}
    if len(cs) == 2:  # times[0][i] and times[1][i] ran back to back: a pair
        result["ratio"] = result["contenders"][cs[0].label]["median_s"] / result["contenders"][cs[1].label]["median_s"]
        paired = [a / b for a, b in zip(times[0], times[1])]
        result["paired_ratio"] = statistics.median(paired)
        result["paired_ratio_ci95"] = list(median_ci(paired))
    return result


def same_outputs(prep: Prepared) -> bool:
    """Whether the contenders must agree in every setting (same architecture, same weights)."""
    return prep.check is not None and prep.counterpart is not None and prep.counterpart.same


def finish(r: dict[str, Any], prep: Prepared, peak: tuple[float, str] | None) -> dict[str, Any]:
    """Add the fraction of peak; withhold the ratio when the outputs disagreed."""
    for c in r["contenders"].values():
        c["peak_fraction"] = c["tflops"] / peak[0] if peak else None
    comparable = prep.check is not None and prep.check["agree"] and r.get("agreement", {"agree": True})["agree"]
    if "ratio" in r and not comparable:
        r["ratio_withheld"] = r.pop("ratio")
    return r


# ------------------------------------------------------------------ the command
def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    """The GPU's name, or the CPU's model."""
    import torch

    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return cpu_model()


def _positive(values: Sequence[str], what: str) -> list[int]:
    out = []
    for v in values:
        for part in str(v).split(","):
            try:
                n = int(part)
            except ValueError:
                n = 0
            if n <= 0:
                raise SpecError(f"{what} must be a positive integer, got '{part}'", filename=WHERE)
            out.append(n)
    return out


def resolve_device(name: str | None) -> str:
    """`cuda` when available and not asked otherwise; a clear error for an unusable one."""
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise SpecError(f"unknown device '{name}'; expected cpu or cuda", filename=WHERE) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SpecError("--device cuda: CUDA is not available on this machine "
                        f"(torch {torch.__version__}, {'built with' if torch.version.cuda else 'built without'} CUDA)",
                        filename=WHERE)
    if dev.type not in ("cpu", "cuda"):
        raise SpecError(f"unsupported device '{name}'; expected cpu or cuda", filename=WHERE)
    return name


def check_dtype(dtype: str, device: str) -> None:
    """Refuse dtypes the device cannot compute in, before building anything."""
    import torch

    if torch.device(device).type == "cuda" and dtype == "bf16" and not torch.cuda.is_bf16_supported():
        raise SpecError(f"bf16 is not supported on {device_name(device)}", filename=WHERE)


def run(spec: str, *, backend: str = "torch", batches: Sequence[int] = (1,), dtype: str = "fp32",
        device: str | None = None, warmup: int = 5, runs: int = 20, threads: int | None = None,
        timm: bool = True, max_params: int = 10**10, prepack: bool = True,
        progress: Callable[[int, int, str], None] | None = None) -> dict[str, Any]:
    """Benchmark one spec; returns the report (what `--json` writes).  `prepack`: on
    the CPU with the eager backend, vitdsl's linear layers run on weights packed once
    (vitdsl.ops.linear.prepack, what a deployment on the CPU would do)."""
    import torch

    from .api import load

    if dtype not in DTYPES:
        raise SpecError(f"unknown dtype '{dtype}'; expected one of {', '.join(DTYPES)}", filename=WHERE)
    if backend not in BACKENDS:
        raise SpecError(f"unknown backend '{backend}'; available: {', '.join(BACKENDS)}", filename=WHERE)
    if warmup < 0 or runs < 1:
        raise SpecError("--warmup must be >= 0 and --runs >= 1", filename=WHERE)
    dev = resolve_device(device)
    check_dtype(dtype, dev)
    if threads is not None:
        if threads < 1:
            raise SpecError(f"--threads must be a positive integer, got {threads}", filename=WHERE)
        torch.set_num_threads(threads)
    graph = load(spec, max_params=max_params)
    if graph.input.out.kind != "image":
        raise SpecError(f"vitdsl bench feeds images; the input of {graph.name} is '{graph.input.out.kind}'", filename=spec)
    prep = prepare(graph, dev, timm=timm)
    packed = prepack and backend == "torch" and torch.device(dev).type == "cpu"
    cs = contenders(prep, dtype, backend, prepack=packed)
    shape = graph.input.out.shape
    total = len(batches) * len(cs) * (1 + warmup + runs)
    done = 0

    def step(n: int, label: str) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, total, label)

    name = device_name(dev)
    peak = peak_tflops(name, dtype)
    results = []
    for b in batches:
        r = measure(cs, b, shape, dev, dtype, warmup=warmup, runs=runs, check=same_outputs(prep), progress=step)
        r["backend"] = backend
        results.append(finish(r, prep, peak))
    import importlib.metadata as md

    try:
        timm_version = md.version("timm")
    except md.PackageNotFoundError:
        timm_version = None
    return {
        "spec": spec, "model": graph.name, "params": graph.total().params, "macs_per_image": graph.total().macs,
        "input": list(shape), "backend": backend, "prepacked": packed, "dtype": dtype, "batches": list(batches),
        "warmup": warmup, "runs": runs,
        "device": {"type": torch.device(dev).type, "name": name, "threads": torch.get_num_threads(),
                   "peak_tflops": peak[0] if peak else None, "peak_matched_as": peak[1] if peak else None},
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "timm": timm_version},
        "comparison": None if prep.counterpart is None else {
            "timm": prep.counterpart.describe(), "same_architecture": prep.counterpart.same, "check": prep.check},
        "note": prep.note,
        "results": results,
    }


def render_report(rep: dict[str, Any]) -> str:
    """The terminal table: one row per contender and batch."""
    from .table import render

    dev = rep["device"]
    lines = [f"{rep['model']} ({rep['spec']}): backend {rep['backend']}, {rep['dtype']}, on {dev['name']}"
             + (f" ({dev['threads']} thread{'s' if dev['threads'] != 1 else ''})" if dev["type"] == "cpu" else ""),
             f"compared with: {rep['note']}"]
    peak = dev["peak_tflops"] is not None
    ratios = any("ratio" in r or "ratio_withheld" in r for r in rep["results"])
    unit, scale = ("TFLOP/s", 1.0) if dev["type"] == "cuda" else ("GFLOP/s", 1e3)
    headers = (["model", "batch", "median ms", "IQR ms", "images/s", unit] + (["% peak"] if peak else [])
               + (["vitdsl/timm"] if ratios else []))
    rows = []
    for r in rep["results"]:
        for i, (label, c) in enumerate(r["contenders"].items()):
            ratio = ""
            if i == 0:
                if "ratio" in r:
                    ratio = f"{r['ratio']:.3f}"
                elif "ratio_withheld" in r:
                    ratio = "withheld"
            rows.append([label, str(r["batch"]), f"{c['median_s'] * 1e3:.2f}", f"{c['iqr_s'] * 1e3:.2f}",
                         f"{c['images_per_s']:.1f}", f"{c['tflops'] * scale:.1f}"]
                        + ([f"{100 * c['peak_fraction']:.1f}"] if peak else []) + ([ratio] if ratios else []))
    lines.append(render(headers, rows, right=set(range(1, len(headers)))))
    notes = [f"{rep['runs']} timed runs after {rep['warmup']} warm-up runs per model"
             + ("" if not ratios else ", interleaved; vitdsl/timm = ratio of median times (<= 1.00: vitdsl at least as fast)")
             + f"; {unit} from the graph's MACs (2 FLOPs per MAC)."]
    if rep.get("prepacked"):
        notes.append("vitdsl's linear layers ran on weights packed once (vitdsl.ops.linear.prepack: oneDNN with "
                     "2+ threads, MKL's packed GEMM with 1); --no-prepack times them unpacked.")
    if peak:
        notes.append(f"% peak: of the dense {rep['dtype']} tensor-core peak of the {dev['peak_matched_as']} "
                     f"({dev['peak_tflops']:g} TFLOP/s, vendor datasheet).")
    if rep["comparison"] and not rep["comparison"]["same_architecture"]:
        notes.append("The ratio compares with a baseline of a different architecture (see above), not the same model.")
    chk = (rep["comparison"] or {}).get("check")
    if chk:
        notes.append(f"fp32 output check after copying the weights: max |diff| {chk['max_abs_diff']:.2e} "
                     f"({'agree' if chk['agree'] else 'DISAGREE'}).")
    for r in rep["results"]:
        a = r.get("agreement")
        if a and not a["agree"]:
            notes.append(f"batch {r['batch']}: outputs disagree in {a['dtype']} (max |diff| {a['max_abs_diff']:.3g}): "
                         "ratio withheld.")
    return "\n".join(lines + notes)


def cmd_bench(args) -> int:
    """Measure forward latency and throughput of a spec, against timm's model of the same architecture."""
    from .atomic import write_text
    from .progress import Bar

    rep = run(args.spec, backend=args.backend, batches=_positive(args.batch, "--batch"), dtype=args.dtype,
              device=args.device, warmup=args.warmup, runs=args.runs, threads=args.threads,
              timm=not args.no_timm, max_params=args.max_params, prepack=not args.no_prepack,
              progress=Bar(not args.quiet and sys.stderr.isatty()))
    print(render_report(rep))
    if args.json:
        write_text(args.json, json.dumps(rep, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Register `vitdsl bench` on an argparse subparsers object."""
    from .cli import path_arg

    p = subparsers.add_parser(
        "bench", help="measure latency and throughput, against timm's same model",
        description=cmd_bench.__doc__ + " Warm-up runs first, then the median (and interquartile range) of "
                    "timed runs, interleaved with timm's model of the same name (same weights, outputs checked "
                    "to agree first); images/s, achieved TFLOP/s from the graph's MACs and, on a known GPU, "
                    "the fraction of its fp16/bf16 tensor-core peak.",
        epilog="Example: vitdsl bench specs/vit_small_patch16_224.vit --batch 1 8 --device cpu --runs 10")
    p.add_argument("spec", metavar="SPEC", help="path to a .vit file")
    p.add_argument("--backend", default="torch", choices=sorted(BACKENDS),
                   help="torch: eager PyTorch; compile: torch.compile of it (default: torch)")
    p.add_argument("--batch", nargs="+", default=["1"], metavar="N", help="batch sizes, e.g. --batch 1 64 (default: 1)")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="weights and input dtype (default: fp32)")
    p.add_argument("--device", default=None, metavar="cpu|cuda", help="where to run (default: cuda if available, else cpu)")
    p.add_argument("--warmup", type=int, default=5, metavar="N", help="untimed forwards of each model first (default: 5)")
    p.add_argument("--runs", type=int, default=20, metavar="N", help="timed forwards of each model (default: 20)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="torch intra-op threads on the CPU (default: torch's choice)")
    p.add_argument("--json", type=path_arg, metavar="PATH", help="also write the report, with every timing, as JSON")
    p.add_argument("--no-timm", action="store_true", help="time vitdsl alone")
    p.add_argument("--no-prepack", action="store_true",
                   help="on the CPU (eager backend), time vitdsl's linear layers without weights packed once "
                        "for oneDNN (default: packed, vitdsl.ops.linear.prepack)")
    p.add_argument("--max-params", type=int, default=10**10, metavar="N",
                   help="refuse models with more parameters than this (default: 10^10)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_bench)
    return p
