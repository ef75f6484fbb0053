"""Inputs a fuzzing pass over the CLI found to crash or to be accepted when meaningless
(2026-11-27); each must now be a located diagnostic or a one-line error, exit 1, and
leave nothing on disk."""
import os

import pytest
import torch

import vitdsl
from conftest import TINY
from vitdsl.cli import main
from vitdsl.errors import SpecError

BITS = TINY.replace("  norm layernorm", "  bits { default w4a4 }\n  norm layernorm")


def _spec(tmp_path, text: str, name: str = "m.vit"):
    p = tmp_path / name
    p.write_text(text)
    return p


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_arithmetic_overflow_is_located(tmp_path, capsys):
    huge = "1" + "0" * 400
    for expr, op in ((f"{huge} + 0.5", "+"), (f"{huge} / 3", "/"), ("1e300 * 1e300", "*")):
        p = _spec(tmp_path, TINY.replace("  input image", f"  let r = {expr}\n  input image"))
        assert main(["check", str(p)]) == 1
        err = _error(capsys)
        assert err.startswith(f"{p}:2:11: error: '{op}' overflows") and "^" in err


def test_a_product_with_a_float_is_not_a_selector():
    """`r*1.5` and `2*1.5` once lexed as a wildcard selector (`*` was a name character)."""
    g = vitdsl.loads(TINY.replace("  input image", "  let r = 2*1.5\n  input image")
                     .replace("transformer heads=2", "transformer heads=2 mlp=r*1.5"))
    assert g.node("blocks.0.mlp").attrs.ratio == pytest.approx(4.5)


def test_fmt_keeps_a_product_a_product(tmp_path, capsys):
    p = _spec(tmp_path, TINY.replace("  input image", "  let r = 1\n  input image")
              .replace("transformer heads=2", "transformer heads=2 mlp=r * 1.5"))
    before = vitdsl.load(p)
    assert main(["fmt", str(p)]) == 0
    assert vitdsl.load(p) == before


def test_bits_selectors_keep_their_wildcards():
    g = vitdsl.loads(TINY.replace("  norm layernorm", "  bits {\n    default w8a8\n    blocks.*.mlp.fc1 w4a8\n  }\n  norm layernorm"))
    assert str(g.bits["blocks.1.mlp.fc1"]) == "w4a8" and str(g.bits["blocks.1.attn.qkv"]) == "w8a8"


def test_fmt_of_a_too_deep_expression_is_a_diagnostic(tmp_path, capsys):
    p = _spec(tmp_path, TINY.replace("  input image", "  let r = " + "+".join(["1"] * 3000) + "\n  input image"))
    text = p.read_text()
    for argv in (["fmt", "--check", str(p)], ["fmt", str(p)]):
        assert main(argv) == 1
        assert _error(capsys).startswith(f"{p}:1:1: error: spec is nested too deeply")
    assert p.read_text() == text


@pytest.mark.parametrize("command", ["build", "train"])
def test_a_bits_spec_without_calibrated_ranges_is_a_diagnostic(tmp_path, capsys, command):
    p = _spec(tmp_path, BITS)
    out = tmp_path / ("out" if command == "build" else "w.safetensors")
    argv = ["build", str(p), "-o", str(out), "-q"] if command == "build" else \
        ["train", str(p), "--epochs", "1", "--max-steps", "1", "-o", str(out)]
    pytest.importorskip("sklearn") if command == "train" else None
    assert main(argv) == 1
    err = _error(capsys)
    line = BITS.splitlines().index("  bits { default w4a4 }") + 1
    assert err.startswith(f"{p}:{line}:3: error: vitdsl {command}") and "vitdsl quantize" in err
    assert not out.exists()


@pytest.mark.parametrize("op", ["mv2 out=8 kernel=4", "mobilevit dim=16 depth=1 patch=2 kernel=2"])
def test_even_kernels_where_the_map_size_must_stay_are_diagnostics(op):
    text = f"model m {{\n  input image 3x8x8\n  stem: conv out=8\n  {op}\n  pool mean\n  head classes=2\n}}\n"
    with pytest.raises(SpecError) as e:
        vitdsl.loads(text)
    assert e.value.line == 4 and e.value.message.startswith("kernel must be odd")
    assert text.splitlines()[3][e.value.column - 1:].startswith("kernel=")


