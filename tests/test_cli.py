"""The command line: tables, artifacts, formatting, pictures, and errors without tracebacks."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY

SMALL_SPEC = os.path.join(ROOT, "specs", "vit_tiny_patch16_224.vit")


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "vitdsl", *args], capture_output=True, text=True, cwd=cwd)


@pytest.fixture
def tiny(tmp_path):
    p = tmp_path / "tiny.vit"
    p.write_text(TINY)
    return p


def _commands() -> list[str]:
    import argparse

    from vitdsl.cli import make_parser

    sub = next(a for a in make_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(sub.choices)


def test_every_command_is_listed():
    assert {"check", "build", "fmt", "graph", "quantize", "import", "train", "bench", "verify"} <= set(_commands())


@pytest.mark.parametrize("cmd", [[]] + [[c] for c in _commands()])
def test_help(cmd):
    r = run(*cmd, "--help")
    assert r.returncode == 0
    assert "usage: vitdsl" in r.stdout and "--help" in r.stdout


def test_check_table(tiny):
    r = run("check", str(tiny))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    header = next(l for l in lines if l.startswith("name"))
    assert header.split() == ["name", "op", "output", "params", "MACs"]
    row = next(l for l in lines if l.startswith("blocks.1.attn "))
    assert row.split()[:4] == ["blocks.1.attn", "attention", "17x64", "16,640"]  # 4*64*64 + 3*64 + 64
    total = next(l for l in lines if l.startswith("total"))
    import vitdsl

    assert f"{vitdsl.loads(TINY).total().params:,}" in total


def test_diagnostic_exits_1_without_traceback(tiny):
    tiny.write_text(TINY.replace("heads=2", "heads=3"))
    for cmd in (["check"], ["build", "-o", str(tiny.parent / "out")], ["graph", "-o", str(tiny.parent / "g.svg")]):
        r = run(*cmd, str(tiny))
        assert r.returncode == 1
        assert r.stderr.startswith(f"{tiny}:6:17: error: dim 64 is not divisible by heads 3")
        assert "Traceback" not in r.stderr
    assert not (tiny.parent / "out").exists() and not (tiny.parent / "g.svg").exists()


def test_missing_file_exits_1(tmp_path):
    r = run("check", str(tmp_path / "nope.vit"))
    assert r.returncode == 1 and "cannot read spec" in r.stderr and "Traceback" not in r.stderr


def test_build_writes_all_artifacts(tiny, tmp_path):
    out = tmp_path / "out"
    r = run("build", str(tiny), "--backend", "torch", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out)) == ["manifest.json", "model.pt2", "model.safetensors", "spec.vit", "summary.json"]
    import vitdsl
    from safetensors.torch import load_file

    g = vitdsl.load(out / "spec.vit")
    assert g == vitdsl.loads(TINY)
    model = vitdsl.compile(g).eval()
    model.load_state_dict(load_file(out / "model.safetensors"), strict=True)
    program = torch.export.load(str(out / "model.pt2"))
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(program.module()(x), model(x))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["params"] == g.total().params and len(summary["layers"]) == len(g)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["files"] == sorted(os.listdir(out))
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary left over


def test_build_with_weights_and_failure_leaves_old_output(tiny, tmp_path):
    out = tmp_path / "out"
    assert run("build", str(tiny), "-o", str(out), "--seed", "7").returncode == 0
    before = (out / "model.safetensors").read_bytes()
    bad = tmp_path / "bad.safetensors"
    from safetensors.torch import save_file

    save_file({"nonsense": torch.zeros(2)}, str(bad))
    r = run("build", str(tiny), "-o", str(out), "--weights", str(bad))
    assert r.returncode == 1
    assert "weights do not match the spec: missing " in r.stderr and "unexpected nonsense" in r.stderr
    assert (out / "model.safetensors").read_bytes() == before
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00garbage")
    r = run("build", str(tiny), "-o", str(out), "--weights", str(corrupt))
    assert r.returncode == 1 and "cannot read weights" in r.stderr and "Traceback" not in r.stderr
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_build_weights_roundtrip(tiny, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run("build", str(tiny), "-o", str(a), "--seed", "3").returncode == 0
    assert run("build", str(tiny), "-o", str(b), "--seed", "9", "--weights", str(a / "model.safetensors")).returncode == 0
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_build_unwritable_output(tiny, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    r = run("build", str(tiny), "-o", str(ro / "out"))
    assert r.returncode == 1 and "Traceback" not in r.stderr


def test_build_output_is_a_file(tiny, tmp_path):
    f = tmp_path / "file"
    f.write_text("keep me")
    r = run("build", str(tiny), "-o", str(f))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f.read_text() == "keep me"


def test_fmt_check_and_rewrite(tiny):
    messy = TINY.replace("  input", "input").replace("heads=2 qkv_bias", "heads=2    qkv_bias")
    tiny.write_text(messy)
    r = run("fmt", "--check", str(tiny))
    assert r.returncode == 1 and "would reformat" in r.stderr and "+  input" in r.stdout
    assert tiny.read_text() == messy
    r = run("fmt", str(tiny))
    assert r.returncode == 0
    assert tiny.read_text() == TINY
    assert run("fmt", "--check", str(tiny)).returncode == 0


def test_fmt_syntax_error_leaves_file(tiny):
    tiny.write_text("model m {\n  input image 3x8x8 ,\n}\n")
    r = run("fmt", str(tiny))
    assert r.returncode == 1 and r.stderr.startswith(f"{tiny}:2:21: error: unexpected ','")
    assert tiny.read_text() == "model m {\n  input image 3x8x8 ,\n}\n"


@pytest.mark.parametrize("ext", [".svg", ".dot"])
def test_graph_writes_picture(tiny, tmp_path, ext):
    out = tmp_path / f"g{ext}"
    r = run("graph", str(tiny), "-o", str(out))
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    assert "blocks.1" in text and "res1" in text


def test_graph_rejects_unknown_extension(tiny, tmp_path):
    r = run("graph", str(tiny), "-o", str(tmp_path / "g.png"))
    assert r.returncode == 1 and ".svg or .dot" in r.stderr


def test_build_refuses_to_replace_a_foreign_directory(tiny, tmp_path):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("keep me")
    r = run("build", str(tiny), "-o", str(d), "-q")
    assert r.returncode == 1 and "is not a vitdsl output directory" in r.stderr
    assert (d / "notes.txt").read_text() == "keep me"


def test_build_weights_of_another_shape_is_a_diagnostic(tiny, tmp_path):
    from safetensors.torch import save_file

    import vitdsl

    other = vitdsl.compile(vitdsl.loads(TINY.replace("dim=64", "dim=32"))).state_dict()
    save_file({k: v.contiguous() for k, v in other.items()}, str(tmp_path / "w.safetensors"))
    r = run("build", str(tiny), "-o", str(tmp_path / "o"), "--weights", str(tmp_path / "w.safetensors"))
    assert r.returncode == 1 and "weights do not match the spec: size mismatch" in r.stderr
    assert "Traceback" not in r.stderr


def test_graph_to_missing_directory_names_the_output(tiny, tmp_path):
    out = tmp_path / "nope" / "g.svg"
    r = run("graph", str(tiny), "-o", str(out))
    assert r.returncode == 1 and r.stderr.startswith(f"{out}: error:") and ".tmp" not in r.stderr


def test_every_package_is_listed_for_pip_install():
    """`pip install .` ships only the packages pyproject lists (no auto-discovery)."""
    import tomllib

    listed = set(tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["tool"]["setuptools"]["packages"])
    found = set()
    for base, prefix in (("vitdsl", "vitdsl"), ("backends", "vitdsl.backends"), ("grammars", "vitdsl.grammars")):
        for dirpath, _, files in os.walk(os.path.join(ROOT, base)):
            if "__init__.py" in files and "__pycache__" not in dirpath:
                rel = os.path.relpath(dirpath, os.path.join(ROOT, base))
                found.add(prefix if rel == "." else prefix + "." + rel.replace(os.sep, "."))
    assert found == listed


def test_input_errors_are_reported_but_other_value_errors_keep_their_traceback(capsys):
    """A ValueError from vitdsl's own checks of non-spec input (InputError) is a user
    error: a message and exit 1.  Any other ValueError is a bug somewhere and must not be
    dressed up as the user's mistake."""
    import argparse

    from vitdsl import InputError
    from vitdsl.cli import run as run_command

    def raising(exc):
        def func(args):
            raise exc
        return argparse.Namespace(func=func)

    assert run_command(raising(InputError("the calibration set is empty"))) == 1
    assert capsys.readouterr().err == "vitdsl: error: the calibration set is empty\n"
    with pytest.raises(ValueError, match="internal"):
        run_command(raising(ValueError("internal")))
    assert issubclass(InputError, ValueError)  # API callers catching ValueError still do
