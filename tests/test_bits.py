"""The bits section: selectors, precedence, diagnostics, averages, canonical text."""
import subprocess
import sys

import pytest

import vitdsl
from vitdsl import SpecError
from vitdsl.fmt import format_text
from vitdsl.quant.bits import BitSpec, summary
from helpers import BASE, where


def with_bits(rules: str) -> str:
    return BASE.replace("  head pool=cls classes=10\n", "  head pool=cls classes=10\n  bits {\n" + rules + "  }\n")


def bits_of(rules: str) -> dict:
    return {k: str(v) for k, v in vitdsl.loads(with_bits(rules)).bits.items()}


def test_no_bits_section_means_float():
    assert vitdsl.loads(BASE).bits is None


def test_default_and_patterns():
    b = bits_of("    default w8a8\n    blocks.*.mlp w4a8\n")
    assert b["patch_embed.proj"] == "w8a8" and b["head"] == "w8a8"
    assert b["blocks.0.mlp.fc1"] == b["blocks.1.mlp.fc2"] == "w4a8"
    assert b["blocks.1.attn.qkv"] == "w8a8"


def test_precedence_exact_beats_longer_beats_shorter_beats_default():
    b = bits_of("    default w8a8\n    blocks.* w6a6\n    blocks.*.mlp w5a5\n    blocks.1.mlp.fc2 w4a8\n    *.1.mlp.fc1 w3a3\n")
    assert b["patch_embed.proj"] == "w8a8"        # default
    assert b["blocks.0.attn.qkv"] == "w6a6"       # shorter pattern
    assert b["blocks.0.mlp.fc1"] == "w5a5"        # longer pattern beats shorter
    assert b["blocks.1.mlp.fc1"] == "w3a3"        # a pattern with more parts
    assert b["blocks.1.mlp.fc2"] == "w4a8"        # exact name beats every pattern


def test_unmatched_layers_without_default_stay_fp32():
    b = bits_of("    blocks.0.mlp w4a8\n")
    assert b["blocks.1.mlp.fc1"] == "fp32" and b["blocks.0.mlp.fc2"] == "w4a8"


def test_equally_specific_disagreeing_selectors():
    text = with_bits("    b*.*.mlp w4a8\n    *.0.mlp w6a6\n")  # both: 3 parts, 4 literal characters
    with pytest.raises(SpecError) as info:
        vitdsl.loads(text)
    assert info.value.message == ("'*.0.mlp' and 'b*.*.mlp' are equally specific and disagree on "
                                  "'blocks.0.mlp.fc1' (w6a6 vs w4a8)")
    assert (info.value.line, info.value.column) == where(text, "*.0.mlp")


def test_selector_matching_nothing():
    text = with_bits("    default w8a8\n    blocks.*.mpl w4a8\n")
    with pytest.raises(SpecError) as info:
        vitdsl.loads(text)
    assert info.value.message == "selector 'blocks.*.mpl' matches no layer"
    assert (info.value.line, info.value.column) == where(text, "blocks.*.mpl")


def test_bits_on_an_op_with_nothing_to_quantize():
    text = with_bits("    blocks.0.norm1 w8a8\n")
    with pytest.raises(SpecError) as info:
        vitdsl.loads(text)
    assert info.value.message == ("'blocks.0.norm1' selects norm 'blocks.0.norm1', which has nothing to quantize "
                                  "(only linear and conv layers have bit widths)")
    assert (info.value.line, info.value.column) == where(text, "blocks.0.norm1 w8a8")


@pytest.mark.parametrize("spec,msg", [
    ("w16a8", "weight width 16 in 'w16a8' is outside the supported set 2..8"),
    ("w4a1", "activation width 1 in 'w4a1' is outside the supported set 2..8"),
    ("int8", "unknown bit width 'int8'; write wNaM (e.g. w4a8) or one of fp32, fp16, bf16"),
    ("w08a8", "write 'w08a8' as 'w8a8' (no leading zeros)"),  # one spelling per width
])
def test_widths_outside_the_supported_set(spec, msg):
    text = with_bits(f"    default {spec}\n")
    with pytest.raises(SpecError) as info:
        vitdsl.loads(text)
    assert info.value.message == msg
    assert (info.value.line, info.value.column) == where(text, spec)


