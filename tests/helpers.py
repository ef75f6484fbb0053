"""Shared helpers for the tests."""
import pytest

import vitdsl
from vitdsl import SpecError

def err(text: str, **kw) -> SpecError:
    with pytest.raises(SpecError) as info:
        vitdsl.loads(text, "spec.vit", **kw)
    return info.value


def where(text: str, needle: str, nth: int = 0) -> tuple[int, int]:
    """1-based (line, column) of the nth occurrence of needle: computed from the text,
    independently of the parser."""
    pos = -1
    for _ in range(nth + 1):
        pos = text.index(needle, pos + 1)
    line = text.count("\n", 0, pos) + 1
    col = pos - (text.rfind("\n", 0, pos) + 1) + 1
    return line, col

BASE = """\
model m {
  input image 3x32x32
  embed patch size=8 dim=64
  tokens cls=1
  stage blocks depth=2 {
    transformer heads=2 qkv_bias
  }
  norm layernorm eps=1e-6
  head pool=cls classes=10
}
"""
