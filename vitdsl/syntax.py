"""Text -> AST.  Wraps lark so that no lark internals reach the user.

The grammar is read from ``grammars/vit.lark`` (shipped as package data
``vitdsl.grammars``); the LALR parser is built once per process.
"""
from __future__ import annotations

import functools
from importlib import resources

import lark
from lark import Lark, Token, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, VisitError

from . import ast as A
from .errors import SOURCES, Span, SpecError

MAX_SOURCE_BYTES = 1_000_000
"""Specs are small; anything larger is almost surely not a spec (and would be slow)."""

_TERMINAL_NAMES = {
    "NAME": "a name",
    "INT": "an integer",
    "FLOAT": "a number",
    "SIZE": "a size such as 3x224x224",
    "STRING": "a quoted string",
    "DOTTED": "a dotted name such as blocks.3.attn",
    "SELECTOR": "a layer selector such as blocks.*.mlp.fc1",
    "_NL": "end of line",
    "$END": "end of file",
        "COMMENT": "a comment",
}


@functools.lru_cache(maxsize=1)
def grammar_text() -> str:
    return resources.files("vitdsl.grammars").joinpath("vit.lark").read_text()


@functools.lru_cache(maxsize=1)
def parser() -> Lark:
    return Lark(grammar_text(), parser="lalr", propagate_positions=True, maybe_placeholders=False)


def _describe_terminal(name: str) -> str:
    if name in _TERMINAL_NAMES:
        return _TERMINAL_NAMES[name]
    for term in parser().terminals:
        if term.name == name:
            if isinstance(term.pattern, lark.lexer.PatternStr):
                return f"'{term.pattern.value}'"
            break
    return "a token"  # never show lark's __ANON_n names


def _describe_token(tok: Token) -> str:
    if tok.type == "$END":
        return "end of file"
    if tok.type == "_NL":
        return "end of line"
    text = str(tok)
    return f"'{text}'" if len(text) < 40 else f"'{text[:37]}...'"


def _expected(names: "set[str] | frozenset[str]") -> str:
    words = sorted({_describe_terminal(n) for n in names if n not in ("COMMENT",)})
    if not words:
        return ""
    if len(words) > 8:
        words = words[:8] + ["..."]
    return "; expected " + (words[0] if len(words) == 1 else "one of " + ", ".join(words))


_FILE: list[str | None] = [None]  # the file being transformed (single-threaded parse)


def _span(meta_or_tok) -> Span:
    return Span.model_construct(  # trusted values: skip validation, it is the hot path
        file=_FILE[0],
        line=getattr(meta_or_tok, "line", 1) or 1,
        column=getattr(meta_or_tok, "column", 1) or 1,
        end_line=getattr(meta_or_tok, "end_line", None),
        end_column=getattr(meta_or_tok, "end_column", None),
    )


