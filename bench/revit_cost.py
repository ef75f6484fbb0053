"""The cost of residual attention: ReViT-B against ViT-B, CPU latency with the same weights.

    ReViT-B  specs/revit_base_patch16_224.vit: ViT-B/16 without a class token, mean-pooled,
             residual attention in every block (one learnable alpha, 0.5)
    ViT-B    the same spec text with `residual(alpha=0.5, learnable)` removed: the same
             architecture with plain (fused SDPA) attention

ViT-B is built and initialised (seeded); its state dict is loaded into ReViT-B with
strict=False, and the only missing key must be `alpha.value` (nothing unexpected).  As a
check that the two are the same network, ReViT-B with alpha = 1 must give ViT-B's logits;
alpha is then set back to 0.5 for the timings.

Per batch size (1 and 8): --warmup untimed forwards of each, then --runs timed pairs;
each pair runs both models back to back, alternating which goes first.  Reported: median
ms of each, the ratio of medians ReViT/ViT with a bootstrap 95% interval, the median of
the per-pair ratios, and the ratio of median process CPU times.  Target: ratio <= 1.15.
Also reported: peak activation memory per forward, measured (torch allocator trace, see
bench/scaling.py) and predicted (vitdsl.passes.memory), and the time in the aten ops that
only one of the two calls as often (torch.profiler, batch 1).

    .venv/bin/python bench/revit_cost.py --threads 1 --write-doc
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

HEADING = "## Residual attention cost (ReViT-B vs ViT-B)"
REVIT = C.SPECS / "revit_base_patch16_224.vit"
RESIDUAL = " residual(alpha=0.5, learnable)"
TARGET = 1.15


def graphs():
    import vitdsl

    text = REVIT.read_text()
    if RESIDUAL not in text:
        raise SystemExit(f"{REVIT} no longer contains '{RESIDUAL.strip()}'")
    vit_text = text.replace(RESIDUAL, "").replace("model revit_base_patch16_224", "model vit_base_patch16_224_gap")
    g_re = vitdsl.load(REVIT)
    g_vit = vitdsl.loads(vit_text, str(C.SPECS / "vit_base_patch16_224_gap.vit"))
    return g_vit, g_re


def build():
    import torch

    import vitdsl

    g_vit, g_re = graphs()
    vit = vitdsl.compile(g_vit).eval()
    revit = vitdsl.compile(g_re).eval()
    res = revit.load_state_dict(vit.state_dict(), strict=False)
    if list(res.missing_keys) != ["alpha.value"] or list(res.unexpected_keys):
        raise SystemExit(f"state dict mismatch: missing {res.missing_keys}, unexpected {res.unexpected_keys}")
    n_vit = sum(p.numel() for p in vit.parameters())
    n_re = sum(p.numel() for p in revit.parameters())
    alpha = revit.get_parameter("alpha.value")
    with torch.inference_mode():
        x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        ref = vit(x)
        alpha.fill_(1.0)
        same = (revit(x) - ref).abs().max().item()
        alpha.fill_(0.5)
        mixed = (revit(x) - ref).abs().max().item()
    facts = {"missing": list(res.missing_keys), "params_vit": n_vit, "params_revit": n_re,
             "alpha1_maxdiff": same, "alpha05_maxdiff": mixed, "logit_scale": ref.abs().max().item()}
    return g_vit, g_re, vit, revit, facts


def measure(vit, revit, batch: int, warmup: int, runs: int) -> dict:
    import torch

    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    pc, pt = time.perf_counter, time.process_time
    acc = {"vit": [], "revit": [], "vit_cpu": [], "revit_cpu": []}
    with torch.inference_mode():
        for _ in range(warmup):
            vit(x)
            revit(x)
        for i in range(runs):
            pair = (("vit", vit), ("revit", revit))
            for name, m in (pair if i % 2 == 0 else pair[::-1]):
                gc.collect()
                c0, t0 = pt(), pc()
                m(x)
                acc[name].append(pc() - t0)
                acc[name + "_cpu"].append(pt() - c0)
            print(f"  batch {batch} pair {i + 1}/{runs}: vit {acc['vit'][-1] * 1e3:.0f} ms, "
                  f"revit {acc['revit'][-1] * 1e3:.0f} ms", file=sys.stderr, flush=True)
    return acc


def memory(g, model, batch: int) -> tuple[int, int]:
    """(measured allocator peak, predicted) bytes for one forward."""
    import torch

    from scaling import allocator_trace
    from vitdsl.passes.memory import peak_activation_bytes

    x = torch.randn(batch, 3, 224, 224)
    with torch.inference_mode():
        model(x)
        gc.collect()
        peak = allocator_trace(lambda: model(x))["peak"]
    return peak, peak_activation_bytes(g, batch=batch)


def op_profile(model, batch: int = 1, repeats: int = 3) -> dict[str, tuple[int, float]]:
    """aten op -> (calls, self CPU ms) per forward, averaged over `repeats` profiled forwards."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(batch, 3, 224, 224)
    with torch.inference_mode():
        model(x)
        with profile(activities=[ProfilerActivity.CPU]) as p:
            for _ in range(repeats):
                model(x)
    return {e.key: (e.count // repeats, e.self_cpu_time_total / 1e3 / repeats)
            for e in p.key_averages() if e.key.startswith("aten::")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="batch sizes (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                    help="torch intra-op threads (default: %(default)s, the cores available)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed forwards of each model first (default: %(default)s)")
    ap.add_argument("--runs", type=int, default=21, help="timed pairs at batch 1 (default: %(default)s)")
    ap.add_argument("--runs-large", type=int, default=9, help="timed pairs at batch > 1 (default: %(default)s)")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    ap.add_argument("--quick", action="store_true", help="warmup 1, runs 3, runs-large 2: a smoke test, not figures to publish")
    ap.add_argument("--wait-idle", type=float, metavar="LOAD", help="first wait for the 1-min load average to drop to LOAD")
    ap.add_argument("--json", metavar="PATH", help="also write the raw timings as JSON")
    ap.add_argument("--write-doc", action="store_true", help=f"add/replace the section '{HEADING}' of docs/benchmarks.md")
    args = ap.parse_args(argv)
    if args.quick:
        args.warmup, args.runs, args.runs_large = 1, 3, 2

    import torch

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    waited = C.wait_for_quiet(args.wait_idle, 900) if args.wait_idle is not None else None
    load0 = C.loadavg()
    print("[revit_cost] building ViT-B and ReViT-B", file=sys.stderr, flush=True)
    g_vit, g_re, vit, revit, facts = build()
    print(f"[revit_cost] {facts}", file=sys.stderr, flush=True)

    rows, verdicts, raw = [], [], {}
    for batch in args.batches:
        runs = args.runs if batch == 1 else args.runs_large
        print(f"[revit_cost] batch {batch}: {args.warmup} warm-up + {runs} pairs", file=sys.stderr, flush=True)
        r = measure(vit, revit, batch, args.warmup, runs)
        raw[batch] = r
        mv, mr = C.median(r["vit"]), C.median(r["revit"])
        ratio = mr / mv
        lo, hi = C.bootstrap_ratio(r["revit"], r["vit"])
        paired = C.median([a / b for a, b in zip(r["revit"], r["vit"])])
        cpu_ratio = C.median(r["revit_cpu"]) / C.median(r["vit_cpu"])
        if ratio <= TARGET:
            verdict = "met" if hi <= TARGET else f"met on the median (CI reaches {hi:.2f})"
        else:
            verdict = "NOT met (within noise)" if lo <= TARGET else "NOT met"
        verdicts.append((batch, ratio, verdict))
        rows.append([batch, runs, C.fmt_ms(mv, 0), C.fmt_ms(mr, 0), f"{ratio:.3f}", f"{lo:.3f} - {hi:.3f}",
                     f"{paired:.3f}", f"{cpu_ratio:.3f}", verdict])
        print(" | ".join(map(str, rows[-1])), flush=True)

    mem_rows = []
    if not args.no_memory:
        for batch in args.batches:
            print(f"[revit_cost] memory, batch {batch}", file=sys.stderr, flush=True)
            (mv, pv), (mr, pr) = memory(g_vit, vit, batch), memory(g_re, revit, batch)
            mem_rows.append([batch, f"{mv / 2**20:.1f}", f"{pv / 2**20:.1f}", f"{(pv - mv) / mv * 100:+.2f}%",
                             f"{mr / 2**20:.1f}", f"{pr / 2**20:.1f}", f"{(pr - mr) / mr * 100:+.2f}%", f"{mr / mv:.2f}"])
    print("[revit_cost] op profile", file=sys.stderr, flush=True)
    pv, pr = op_profile(vit), op_profile(revit)
    # the ops whose call counts differ: the attention product's own kernels
    diff = sorted((k for k in set(pv) | set(pr) if pv.get(k, (0, 0))[0] != pr.get(k, (0, 0))[0]),
                  key=lambda k: -(pr.get(k, (0, 0))[1] + pv.get(k, (0, 0))[1]))
    t_only_v = sum(pv.get(k, (0, 0))[1] for k in diff)
    t_only_r = sum(pr.get(k, (0, 0))[1] for k in diff)
    t_all_v = sum(t for _, t in pv.values())
    t_all_r = sum(t for _, t in pr.values())
    load1 = C.loadavg()

    out = [C.table(["batch", "pairs", "ViT-B ms", "ReViT-B ms", "ratio", "95% CI", "paired ratio",
                    "CPU-time ratio", f"target <= {TARGET:.2f}"], rows)]
    out.append("")
    out.append("ms: median forward time (eval, `torch.inference_mode`). ratio: median(ReViT-B)/median(ViT-B); "
               "95% CI: bootstrap over the pairs; paired ratio: median of the per-pair ratios; CPU-time ratio: "
               "the same for process CPU time, less sensitive to other jobs on the machine.")
    if mem_rows:
        out += ["", C.table(["batch", "ViT-B measured MiB", "predicted", "error", "ReViT-B measured MiB", "predicted",
                             "error", "ReViT/ViT"], mem_rows)]
        out.append("")
        out.append("Peak activation memory of one forward: measured = torch allocator trace (every allocation and "
                   "free during the forward; see the scaling section), predicted = "
                   "`vitdsl.passes.memory.peak_activation_bytes(graph, batch)`.")
    out.append("")
    out.append("Where the difference lies (batch 1, torch.profiler, mean of 3 forwards; self time per aten op, "
               "which is wall time on a loaded machine): the ops whose call counts differ between the two models, "
               "calls per forward ViT-B / ReViT-B and ms ViT-B / ReViT-B: "
               + ", ".join(f"`{k}` {pv.get(k, (0, 0))[0]}/{pr.get(k, (0, 0))[0]} calls, "
                           f"{pv.get(k, (0, 0))[1]:.1f}/{pr.get(k, (0, 0))[1]:.1f} ms" for k in diff[:8])
               + (f" (and {len(diff) - 8} more under "
                  f"{max(pv.get(k, (0, 0))[1] + pr.get(k, (0, 0))[1] for k in diff[8:]):.1f} ms)" if len(diff) > 8 else "")
               + f". Together {t_only_v:.1f} ms in ViT-B and {t_only_r:.1f} ms in ReViT-B, of {t_all_v:.0f} and "
               f"{t_all_r:.0f} ms for all aten ops.")
    out.append("")
    out.append(f"Same weights: ViT-B's state dict loads into ReViT-B with strict=False, missing only "
               f"{', '.join('`' + k + '`' for k in facts['missing'])} ({facts['params_vit']:,} vs "
               f"{facts['params_revit']:,} parameters). With alpha = 1, ReViT-B's logits equal ViT-B's to "
               f"{facts['alpha1_maxdiff']:.1e} (max abs, batch 2; logits up to {facts['logit_scale']:.2f}); "
               f"with alpha = 0.5 they differ by up to {facts['alpha05_maxdiff']:.2f}. The timings use alpha = 0.5.")
    out.append("")
    out.append(f"torch intra-op threads: {args.threads}; inter-op threads: 1; {args.warmup} warm-up forwards of each "
               f"model per batch size. Load average (1/5/15 min) at start: {load0}; at end: {load1}"
               + (f" ({waited})" if waited else "") + ".")
    report = "\n".join(out)
    met = [v for v in verdicts if v[2].startswith("met")]
    summary = (f"- ReViT-B / ViT-B forward latency: target <= {TARGET:.2f} **met in {len(met)} of {len(verdicts)} "
               f"batch sizes** (" + "; ".join(f"batch {b}: {r:.3f}, {v}" for b, r, v in verdicts) + ").")
    print()
    print(summary)
    print(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"raw": {str(k): v for k, v in raw.items()}, "facts": facts, "ops": {"vit": pv, "revit": pr},
                       "load": [load0, load1]}, f, indent=1)
    if args.write_doc:
        from scaling import replace_section, reproduce_command

        body = "\n".join([
            HEADING, "",
            f"Date: {C.now()}", "",
            "Command (from the repository root):", "",
            "```", reproduce_command(), "```", "",
            *C.machine_lines([f"- torch intra-op threads: {args.threads}"]), "",
            summary, "",
            report,
        ])
        replace_section(HEADING, body)
        print(f"\nupdated {C.DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
