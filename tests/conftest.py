import glob
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECS = sorted(p for p in glob.glob(os.path.join(ROOT, "specs", "*.vit")) if not os.path.basename(p).startswith("_"))

TINY = """\
model tiny {
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


@pytest.fixture
def tiny_text() -> str:
    return TINY


def spec_id(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]
