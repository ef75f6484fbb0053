"""Shared helpers for the bench/ scripts: statistics, machine facts, tables, and the
atomic update of one section of docs/benchmarks.md.

Each benchmark owns the part of docs/benchmarks.md between

    <!-- BEGIN bench:NAME -->
    <!-- END bench:NAME -->

and rewrites only that part (temp file in the same directory + os.replace), so the
scripts can be run one at a time in any order.
"""
from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import random
import shlex
import statistics
import sys
from pathlib import Path
from typing import Iterable, Sequence

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
SPECS = ROOT / "specs"

DOC_HEADER = """# Benchmarks

Figures produced by the scripts in `bench/` (see `bench/README.md`).  Each section
below is rewritten by its own script (`--write-doc`); everything between a section's
`BEGIN`/`END` markers is generated, so edit the scripts, not the figures.

Times are wall clock (`time.perf_counter`), medians of repeated warm runs; some
tables add process CPU time, which other processes disturb less.  The machines used
so far are small shared VMs where other work (test suites, other benchmarks) may be
running at the same time, so the scripts interleave the contenders, repeat, report
medians, and record the load average at the start and end of each run; a section
measured while the machine was busy says so at its top.  Each section states plainly
whether its target is met.

GPU figures: pending (no GPU was available on the machine that produced these figures).
"""


# ------------------------------------------------------------------ statistics
def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def quantile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile (q in [0, 1])."""
    s = sorted(xs)
    if not s:
        return float("nan")
    pos = q * (len(s) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def iqr(xs: Sequence[float]) -> tuple[float, float]:
    return quantile(xs, 0.25), quantile(xs, 0.75)


def bootstrap_ratio(a: Sequence[float], b: Sequence[float], iters: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% interval of median(a)/median(b), resampling the pairs (a[i], b[i]) together."""
    rng = random.Random(seed)
    n = len(a)
    rs = []
    for _ in range(iters):
        idx = [rng.randrange(n) for _ in range(n)]
        rs.append(median([a[i] for i in idx]) / median([b[i] for i in idx]))
    return quantile(rs, 0.025), quantile(rs, 0.975)


