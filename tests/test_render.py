"""Pictures: DOT text and the self-laid-out SVG (no Graphviz needed)."""
import os
import re
import xml.etree.ElementTree as ET

import pytest

import vitdsl
from vitdsl.render import to_dot, to_svg

from conftest import ROOT

SVG_NS = "{http://www.w3.org/2000/svg}"

# Every way an edge can be routed: a top-level composite block, a lone op inside a
# stage, a stage split into columns, and a skip over a whole stage (tokens -> side).
ODD = """\
model odd {
  input image 3x32x32
  embed patch size=8 dim=64
  tokens cls=1
  pre: transformer heads=2
  stage blocks depth=8 {
    transformer heads=2
    norm layernorm
  }
  norm layernorm eps=1e-6
  side: norm layernorm from=tokens
  j: add from=(norm, side)
  head pool=cls classes=10
}
"""


@pytest.fixture(scope="module")
def vit() -> vitdsl.Graph:
    return vitdsl.load(os.path.join(ROOT, "specs", "vit_tiny_patch16_224.vit"))


@pytest.fixture
def graphs(vit, tiny_text) -> list:
    return [vit, vitdsl.loads(tiny_text), vitdsl.loads(ODD)]


def skip_edges(g) -> set:
    pos = {n: i for i, n in enumerate(g.order)}
    return {(u, v) for u, v in g.nx.edges() if pos[v] != pos[u] + 1}


# ------------------------------------------------------------------ DOT
def test_dot_has_every_node_edge_and_cluster(graphs):
    for g in graphs:
        dot = to_dot(g)
        assert dot.startswith(f'digraph "{g.name}" {{') and dot.rstrip().endswith("}")
        assert dot.count("{") == dot.count("}")
        nodes = set(re.findall(r'^\s*"([^"]+)" \[label=', dot, re.M))
        edges = re.findall(r'^\s*"([^"]+)" -> "([^"]+)"', dot, re.M)
        assert nodes == set(g.order)
        assert sorted(edges) == sorted(g.nx.edges())
        assert len(re.findall(r"color=\"#e07b00\"", dot)) == len(skip_edges(g))
        assert re.search(r'subgraph cluster_\w+ \{\n\s*label="stage blocks', dot)
        assert re.search(r'subgraph cluster_\w+ \{\n\s*label="blocks\.0"', dot)


def test_dot_clusters_nest_blocks_in_their_stage(vit):
    dot = to_dot(vit)
    stage = dot.index('label="stage blocks')
    end = dot.index("\n  }\n", stage)  # the stage cluster's closing brace
    inside = dot[stage:end]
    for n in vit.nodes():
        assert (f'"{n.name}" [' in inside) == (n.stage == "blocks")
    assert inside.count("subgraph cluster_") == 12


def test_dot_quotes_awkward_names(tiny_text):
    g = vitdsl.loads(tiny_text)
    g.name = 'odd "name" \\ here'
    dot = to_dot(g)
    assert dot.startswith('digraph "odd \\"name\\" \\\\ here" {')


# ------------------------------------------------------------------ SVG
def parse(svg: str) -> ET.Element:
    root = ET.fromstring(svg.encode())
    assert root.tag == SVG_NS + "svg"
    return root


def node_groups(root: ET.Element) -> list:
    return [e for e in root.iter(SVG_NS + "g") if e.get("class") == "node"]


def edge_paths(root: ET.Element) -> list:
    return [e for e in root.iter(SVG_NS + "path") if (e.get("class") or "").split()[:1] == ["edge"]]


def texts(el: ET.Element) -> list:
    return ["".join(t.itertext()) for t in el.iter(SVG_NS + "text")]


def test_svg_is_well_formed_with_one_box_per_node(graphs):
    for g in graphs:
        root = parse(to_svg(g))
        groups = node_groups(root)
        assert [e.get("data-name") for e in groups] == g.order
        for e, n in zip(groups, g.nodes()):
            shown = texts(e)
            short = n.name.rsplit(".", 1)[-1] if n.block != n.name else n.name
            assert shown[0] == short
            assert shown[1] == f"{n.op} · {n.out}"
            assert e.find(SVG_NS + "title").text.startswith(n.name + "\n")


def test_svg_draws_every_edge_and_marks_skips(graphs):
    for g in graphs:
        paths = edge_paths(parse(to_svg(g)))
        assert len(paths) == g.nx.number_of_edges()
        assert sorted((p.get("data-src"), p.get("data-dst")) for p in paths) == sorted(g.nx.edges())
        skips = {(p.get("data-src"), p.get("data-dst")) for p in paths if "skip" in p.get("class").split()}
        assert skips == skip_edges(g)
        assert all(p.get("d").startswith("M") for p in paths)


def test_svg_residuals_of_a_vit(vit):
    skips = skip_edges(vit)
    assert len(skips) == 24  # two residuals per block
    assert ("tokens", "blocks.0.res1") in skips and ("blocks.0.res1", "blocks.0.res2") in skips


def test_svg_title_and_clusters(vit):
    root = parse(to_svg(vit))
    all_text = texts(root)
    assert vit.name in all_text
    assert any(f"{vit.total().params:,} params" in t for t in all_text)
    assert root.find(SVG_NS + "title").text == vit.name
    assert any(t.startswith("stage blocks") for t in all_text)
    stages = [e for e in root.iter(SVG_NS + "rect") if e.get("class") == "stage"]
    assert [e.get("data-stage") for e in stages] == ["blocks"]
    blocks = [e.get("data-block") for e in root.iter(SVG_NS + "rect") if e.get("class") == "block"]
    assert blocks == [f"blocks.{i}" for i in range(12)]
    assert "blocks.3" in all_text


def boxes(root: ET.Element) -> dict:
    out = {}
    for e in node_groups(root):
        r = e.find(SVG_NS + "rect")
        out[e.get("data-name")] = tuple(float(r.get(k)) for k in ("x", "y", "width", "height"))
    return out


def test_svg_layout_is_sane(graphs):
    for g in graphs:
        root = parse(to_svg(g))
        w, h = float(root.get("width")), float(root.get("height"))
        assert root.get("viewBox") == f"0 0 {root.get('width')} {root.get('height')}"
        placed = boxes(root)
        for x, y, bw, bh in placed.values():
            assert 0 <= x and x + bw <= w and 0 <= y and y + bh <= h
        items = sorted(placed.values())
        for i, (x, y, bw, bh) in enumerate(items):  # no two boxes overlap
            for x2, y2, bw2, bh2 in items[i + 1:]:
                if x2 >= x + bw:
                    break
                assert y2 >= y + bh or y >= y2 + bh2


def test_svg_size_of_a_12_block_vit(vit):
    root = parse(to_svg(vit))
    w, h = float(root.get("width")), float(root.get("height"))
    assert 400 < w < 2000 and 600 < h < 2000
    columns = {x for x, _, _, _ in boxes(root).values()}
    assert 2 <= len(columns) <= 6  # the blocks are laid out side by side


def test_svg_main_chain_runs_straight_down_a_column(tiny_text):
    g = vitdsl.loads(tiny_text)
    placed = boxes(parse(to_svg(g)))
    xs = {x for x, _, _, _ in placed.values()}
    assert len(xs) == 1  # a small model is one column
    ys = [placed[n][1] for n in g.order]
    assert ys == sorted(ys)


def test_svg_escapes_text(tiny_text):
    g = vitdsl.loads(tiny_text)
    g.name = 'a<b>&"c"\x01'
    svg = to_svg(g)
    root = parse(svg)
    assert root.find(SVG_NS + "title").text == 'a<b>&"c"'
    assert "a<b>" not in svg
