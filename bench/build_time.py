"""Build time: spec file -> nn.Module with vitdsl, against timm.create_model.

    vitdsl  vitdsl.load(specs/NAME.vit) + vitdsl.compile(graph)   (seeded init, the default)
    timm    timm.create_model(NAME)                               (no pretrained download)

Both include allocating and randomly initialising every weight, which is most of the
time for either.  Measured warm: one untimed build of each first (so the lark parser,
imports and lazy initialisation are done), then --runs interleaved pairs, alternating
which goes first; the module from each run is dropped and gc.collect() run before the
next.  Reported: median seconds of each, the vitdsl split into load and compile, and
the ratio of medians vitdsl/timm.  Target: ratio <= 1.1.

torch's intra-op thread count is set explicitly (--threads, default: the cores this
process may use, then 1) because weight initialisation runs on torch's thread pool.
On a busy machine the all-cores figures suffer most (torch's worker threads wait on
each other when one is descheduled); the 1-thread figures are the steadier comparison.
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
TARGET = 1.10


def build_vitdsl(name: str) -> dict[str, float]:
    import vitdsl

    pc = time.perf_counter
    t0 = pc()
    g = vitdsl.load(C.SPECS / f"{name}.vit")
    t1 = pc()
    m = vitdsl.compile(g)
    t2 = pc()
    del m, g
    return {"load": t1 - t0, "compile": t2 - t1, "total": t2 - t0}


def build_timm(name: str) -> dict[str, float]:
    import timm

    t0 = time.perf_counter()
    m = timm.create_model(name, pretrained=False)
    t1 = time.perf_counter()
    del m
    return {"total": t1 - t0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=MODELS, help="spec/timm names (default: %(default)s)")
    ap.add_argument("--runs", type=int, default=9, help="timed pairs per model (default: %(default)s)")
    cores = len(os.sched_getaffinity(0))
    ap.add_argument("--threads", type=int, nargs="+", default=sorted({cores, 1}, reverse=True),
                    help="torch intra-op thread counts to measure (default: %(default)s: the cores available, and 1)")
    ap.add_argument("--quick", action="store_true", help="3 pairs: a smoke test, not figures to publish")
    ap.add_argument("--json", metavar="PATH", help="also write raw timings as JSON")
    ap.add_argument("--write-doc", action="store_true", help="update the 'build_time' section of docs/benchmarks.md")
    args = ap.parse_args(argv)
    if args.quick:
        args.runs = 3

    import timm  # noqa: F401
    import torch

    import vitdsl  # noqa: F401

    torch.set_num_interop_threads(1)
    load0 = C.loadavg()
    raw = {}
    rows = []
    verdicts = []
    for name, threads in [(n, t) for n in args.models for t in args.threads]:
        torch.set_num_threads(threads)
        assert torch.get_num_threads() == threads
        build_vitdsl(name)  # warm-up (also builds the lark parser on the first model)
        build_timm(name)
        ours, theirs = [], []
        for i in range(args.runs):
            order = [(build_vitdsl, ours), (build_timm, theirs)]
            for fn, acc in (order if i % 2 == 0 else order[::-1]):
                gc.collect()
                acc.append(fn(name))
        raw[f"{name}/t{threads}"] = {"vitdsl": ours, "timm": theirs}
        mo = C.median([r["total"] for r in ours])
        mt = C.median([r["total"] for r in theirs])
        ratio = mo / mt
        pair = C.median([a["total"] / b["total"] for a, b in zip(ours, theirs)])
        ok = ratio <= TARGET
        verdicts.append((name, threads, ratio, ok))
        lo_o, hi_o = C.iqr([r["total"] for r in ours])
        lo_t, hi_t = C.iqr([r["total"] for r in theirs])
        rows.append([name, threads, args.runs,
                     C.fmt_ms(C.median([r["load"] for r in ours]), 1),
                     C.fmt_ms(C.median([r["compile"] for r in ours]), 0),
                     f"{C.fmt_ms(mo, 0)} ({C.fmt_ms(lo_o, 0)} - {C.fmt_ms(hi_o, 0)})",
                     f"{C.fmt_ms(mt, 0)} ({C.fmt_ms(lo_t, 0)} - {C.fmt_ms(hi_t, 0)})",
                     f"{ratio:.3f}", f"{pair:.3f}", "met" if ok else "NOT met"])
        print(" | ".join(map(str, rows[-1])), flush=True)
    load1 = C.loadavg()

    out = [C.table(["model", "threads", "pairs", "vitdsl load ms", "vitdsl compile ms", "vitdsl total ms (IQR)",
                    "timm create_model ms (IQR)", "ratio", "paired ratio", "target <= 1.1"], rows)]
    out.append("")
    out.append("Medians; ratio = median(vitdsl total)/median(timm); paired ratio: median of the per-pair ratios. "
               f"torch intra-op threads: {', '.join(map(str, args.threads))} (torch.set_num_threads), inter-op threads: 1. "
               f"Load average (1/5/15 min) at start: {load0}; at end: {load1}.")
    report = "\n".join(out)
    print()
    print(report)

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"raw": raw, "threads": args.threads, "load": [load0, load1]}, f, indent=1)

    if args.write_doc:
        summary = "\n".join(f"- {n}, {t} thread(s): vitdsl/timm build time {r:.3f} (target <= 1.1): **{'met' if ok else 'NOT met'}**"
                            for n, t, r, ok in verdicts)
        body = "\n".join([
            *C.section("Build time: spec to module (vitdsl.load + vitdsl.compile) vs timm.create_model", [summary], load0, load1),
            report,
        ])
        extra = C.notes("build_time")
        C.update_doc("build_time", body + ("\n\n" + extra if extra else ""))
        print(f"\nupdated {C.DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
