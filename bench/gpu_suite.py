"""The GPU suite: vitdsl against timm on one NVIDIA GPU, in one process.

    .venv/bin/python bench/gpu_suite.py --out build/gpu_suite.json       # on a GPU machine (compile groups stop at --budget-s, default 420 s)
    .venv/bin/python bench/gpu_suite.py --from-json build/gpu_suite.json --write-doc   # the doc section, anywhere
    .venv/bin/python bench/gpu_suite.py --dry-run                         # CPU: tiny models, every code path

Matrix: vit_base_patch16_224, swin_tiny_patch4_window7_224 and revit_base_patch16_224
(specs/), each against timm's same model with the same weights (ReViT, which timm
lacks, against timm's ViT-B/16 without a class token: `vitdsl.benchmark.BASELINES`),
x fp16, bf16 x eager, torch.compile x batch 1, 64.  Method as `vitdsl bench`
(vitdsl/benchmark.py): outputs checked to agree, first call timed apart (compilation),
warm-up, then interleaved timed forwards bracketed by torch.cuda.synchronize();
medians, IQR, images/s, achieved TFLOP/s from the graph's MACs and the fraction of
the GPU's dense fp16/bf16 tensor-core peak.  Target: vitdsl/timm <= 1.00 (median
time ratio, same run) for every same-architecture setting.

Time: the models are built once; all eager settings run first (seconds), then
torch.compile, one model and dtype at a time, fp16 for every model before bf16
(compiled once, recompiled per batch size with static shapes; the dynamo cache is
reset between groups).  A compile group
whose expected time (the slowest so far) no longer fits in --budget-s is skipped and
reported as such.  The JSON (--out) is rewritten after every setting, so a run cut
short still leaves its figures; --from-json renders the doc section from it later.

On a lent GPU machine whose Python has torch and timm but not vitdsl's other
dependencies: carry wheels of lark and pydantic (with pydantic-core, annotated-types,
typing-inspection), install them and vitdsl itself without the network
(`pip install --no-index --no-deps --no-build-isolation -e .`), write the JSON under
$OUT, and render the doc here with --from-json.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

MODELS = ["vit_base_patch16_224", "swin_tiny_patch4_window7_224", "revit_base_patch16_224"]
DTYPES = ["fp16", "bf16"]
BACKENDS = ["torch", "compile"]
BATCHES = [1, 64]
TARGET = 1.00
SECTION = "gpu"

# --dry-run: the same three kinds of model at toy sizes, with timm counterparts built
# from keyword arguments, so the whole path (weight copy, checks, baseline, compile,
# JSON, doc) runs on the CPU in a minute or two.
_DRY_VIT = """model dry_vit {{
  input image 3x32x32
  embed patch size=8 dim=64
  tokens cls={cls} pos=learned
  stage blocks depth=2 {{
    transformer dim=64 heads=2 mlp=4.0 qkv_bias eps=1e-6{residual}
  }}
  norm layernorm eps=1e-6
  head pool={pool} classes=10
}}
"""
_DRY_SWIN = """model dry_swin {
  input image 3x32x32
  embed patch size=4 dim=32 norm=layernorm eps=1e-5
  stage s1 depth=2 {
    transformer heads=2 attn=window(4, shift=alternate) qkv_bias eps=1e-5
  }
  stage s2 depth=2 downsample=merge {
    transformer heads=4 attn=window(4, shift=alternate) qkv_bias eps=1e-5
  }
  norm layernorm eps=1e-5
  head pool=mean classes=10
}
"""
_VIT_KW = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2, "num_classes": 10}


def dry_models():
    """(name, graph, counterpart) for the toy matrix of --dry-run."""
    import vitdsl
    from vitdsl.benchmark import BASELINES, Counterpart

    vit = vitdsl.loads(_DRY_VIT.format(cls=1, residual="", pool="cls"), "dry_vit.vit")
    swin = vitdsl.loads(_DRY_SWIN, "dry_swin.vit")
    revit = vitdsl.loads(_DRY_VIT.format(cls=0, residual=" residual(alpha=0.5, learnable)", pool="mean"), "dry_revit.vit")
    base = BASELINES["revit_base_patch16_224"]
    return [
        ("dry_vit", vit, Counterpart("vit_tiny_patch16_224", _VIT_KW)),
        ("dry_swin", swin, Counterpart("swin_tiny_patch4_window7_224", {
            "img_size": 32, "embed_dim": 32, "depths": (2, 2), "num_heads": (2, 4), "window_size": 4, "num_classes": 10})),
        ("dry_revit", revit, Counterpart("vit_tiny_patch16_224", {**_VIT_KW, **base.kwargs}, same=False,
                                         note=base.note, neutral=base.neutral)),
    ]


def _dry_compile(module, example):
    """--dry-run's stand-in for `compile`: dynamo captures the graph as on the GPU, but
    aot_eager runs it without inductor's code generation, which takes minutes on a small
    CPU (inductor itself is covered by the slow tests' torch.compile of every spec)."""
    import torch

    return torch.compile(module, backend="aot_eager", dynamic=False)


def gpu_facts(device: str) -> dict:
    import torch

    from vitdsl.benchmark import device_name

    facts = {"name": device_name(device), "torch": torch.__version__, "cuda": torch.version.cuda,
             "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    if torch.device(device).type == "cuda":
        p = torch.cuda.get_device_properties(torch.device(device))
        facts.update(memory_gib=round(p.total_memory / 2**30, 1), sm_count=p.multi_processor_count,
                     capability=f"{p.major}.{p.minor}")
    return facts


def run_suite(args) -> dict:
    import torch

    import vitdsl
    from vitdsl.benchmark import contenders, finish, measure, peak_tflops, prepare, register_backend, same_outputs
    from vitdsl.errors import SpecError

    runner = {"torch": "torch", "compile": "compile"}
    if args.dry_run:
        torch.set_num_threads(1)  # toy models: worker threads only contend on a small shared machine
        runner["compile"] = "dry-compile"
        register_backend("dry-compile")(_dry_compile)

    t_start = time.perf_counter()
    device = args.device
    facts = gpu_facts(device)
    print(f"[gpu_suite] device: {facts}", flush=True)
    report = {"date": C.now(), "command": C.command_line(), "dry_run": args.dry_run, "device": facts, "runners": runner,
              "cpu": C.cpu_model(), "python": platform.python_version(), "load": [C.loadavg()],
              "warmup": args.warmup, "runs": args.runs, "runs_large": args.runs_large, "budget_s": args.budget_s,
              "models": {}, "results": [], "skipped": [], "errors": []}
    try:
        import timm

        report["timm"] = timm.__version__
    except ImportError:
        report["timm"] = None

    def save() -> None:
        if args.out:
            from vitdsl.atomic import write_text

            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            write_text(args.out, json.dumps(report, indent=1) + "\n")

    if args.dry_run:
        todo = dry_models()
    else:
        todo = [(m, vitdsl.load(C.SPECS / f"{m}.vit"), None) for m in args.models]
    preps = {}
    for name, graph, counterpart in todo:
        t0 = time.perf_counter()
        prep = prepare(graph, device, counterpart=counterpart)
        preps[name] = prep
        report["models"][name] = {"params": graph.total().params, "macs_per_image": graph.total().macs,
                                  "input": list(graph.input.out.shape), "note": prep.note,
                                  "timm": prep.counterpart.describe() if prep.counterpart else None,
                                  "same_architecture": prep.counterpart.same if prep.counterpart else None,
                                  "check": prep.check}
        chk = prep.check or {}
        print(f"[gpu_suite] {name}: built in {time.perf_counter() - t0:.1f}s; against "
              f"{report['models'][name]['timm']}; fp32 check max |diff| {chk.get('max_abs_diff', float('nan')):.2e} "
              f"({'agree' if chk.get('agree') else 'DISAGREE'})", flush=True)
    save()

    settings = len(args.backends) * len(preps) * len(args.dtypes) * len(args.batches)
    done = 0
    group_times: list[float] = []
    for backend in args.backends:  # all eager settings first (seconds), then compile: every model once per dtype
        for dtype in args.dtypes:
            for name, prep in preps.items():
                elapsed = time.perf_counter() - t_start
                expect = max(group_times) if group_times else 0.0
                if backend == "compile" and elapsed + expect > args.budget_s:
                    for b in args.batches:
                        report["skipped"].append({"model": name, "backend": backend, "dtype": dtype, "batch": b,
                                                  "why": f"time budget: {elapsed:.0f}s spent, a compile group took up to "
                                                         f"{expect:.0f}s, budget {args.budget_s:.0f}s"})
                    done += len(args.batches)
                    print(f"[gpu_suite] skip {name} {dtype} {backend}: time budget", flush=True)
                    save()
                    continue
                if dtype == "bf16" and torch.device(device).type == "cuda" and not torch.cuda.is_bf16_supported():
                    report["errors"].append({"model": name, "backend": backend, "dtype": dtype, "error": "bf16 unsupported"})
                    done += len(args.batches)
                    continue
                torch._dynamo.reset()  # each compile group starts with a clean cache (and recompile limit)
                g0 = time.perf_counter()
                peak = peak_tflops(facts["name"], dtype)
                cs = contenders(prep, dtype, runner[backend])
                for b in args.batches:
                    done += 1
                    runs = args.runs if b < 16 else args.runs_large
                    try:
                        r = measure(cs, b, prep.graph.input.out.shape, device, dtype, warmup=args.warmup, runs=runs,
                                    check=same_outputs(prep))
                    except SpecError as e:
                        report["errors"].append({"model": name, "backend": backend, "dtype": dtype, "batch": b,
                                                 "error": e.message})
                        print(f"[gpu_suite] {name} {dtype} {backend} b{b}: ERROR {e.message}", flush=True)
                        continue
                    r.update(model=name, backend=backend, peak_tflops=peak[0] if peak else None)
                    finish(r, prep, peak)
                    report["results"].append(r)
                    save()
                    ours = r["contenders"]["vitdsl"]
                    line = (f"[gpu_suite {done:2d}/{settings} {time.perf_counter() - t_start:5.0f}s] {name} {dtype} "
                            f"{backend} b{b}: vitdsl {ours['median_s'] * 1e3:.2f} ms ({ours['tflops']:.1f} TFLOP/s, "
                            f"first call {ours['first_call_s']:.1f}s)")
                    theirs = [v for k, v in r["contenders"].items() if k != "vitdsl"]
                    if theirs:
                        line += f", timm {theirs[0]['median_s'] * 1e3:.2f} ms"
                    if "ratio" in r:
                        line += f", ratio {r['ratio']:.3f}"
                    elif "ratio_withheld" in r:
                        line += ", ratio WITHHELD (outputs disagree)"
                    print(line, flush=True)
                del cs
                gc.collect()
                if torch.device(device).type == "cuda":
                    torch.cuda.empty_cache()
                if backend == "compile":
                    group_times.append(time.perf_counter() - g0)
    torch._dynamo.reset()
    report["load"].append(C.loadavg())
    report["wall_s"] = time.perf_counter() - t_start
    save()
    return report


def verdict(r: dict, same: bool) -> str:
    if "ratio_withheld" in r:
        return "withheld: outputs disagree"
    if "ratio" not in r:
        return "no comparison"
    if not same:
        return "n/a (baseline)"
    if r["ratio"] <= TARGET:
        return "met"
    return "NOT met (within noise)" if r["paired_ratio_ci95"][0] <= TARGET else "NOT met"


def render(report: dict) -> tuple[str, list[str]]:
    """(the table and notes, the summary lines)."""
    rows = []
    met = total = 0
    missing = []
    for r in report["results"]:
        m = report["models"][r["model"]]
        same = bool(m["same_architecture"])
        cs = r["contenders"]
        ours = cs["vitdsl"]
        theirs = next((v for k, v in cs.items() if k != "vitdsl"), None)
        v = verdict(r, same)
        if same and "ratio" in r:
            total += 1
            met += v == "met"
        elif same:
            missing.append(f"{r['model']} {r['dtype']} {r['backend']} batch {r['batch']} ({v})")
        pct = lambda c: f"{100 * c['peak_fraction']:.1f}" if c.get("peak_fraction") is not None else "-"  # noqa: E731
        rows.append([r["model"], r["dtype"], "eager" if r["backend"] == "torch" else "torch.compile", r["batch"],
                     f"{ours['median_s'] * 1e3:.2f} ± {ours['iqr_s'] * 1e3 / 2:.2f}",
                     f"{theirs['median_s'] * 1e3:.2f} ± {theirs['iqr_s'] * 1e3 / 2:.2f}" if theirs else "-",
                     f"{ours['images_per_s']:.0f}", f"{theirs['images_per_s']:.0f}" if theirs else "-",
                     f"{ours['tflops']:.1f}", pct(ours), pct(theirs) if theirs else "-",
                     f"{r['ratio']:.3f}" if "ratio" in r else "-",
                     "{:.3f} ({:.3f} - {:.3f})".format(r["paired_ratio"], *r["paired_ratio_ci95"]) if "ratio" in r
                     else "-", v])
    dev = report["device"]
    peak = next((r["peak_tflops"] for r in report["results"] if r.get("peak_tflops")), None)
    summary = [f"- {'Device' if report.get('dry_run') else 'GPU'}: {dev['name']}" + (f" ({dev.get('memory_gib')} GiB, {dev.get('sm_count')} SMs, compute capability "
                                          f"{dev.get('capability')})" if dev.get("sm_count") else "")
               + f"; CUDA {dev.get('cuda')}, cuDNN {dev.get('cudnn')}; torch {dev.get('torch')}, timm {report.get('timm')}",
               f"- Peak used for % peak: dense fp16/bf16 tensor-core rate, {peak:g} TFLOP/s (vendor datasheet; "
               "`vitdsl.benchmark.peak_tflops`)" if peak else "- % peak: this GPU is not in `vitdsl.benchmark.peak_tflops`",
               f"- vitdsl/timm <= {TARGET:.2f} (same architecture, same run): **met in {met} of {total} settings**"
               + ("" if met == total else " (see the table)")]
    if missing or report["skipped"] or report["errors"]:
        n = len(missing) + len(report["skipped"]) + len(report["errors"])
        summary.append(f"- **{n} settings without a same-architecture ratio** (skipped, failed or withheld; listed below)")
    if report.get("dry_run"):
        summary.insert(0, "- **DRY RUN with toy models: these figures only show that the script works**"
                       + (" (torch.compile rows: backend='aot_eager', no inductor)"
                          if report.get("runners", {}).get("compile") == "dry-compile" else "") + ".")
    table = C.table(["model", "dtype", "mode", "batch", "vitdsl ms", "timm ms", "vitdsl img/s", "timm img/s",
                     "vitdsl TFLOP/s", "vitdsl % peak", "timm % peak", "vitdsl/timm", "paired ratio (95% CI)", f"target <= {TARGET:.2f}"], rows)
    notes = ["", "ms: median ± half the interquartile range of the timed forwards (each bracketed by "
             "`torch.cuda.synchronize()`, so launch overhead counts); img/s = batch / median; TFLOP/s from the "
             "graph's MACs (2 FLOPs per MAC; timm's from `torch.utils.flop_counter` where the architecture "
             "differs); vitdsl/timm: ratio of the median times in the same run, contenders interleaved; paired ratio: "
             "median of the per-pair ratios (each pair ran back to back) with a distribution-free ~95% interval; "
             "\"within noise\": vitdsl/timm above 1.00 but the paired interval includes 1.00.",
             "", "What is compared:"]
    for name, m in report["models"].items():
        chk = m.get("check") or {}
        notes.append(f"- {name} ({m['params']:,} params, {m['macs_per_image'] / 1e9:.2f} GMACs per image): {m['note']}"
                     + (f"; fp32 check of the weight copy: max |diff| {chk['max_abs_diff']:.1e}." if chk else "."))
    firsts = [f"{r['model']} {r['dtype']} b{r['batch']}: {r['contenders']['vitdsl']['first_call_s']:.0f}s"
              for r in report["results"] if r["backend"] == "compile"]
    if firsts:
        notes += ["", "First call with torch.compile (compilation, vitdsl): " + "; ".join(firsts) + "."]
    for label, items in (("Skipped", report["skipped"]), ("Failed", report["errors"])):
        if items:
            notes += ["", f"{label}: " + "; ".join(
                f"{i['model']} {i['dtype']} {i['backend']}" + (f" b{i['batch']}" if "batch" in i else "")
                + f" ({i.get('why') or i.get('error')})" for i in items) + "."]
    if missing:
        notes += ["", "Without a ratio: " + "; ".join(missing) + "."]
    notes += ["", f"{report['warmup']} warm-up forwards, then {report['runs']} timed forwards per model at batch 1 and "
              f"{report['runs_large']} at batch >= 16; whole run {report.get('wall_s', float('nan')):.0f}s "
              f"(budget {report['budget_s']:.0f}s)."]
    return "\n".join([table, *notes]), summary


def write_doc(report: dict, doc) -> None:
    body, summary = render(report)
    head = ["## GPU: vitdsl vs timm (fp16/bf16, eager and torch.compile)", "", f"Date: {report['date']}", "",
            "Command (from the repository root):", "", "```", report["command"], "```", "",
            f"- CPU: {report['cpu']}; Python {report['python']}", *summary, ""]
    C.update_doc(SECTION, "\n".join(head + [body]), Path(doc))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", metavar="PATH", default=None,
                    help="JSON with every timing, rewritten after each setting (default: build/gpu_suite.json, "
                         "or build/gpu_suite_dry.json with --dry-run)")
    ap.add_argument("--write-doc", action="store_true", help=f"update the '{SECTION}' section of docs/benchmarks.md (or --doc)")
    ap.add_argument("--doc", metavar="PATH", default=None, help="the markdown file to update (default: docs/benchmarks.md; "
                                                                 "with --dry-run: the JSON path with .md)")
    ap.add_argument("--from-json", metavar="PATH", help="measure nothing: render the doc section from a saved JSON")
    ap.add_argument("--dry-run", action="store_true", help="on the CPU: toy models, batches 1 and 2, few runs")
    ap.add_argument("--device", default="cuda", help="default: cuda (cpu with --dry-run)")
    ap.add_argument("--models", nargs="+", default=MODELS, choices=MODELS, help="subset of the models")
    ap.add_argument("--dtypes", nargs="+", default=DTYPES, choices=DTYPES)
    ap.add_argument("--backends", nargs="+", default=BACKENDS, choices=BACKENDS)
    ap.add_argument("--batches", type=int, nargs="+", default=BATCHES)
    ap.add_argument("--warmup", type=int, default=10, help="untimed forwards per model and setting (default: %(default)s)")
    ap.add_argument("--runs", type=int, default=50, help="timed forwards per model below batch 16 (default: %(default)s)")
    ap.add_argument("--runs-large", type=int, default=20, help="timed forwards per model at batch >= 16 (default: %(default)s)")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="skip compile groups that would end after this many seconds (default: %(default)s)")
    args = ap.parse_args(argv)

    if args.from_json:
        with open(args.from_json) as f:
            report = json.load(f)
        doc = args.doc or (os.path.splitext(args.from_json)[0] + ".md" if report.get("dry_run") else C.DOC)
    else:
        if args.dry_run:
            args.device = "cpu" if args.device == "cuda" else args.device
            args.batches = [1, 2] if args.batches == BATCHES else args.batches
            args.warmup, args.runs, args.runs_large = 1, 3, 3
        else:
            import torch

            if not torch.cuda.is_available():
                print("gpu_suite: no CUDA device here (torch.cuda.is_available() is False, torch "
                      f"{torch.__version__}). Run it on a machine with an NVIDIA GPU, or check the script on the CPU "
                      "with --dry-run.", file=sys.stderr)
                return 1
        args.out = args.out or os.path.join(C.ROOT, "build", "gpu_suite_dry.json" if args.dry_run else "gpu_suite.json")
        doc = args.doc or (os.path.splitext(args.out)[0] + ".md" if args.dry_run else C.DOC)
        report = run_suite(args)
        print(f"[gpu_suite] wrote {args.out}")
    if report.get("dry_run") and os.path.abspath(doc) == os.path.abspath(C.DOC):
        print("gpu_suite: refusing to write dry-run figures into docs/benchmarks.md", file=sys.stderr)
        return 1
    body, summary = render(report)
    print("\n".join(summary))
    print(body)
    if args.write_doc:
        write_doc(report, doc)
        print(f"\nupdated {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
