"""Diagnostics: every user-facing error is a SpecError pointing at a spot in a file.

Rendered like a compiler diagnostic so editors and people can jump to it::

    specs/bad.vit:4:27: error: dim 100 is not divisible by heads 6
        transformer dim=100 heads=6
                            ^
"""
from __future__ import annotations

from pydantic import BaseModel


class Span(BaseModel, frozen=True):
    """A 1-based source position (line, column) and its end."""

    line: int = 1
    column: int = 1
    end_line: int | None = None
    end_column: int | None = None
    file: str | None = None  # set for spans from imported files


SOURCES: dict[str, str] = {}
"""Text of every file parsed in this process, so imported files' errors show their line."""


class SpecError(Exception):
    """A problem in a spec, located at ``filename:line:column``."""

    def __init__(
        self,
        message: str,
        span: Span | None = None,
        filename: str = "<string>",
        source: str | None = None,
    ) -> None:
        self.message = message
        self.span = span or Span()
        self.filename = filename
        self.source = source
        super().__init__(str(self))

    @property
    def line(self) -> int:
        return self.span.line

    @property
    def column(self) -> int:
        return self.span.column

    def located(self, filename: str, source: str | None) -> "SpecError":
        """Return this error bound to a file (keeps an existing binding)."""
        if self.span.file and self.span.file != filename and self.span.file in SOURCES:
            self.filename, self.source = self.span.file, SOURCES[self.span.file]
        elif self.source is None:
            self.filename, self.source = filename, source
        self.args = (str(self),)
        return self

    def __str__(self) -> str:
        head = f"{self.filename}:{self.line}:{self.column}: error: {self.message}"
        if not self.source:
            return head
        lines = self.source.splitlines()
        if not 1 <= self.line <= len(lines):
            return head
        text = lines[self.line - 1].replace("\t", " ")
        if len(text) > 200:  # a 10 MB single line must not flood the terminal
            start = max(0, self.column - 100)
            text = text[start : start + 200]
            col = self.column - start
        else:
            col = self.column
        width = 1
        if self.span.end_line == self.line and self.span.end_column:
            width = max(1, min(self.span.end_column - self.column, len(text) - col + 1))
        return f"{head}\n    {text}\n    {' ' * (col - 1)}{'^' * width}"


def did_you_mean(word: str, choices: "list[str] | set[str]") -> str:
    """A ' (did you mean 'x'?)' suffix, or '' when nothing is close."""
    import difflib

    close = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


class InputError(ValueError):
    """Bad input that is not spec text (calibration tensors, budgets, batch sizes,
    weights of the wrong shape): a ValueError, so API callers catching ValueError still
    do.  The CLI reports it as a user error (exit 1, no traceback); any other ValueError
    is a bug in vitdsl or a library and keeps its traceback."""
