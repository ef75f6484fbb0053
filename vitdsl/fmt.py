"""`vitdsl fmt`: print a spec's AST back in the canonical layout, comments kept.

The formatter keeps what the author wrote (variables, templates, argument order) and
normalises layout only: two-space indentation, one space between arguments, ' = '
in lets, one blank line at most between statements and one between top-level items.
"""
from __future__ import annotations

from . import ast as A
from .errors import SpecError
from .syntax import parse

INDENT = "  "
_PREC = {"+": 1, "-": 1, "*": 2, "/": 2, "//": 2}


def expr_text(e: A.Expr, prec: int = 0, tight: bool = False) -> str:
    """An expression as text; `tight` drops spaces around operators (inside arguments)."""
    if isinstance(e, A.Num):
        return e.text or repr(e.value)
    if isinstance(e, A.Str):
        return f'"{e.value}"'
    if isinstance(e, A.Size):
        return "x".join(str(d) for d in e.dims)
    if isinstance(e, A.Ref):
        return e.dotted
    if isinstance(e, A.Neg):
        return "-" + expr_text(e.operand, 3, tight)
    if isinstance(e, A.BinOp):
        p = _PREC[e.op]
        op = e.op if tight else f" {e.op} "
        text = f"{expr_text(e.left, p, tight)}{op}{expr_text(e.right, p + 1, tight)}"
        return f"({text})" if p < prec else text
    if isinstance(e, A.TupleExpr):
        inner = ", ".join(expr_text(i) for i in e.items)
        return f"({inner},)" if len(e.items) == 1 else f"({inner})"
    if isinstance(e, A.Call):
        return f"{e.name}(" + ", ".join(arg_text(a) for a in e.args) + ")"
    raise TypeError(e)  # pragma: no cover


def arg_text(a: A.Arg) -> str:
    v = expr_text(a.value, tight=True)
    return v if a.key is None else f"{a.key}={v}"