def test_float_types_and_weighted_averages():
    g = vitdsl.loads(with_bits("    default w8a8\n    blocks.*.mlp w4a6\n    head fp16\n"))
    s = summary(g)
    layers = s["layers"]
    w = {q.name: q.weights for q in layers}
    a = {q.name: q.act_elems for q in layers}
    # independent arithmetic from the shapes: dim 64, 17 tokens, mlp 256, 16 patches of 3x8x8
    assert w["blocks.0.mlp.fc1"] == 64 * 256 and a["blocks.0.mlp.fc2"] == 17 * 256
    assert a["head"] == 64 and a["patch_embed.proj"] == 3 * 32 * 32
    wb = {n: 4 if ".mlp." in n else 16 if n == "head" else 8 for n in w}
    ab = {n: 6 if ".mlp." in n else 16 if n == "head" else 8 for n in w}
    assert s["avg_weight_bits"] == pytest.approx(sum(wb[n] * w[n] for n in w) / sum(w.values()))
    assert s["avg_act_bits"] == pytest.approx(sum(ab[n] * a[n] for n in w) / sum(a.values()))
    other = g.total().params - sum(w.values())  # biases, norms, tokens stay fp32
    assert s["size_bytes"] == sum(w[n] * wb[n] / 8 for n in w) + 4 * other
    assert BitSpec.parse("bf16").bytes_per_weight == 2


def test_canonical_text_and_fmt_order_the_section():
    text = with_bits("    blocks.1.mlp.fc2 w6a6\n    head fp16\n    default w8a8\n    blocks.*.mlp w4a8\n")
    g = vitdsl.loads(text)
    assert vitdsl.loads(g.to_vit()) == g
    body = g.to_vit().split("bits {\n")[1].split("  }")[0].split("\n")
    assert [ln.split()[0] for ln in body if ln.strip()] == ["default", "blocks.*.mlp", "head", "blocks.1.mlp.fc2"]
    formatted = format_text(text)
    assert formatted.index("default") < formatted.index("blocks.*.mlp") < formatted.index("head  ") < formatted.index("blocks.1.mlp.fc2")
    assert format_text(formatted) == formatted


def test_bits_change_graph_equality():
    assert vitdsl.loads(with_bits("    default w8a8\n")) != vitdsl.loads(with_bits("    default w4a8\n"))


def test_check_shows_bits_column_and_summary(tmp_path):
    p = tmp_path / "q.vit"
    p.write_text(with_bits("    default w8a8\n    blocks.*.mlp w4a8\n"))
    r = subprocess.run([sys.executable, "-m", "vitdsl", "check", str(p)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    header = next(l for l in r.stdout.splitlines() if l.startswith("name"))
    assert header.split()[-1] == "bits"
    row = next(l for l in r.stdout.splitlines() if l.startswith("blocks.0.mlp "))
    assert row.split()[-1] == "w4a8"
    assert "bits: weights" in r.stdout and "model size" in r.stdout


def test_an_exact_name_beats_a_pattern_with_more_parts():
    """Exactness comes first: `blocks.1.mlp` (3 parts, exact) beats `blocks.*.mlp.fc1` (4 parts)."""
    b = bits_of("    default w8a8\n    blocks.*.mlp.fc1 w6a6\n    blocks.1.mlp w4a8\n")
    assert b["blocks.1.mlp.fc1"] == "w4a8"  # the exact name
    assert b["blocks.0.mlp.fc1"] == "w6a6"  # only the pattern
    assert b["blocks.1.attn.qkv"] == "w8a8"