@pytest.fixture
def tiny_weights(tmp_path):
    from safetensors.torch import save_file

    g = vitdsl.loads(TINY)
    path = tmp_path / "w.safetensors"
    save_file(vitdsl.compile(g, seed=0).state_dict(), str(path))
    return _spec(tmp_path, TINY, "tiny.vit"), path


@pytest.mark.parametrize("case", ["nan_images", "inf_weights", "nan_budget", "inf_budget"])
def test_quantize_refuses_non_finite_input(tmp_path, capsys, tiny_weights, case):
    from safetensors.torch import load_file, save_file

    spec, weights = tiny_weights
    images = torch.randn(4, 3, 32, 32)
    if case == "nan_images":
        images[1, 0, 2, 3] = float("nan")
    if case == "inf_weights":
        state = load_file(str(weights))
        state["head.weight"][0, 0] = float("inf")
        save_file(state, str(weights))
    calib = tmp_path / "calib.pt"
    torch.save(images, calib)
    width = ["--budget", {"nan_budget": "nan", "inf_budget": "1e400"}[case]] if "budget" in case else ["--bits", "w8a8"]
    out = tmp_path / "q"
    assert main(["quantize", str(spec), "--weights", str(weights), "--calib", str(calib), *width,
                 "--method", "minmax", "-o", str(out), "-q"]) == 1
    err = _error(capsys).strip()
    want = {"nan_images": f"{calib}:1:1: error: calibration images hold NaN or infinite values (1 of",
            "inf_weights": f"{weights}:1:1: error: weights hold NaN or infinite values: head.weight",
            "nan_budget": "vitdsl: error: the budget must be a finite average width, got nan",
            "inf_budget": "vitdsl: error: the budget must be a finite average width, got inf"}[case]
    assert err.startswith(want) and err.count("\n") == 0
    assert not out.exists() and not any(n.startswith(".q") for n in os.listdir(tmp_path))


@pytest.mark.parametrize("extra, message", [
    ("qkv_bias qkv_bias", "'qkv_bias' given twice"),
    ("qkv_bias foo(1)", "unknown attribute 'foo' for transformer"),
])
def test_repeated_flags_and_unknown_calls_are_named(extra, message):
    text = TINY.replace("transformer heads=2 qkv_bias", f"transformer heads=2 {extra}")
    with pytest.raises(SpecError) as e:
        vitdsl.loads(text)
    assert e.value.message == message and e.value.line == 6
    assert text.splitlines()[5][e.value.column - 1:].startswith(extra.split()[1])


def test_an_absurdly_long_integer_is_located(tmp_path, capsys):
    p = _spec(tmp_path, TINY.replace("eps=1e-6", "eps=" + "9" * 5000))
    for argv in (["check", str(p)], ["fmt", "--check", str(p)]):
        assert main(argv) == 1
        err = _error(capsys)
        assert err.startswith(f"{p}:8:22: error: integer literal of 5,000 digits is too long") and "^" in err


@pytest.mark.parametrize("command", ["build", "train"])
def test_a_seed_torch_cannot_take_is_an_error(tmp_path, capsys, command):
    p = _spec(tmp_path, TINY)
    out = tmp_path / ("out" if command == "build" else "w.safetensors")
    argv = [command, str(p), "--seed", str(2**64), "-o", str(out)] + (["--epochs", "1"] if command == "train" else [])
    assert main(argv) == 1
    assert _error(capsys).strip() == f"vitdsl: error: seed must be an integer in [0, 2^63), got {2**64}"
    assert not out.exists()