class _Printer:
    def __init__(self, spec: A.SpecFile):
        self.lines: list[str] = []
        self.comments = sorted((c for c in spec.comments if c.own_line), key=lambda c: c.line)
        # A comment beside code follows everything on its line, so it goes after the last
        # thing printed from that line (`norm layernorm; head ...  # the head` stays with
        # the head): `anchors` maps a source line to that output line, and the comments are
        # attached once the whole file is printed.
        self.trailing = {c.line: c.text for c in spec.comments if not c.own_line}
        self.anchors: dict[int, int] = {}
        self.last_line = 0  # last source line accounted for

    def _flush_comments(self, before: int, depth: int) -> None:
        while self.comments and self.comments[0].line < before:
            c = self.comments.pop(0)
            self._gap(c.line)
            self.lines.append(INDENT * depth + c.text)
            self.last_line = c.line

    def _gap(self, line: int) -> None:
        if self.lines and line > self.last_line + 1 and self.lines[-1].strip() and not self.lines[-1].endswith("{"):
            self.lines.append("")

    def _anchor(self, line: int, index: int = -1) -> None:
        """Source `line`'s comment, if any, goes on output line `index` (unless something
        later on the same source line is printed after it)."""
        self.anchors[line] = index % len(self.lines)

    def emit(self, text: str, line: int, depth: int, end_line: int | None = None) -> None:
        self._flush_comments(line, depth)
        self._gap(line)
        self.lines.append(INDENT * depth + text)
        self._anchor(line)
        self.last_line = end_line or line

    def block(self, header: str, span, body, depth: int) -> None:
        self.emit(header + " {", span.line, depth)
        for s in body:
            self.stmt(s, depth + 1)
        end = span.end_line or span.line
        self._flush_comments(end, depth + 1)
        if self.lines[-1].endswith("{") and end == span.line:  # one-line block: keep it short
            self.lines[-1] = self.lines[-1] + " }"
        else:
            self.lines.append(INDENT * depth + "}")
        self._anchor(end)
        self.last_line = end

    def stmt(self, s, depth: int) -> None:
        if isinstance(s, A.LetStmt):
            self.emit(f"let {s.name} = {expr_text(s.value)}", s.span.line, depth)
        elif isinstance(s, A.OpStmt):
            text = " ".join([s.op] + [arg_text(a) for a in s.args])
            self.emit(f"{s.label}: {text}" if s.label else text, s.span.line, depth)
        elif isinstance(s, A.StageStmt):
            head = " ".join(["stage", s.name] + [arg_text(a) for a in s.args])
            self.block(head, s.span, s.body, depth)
        elif isinstance(s, A.BitsBlock):
            self.emit("bits {", s.span.line, depth)
            width = max((len(r.selector) for r in s.rules), default=0)
            printed: dict[int, int] = {}  # a rule's position in the source -> its output line
            for i, r, lead in self._bits_rules(s):
                for c in lead:
                    self.lines.append(INDENT * (depth + 1) + c.text)
                self.lines.append(INDENT * (depth + 1) + f"{r.selector.ljust(width)}  {r.spec}")
                printed[i] = len(self.lines) - 1
                self.last_line = r.span.line
            for i in sorted(printed):  # in source order: a line's comment follows its last rule
                self._anchor(s.rules[i].span.line, printed[i])
            self._flush_comments(s.span.end_line or s.span.line, depth + 1)
            self.lines.append(INDENT * depth + "}")
            self._anchor(s.span.end_line or s.span.line)
            self.last_line = s.span.end_line or s.span.line
        elif isinstance(s, A.ShortcutStmt):
            taps = ", ".join(f"{t.ref.dotted} -> {expr_text(t.width)}" for t in s.taps)
            text = f"shortcut {s.name} from {taps}" + "".join(" " + arg_text(a) for a in s.args)
            if s.into is not None:
                text += f" into {s.into.dotted}"
            self.emit(text, s.span.line, depth)

    def _bits_rules(self, s: A.BitsBlock):
        """Rules in canonical order (default first, then by rising precedence), each
        with its position in the source and the comments written above it."""
        from .canon import canonical_rules

        prev = s.span.line
        entries = []
        for i, r in enumerate(s.rules):
            lead = [c for c in self.comments if prev < c.line < r.span.line]
            for c in lead:
                self.comments.remove(c)
            entries.append((i, r, lead))
            prev = r.span.line
        order = canonical_rules([(r.selector, r.spec) for r in s.rules])
        rank = {sel: i for i, (sel, _) in enumerate(order)}
        return sorted(entries, key=lambda e: rank[e[1].selector])

    def item(self, it) -> None:
        if isinstance(it, A.ImportStmt):
            self.emit(f'import "{it.path}"', it.span.line, 0)
        elif isinstance(it, A.LetStmt):
            self.stmt(it, 0)
        else:
            head = ("template " if it.template else "model ") + it.name
            if it.extends:
                head += f" extends {it.extends}"
            if self.lines and self.lines[-1].strip():
                self.lines.append("")
            self.block(head, it.span, it.body, 0)
            self.last_line = (it.span.end_line or it.span.line)

    def text(self, spec: A.SpecFile) -> str:
        prev = None
        for it in spec.items:
            if prev is not None and type(prev) is not type(it) and self.lines and self.lines[-1].strip():
                self.lines.append("")
            self.item(it)
            prev = it
        self._flush_comments(10**9, 0)
        for line, text in self.trailing.items():
            if line in self.anchors:
                self.lines[self.anchors[line]] += "  " + text
            else:  # a comment whose line printed nothing (should not happen): keep it
                self.lines.append(text)
        while self.lines and not self.lines[-1].strip():
            self.lines.pop()
        return "\n".join(self.lines) + "\n"


def format_spec(spec: A.SpecFile) -> str:
    return _Printer(spec).text(spec)


def format_text(text: "str | bytes", filename: str = "<string>") -> str:
    """Canonical layout of spec text; raises SpecError on a syntax error."""
    try:
        return format_spec(parse(text, filename))
    except RecursionError:  # as vitdsl.api.loads reports it
        raise SpecError("spec is nested too deeply", filename=filename) from None
