"""Forward latency on CPU: vitdsl-compiled ViTs against timm's, with the same weights.

For each model, the spec in specs/ is loaded and compiled (vitdsl.load + vitdsl.compile)
and timm builds the same architecture (timm.create_model, no pretrained download);
timm's weights are copied into the vitdsl module with
vitdsl.interop.timm.convert_state_dict (load_state_dict strict=True), the vitdsl model
is prepared for CPU inference with vitdsl.ops.linear.prepack (linear weights packed
once; opt-in, like torch.jit.freeze), and the outputs are checked to agree.
Both models run in this one process, in eval mode, under torch.inference_mode, on the
same input tensor.

Per (model, batch, threads): --warmup untimed forwards of each, then --runs timed
pairs; each pair runs both models back to back, alternating which goes first, so slow
phases of a shared machine hit both alike.  Reported: median ms of each, the ratio of
the medians vitdsl/timm with a bootstrap 95% interval, and the median of the per-pair
ratios.  Target: vitdsl/timm <= 1.00.  Also, under torch.profiler, the self CPU time
of all aten and mkldnn ops per forward (batch 1) of each model: the kernel work without
the Python between kernels, and which ops each runs.  vitdsl's linear layers run on a
weight packed once (vitdsl.ops.linear.prepack: oneDNN's linear with two or more
threads, MKL's packed GEMM with one) where timm calls aten::addmm, so the logits agree
to rounding (about 1e-6), not necessarily bit for bit.

torch's intra-op thread count is set explicitly (--threads, default: the cores this
process may use, then 1) and reported; inter-op threads are set to 1.  On a busy
machine the all-cores figures suffer most (torch's worker threads wait on each other
when one is descheduled); the 1-thread figures are the steadier comparison.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

MODELS = ["vit_small_patch16_224", "vit_base_patch16_224"]
TARGET = 1.00


def build_pair(name: str):
    import timm
    import torch

    import vitdsl
    from vitdsl.interop.timm import convert_state_dict
    from vitdsl.ops.linear import prepack

    g = vitdsl.load(C.SPECS / f"{name}.vit")
    ours = vitdsl.compile(g)
    theirs = timm.create_model(name, pretrained=False)
    ours.load_state_dict(convert_state_dict(g, theirs.state_dict()), strict=True)
    prepack(ours)  # vitdsl's CPU inference preparation: linear weights packed once (oneDNN / MKL)
    ours.eval()
    theirs.eval()
    with torch.inference_mode():
        x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        diff = (ours(x) - theirs(x)).abs().max().item()
    return ours, theirs, diff


def measure(ours, theirs, batch: int, warmup: int, runs: int) -> dict:
    import torch

    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    pc, cpu = time.perf_counter, time.process_time
    t_ours, t_theirs = [], []
    c_ours, c_theirs = [], []
    with torch.inference_mode():
        for _ in range(warmup):
            ours(x)
            theirs(x)
        gc.collect()
        for i in range(runs):
            order = ((ours, t_ours, c_ours), (theirs, t_theirs, c_theirs))
            for m, acc, cacc in (order if i % 2 == 0 else order[::-1]):
                c0 = cpu()
                t0 = pc()
                m(x)
                acc.append(pc() - t0)
                cacc.append(cpu() - c0)
    return {"vitdsl": t_ours, "timm": t_theirs, "vitdsl_cpu": c_ours, "timm_cpu": c_theirs}


def op_profile(ours, theirs, batch: int = 1, runs: int = 10) -> tuple[dict, dict, float, float]:
    """Under torch.profiler, `runs` forwards of each model, interleaved: (aten op ->
    calls per forward) of each, to check that both run the same kernels, and the mean
    self CPU time of all aten ops per forward (ms) of each: the time spent in kernels,
    without the Python around them and less exposed to other processes than wall time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(batch, 3, 224, 224)
    counts: list[dict] = [{}, {}]
    self_ms = [0.0, 0.0]
    with torch.inference_mode():
        ours(x)
        theirs(x)
        for i in range(runs):
            for k in ((0, 1) if i % 2 == 0 else (1, 0)):
                with profile(activities=[ProfilerActivity.CPU]) as p:
                    (ours, theirs)[k](x)
                ev = [e for e in p.key_averages() if e.key.startswith(("aten::", "mkldnn::", "mkl::"))]
                counts[k] = {e.key: e.count for e in ev}
                self_ms[k] += sum(e.self_cpu_time_total for e in ev) / 1000 / runs
    return counts[0], counts[1], self_ms[0], self_ms[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=MODELS, help="spec/timm names (default: %(default)s)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="batch sizes (default: %(default)s)")
    default_threads = len(os.sched_getaffinity(0))
    ap.add_argument("--threads", type=int, nargs="+", default=sorted({default_threads, 1}, reverse=True),
                    help="torch intra-op thread counts to measure (default: %(default)s: the cores available, and 1)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed forwards of each model first (default: %(default)s)")
    ap.add_argument("--runs", type=int, default=40, help="timed pairs at batch 1 (default: %(default)s)")
    ap.add_argument("--runs-large", type=int, default=15, help="timed pairs at batch > 1 (default: %(default)s)")
    ap.add_argument("--no-op-check", action="store_true", help="skip the torch.profiler check that both models run the same aten ops")
    ap.add_argument("--quick", action="store_true", help="warmup 2, runs 8, runs-large 4: a smoke test, not figures to publish")
    ap.add_argument("--json", metavar="PATH", help="also write raw timings as JSON")
    ap.add_argument("--write-doc", action="store_true", help="update the 'latency' section of docs/benchmarks.md")
    args = ap.parse_args(argv)
    if args.quick:
        args.warmup, args.runs, args.runs_large = 2, 8, 4

    import torch

    torch.set_num_interop_threads(1)
    load0 = C.loadavg()
    raw: dict[str, dict] = {}
    rows = []
    verdicts = []
    diffs = {}
    opcheck: dict[str, str] = {}
    optime: dict[str, tuple[float, float]] = {}
    for name in args.models:
        ours, theirs, diff = build_pair(name)
        diffs[name] = diff
        if not args.no_op_check:
            torch.set_num_threads(args.threads[0])
            a, b, ms_a, ms_b = op_profile(ours, theirs)
            optime[name] = (ms_a, ms_b)
            same = a == b
            opcheck[name] = (f"identical ({sum(a.values())} op calls per forward)" if same else
                             f"{sum(a.values())} vs {sum(b.values())} op calls; differences: " + ", ".join(
                                 f"`{k}` {a.get(k, 0)} vs {b.get(k, 0)}" for k in sorted(set(a) | set(b)) if a.get(k, 0) != b.get(k, 0)))
        for threads in args.threads:
            torch.set_num_threads(threads)
            assert torch.get_num_threads() == threads
            for batch in args.batches:
                runs = args.runs if batch == 1 else args.runs_large
                r = measure(ours, theirs, batch, args.warmup, runs)
                raw[f"{name}/t{threads}/b{batch}"] = r
                mo, mt = C.median(r["vitdsl"]), C.median(r["timm"])
                ratio = mo / mt
                lo, hi = C.bootstrap_ratio(r["vitdsl"], r["timm"])
                pair = C.median([a / b for a, b in zip(r["vitdsl"], r["timm"])])
                cpu_ratio = C.median(r["vitdsl_cpu"]) / C.median(r["timm_cpu"])
                ok = ratio <= TARGET
                verdict = "met" if ok else ("NOT met (within noise)" if lo <= TARGET else "NOT met")
                verdicts.append((name, threads, batch, ratio, verdict))
                rows.append([name, threads, batch, runs, C.fmt_ms(mo, 1), C.fmt_ms(mt, 1),
                             f"{ratio:.3f}", f"{lo:.3f} - {hi:.3f}", f"{pair:.3f}", f"{cpu_ratio:.3f}", verdict])
                print(" | ".join(map(str, rows[-1])), flush=True)
        del ours, theirs
        gc.collect()
    load1 = C.loadavg()

    out = [C.table(["model", "threads", "batch", "pairs", "vitdsl ms", "timm ms", "ratio", "95% CI", "paired ratio", "CPU-time ratio", "target <= 1.00"], rows)]
    out.append("")
    out.append("ms: median forward time. ratio: median(vitdsl)/median(timm); 95% CI: bootstrap over the pairs; "
               "paired ratio: median of the per-pair ratios; CPU-time ratio: the same as ratio but for process CPU time "
               "(all threads), less sensitive to other processes on the machine. \"within noise\" means the ratio is above 1.00 but the "
               "interval includes 1.00.")
    out.append("")
    out.append("Max |vitdsl - timm| on the logits (batch 2, same weights): "
               + ", ".join(f"{n}: {d:.2e}" for n, d in diffs.items()) + ".")
    if optime:
        out.append("")
        out.append(f"Kernel time (torch.profiler, batch 1, {args.threads[0]} thread(s), 10 forwards of each, interleaved): "
                   "mean self CPU time of all aten and mkldnn ops per forward, vitdsl vs timm: "
                   + "; ".join(f"{n}: {a:.1f} ms vs {b:.1f} ms ({a / b:.3f})" for n, (a, b) in optime.items())
                   + ". The kernels differ where listed below: vitdsl's linear layers run oneDNN on a weight packed once "
                     "(mkldnn::_linear_pointwise, no aten::addmm / aten::copy_ of the bias; with one thread MKL's GEMM "
                     "on a weight packed once per row count, mkl::_mkl_linear), its residual sums and GELU run "
                     "in place; this figure excludes the "
                     "Python between kernels but is itself noisy (with several threads, time spent waiting on each other "
                     "counts).")
    if opcheck:
        out.append("")
        out.append("aten and mkldnn ops per forward (torch.profiler, batch 1), vitdsl vs timm; any op not listed is called "
                   "equally often by both: "
                   + "; ".join(f"{n}: {v}" for n, v in opcheck.items()) + ".")
    out.append("")
    out.append(f"torch intra-op threads: {', '.join(map(str, args.threads))} (set with torch.set_num_threads); "
               f"inter-op threads: 1. {args.warmup} warm-up forwards per model and setting. "
               f"Load average (1/5/15 min) at start: {load0}; at end: {load1}.")
    report = "\n".join(out)
    print()
    print(report)

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"raw": raw, "diffs": diffs, "threads": args.threads, "load": [load0, load1]}, f, indent=1)

    if args.write_doc:
        met = [v for v in verdicts if v[4] == "met"]
        summary = (f"- vitdsl/timm forward latency: target <= 1.00 **met in {len(met)} of {len(verdicts)} settings**"
                   + ("" if len(met) == len(verdicts) else
                      "; not met: " + "; ".join(f"{n} threads={t} batch={b} ({r:.3f}, {v})" for n, t, b, r, v in verdicts if v != "met")))
        body = "\n".join([
            *C.section("Forward latency, CPU: vitdsl vs timm (same weights)", [summary], load0, load1),
            report,
            "",
            "GPU latency: pending (no GPU on the machine that produced these figures).",
        ])
        C.update_doc("latency", body)
        print(f"\nupdated {C.DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
