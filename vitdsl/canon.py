"""Canonical text: how a resolved program (and any value) is written back out."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from .values import CallValue, SizeValue

INDENT = "  "


def value_text(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, SizeValue):
        return "x".join(str(x) for x in v)
    if isinstance(v, tuple):
        return "(" + ", ".join(value_text(x) for x in v) + ("," if len(v) == 1 else "") + ")"
    if isinstance(v, CallValue):
        parts = [value_text(a) for a in v.args] + [f"{k}={value_text(x)}" for k, x in v.kwargs.items()]
        return f"{v.name}(" + ", ".join(parts) + ")"
    if isinstance(v, BaseModel) and hasattr(v, "to_value"):
        return value_text(v.to_value())
    if isinstance(v, float):
        r = repr(v).replace("e-0", "e-").replace("e+0", "e+")
        return r if ("." in r or "e" in r or "inf" in r or "nan" in r) else r + ".0"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        import re

        return v if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*", v) else '"' + v + '"'
    if v is None:
        return "none"
    raise TypeError(f"cannot write {v!r} in a spec")


def attrs_text(op, attrs) -> str:
    """Arguments in schema order, defaults left out; positional fields first."""
    out: list[str] = []
    fields = type(attrs).model_fields
    positional = list(op.positional)
    for name in positional:  # always written, so `norm layernorm` reads as it did
        out.append(value_text(_as_size(name, getattr(attrs, name), op)))
    for name, f in fields.items():
        if name in positional:
            continue
        v = getattr(attrs, name)
        if not f.is_required() and v == f.default:
            continue
        if isinstance(v, bool) and v:
            out.append(name)
        elif name in getattr(op, "word_fields", ()) and _call_name(v) == name:
            out.append(value_text(v))  # `residual(alpha=0.5)` rather than residual=residual(...)
        else:
            out.append(f"{name}={value_text(_as_size(name, v, op))}")
    return " ".join(out)


def _call_name(v: Any) -> str | None:
    if isinstance(v, BaseModel) and hasattr(v, "to_value"):
        v = v.to_value()
    return v.name if isinstance(v, CallValue) else None


def _as_size(name: str, v: Any, op) -> Any:
    if name in getattr(op, "size_fields", ()) and isinstance(v, tuple):
        return SizeValue(v)
    return v


def stmt_lines(stmt, depth: int = 1) -> list[str]:
    from .ops.base import REGISTRY

    pad = INDENT * depth
    if stmt.kind == "stage":
        from .expand import StageAttrs

        fields = StageAttrs.model_fields
        args = " ".join(f"{k}={value_text(stmt.attrs[k])}" for k in fields
                        if k in stmt.attrs and (k == "depth" or stmt.attrs[k] != fields[k].default))
        lines = [f"{pad}stage {stmt.name} {args} {{".replace("  {", " {")]
        for s in stmt.body:
            lines += stmt_lines(s, depth + 1)
        return lines + [pad + "}"]
    if stmt.kind == "bits":
        rules = canonical_rules(stmt.attrs["rules"])
        width = max((len(sel) for sel, _ in rules), default=0)
        return [f"{pad}bits {{"] + [f"{pad}{INDENT}{sel.ljust(width)}  {spec}" for sel, spec in rules] + [f"{pad}}}"]
    if stmt.kind == "shortcut":
        from .expand import ShortcutAttrs

        a = stmt.attrs
        taps = ", ".join(f"{ref} -> {w}" for ref, w in a["taps"])
        opts = "".join(f" {k}={value_text(a[k])}" for k, f in ShortcutAttrs.model_fields.items() if a[k] != f.default)
        return [f"{pad}shortcut {stmt.name} from {taps}{opts} into {a['into']}"]
    op = REGISTRY[stmt.op]
    text = stmt.op
    rest = attrs_text(op, stmt.attrs)
    if rest:
        text += " " + rest
    if stmt.inputs:
        refs = stmt.inputs
        text += " from=" + (refs[0] if len(refs) == 1 else "(" + ", ".join(refs) + ")")
    if stmt.label:
        text = f"{stmt.label}: {text}"
    return [pad + text]


def canonical_rules(rules: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """`default` first, then from least to most specific (the order precedence applies)."""
    from .quant.bits import specificity

    return sorted(rules, key=lambda r: (r[0] != "default", specificity(r[0]) if r[0] != "default" else (), r[0]))


def program_text(name: str, program: list) -> str:
    lines = [f"model {name} {{"]
    for s in sorted(program, key=lambda s: s.kind == "bits"):  # the bits section last
        lines += stmt_lines(s)
    return "\n".join(lines + ["}"]) + "\n"
