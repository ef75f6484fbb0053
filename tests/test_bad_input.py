"""Malformed or meaningless specs: a SpecError at the right spot, never a crash."""
import os
import subprocess
import sys

import pytest

import vitdsl
from vitdsl import SpecError

from helpers import BASE, err, where


def test_empty_text():
    e = err("")
    assert (e.line, e.column) == (1, 1)
    assert "spec is empty" in e.message


def test_only_comments_is_empty():
    assert "spec is empty" in err("# nothing here\n\n").message


def test_binary_file(tmp_path):
    p = tmp_path / "model.vit"
    p.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(SpecError) as info:
        vitdsl.load(p)
    assert "binary" in info.value.message
    assert str(info.value).startswith(f"{p}:1:1: error:")


def test_nul_byte_in_text():
    e = err("model m {\n  input image 3x8x8\x00\n}\n")
    assert (e.line, e.column) == (2, 20)
    assert "NUL" in e.message


def test_ten_megabyte_file(tmp_path):
    p = tmp_path / "big.vit"
    p.write_text("# padding\n" * 1_000_000)  # 10 MB
    with pytest.raises(SpecError) as info:
        vitdsl.load(p)
    assert "over the 1,000,000-byte limit" in info.value.message


def test_ten_megabyte_string():
    e = err("model m { " + "x " * 5_000_000 + "}")
    assert "limit" in e.message


def test_missing_file(tmp_path):
    with pytest.raises(SpecError) as info:
        vitdsl.load(tmp_path / "nope.vit")
    assert "cannot read spec" in info.value.message


def test_unknown_keyword():
    text = BASE.replace("  stage blocks", "  stag blocks")
    e = err(text)
    assert (e.line, e.column) == where(text, "{", 1)
    assert e.message.startswith("unexpected '{'")
    assert e.message.endswith("('stag' is not a keyword; did you mean 'stage'?)")


@pytest.mark.parametrize("old,new,needle,msg", [
    ("3x32x32", "0x32x32", "3x32x32", "must be positive"),
    ("dim=64", "dim=0", "dim=0", "greater than or equal to 1"),
    ("dim=64", "dim=-64", "dim=-64", "greater than or equal to 1"),
    ("size=8", "size=0", "size=0", "greater than or equal to 1"),
    ("depth=2", "depth=0", "depth=0", "greater than or equal to 1"),
    ("heads=2", "heads=-2", "heads=-2", "greater than or equal to 1"),
    ("eps=1e-6", "eps=0", "eps=0", "greater than 0"),
])
def test_negative_or_zero_sizes(old, new, needle, msg):
    text = BASE.replace(old, new)
    e = err(text)
    assert (e.line, e.column) == where(text, needle if needle != "3x32x32" else "0x32x32")
    assert msg in e.message


def test_depth_one_billion_is_refused_without_expanding():
    text = BASE.replace("depth=2", "depth=1000000000")
    e = err(text)
    assert (e.line, e.column) == where(text, "depth=1000000000")
    assert "less than or equal to 4096" in e.message


def test_dim_hundred_million_fails_on_budget_before_allocation():
    text = BASE.replace("dim=64", "dim=100000000")
    e = err(text)  # would need ~10^17 parameters: must fail fast, not allocate
    assert "over the budget of 10,000,000,000" in e.message
    assert (e.line, e.column) == where(text, "transformer")  # the largest node: blocks.0.attn


def test_parameter_budget_is_configurable():
    g = vitdsl.loads(BASE)
    params = g.total().params
    with pytest.raises(SpecError) as info:
        vitdsl.loads(BASE, max_params=params - 1)
    assert f"model has {params:,} parameters, over the budget of {params - 1:,}" in info.value.message
    assert vitdsl.loads(BASE, max_params=params).total().params == params


def test_deep_parentheses_are_fine():
    text = BASE.replace("dim=64", "dim=" + "(" * 3000 + "64" + ")" * 3000)
    assert vitdsl.loads(text).node("patch_embed").attrs.dim == 64


@pytest.mark.parametrize("expr", ["-" * 20000 + "64", "0" + "+0" * 20000 + "+64"])
def test_deeply_nested_expression_is_a_diagnostic_or_correct(expr):
    text = BASE.replace("dim=64", "dim=" + expr)
    try:
        g = vitdsl.loads(text)
    except SpecError as e:
        assert "nested too deeply" in e.message
    else:
        assert g.node("patch_embed").attrs.dim == 64


def test_import_cycle(tmp_path):
    (tmp_path / "a.vit").write_text('import "b.vit"\ntemplate a {\n  input image 3x8x8\n}\n')
    (tmp_path / "b.vit").write_text('import "a.vit"\ntemplate b {\n  input image 3x8x8\n}\n')
    (tmp_path / "m.vit").write_text('import "a.vit"\nmodel m extends a {\n}\n')
    with pytest.raises(SpecError) as info:
        vitdsl.load(tmp_path / "m.vit")
    assert "import cycle" in info.value.message


def test_error_in_imported_file_points_into_that_file(tmp_path):
    (tmp_path / "base.vit").write_text("template t {\n  input image 3x32x32\n  embed patch size=7 dim=8\n  head pool=mean classes=2\n}\n")
    (tmp_path / "m.vit").write_text('import "base.vit"\nmodel m extends t {\n}\n')
    with pytest.raises(SpecError) as info:
        vitdsl.load(tmp_path / "m.vit")
    assert str(info.value).startswith(f"{tmp_path / 'base.vit'}:3:15: error: image size 32x32 is not divisible")


def test_extends_cycle():
    text = "template a extends b {\n}\ntemplate b extends a {\n}\nmodel m extends a {\n}\n"
    assert "extends itself" in err(text).message