def test_quantize_checks_its_output_before_calibrating(tmp_path, capsys, tiny_weights):
    spec, weights = tiny_weights
    (tmp_path / "afile").write_text("")
    calib = tmp_path / "calib.pt"
    torch.save(torch.randn(2, 3, 32, 32), calib)
    out = tmp_path / "afile" / "x"
    assert main(["quantize", str(spec), "--weights", str(weights), "--calib", str(calib), "--bits", "w8a8",
                 "-o", str(out), "-q"]) == 1
    assert f"{tmp_path / 'afile'} is not a directory" in _error(capsys)


@pytest.mark.parametrize("encode", [
    pytest.param(lambda t: ("\ufeff" + t).encode(), id="bom"),
    pytest.param(lambda t: t.replace("\n", "\r").encode(), id="cr-only"),
    pytest.param(lambda t: t.replace("\n", "\r\n").encode(), id="crlf"),
])
def test_byte_order_marks_and_old_line_ends_read_as_plain_text(tmp_path, encode):
    p = tmp_path / "m.vit"
    p.write_bytes(encode(TINY))
    assert vitdsl.load(p) == vitdsl.loads(TINY)
    p.write_bytes(encode(TINY.replace("heads=2", "heads=3")))  # diagnostics still point at the right spot
    with pytest.raises(SpecError) as e:
        vitdsl.load(p)
    assert (e.value.line, e.value.column) == (6, 17) and "not divisible by heads 3" in e.value.message


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc, where nothing can be created")
@pytest.mark.parametrize("command", ["build", "quantize"])
def test_an_unwritable_output_is_named_as_given(tmp_path, capsys, tiny_weights, command):
    """The error named the staging directory (/proc/.out.XXXX.partial), which never exists."""
    spec, weights = tiny_weights
    out = "/proc/vitdsl-no-such-output"
    argv = ["build", str(spec), "-o", out, "-q"] if command == "build" else \
        ["quantize", str(spec), "--weights", str(weights), "--calib", "digits:2", "--bits", "w8a8", "-o", out, "-q"]
    assert main(argv) == 1
    err = _error(capsys)
    assert err.startswith(f"{out}") and ": error: " in err and ".partial" not in err


def test_a_failure_inside_the_staging_directory_names_the_output(tmp_path):
    from vitdsl.atomic import staged_dir

    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError) as e:
        with staged_dir(str(out)) as tmp:
            open(os.path.join(tmp, "missing", "model.safetensors"), "wb")
    assert e.value.filename == os.path.join(str(out), "missing", "model.safetensors")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("content, want", [
    pytest.param(None, "calibration data is empty; expected images (N, C, H, W)", id="dev-null"),
    pytest.param(b"", "calibration data is empty; expected images (N, C, H, W)", id="empty"),
    pytest.param(b"1 2 3\n", "cannot read calibration data: not a tensor file; expected images (N, C, H, W)", id="text"),
])
def test_an_unreadable_calibration_file_says_why(tmp_path, capsys, tiny_weights, content, want):
    """An empty file gave 'cannot read calibration data: ' (torch.load's message is empty)."""
    spec, weights = tiny_weights
    calib = "/dev/null" if content is None else str(tmp_path / "calib.pt")
    if content is not None:
        (tmp_path / "calib.pt").write_bytes(content)
    out = tmp_path / "q"
    assert main(["quantize", str(spec), "--weights", str(weights), "--calib", calib, "--bits", "w8a8",
                 "-o", str(out), "-q"]) == 1
    err = _error(capsys).strip()
    assert err.startswith(f"{calib}:1:1: error: {want}") and err.count("\n") == 0
    assert not out.exists()


