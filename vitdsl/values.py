"""Evaluated attribute values: numbers, words, sizes, tuples and calls.

Spec text is never eval'd: expressions are interpreted here over plain numbers.
"""
from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict

from . import ast as A
from .errors import SpecError


class CallValue(BaseModel):
    """`window(7, shift=alternate)` after evaluation."""

    model_config = ConfigDict(frozen=True)

    name: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = {}


class SizeValue(tuple):
    """`3x224x224`: a tuple that prints back in the same form."""


def evaluate(expr: A.Expr, env: dict[str, Any]) -> Any:
    """Interpret an expression; a bare word that is no variable stands for itself."""
    if isinstance(expr, A.Num):
        return expr.value
    if isinstance(expr, A.Str):
        return expr.value
    if isinstance(expr, A.Size):
        return SizeValue(expr.dims)
    if isinstance(expr, A.Ref):
        if len(expr.parts) == 1 and expr.parts[0] in env:
            return env[expr.parts[0]]
        return expr.dotted
    if isinstance(expr, A.Neg):
        v = evaluate(expr.operand, env)
        if not _is_num(v):
            raise SpecError(f"cannot negate {_show(v)}: not a number", expr.span)
        return -v
    if isinstance(expr, A.BinOp):
        a, b = evaluate(expr.left, env), evaluate(expr.right, env)
        for side, v in ((expr.left, a), (expr.right, b)):
            if not _is_num(v):
                hint = " (is it an undefined variable?)" if isinstance(v, str) else ""
                raise SpecError(f"'{expr.op}' needs numbers, got {_show(v)}{hint}", side.span)
        if expr.op in ("/", "//") and b == 0:
            raise SpecError("division by zero", expr.right.span)
        try:
            v = _arith(expr.op, a, b)
        except OverflowError:
            v = float("inf")
        if isinstance(v, float) and not math.isfinite(v):
            raise SpecError(f"'{expr.op}' overflows: the result is too large for a number", expr.span)
        return v
    if isinstance(expr, A.TupleExpr):
        return tuple(evaluate(i, env) for i in expr.items)
    if isinstance(expr, A.Call):
        args = tuple(evaluate(a.value, env) for a in expr.args if a.key is None)
        kwargs = {a.key: evaluate(a.value, env) for a in expr.args if a.key is not None}
        return CallValue(name=expr.name, args=args, kwargs=kwargs)
    raise SpecError("unsupported expression", getattr(expr, "span", None))  # pragma: no cover


def _arith(op: str, a: int | float, b: int | float) -> int | float:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if op == "//":
        return a // b
    if isinstance(a, int) and isinstance(b, int) and a % b == 0:  # '/' keeps integers integral when it divides exactly
        return a // b
    return a / b


def _show(v: Any) -> str:
    from .canon import value_text

    try:
        text = value_text(v)
    except TypeError:
        return repr(v)
    return f"'{text}'" if isinstance(v, str) else text


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