@v_args(meta=True)
class _ToAst(Transformer):
    """Parse tree -> pydantic AST.  Rule names mirror grammars/vit.lark."""

    # expressions -----------------------------------------------------------
    def int(self, meta, c):
        if len(c[0]) > 1000:  # far past any size; Python refuses int() of over 4,300 digits anyway
            raise SpecError(f"integer literal of {len(c[0]):,} digits is too long", _span(meta))
        return A.Num.model_construct(value=int(c[0]), text=str(c[0]), span=_span(meta))

    def float(self, meta, c):
        return A.Num.model_construct(value=float(c[0]), text=str(c[0]), span=_span(meta))

    def size(self, meta, c):
        return A.Size.model_construct(dims=tuple(int(p) for p in str(c[0]).split("x")), span=_span(meta))

    def string(self, meta, c):
        return A.Str.model_construct(value=str(c[0])[1:-1], span=_span(meta))

    def ref(self, meta, c):
        return A.Ref.model_construct(parts=tuple(str(c[0]).split(".")), span=_span(meta))

    def _bin(op):  # noqa: N805 - tiny factory for the four operators
        def rule(self, meta, c):
            return A.BinOp.model_construct(op=op, left=c[0], right=c[1], span=_span(meta))

        return rule

    add, sub, mul, div, floordiv = _bin("+"), _bin("-"), _bin("*"), _bin("/"), _bin("//")

    def neg(self, meta, c):
        return A.Neg.model_construct(operand=c[0], span=_span(meta))

    def tuple(self, meta, c):
        return A.TupleExpr.model_construct(items=[x for x in c if x is not None], span=_span(meta))

    def call(self, meta, c):
        return A.Call.model_construct(name=str(c[0]), args=[x for x in c[1:] if x is not None], span=_span(meta))

    def kwarg(self, meta, c):
        return A.Arg.model_construct(key=str(c[0]), value=c[1], span=_span(meta))

    def posarg(self, meta, c):
        return A.Arg.model_construct(key=None, value=c[0], span=_span(meta))

    # statements ------------------------------------------------------------
    def let_stmt(self, meta, c):
        return A.LetStmt.model_construct(name=str(c[0]), value=c[1], span=_span(meta))

    def op_stmt(self, meta, c):
        names = [x for x in c if isinstance(x, Token)]
        args = [x for x in c if isinstance(x, A.Arg)]
        label = str(names[0]) if len(names) == 2 else None
        op_tok = names[-1]
        return A.OpStmt.model_construct(label=label, op=str(op_tok), op_span=_span(op_tok), args=args, span=_span(meta))

    def stage_stmt(self, meta, c):
        return A.StageStmt.model_construct(
            name=str(c[0]),
            args=[x for x in c[1:] if isinstance(x, A.Arg)],
            body=next((x for x in c if isinstance(x, list)), []),
            span=_span(meta),
        )

    def body(self, meta, c):
        return list(c)

    def bits_rule(self, meta, c):
        return A.BitsRule.model_construct(selector=str(c[0]), spec=str(c[1]), span=_span(meta))

    def bits_block(self, meta, c):
        return A.BitsBlock.model_construct(rules=list(c), span=_span(meta))

    def tap(self, meta, c):
        return A.Tap.model_construct(ref=c[0], width=c[1], span=_span(meta))

    def shortcut_stmt(self, meta, c):
        taps = [x for x in c if isinstance(x, A.Tap)]
        args = [x for x in c if isinstance(x, A.Arg)]
        refs = [x for x in c if isinstance(x, A.Ref)]
        return A.ShortcutStmt.model_construct(name=str(c[0]), taps=taps, args=args, into=refs[0] if refs else None, span=_span(meta))

    def extends(self, meta, c):
        return ("extends", str(c[0]), _span(c[0]))

    def model_def(self, meta, c):
        ext = next((x for x in c if isinstance(x, tuple)), None)
        return A.ModelDef.model_construct(
            name=str(c[1]),
            template=str(c[0]) == "template",
            extends=ext[1] if ext else None,
            extends_span=ext[2] if ext else None,
            body=next((x for x in c if isinstance(x, list)), []),
            span=_span(meta),
        )

    def import_stmt(self, meta, c):
        return A.ImportStmt.model_construct(path=str(c[0])[1:-1], span=_span(meta))

    def start(self, meta, c):
        return list(c)


def _check_source(source: "str | bytes", filename: str) -> str:
    """Reject what is not a spec before lark sees it: binary, huge or empty input."""
    if isinstance(source, bytes):
        if len(source) > MAX_SOURCE_BYTES:
            raise SpecError(f"file is {len(source):,} bytes, over the {MAX_SOURCE_BYTES:,}-byte limit for a spec", filename=filename)
        try:
            source = source.decode("utf-8")
        except UnicodeDecodeError as e:
            raise SpecError(f"file is not UTF-8 text (byte 0x{source[e.start]:02x} at offset {e.start}); is it a binary file?", filename=filename) from None
    if source.startswith("\ufeff"):  # a UTF-8 byte-order mark (some Windows editors write one) is not text
        source = source[1:]
    if "\r" in source:  # CRLF and old Mac CR line ends read as LF: lines and columns as an editor shows them
        source = source.replace("\r\n", "\n").replace("\r", "\n")
    if len(source) > MAX_SOURCE_BYTES:
        raise SpecError(f"spec is {len(source):,} characters, over the {MAX_SOURCE_BYTES:,} limit for a spec", filename=filename)
    nul = source.find("\x00")
    if nul >= 0:
        line = source.count("\n", 0, nul) + 1
        col = nul - (source.rfind("\n", 0, nul) + 1) + 1
        raise SpecError("file contains a NUL byte; is it a binary file?", Span(line=line, column=col), filename, None)
    if not source.strip() or all(not ln.strip() or ln.lstrip().startswith("#") for ln in source.splitlines()):
        raise SpecError("spec is empty; expected a 'model NAME { ... }' definition", Span(), filename, source)
    return source


