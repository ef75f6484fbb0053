"""Run every benchmark in bench/ in turn and (by default) update docs/benchmarks.md.

    .venv/bin/python bench/run_all.py               # full runs, update the doc
    .venv/bin/python bench/run_all.py --quick       # smoke test: few runs, doc untouched
    .venv/bin/python bench/run_all.py --only latency --wait-idle 1.0

Each benchmark runs in its own interpreter (so one-off costs and memory of one do not
leak into the next) and rewrites only its own section of docs/benchmarks.md.
On a shared machine, --wait-idle LOAD waits (up to --wait-timeout seconds) before each
benchmark until the 1-minute load average is at most LOAD.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

BENCHES = ["frontend", "build_time", "latency"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=BENCHES, default=BENCHES, help="benchmarks to run (default: all, in this order)")
    ap.add_argument("--quick", action="store_true", help="pass --quick to each benchmark (smoke test; implies --no-doc)")
    ap.add_argument("--no-doc", action="store_true", help="do not update docs/benchmarks.md")
    ap.add_argument("--wait-idle", type=float, metavar="LOAD", help="before each benchmark, wait for the 1-min load average to drop to LOAD")
    ap.add_argument("--wait-timeout", type=float, default=600, help="longest wait for --wait-idle, seconds (default: %(default)s)")
    ap.add_argument("--json-dir", metavar="DIR", help="write each benchmark's raw timings to DIR/NAME.json")
    args = ap.parse_args(argv)

    failed = []
    for name in args.only:
        cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")]
        if args.quick:
            cmd.append("--quick")
        elif not args.no_doc:
            cmd.append("--write-doc")
        if args.json_dir:
            os.makedirs(args.json_dir, exist_ok=True)
            cmd += ["--json", os.path.join(args.json_dir, f"{name}.json")]
        if args.wait_idle is not None:
            print(f"[run_all] {name}: {C.wait_for_quiet(args.wait_idle, args.wait_timeout)}", flush=True)
        print(f"[run_all] {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(cmd, cwd=C.ROOT)
        print(f"[run_all] {name}: exit {rc} after {time.perf_counter() - t0:.0f} s\n", flush=True)
        if rc:
            failed.append(name)
    if failed:
        print(f"[run_all] failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
