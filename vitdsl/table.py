"""Plain-text tables for the terminal (no dependency, aligned columns)."""
from __future__ import annotations


def human(n: float, unit: str = "") -> str:
    """1234567 -> '1.23M'."""
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:g}{unit}"


def render(headers: list[str], rows: list[list[str]], right: set[int] = frozenset(), footer: list[list[str]] = ()) -> str:
    cols = len(headers)
    allrows = [headers] + rows + list(footer)
    width = [max(len(r[i]) for r in allrows) for i in range(cols)]

    def line(r: list[str]) -> str:
        return "  ".join(r[i].rjust(width[i]) if i in right else r[i].ljust(width[i]) for i in range(cols)).rstrip()

    rule = "  ".join("-" * w for w in width)
    out = [line(headers), rule] + [line(r) for r in rows]
    if footer:
        out += [rule] + [line(r) for r in footer]
    return "\n".join(out)