def parse(source: "str | bytes", filename: str = "<string>") -> A.SpecFile:
    """Parse .vit text into an AST; raises SpecError with a caret on any syntax error."""
    text = _check_source(source, filename)
    comments: list[A.Comment] = []
    try:
        tree = parser().parse(text)
    except UnexpectedInput as e:
        raise _syntax_error(e, text, filename) from None
    _FILE[0] = filename
    SOURCES[filename] = text
    try:
        items = _ToAst().transform(tree)
    except VisitError as e:
        if isinstance(e.orig_exc, SpecError):  # a value the grammar accepts but no number can hold
            raise e.orig_exc.located(filename, text) from None
        raise e.orig_exc  # pragma: no cover - a transformer bug, not user error
    finally:
        _FILE[0] = None
    # Comments are ignored by the grammar; collect them separately so `fmt` keeps them.
    for i, line in enumerate(text.splitlines(), 1):
        pos = _comment_start(line)
        if pos is not None:
            comments.append(A.Comment(line=i, text=line[pos:].rstrip(), own_line=not line[:pos].strip()))
    return A.SpecFile(filename=filename, source=text, items=items, comments=comments)


def _comment_start(line: str) -> int | None:
    in_str = False
    for i, ch in enumerate(line):
        if ch == '"':
            in_str = not in_str
        elif ch == "#" and not in_str:
            return i
    return None


KEYWORDS = ("import", "let", "model", "template", "extends", "stage", "bits", "shortcut", "from", "into")


def _keyword_hint(text: str, line: int) -> str:
    """A misspelt keyword parses as an op name; say so when the line then fails."""
    import difflib

    lines = text.splitlines()
    words = lines[line - 1].split() if 0 < line <= len(lines) else []
    if not words or words[0] in KEYWORDS:
        return ""
    close = difflib.get_close_matches(words[0], KEYWORDS, n=1, cutoff=0.7)
    return f" ('{words[0]}' is not a keyword; did you mean '{close[0]}'?)" if close else ""


def _syntax_error(e: UnexpectedInput, text: str, filename: str) -> SpecError:
    if isinstance(e, UnexpectedCharacters):
        ch = text[e.pos_in_stream] if e.pos_in_stream < len(text) else "?"
        msg = f"unexpected character {ch!r}"
        allowed = getattr(e, "allowed", None) or set()
        msg += _expected(allowed)
        return SpecError(msg, Span(line=e.line, column=e.column), filename, text)
    if isinstance(e, UnexpectedToken):
        tok = e.token
        expected = set(e.expected) if e.expected else set()
        if tok.type == "$END":
            lines = text.splitlines() or [""]
            span = Span(line=len(lines), column=len(lines[-1]) + 1)
        else:
            span = Span(line=tok.line or 1, column=tok.column or 1, end_line=tok.end_line, end_column=tok.end_column)
        msg = f"unexpected {_describe_token(tok)}{_expected(expected)}{_keyword_hint(text, span.line)}"
        return SpecError(msg, span, filename, text)
    if isinstance(e, UnexpectedEOF):
        lines = text.splitlines() or [""]
        return SpecError(f"unexpected end of file{_expected(set(e.expected))}", Span(line=len(lines), column=len(lines[-1]) + 1), filename, text)
    return SpecError("syntax error", Span(line=getattr(e, "line", 1), column=getattr(e, "column", 1)), filename, text)