@pytest.mark.parametrize("argv, option", [
    (["build", "{spec}", "-o", ""], "-o/--output"),
    (["build", "{spec}", "-o", "{tmp}/o", "--weights", ""], "--weights"),
    (["graph", "{spec}", "-o", ""], "-o/--output"),
    (["quantize", "{spec}", "--weights", "{weights}", "--calib", "digits:2", "--bits", "w8a8", "-o", ""], "-o/--output"),
    (["quantize", "{spec}", "--weights", "{weights}", "--calib", "", "--bits", "w8a8", "-o", "{tmp}/q"], "--calib"),
    (["import", "timm:vit_tiny_patch16_224", "-o", ""], "-o/--output"),
    (["import", "timm:vit_tiny_patch16_224", "-o", "{tmp}/a.vit", "--weights", ""], "--weights"),
    (["bench", "{spec}", "--json", "", "--no-timm", "--runs", "1", "--warmup", "0", "-q"], "--json"),
    (["check", ""], "SPEC"),
    (["fmt", ""], "SPEC"),
    (["train", "{spec}", "--epochs", "1", "-o", ""], "-o/--output"),
    (["train", "{spec}", "--epochs", "1", "--data", "", "-o", "{tmp}/t.safetensors"], "--data"),
    (["train", "{spec}", "--epochs", "1", "--replica-checksums", "", "-o", "{tmp}/t.safetensors"], "--replica-checksums"),
    (["train", "", "-o", "{tmp}/t.safetensors"], "SPEC"),
])
def test_an_empty_path_is_an_error(tmp_path, capsys, monkeypatch, tiny_weights, argv, option):
    """`-o ""` built into build/MODEL, quantize replaced the current directory with its
    output, and an empty --weights or --json was silently ignored."""
    spec, weights = tiny_weights
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    argv = [a.format(spec=spec, weights=weights, tmp=tmp_path) for a in argv]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 1
    err = _error(capsys)
    assert err.splitlines()[-1] == f"vitdsl {argv[0]}: error: argument {option}: expected a path, got an empty string"
    assert os.listdir(cwd) == [] and sorted(os.listdir(tmp_path)) == ["cwd", "tiny.vit", "w.safetensors"]


def test_an_empty_output_is_refused_by_the_python_api(tmp_path, monkeypatch):
    from vitdsl.build import build

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpecError, match="the output path is empty"):
        build(vitdsl.loads(TINY), "")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("where", ["under-a-file", "/proc"])
def test_an_unwritable_replica_checksum_directory_is_refused_before_training(tmp_path, capsys, where):
    """It was created after the last epoch: a whole training lost, and the error said only
    'No such file or directory'.  An existing directory that takes no files (review) too."""
    p = _spec(tmp_path, TINY)
    blocker = tmp_path / "file"
    blocker.write_text("")
    sums = str(blocker / "sums") if where == "under-a-file" else where
    out = tmp_path / "t.safetensors"
    assert main(["train", str(p), "--epochs", "1", "-q", "--replica-checksums", sums, "-o", str(out)]) == 1
    err = _error(capsys).strip()
    assert err.startswith(f"{sums}:1:1: error: cannot write to the replica checksum directory: ")
    assert not out.exists() and not (tmp_path / "t.json").exists()


FMT_COMMENTS = """\
model tiny {
  input image 3x32x32
  embed patch size=8 dim=64; tokens cls=1  # tokens
  stage blocks depth=2 { transformer heads=2 qkv_bias }  # one-line block
  bits {
    default w8a8
    head w8a8; blocks.*.mlp w4a8  # the MLPs
  }  # bits
  # the head
  norm layernorm; head pool=cls classes=10  # ten digits
}
"""


def test_fmt_keeps_a_trailing_comment_after_the_last_statement_of_its_line(tmp_path, capsys):
    """The comment went to the first statement of a ';'-joined line (and the rule of a bits
    line that sorts first); one after a bits block's '}' went to the end of the file and
    took the own-line comments after it along."""
    p = _spec(tmp_path, FMT_COMMENTS)
    assert main(["fmt", str(p)]) == 0
    text = p.read_text()
    assert text == """\
model tiny {
  input image 3x32x32
  embed patch size=8 dim=64
  tokens cls=1  # tokens
  stage blocks depth=2 {
    transformer heads=2 qkv_bias
  }  # one-line block
  bits {
    default       w8a8
    blocks.*.mlp  w4a8  # the MLPs
    head          w8a8
  }  # bits
  # the head
  norm layernorm
  head pool=cls classes=10  # ten digits
}
"""
    assert vitdsl.load(p) == vitdsl.loads(FMT_COMMENTS)
    assert main(["fmt", "--check", str(p)]) == 0  # idempotent


