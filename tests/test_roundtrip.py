"""Canonical text, fmt and the cost model, checked over every spec and over random specs."""
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vitdsl
from vitdsl.fmt import format_text
from conftest import SPECS, spec_id


@pytest.mark.parametrize("path", SPECS, ids=spec_id)
def test_to_vit_roundtrips(path):
    g = vitdsl.load(path)
    text = g.to_vit()
    assert vitdsl.loads(text) == g
    assert vitdsl.loads(text).to_vit() == text  # canonical text is a fixed point


@pytest.mark.parametrize("path", SPECS + [p for p in [os.path.join(os.path.dirname(SPECS[0]), "_vit.vit")]], ids=spec_id)
def test_fmt_is_idempotent_and_specs_are_formatted(path):
    text = open(path).read()
    assert format_text(text) == text, "specs/ must be in canonical layout (run vitdsl fmt)"
    assert format_text(format_text(text)) == format_text(text)


@pytest.mark.parametrize("path", SPECS, ids=spec_id)
def test_predicted_params_equal_built_module(path):
    g = vitdsl.load(path)
    with torch.device("meta"):
        model = vitdsl.compile(g, seed=None)
    assert g.total().params == sum(p.numel() for p in model.parameters())


# -------------------------------------------------------------- random specs
@st.composite
def vit_specs(draw):
    heads = draw(st.integers(1, 4))
    dim = heads * draw(st.integers(1, 6)) * 2
    patch = draw(st.sampled_from([2, 4, 8]))
    side = patch * draw(st.integers(1, 4))
    chans = draw(st.integers(1, 4))
    depth = draw(st.integers(1, 3))
    cls = draw(st.integers(0, 1))
    pool = "cls" if cls and draw(st.booleans()) else "mean"
    mlp = draw(st.sampled_from([1.0, 2.0, 2.5, 4.0]))
    qkv = draw(st.booleans())
    pos = draw(st.sampled_from(["learned", "none"]))
    norm = draw(st.sampled_from(["none", "layernorm"]))
    classes = draw(st.integers(1, 20))
    act = draw(st.sampled_from(["gelu", "gelu_tanh", "relu", "silu"]))
    lines = [
        "model random {",
        f"  input image {chans}x{side}x{side}",
        f"  embed patch size={patch} dim={dim} norm={norm}",
        f"  tokens cls={cls} pos={pos}",
        f"  stage blocks depth={depth} {{",
        f"    transformer heads={heads} mlp={mlp} act={act}" + (" qkv_bias" if qkv else ""),
        "  }",
        "  norm layernorm eps=1e-6",
        f"  head pool={pool} classes={classes}",
        "}",
    ]
    return "\n".join(lines) + "\n"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(vit_specs())
def test_random_specs_roundtrip_and_count_exactly(text):
    g = vitdsl.loads(text)
    assert vitdsl.loads(g.to_vit()) == g
    model = vitdsl.compile(g)
    assert g.total().params == sum(p.numel() for p in model.parameters())
    x = torch.randn(2, *g.input.out.shape)
    assert model(x).shape == (2, g.output.out.shape[0])


def test_graph_equality_sees_differences():
    a = vitdsl.load(SPECS[0])
    assert vitdsl.loads(a.to_vit().replace("classes=1000", "classes=999")) != a
    assert vitdsl.loads(a.to_vit().replace("eps=1e-6", "eps=1e-5", 1)) != a
