"""CPU figures of the `vitdsl bench` command: vitdsl against timm, same weights.

Runs the command itself, one interpreter per model, exactly as a user would:

    vitdsl bench specs/MODEL.vit --device cpu --dtype fp32 --batch 1 8 --json ...

and, with --write-doc, rewrites the 'cli' section of docs/benchmarks.md with the
commands, the machine and the merged table.  The GPU figures come from
bench/gpu_suite.py (section 'gpu') on a machine with an NVIDIA GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

MODELS = ["vit_small_patch16_224", "vit_base_patch16_224"]
SECTION = "cli"


def bench_command(model: str, args) -> list[str]:
    """The `vitdsl bench` invocation for one model (without --json)."""
    cmd = ["vitdsl", "bench", f"specs/{model}.vit", "--device", "cpu", "--dtype", "fp32",
           "--batch", *map(str, args.batches), "--warmup", str(args.warmup), "--runs", str(args.runs)]
    return cmd + (["--threads", str(args.threads)] if args.threads else [])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=MODELS, help="spec names in specs/ (default: %(default)s)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="(default: %(default)s)")
    ap.add_argument("--warmup", type=int, default=3, help="(default: %(default)s)")
    ap.add_argument("--runs", type=int, default=15, help="timed forwards per model and batch (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--wait-idle", type=float, metavar="LOAD", help="first wait for the 1-minute load average to drop to LOAD")
    ap.add_argument("--json", metavar="PATH", help="write the reports of every model as one JSON list")
    ap.add_argument("--write-doc", action="store_true", help=f"update the '{SECTION}' section of docs/benchmarks.md")
    args = ap.parse_args(argv)

    waited = C.wait_for_quiet(args.wait_idle, 900) if args.wait_idle is not None else ""
    load0 = C.loadavg()
    reports, commands = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for m in args.models:
            cmd = bench_command(m, args)
            commands.append(" ".join(map(shlex.quote, cmd)))
            out = os.path.join(tmp, f"{m}.json")
            print(f"[bench_cli] {commands[-1]}", flush=True)
            r = subprocess.run([sys.executable, "-m", "vitdsl", *cmd[1:], "--json", out, "-q"], cwd=C.ROOT)
            if r.returncode:
                print(f"[bench_cli] {m}: vitdsl bench exited {r.returncode}", file=sys.stderr)
                return r.returncode
            with open(out) as f:
                reports.append(json.load(f))
    load1 = C.loadavg()

    rows, verdicts = [], []
    for rep in reports:
        for r in rep["results"]:
            ours, theirs = (list(r["contenders"].values()) + [None])[:2]
            ratio = r.get("ratio")
            if ratio is not None:
                verdicts.append(ratio <= 1.0)
            rows.append([rep["model"], r["batch"], C.fmt_ms(ours["median_s"], 1), C.fmt_ms(ours["iqr_s"], 1),
                         C.fmt_ms(theirs["median_s"], 1) if theirs else "-", C.fmt_ms(theirs["iqr_s"], 1) if theirs else "-",
                         f"{ours['images_per_s']:.2f}", f"{theirs['images_per_s']:.2f}" if theirs else "-",
                         f"{ours['tflops'] * 1e3:.0f}", f"{ratio:.3f}" if ratio is not None else "withheld",
                         "{:.3f} ({:.3f} - {:.3f})".format(r["paired_ratio"], *r["paired_ratio_ci95"])
                         if ratio is not None else "-"])
    table = C.table(["model", "batch", "vitdsl ms", "IQR", "timm ms", "IQR", "vitdsl img/s", "timm img/s",
                     "vitdsl GFLOP/s", "vitdsl/timm", "paired ratio (95% CI)"], rows)
    checks = "; ".join(f"{rep['model']}: max |diff| {rep['comparison']['check']['max_abs_diff']:.1e}"
                       for rep in reports if rep.get("comparison"))
    threads = sorted({rep["device"]["threads"] for rep in reports})
    notes = [
        "ms: median forward time (fp32, eval, `torch.inference_mode`); IQR: interquartile range of the timed runs, ms; "
        "GFLOP/s from the graph's MACs (2 FLOPs per MAC); vitdsl/timm: ratio of the median times, contenders "
        "interleaved in the same process (<= 1.00: vitdsl at least as fast); paired ratio: median of the per-pair "
        "ratios (each pair ran back to back), with a distribution-free ~95% interval.",
        "",
        f"Each model is compared with timm's model of the same name, timm's random-init weights copied into vitdsl's "
        f"(`vitdsl.interop.timm.convert_state_dict`); fp32 outputs checked before timing: {checks}.",
        "",
        f"{reports[0]['warmup']} warm-up and {reports[0]['runs']} timed forwards per model and batch; torch intra-op "
        f"threads: {', '.join(map(str, threads))}. Load average (1/5/15 min) at start: {load0}; at end: {load1}."
        + (f" Before starting: {waited}." if waited else ""),
        "",
        "**GPU figures: pending.** No GPU was available in the session that produced these figures. The prepared "
        "script is `bench/gpu_suite.py` (vit_base, swin_tiny and revit_base against timm, fp16/bf16, eager and "
        "`torch.compile`, batch 1 and 64; section `gpu` of this file once it has run on a GPU).",
    ]
    n_met = sum(verdicts)
    summary = [f"- `vitdsl bench` on the CPU, vitdsl/timm <= 1.00: **met in {n_met} of {len(verdicts)} settings**",
               "- Commands (one interpreter each):", "", "```", *commands, "```"]
    report = "\n".join([table, "", *notes])
    print()
    print(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(reports, f, indent=1)
    if args.write_doc:
        body = "\n".join([*C.section("`vitdsl bench` on the CPU: vitdsl vs timm (same weights)", summary, load0, load1),
                          report])
        C.update_doc(SECTION, body)
        print(f"\nupdated {C.DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