@pytest.mark.parametrize("argv, message", [
    (["check", "--max-params", "1e3", "{spec}"], "vitdsl check: error: argument --max-params: invalid int value: '1e3'"),
    (["train", "{spec}", "--epochs", "x", "-o", "w.safetensors"], "vitdsl train: error: argument --epochs: invalid int value: 'x'"),
    (["build", "{spec}", "--no-such-option"], "vitdsl: error: unrecognized arguments: --no-such-option"),
    (["frobnicate"], "vitdsl: error: argument COMMAND: invalid choice: 'frobnicate'"),
])
def test_usage_errors_exit_1(tmp_path, capsys, argv, message):
    """argparse exited 2; DESIGN.md §3: every error exits 1 (help still exits 0)."""
    p = _spec(tmp_path, TINY)
    with pytest.raises(SystemExit) as e:
        main([a.format(spec=p) for a in argv])
    assert e.value.code == 1
    err = _error(capsys)
    assert err.startswith("usage: vitdsl") and err.splitlines()[-1].startswith(message)
    with pytest.raises(SystemExit) as e:
        main([argv[0] if argv[0] != "frobnicate" else "check", "--help"])
    assert e.value.code == 0


def test_import_weights_to_an_unwritable_path_name_that_path(tmp_path, capsys):
    """The error named a temporary file safetensors itself had tried (/proc/.tmpXXXX), and
    the spec was not written either way."""
    pytest.importorskip("timm")
    out = "/proc/vitdsl-no-such-weights.safetensors"
    spec = tmp_path / "t.vit"
    assert main(["import", "timm:vit_tiny_patch16_224", "-o", str(spec), "--weights", out]) == 1
    err = _error(capsys)
    assert err.startswith(f"{out}:") and "cannot write weights" in err and ".tmp" not in err
    assert not spec.exists() and os.listdir(tmp_path) == []


@pytest.mark.parametrize("env, want", [
    ({"WORLD_SIZE": "abc"}, "environment variable WORLD_SIZE must be a non-negative integer, got 'abc'"),
    ({"WORLD_SIZE": "2", "RANK": "abc"}, "cannot start torch.distributed: "),
    ({"WORLD_SIZE": "2"}, "cannot start torch.distributed: "),
], ids=["world-size", "rank", "no-rank"])
def test_a_wrong_torchrun_environment_is_an_error_before_training(tmp_path, capsys, monkeypatch, env, want):
    """torch.distributed's ValueError once reached the user as a traceback."""
    for name in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "w.safetensors"
    assert main(["train", str(_spec(tmp_path, TINY)), "-o", str(out), "--max-steps", "1", "-q"]) == 1
    assert _error(capsys).startswith(f"vitdsl: error: {want}")
    assert os.listdir(tmp_path) == ["m.vit"]


def test_one_process_ignores_rank(tmp_path, capsys, monkeypatch):
    """RANK matters only with several processes (torch.distributed reads it then)."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("RANK", "abc")
    out = tmp_path / "w.safetensors"
    spec = _spec(tmp_path, TINY.replace("input image 3x32x32", "input image 1x16x16").replace("size=8", "size=4"))
    assert main(["train", str(spec), "-o", str(out), "--max-steps", "1", "--epochs", "1", "-q"]) == 0
    assert out.exists()


def test_a_digits_count_in_other_scripts_digits_is_refused(tmp_path, capsys, tiny_weights):
    """'digits:²' passed str.isdigit() and then crashed int()."""
    spec, weights = tiny_weights
    out = tmp_path / "q"
    assert main(["quantize", str(spec), "--weights", str(weights), "--calib", "digits:²", "--bits", "w8a8",
                 "-o", str(out), "-q"]) == 1
    assert "expected digits or digits:N with N a number of images, got 'digits:²'" in _error(capsys)
    assert not out.exists()