def linfit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float, float]:
    """Least squares y = a*x + b; returns (slope a, intercept b, R^2)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    a = sxy / sxx
    b = my - a * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - (a * x + b)) ** 2 for x, y in zip(xs, ys))
    r2 = 1.0 - ss_res / ss_tot if ss_tot else 1.0
    return a, b, r2


# ------------------------------------------------------------------ machine
def cpu_model() -> str:
    from vitdsl.benchmark import cpu_model as model

    return model()


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def machine_lines(extra: Iterable[str] = ()) -> list[str]:
    import torch

    lines = [
        f"- CPU: {cpu_model()}; {os.cpu_count()} logical cores visible "
        f"(`os.sched_getaffinity`: {len(os.sched_getaffinity(0))})",
        f"- Python {platform.python_version()}, torch {torch.__version__}",
    ]
    try:
        import timm

        lines[-1] += f", timm {timm.__version__}"
    except Exception:  # pragma: no cover - timm is a test extra
        pass
    try:
        import lark
        import pydantic

        lines[-1] += f", lark {lark.__version__}, pydantic {pydantic.VERSION}"
    except Exception:  # pragma: no cover
        pass
    lines.append(f"- OS: {platform.platform()}")
    lines.extend(extra)
    return lines


def now() -> str:
    return _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


def command_line() -> str:
    """The command as it would be typed from the repository root."""
    script = os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)
    return " ".join([".venv/bin/python", shlex.quote(script), *map(shlex.quote, sys.argv[1:])])


# ------------------------------------------------------------------ tables
def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-markdown table that also reads well in a terminal."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r):
        return "| " + " | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |"

    sep = "|" + "|".join("-" * (w + 1) + ":" if i else ":" + "-" * (w + 1) for i, w in enumerate(widths)) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


# ------------------------------------------------------------------ the doc
def _markers(name: str) -> tuple[str, str]:
    return f"<!-- BEGIN bench:{name} -->", f"<!-- END bench:{name} -->"


ORDER = ["frontend", "build_time", "latency"]


def update_doc(name: str, body: str, doc: Path = DOC) -> Path:
    """Replace (or add) the section `name` of docs/benchmarks.md, atomically."""
    begin, end = _markers(name)
    text = doc.read_text() if doc.exists() else DOC_HEADER
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        pre, rest = text.split(begin, 1)
        _, post = rest.split(end, 1)
        text = pre + block + post
    else:
        # Insert before the first later section in ORDER, else append.
        later = [n for n in ORDER[ORDER.index(name) + 1:]] if name in ORDER else []
        pos = -1
        for n in later:
            b, _ = _markers(n)
            if b in text:
                pos = text.index(b)
                break
        if pos >= 0:
            text = text[:pos] + block + "\n\n" + text[pos:]
        else:
            text = text.rstrip() + "\n\n" + block + "\n"
    write_doc(text, doc)
    return doc


def write_doc(text: str, doc: Path = DOC) -> None:
    """Atomic write of the benchmarks doc (temp file in the same directory + rename)."""
    from vitdsl.atomic import write_text

    doc.parent.mkdir(parents=True, exist_ok=True)
    write_text(str(doc), text)


def section(title: str, summary: Sequence[str], load0: str, load1: str, date: str | None = None,
            command: str | None = None, machine: Sequence[str] | None = None) -> list[str]:
    """The lines every section starts with: title, date, command, machine, verdicts,
    and a warning when the machine was busy (`date`, `command`, `machine`: of figures
    measured earlier, default now, this process's command and this machine)."""
    warning = load_warning(load0, load1)
    return [f"## {title}", "", f"Date: {date or now()}", "", "Command (from the repository root):", "", "```",
            command or command_line(), "```", "", *(machine or machine_lines()), "", *summary, "",
            *([warning, ""] if warning else [])]


def fmt_ms(seconds: float, digits: int = 2) -> str:
    return f"{seconds * 1e3:.{digits}f}"


def wait_for_quiet(max_load: float, timeout: float, poll: float = 5.0) -> str:
    """Wait until the 1-minute load average is at most max_load (or timeout seconds
    pass); returns a line saying what happened."""
    import time

    t0 = time.monotonic()
    while True:
        one = os.getloadavg()[0]
        waited = time.monotonic() - t0
        if one <= max_load:
            return f"load average {one:.2f} <= {max_load} after waiting {waited:.0f} s"
        if waited >= timeout:
            return f"gave up waiting after {waited:.0f} s: load average still {one:.2f} > {max_load}"
        time.sleep(poll)


def load_warning(*loads: str) -> str:
    """A warning line when the 1-minute load average during a run exceeded the cores
    available (other processes were competing for the CPU), else ''."""
    cores = len(os.sched_getaffinity(0))
    worst = 0.0
    for s in loads:
        try:
            worst = max(worst, float(s.split()[0]))
        except (ValueError, IndexError):
            pass
    if worst <= cores * 0.75:
        return ""
    return (f"**Caution: measured on a busy machine** (1-minute load average up to {worst:.2f} on {cores} cores "
            f"while this ran: other jobs were competing for the CPU). Absolute times are inflated and noisy; "
            f"interleaved ratios are fairer than absolute times, and a rerun on an idle machine "
            f"(`bench/run_all.py --wait-idle 1.0`) is needed before trusting the absolute figures.")


def notes(name: str) -> str:
    """Hand-written analysis kept in bench/notes/NAME.md, appended to the generated
    section so that it survives regeneration ('' if there is none)."""
    try:
        with open(Path(__file__).resolve().parent / "notes" / f"{name}.md") as f:
            return f.read()
    except OSError:
        return ""
