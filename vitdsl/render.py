"""Pictures of a graph: Graphviz DOT text, and a standalone SVG laid out here.

``to_svg`` needs no Graphviz.  Its layout, top to bottom:

* the graph is cut into *sections*: runs of nodes in the same stage (drawn as a
  labelled cluster) or outside any stage;
* a section's *groups* (a block such as ``blocks.3``, drawn as a light sub-box, or
  a lone node) are stacked in one column, or, when the drawing would be too tall,
  in several side by side (one height cap for all sections, picked for a
  reasonable aspect ratio); the main flow runs straight down each column;
* edges from a node to the very next node in execution order are the main flow
  (dark); every other edge is a skip/residual edge (orange) and leaves and enters
  boxes on their right-hand side: a curve beside the column when both ends share
  a column, otherwise a rounded path through the lanes, gutters and channels that
  the layout reserves for it, so that no edge runs through a box.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

from .graph import Graph, Node

__all__ = ["to_dot", "to_svg"]

# ----------------------------------------------------------------- sizes (px)
NODE_H = 38          # node box height
NODE_MIN_W, NODE_MAX_W = 150, 280
NODE_GAP = 22        # vertical gap between nodes (room for an arrow)
GROUP_GAP = 14       # vertical gap between two block boxes
BLOCK_HEAD = 20      # block box: room for its label above the first node
BLOCK_PAD = 9        # block box: padding below the last node
SIDE = 12            # column: padding left of the boxes / right of the lanes
LANE0, LANE_STEP = 18, 10   # skip lanes to the right of the boxes
TRACK = 8            # spacing of parallel edges in gutters and channels
GUT_PAD, GUT_MIN = 12, 26   # gutter between two columns
CH_PAD = 10          # channel above/below columns: first track's distance
GAP_MIN = 30         # vertical gap between two sections
STAGE_HEAD, STAGE_PAD = 30, 14  # stage cluster: label band, padding
STAGE_LINE = 15      # a stage label's second line, when it wraps
MARGIN, TITLE_H = 20, 74
MAX_ONE_COLUMN_H = 1600  # a drawing taller than this is split into columns...
ASPECT = 0.7         # ...to bring its width / height near this
MAX_COLUMNS = 64     # per section
SECTION_EXTRA = 110  # about what a section adds to the height besides its columns

FONT = "Helvetica, Arial, 'DejaVu Sans', sans-serif"
MAIN_COLOR, SKIP_COLOR, SCORE_COLOR = "#4a5260", "#e07b00", "#7c3aed"
OP_COLORS = {
    "input": "#e8eaed", "embed": "#d4efd9", "tokens": "#d4efd9", "norm": "#fdf1c7",
    "attention": "#d5e5ff", "mlp": "#e8dcfb", "add": "#ffe7cc", "pool": "#fbd9d9",
    "head": "#fbd9d9",
}
FALLBACK_COLORS = ["#d9f2f2", "#f2e0d9", "#e0f2d9", "#d9dff2", "#f2d9ec", "#eef2d9"]


# ----------------------------------------------------------------- shared helpers
def _local(n: Node) -> str:
    """The name shown in a node's box: the part after its block (``attn``)."""
    if n.block and n.name != n.block and n.name.startswith(n.block + "."):
        return n.name[len(n.block) + 1:]
    return n.name


def _short(n: int) -> str:
    """148224 -> '148K', 5717416 -> '5.72M'."""
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            v = n / div
            return f"{v:.0f}{suffix}" if v >= 100 else f"{v:.3g}{suffix}"
    return str(n)


def _params(n: Node) -> int:
    return n.cost.params if n.cost else 0


def _shape(n: Node) -> str:
    return str(n.out) if n.out is not None else "?"


def _color(op: str) -> str:
    if op in OP_COLORS:
        return OP_COLORS[op]
    return FALLBACK_COLORS[sum(map(ord, op)) % len(FALLBACK_COLORS)]


def _is_skip(pos: dict[str, int], u: str, v: str) -> bool:
    """A skip edge is any edge but one to the very next node in execution order."""
    return pos[v] != pos[u] + 1


@dataclass
class _Group:
    """Consecutive nodes drawn together: one block (``block`` set) or a lone node."""

    block: str | None
    nodes: list[str]


@dataclass
class _Section:
    """A run of nodes in one stage (or outside any stage)."""

    stage: str | None
    groups: list[_Group]
    columns: list[int] = field(default_factory=list)
    left: float = 0.0
    width: float = 0.0
    top: float = 0.0
    cols_top: float = 0.0
    cols_bottom: float = 0.0
    bottom: float = 0.0
    wrap: bool = False     # its label takes two lines


def _sections(g: Graph) -> list[_Section]:
    """Cut the execution order into sections, and each section into groups."""
    sections: list[_Section] = []
    for n in g.nodes():
        if not sections or sections[-1].stage != n.stage:
            sections.append(_Section(n.stage, []))
        groups = sections[-1].groups
        block = n.block if n.block and n.block != n.name else None
        if block is not None and groups and groups[-1].block == block:
            groups[-1].nodes.append(n.name)
        else:
            groups.append(_Group(block, [n.name]))
    return sections


def _stage_label(g: Graph, s: _Section) -> tuple[str, str]:
    """A stage's name, and what it holds."""
    names = [m for grp in s.groups for m in grp.nodes]
    params = sum(_params(g.node(m)) for m in names)
    nblocks = len({g.node(m).block for m in names})
    return f"stage {s.stage}", f"{nblocks} block{'s' if nblocks != 1 else ''} · {_short(params)} params"


# ----------------------------------------------------------------- DOT
def _dq(s: str) -> str:
    """A DOT double-quoted string."""
    return '"' + str(s).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _dot_node(n: Node, indent: str) -> str:
    label = _dq(f"{_local(n)}\n{n.op}  {_shape(n)}")
    tip = _dq(f"{n.name}: {n.op} {_shape(n)}, {_params(n):,} params")
    return f'{indent}{_dq(n.name)} [label={label}, tooltip={tip}, fillcolor="{_color(n.op)}"];'


def to_dot(graph: Graph) -> str:
    """Graphviz DOT text: stages as clusters, blocks as nested clusters, skip edges orange.

    Render it with e.g. ``dot -Tsvg model.dot -o model.svg``.
    """
    total = graph.total()
    pos = {name: i for i, name in enumerate(graph.order)}
    title = f"{graph.name}\n{len(graph)} nodes, {total.params:,} params"
    out = [
        f"digraph {_dq(graph.name)} {{",
        f'  graph [label={_dq(title)}, labelloc=t, fontsize=16, fontname="Helvetica", '
        'rankdir=TB, nodesep=0.3, ranksep=0.3];',
        '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10, '
        'color="#6b7280", height=0.4];',
        f'  edge [color="{MAIN_COLOR}", arrowsize=0.6];',
    ]
    for si, s in enumerate(_sections(graph)):
        indent = "  "
        if s.stage is not None:
            name, detail = _stage_label(graph, s)
            out += [f"  subgraph cluster_s{si} {{",
                    f"    label={_dq(f'{name} ({detail})')}; labeljust=l;",
                    '    style="rounded,dashed"; color="#94a3b8"; fontname="Helvetica-Bold";']
            indent = "    "
        for gi, grp in enumerate(s.groups):
            if grp.block is not None:
                out += [f"{indent}subgraph cluster_s{si}_g{gi} {{",
                        f"{indent}  label={_dq(grp.block)}; labeljust=l; fontsize=10;",
                        f'{indent}  style="rounded,filled"; fillcolor="#f8fafc"; color="#cbd5e1";']
                out += [_dot_node(graph.node(m), indent + "  ") for m in grp.nodes]
                out.append(f"{indent}}}")
            else:
                out += [_dot_node(graph.node(m), indent) for m in grp.nodes]
        if s.stage is not None:
            out.append("  }")
    for u, v, d in graph.nx.edges(data=True):
        attrs = f' [color="{SKIP_COLOR}", weight=0]' if _is_skip(pos, u, v) else " [weight=10]"
        if d.get("kind", "data") != "data":
            attrs = f' [color="{SCORE_COLOR}", style=dashed, weight=0, label="{d["kind"]}", fontsize=8]' 
        out.append(f"  {_dq(u)} -> {_dq(v)}{attrs};")
    out.append("}")
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------- SVG layout
@dataclass
class _Column:
    section: int
    groups: list[_Group]
    nodes: list[str]
    lanes: int = 0
    left: float = 0.0      # left edge of its block boxes
    width: float = 0.0


@dataclass
class _Edge:
    src: str
    dst: str
    skip: bool
    kind: str              # straight | side | across | down | far
    lane_src: int = 0
    lane_dst: int = 0
    tracks: dict[str, int] = field(default_factory=dict)
    points: list[tuple[float, float]] = field(default_factory=list)
    curve: bool = False    # drawn as one cubic arc beside its column


def _text_w(s: str, size: float, bold: bool = False) -> float:
    """A generous estimate of a text's rendered width."""
    return len(s) * size * (0.64 if bold else 0.6)


def _col_height(heights: list[float]) -> float:
    return sum(heights) + GROUP_GAP * max(len(heights) - 1, 0)


def _pack(heights: list[float], cap: float) -> list[list[int]]:
    """Greedily fill columns of at most `cap` height, in order."""
    cols: list[list[int]] = []
    cur: list[int] = []
    h = 0.0
    for i, hh in enumerate(heights):
        need = hh if not cur else h + GROUP_GAP + hh
        if cur and need > cap:
            cols.append(cur)
            cur, need = [], hh
        cur.append(i)
        h = need
    if cur:
        cols.append(cur)
    return cols


def _balanced(heights: list[float], k: int) -> list[list[int]]:
    """At most k columns, as even as a contiguous split allows."""
    lo, hi = max(heights), _col_height(heights)
    if len(_pack(heights, lo)) <= k:
        return _pack(heights, lo)
    while hi - lo > 0.5:
        mid = (lo + hi) / 2
        if len(_pack(heights, mid)) <= k:
            hi = mid
        else:
            lo = mid
    return _pack(heights, hi)


def _options(heights: list[float]) -> list[tuple[float, list[list[int]]]]:
    """A section's useful splits, fewest columns first: (tallest column, split)."""
    out: list[tuple[float, list[list[int]]]] = []
    for k in range(1, min(len(heights), MAX_COLUMNS) + 1):
        split = _balanced(heights, k)
        tallest = max(_col_height([heights[i] for i in c]) for c in split)
        if not out or tallest < out[-1][0]:
            out.append((tallest, split))
    return out


def _split_all(heights: list[list[float]], col_w: float) -> list[list[list[int]]]:
    """Columns for every section (given its groups' heights): one each while the
    drawing is short, else one cap on column height for all sections, chosen to
    bring the drawing's shape nearest ASPECT."""
    if sum(_col_height(hs) + SECTION_EXTRA for hs in heights) <= MAX_ONE_COLUMN_H:
        return [[list(range(len(hs)))] for hs in heights]
    options = [_options(hs) for hs in heights]
    best: tuple[float, list[list[list[int]]]] | None = None
    for cap in sorted({t for opts in options for t, _ in opts}, reverse=True):
        chosen = [next((o for o in opts if o[0] <= cap), opts[-1]) for opts in options]
        width = max(len(split) for _, split in chosen) * col_w
        height = sum(tallest + SECTION_EXTRA for tallest, _ in chosen)
        score = abs(math.log(width / height / ASPECT))
        if best is None or score < best[0] - 1e-9:
            best = (score, [split for _, split in chosen])
    assert best is not None
    return best[1]


def _intervals(items: Iterable[tuple[object, float, float]], gap: float = 0.0) -> dict[object, int]:
    """Give each (key, lo, hi) the lowest slot free of overlapping intervals, in the order given."""
    placed: list[tuple[float, float, int]] = []
    out: dict[object, int] = {}
    for key, a, b in items:
        a, b = min(a, b), max(a, b)
        busy = {t for c, d, t in placed if a < d + gap and c < b + gap}
        t = 0
        while t in busy:
            t += 1
        placed.append((a, b, t))
        out[key] = t
    return out


class _Layout:
    """Positions of every box and the route of every edge of one graph."""

    def __init__(self, g: Graph):
        self.g = g
        self.pos = {name: i for i, name in enumerate(g.order)}
        self.node_w = self._node_width()
        self.sections = _sections(g)
        self.columns: list[_Column] = []
        self.where: dict[str, tuple[int, int]] = {}   # node -> (column, row)
        self.boxes: dict[str, tuple[float, float]] = {}  # node -> (x, y) of its box
        self.blocks: list[tuple[str, float, float, float, float]] = []
        self._make_columns()
        self.edges = [self._classify(u, v) for u, v in g.nx.edges()]
        self._assign_lanes()
        self.rail_x0 = 0.0
        self._layout_x()
        self._assign_tracks()
        self._layout_y()
        slots = self._side_slots()
        for i, e in enumerate(self.edges):
            self._route(i, e, slots)

    # -- sizes ---------------------------------------------------------------
    def _node_width(self) -> float:
        w = NODE_MIN_W
        for n in self.g.nodes():
            w = max(w, _text_w(_local(n), 12, True) + _text_w(_short(_params(n)), 10) + 30,
                    _text_w(f"{n.op} · {_shape(n)}", 10.5) + 20)
        return min(w, NODE_MAX_W)

    def _group_height(self, grp: _Group) -> float:
        k = len(grp.nodes)
        body = k * NODE_H + (k - 1) * NODE_GAP
        return BLOCK_HEAD + body + BLOCK_PAD if grp.block is not None else body

    # -- columns -------------------------------------------------------------
    def _make_columns(self) -> None:
        col_w = self.node_w + 2 * SIDE + LANE0 + GUT_MIN
        heights = [[self._group_height(grp) for grp in s.groups] for s in self.sections]
        for si, (s, split) in enumerate(zip(self.sections, _split_all(heights, col_w))):
            for idx in split:
                groups = [s.groups[i] for i in idx]
                nodes = [m for grp in groups for m in grp.nodes]
                ci = len(self.columns)
                self.columns.append(_Column(si, groups, nodes))
                s.columns.append(ci)
                for row, m in enumerate(nodes):
                    self.where[m] = (ci, row)

    def _classify(self, u: str, v: str) -> _Edge:
        skip = _is_skip(self.pos, u, v)
        cu, cv = self.where[u][0], self.where[v][0]
        su, sv = self.columns[cu].section, self.columns[cv].section
        if cu == cv:
            kind = "side" if skip else "straight"
        elif su == sv:
            kind = "across"
        else:
            kind = "down" if sv == su + 1 else "far"
        return _Edge(u, v, skip, kind)

    def _assign_lanes(self) -> None:
        """Skip edges run in lanes right of the boxes; nested ones further out."""
        inf = float(len(self.g) + 1)
        per_col: dict[int, list[tuple[object, float, float]]] = {}
        for i, e in enumerate(self.edges):
            if not e.skip:
                continue
            (cu, ru), (cv, rv) = self.where[e.src], self.where[e.dst]
            if e.kind == "side":
                per_col.setdefault(cu, []).append(((i, "both"), ru, rv))
            else:
                per_col.setdefault(cu, []).append(((i, "src"), ru, inf))
                per_col.setdefault(cv, []).append(((i, "dst"), -1.0, rv))
        for ci, items in per_col.items():
            items.sort(key=lambda t: (t[2] - t[1], t[1]))
            lanes = _intervals(((k, a + 0.01, b - 0.01) for k, a, b in items))
            for (i, end), lane in lanes.items():
                e = self.edges[i]
                if end in ("src", "both"):
                    e.lane_src = lane
                if end in ("dst", "both"):
                    e.lane_dst = lane
            self.columns[ci].lanes = max(lanes.values()) + 1
        for s in self.sections:  # equal widths within a section
            lanes = max(self.columns[ci].lanes for ci in s.columns)
            for ci in s.columns:
                self.columns[ci].lanes = lanes

    # -- x ---------------------------------------------------------------------
    def box_x(self, ci: int) -> float:
        return self.columns[ci].left + SIDE

    def cx(self, ci: int) -> float:
        return self.box_x(ci) + self.node_w / 2

    def lane_x(self, ci: int, lane: int) -> float:
        return self.box_x(ci) + self.node_w + LANE0 + lane * LANE_STEP

    def gutter_x(self, ci: int, track: int) -> float:
        return self.columns[ci].left - GUT_PAD - track * TRACK

    def rail_x(self, track: int) -> float:
        return self.rail_x0 + track * TRACK

    def _layout_x(self) -> None:
        """Gutter and rail tracks, then every column's and section's x."""
        gutters = self._assign_gutters()
        for c in self.columns:
            lanes = LANE0 + (c.lanes - 1) * LANE_STEP if c.lanes else 0
            c.width = SIDE + self.node_w + lanes + SIDE
        for s in self.sections:  # local coordinates first
            pad = STAGE_PAD if s.stage is not None else 0.0
            x = pad
            for j, ci in enumerate(s.columns):
                if j:
                    x += max(GUT_MIN, 2 * GUT_PAD + (gutters.get(ci, 0) - 1) * TRACK)
                self.columns[ci].left = x
                x += self.columns[ci].width
            s.width = x + pad
            if s.stage is not None:
                self._fit_stage_label(s)
        self._align_sections()
        right = max(s.left + s.width for s in self.sections)
        self.rail_x0 = right + GUT_PAD
        rails = sum(1 for e in self.edges if e.kind == "far")
        self.width = right + (GUT_PAD + rails * TRACK if rails else 0.0) + MARGIN

    def _assign_gutters(self) -> dict[int, int]:
        """Tracks in the gutter left of each column (the main flow nearest the
        column) and on the rail right of everything; returns tracks per gutter."""
        gutters: dict[int, list[int]] = {}
        rail = 0
        for i, e in enumerate(self.edges):
            if e.kind == "across":
                gutters.setdefault(self.where[e.dst][0], []).append(i)
            elif e.kind == "far":
                e.tracks["rail"] = rail
                rail += 1
        for idx in gutters.values():
            idx.sort(key=lambda i: (self.edges[i].skip, self.pos[self.edges[i].src]))
            for t, i in enumerate(idx):
                self.edges[i].tracks["gutter"] = t
        return {ci: len(idx) for ci, idx in gutters.items()}

    def _fit_stage_label(self, s: _Section) -> None:
        """Widen a stage's cluster to hold its label, on two lines if one is too long."""
        name, detail = _stage_label(self.g, s)
        name_w, detail_w = _text_w(name, 13, True), _text_w(detail, 11.5)
        one_line = name_w + _text_w(" · ", 11.5) + detail_w + 28
        s.wrap = one_line > s.width
        if s.wrap:
            s.width = max(s.width, max(name_w, detail_w) + 28)

    def _align_sections(self) -> None:
        """Line the flow up between sections: a one-column section continues the
        column it follows from (or leads into); two many-column ones align left."""
        for prev, cur in zip(self.sections, self.sections[1:]):
            if len(prev.columns) > 1 and len(cur.columns) > 1:
                shift = prev.left - cur.left
            else:
                shift = self.cx(prev.columns[-1]) - self.cx(cur.columns[0])
            cur.left += shift
            for ci in cur.columns:
                self.columns[ci].left += shift
        dx = MARGIN - min(s.left for s in self.sections)
        for s in self.sections:
            s.left += dx
            for ci in s.columns:
                self.columns[ci].left += dx

    # -- channels --------------------------------------------------------------
    def exit_x(self, e: _Edge) -> float:
        c = self.where[e.src][0]
        return self.lane_x(c, e.lane_src) if e.skip else self.cx(c)

    def entry_x(self, e: _Edge) -> float:
        c = self.where[e.dst][0]
        return self.lane_x(c, e.lane_dst) if e.skip else self.cx(c)

    def _assign_tracks(self) -> None:
        """Parallel horizontal runs above/below columns and between sections get
        distinct tracks wherever they would overlap."""
        chans: dict[tuple[str, int], list[tuple[tuple[int, str], float, float, bool]]] = {}

        def add(chan: tuple[str, int], i: int, role: str, a: float, b: float) -> None:
            chans.setdefault(chan, []).append(((i, role), a, b, self.edges[i].skip))

        for i, e in enumerate(self.edges):
            su = self.columns[self.where[e.src][0]].section
            sv = self.columns[self.where[e.dst][0]].section
            if e.kind == "across":
                xg = self.gutter_x(self.where[e.dst][0], e.tracks["gutter"])
                add(("bot", su), i, "bot", self.exit_x(e), xg)
                add(("top", su), i, "top", xg, self.entry_x(e))
            elif e.kind == "down":
                add(("gap", su), i, "gap", self.exit_x(e), self.entry_x(e))
            elif e.kind == "far":
                xr = self.rail_x(e.tracks["rail"])
                add(("gap", su), i, "gap", self.exit_x(e), xr)
                add(("gap", sv - 1), i, "gap2", self.entry_x(e), xr)
        self.n_tracks: dict[tuple[str, int], int] = {}
        for chan, items in chans.items():
            # below the columns skip edges run inside the main flow, elsewhere outside
            items.sort(key=lambda t: (t[3] != (chan[0] == "bot"), self.pos[self.edges[t[0][0]].src]))
            tracks = _intervals(((k, a, b) for k, a, b, _ in items), gap=4.0)
            for (i, role), t in tracks.items():
                self.edges[i].tracks[role] = t
            self.n_tracks[chan] = max(tracks.values()) + 1

    def _chan_h(self, kind: str, si: int) -> float:
        n = self.n_tracks.get((kind, si), 0)
        return 2 * CH_PAD + (n - 1) * TRACK if n else 0.0

    # -- y ---------------------------------------------------------------------
    def _layout_y(self) -> None:
        y = MARGIN + TITLE_H
        for si, s in enumerate(self.sections):
            staged = s.stage is not None
            s.top = y
            head = (STAGE_HEAD + (STAGE_LINE if s.wrap else 0.0)) if staged else 0.0
            s.cols_top = y + head + self._chan_h("top", si)
            s.cols_bottom = s.cols_top + max(self._place_column(ci, s.cols_top) for ci in s.columns)
            s.bottom = s.cols_bottom + self._chan_h("bot", si) + (STAGE_PAD if staged else 0.0)
            y = s.bottom + (max(GAP_MIN, self._chan_h("gap", si)) if si + 1 < len(self.sections) else 0.0)
        self.height = y + MARGIN

    def _place_column(self, ci: int, top: float) -> float:
        """Stack a column's groups from `top`; returns the column's height."""
        c = self.columns[ci]
        x, y = self.box_x(ci), top
        prev: _Group | None = None
        for grp in c.groups:
            if prev is not None:
                y += GROUP_GAP if (prev.block and grp.block) else NODE_GAP
            start = y
            if grp.block is not None:
                y += BLOCK_HEAD
            for k, m in enumerate(grp.nodes):
                y += NODE_GAP if k else 0.0
                self.boxes[m] = (x, y)
                y += NODE_H
            if grp.block is not None:
                y += BLOCK_PAD
                self.blocks.append((grp.block, c.left, start, c.width, y - start))
            prev = grp
        return y - top

    # -- routes ----------------------------------------------------------------
    def _side_slots(self) -> dict[tuple[int, str], float]:
        """Where skip edges meet a box's right side: incoming above the middle
        (outer lanes lower), outgoing below it (outer lanes higher)."""
        ins: dict[str, list[int]] = {}
        outs: dict[str, list[int]] = {}
        for i, e in enumerate(self.edges):
            if e.skip:
                ins.setdefault(e.dst, []).append(i)
                outs.setdefault(e.src, []).append(i)
        ys: dict[tuple[int, str], float] = {}
        for m, idx in ins.items():
            idx.sort(key=lambda i: self.edges[i].lane_dst)
            step = min(8.0, (NODE_H / 2 - 8) / max(len(idx) - 1, 1))
            cy = self.boxes[m][1] + NODE_H / 2
            for k, i in enumerate(idx):
                ys[(i, "in")] = cy - 5 - step * (len(idx) - 1 - k)
        for m, idx in outs.items():
            idx.sort(key=lambda i: -self.edges[i].lane_src)
            step = min(8.0, (NODE_H / 2 - 8) / max(len(idx) - 1, 1))
            cy = self.boxes[m][1] + NODE_H / 2
            for k, i in enumerate(idx):
                ys[(i, "out")] = cy + 5 + step * k
        return ys

    def _route(self, i: int, e: _Edge, slots: dict[tuple[int, str], float]) -> None:
        """The points an edge passes through (`e.curve`: a side arc instead)."""
        (cu, _), (cv, _) = self.where[e.src], self.where[e.dst]
        (ux, uy), (vx, vy) = self.boxes[e.src], self.boxes[e.dst]
        right = self.node_w
        if e.skip:
            y0, y1 = slots[(i, "out")], slots[(i, "in")]
            x0, x1 = self.lane_x(cu, e.lane_src), self.lane_x(cv, e.lane_dst)
            start = [(ux + right, y0), (x0, y0)]
            end = [(x1, y1), (vx + right, y1)]
        else:
            x0, x1 = self.cx(cu), self.cx(cv)
            start, end = [(x0, uy + NODE_H)], [(x1, vy)]
        su, sv = self.columns[cu].section, self.columns[cv].section
        t = e.tracks
        if e.kind == "side":
            e.curve = True
            mid: list[tuple[float, float]] = []
        elif e.kind == "across":
            yb = self.sections[su].cols_bottom + CH_PAD + t["bot"] * TRACK
            yt = self.sections[su].cols_top - CH_PAD - t["top"] * TRACK
            xg = self.gutter_x(cv, t["gutter"])
            mid = [(x0, yb), (xg, yb), (xg, yt), (x1, yt)]
        elif e.kind == "down":
            yg = self.sections[su].bottom + CH_PAD + t["gap"] * TRACK
            mid = [(x0, yg), (x1, yg)]
        elif e.kind == "far":
            ya = self.sections[su].bottom + CH_PAD + t["gap"] * TRACK
            yb = self.sections[sv - 1].bottom + CH_PAD + t["gap2"] * TRACK
            xr = self.rail_x(t["rail"])
            mid = [(x0, ya), (xr, ya), (xr, yb), (x1, yb)]
        else:
            mid = []
        e.points = start + mid + end


# ----------------------------------------------------------------- SVG drawing
def _xml_char(ch: str) -> bool:
    """Whether XML 1.0 allows this character at all."""
    o = ord(ch)
    return ch in "\t\n\r" or 0x20 <= o < 0xD800 or 0xE000 <= o <= 0xFFFD or o >= 0x10000


def _esc(s: object) -> str:
    """Text safe inside an XML element or a double-quoted attribute."""
    s = "".join(ch for ch in str(s) if _xml_char(ch))
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def _n(x: float) -> str:
    """A coordinate, briefly."""
    return f"{x:.1f}".rstrip("0").rstrip(".")


def _simplify(pts: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Drop repeated points and points in the middle of a straight run."""
    out: list[tuple[float, float]] = []
    for p in pts:
        if out and abs(p[0] - out[-1][0]) < 0.01 and abs(p[1] - out[-1][1]) < 0.01:
            continue
        if len(out) >= 2:
            (ax, ay), (bx, by) = out[-2], out[-1]
            if abs((bx - ax) * (p[1] - by) - (by - ay) * (p[0] - bx)) < 0.01:
                out[-1] = p
                continue
        out.append(p)
    return out


def _rounded_path(pts: list[tuple[float, float]], radius: float) -> str:
    """SVG path data through `pts` with rounded corners."""
    pts = _simplify(pts)
    d = [f"M{_n(pts[0][0])},{_n(pts[0][1])}"]
    for k in range(1, len(pts) - 1):
        (ax, ay), (bx, by), (cx, cy) = pts[k - 1], pts[k], pts[k + 1]
        l1, l2 = math.hypot(bx - ax, by - ay), math.hypot(cx - bx, cy - by)
        r = min(radius, l1 if k == 1 else l1 / 2, l2 if k == len(pts) - 2 else l2 / 2)
        px, py = bx - (bx - ax) / l1 * r, by - (by - ay) / l1 * r
        qx, qy = bx + (cx - bx) / l2 * r, by + (cy - by) / l2 * r
        d.append(f"L{_n(px)},{_n(py)} Q{_n(bx)},{_n(by)} {_n(qx)},{_n(qy)}")
    d.append(f"L{_n(pts[-1][0])},{_n(pts[-1][1])}")
    return " ".join(d)


def _arc_path(pts: list[tuple[float, float]]) -> str:
    """A side edge within a column: one cubic arc reaching out to its lane."""
    (x0, y0), (lane, _), (_, y1), (x1, _) = pts
    k = (lane - x0) / 0.75
    return f"M{_n(x0)},{_n(y0)} C{_n(x0 + k)},{_n(y0)} {_n(x1 + k)},{_n(y1)} {_n(x1)},{_n(y1)}"


def _svg_head(lay: _Layout, width: float, height: float) -> list[str]:
    """The document start: arrowheads, styles, title, totals and a legend."""
    g = lay.g
    total = g.total()
    arrow = ('<marker id="{id}" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" '
             'markerHeight="7" orient="auto"><path d="M0,1 L10,5 L0,9 z" fill="{c}"/></marker>')
    ly = MARGIN + 62  # the legend's baseline
    line = 'fill="none" stroke="{c}" stroke-width="1.4"'
    return [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_n(width)}" height="{_n(height)}" '
        f'viewBox="0 0 {_n(width)} {_n(height)}" font-family="{_esc(FONT)}">',
        f"<title>{_esc(g.name)}</title>",
        "<defs>" + arrow.format(id="arrow", c=MAIN_COLOR) + arrow.format(id="arrow-skip", c=SKIP_COLOR)
        + arrow.format(id="arrow-score", c=SCORE_COLOR) + "</defs>",
        "<style>"
        ".stage{fill:#f4f7fb;stroke:#94a3b8;stroke-dasharray:5 3}"
        ".stage-label{font-size:13px;font-weight:bold;fill:#334155;"
        "stroke:#f4f7fb;stroke-width:5px;stroke-linejoin:round;paint-order:stroke}"
        ".stage-label .detail{font-size:11.5px;font-weight:normal;fill:#475569}"
        ".block{fill:#ffffff;stroke:#cbd5e1}"
        ".block-label{font-size:10.5px;fill:#64748b;"
        "stroke:#ffffff;stroke-width:4px;stroke-linejoin:round;paint-order:stroke}"
        ".node>rect{stroke:#6b7280;stroke-width:1}"
        ".node .name{font-size:12px;font-weight:bold;fill:#111827}"
        ".node .sub{font-size:10.5px;fill:#4b5563}"
        ".node .params{font-size:10px;fill:#6b7280}"
        f".edge{{fill:none;stroke:{MAIN_COLOR};stroke-width:1.4}}"
        f".edge.skip{{stroke:{SKIP_COLOR};stroke-width:1.4}}"
        f".edge.scores{{stroke:{SCORE_COLOR};stroke-dasharray:6 3}}"
        f".edge.alpha{{stroke:{SCORE_COLOR};stroke-dasharray:2 3;stroke-opacity:.6}}"
        ".legend{font-size:11px;fill:#4b5563}"
        "</style>",
        '<rect width="100%" height="100%" fill="#ffffff"/>',
        f'<text x="{MARGIN}" y="{MARGIN + 20}" font-size="20" font-weight="bold" fill="#111827">{_esc(g.name)}</text>',
        f'<text x="{MARGIN}" y="{MARGIN + 40}" font-size="12.5" fill="#4b5563">'
        f"{len(g)} nodes · {total.params:,} params ({_short(total.params)}) · {_short(total.macs)} MACs</text>",
        f'<g class="legend"><path d="M{MARGIN},{ly - 4} h26" {line.format(c=MAIN_COLOR)} marker-end="url(#arrow)"/>'
        f'<text x="{MARGIN + 32}" y="{ly}">main flow</text>'
        f'<path d="M{MARGIN + 110},{ly - 4} h26" {line.format(c=SKIP_COLOR)} marker-end="url(#arrow-skip)"/>'
        f'<text x="{MARGIN + 142}" y="{ly}">skip / residual</text>'
        + (f'<path d="M{MARGIN + 250},{ly - 4} h26" {line.format(c=SCORE_COLOR)} stroke-dasharray="6 3" '
           f'marker-end="url(#arrow-score)"/><text x="{MARGIN + 282}" y="{ly}">attention scores</text>'
           if any(d.get("kind", "data") == "scores" for _, _, d in g.nx.edges(data=True)) else "")
        + "</g>",
    ]


def _svg_clusters(lay: _Layout) -> list[str]:
    """Stage clusters and block sub-boxes (their labels come later, over the edges)."""
    out = []
    for s in lay.sections:
        if s.stage is not None:
            out.append(f'<rect class="stage" data-stage="{_esc(s.stage)}" x="{_n(s.left)}" y="{_n(s.top)}" '
                       f'width="{_n(s.width)}" height="{_n(s.bottom - s.top)}" rx="12"/>')
    for name, x, y, w, h in lay.blocks:
        out.append(f'<rect class="block" data-block="{_esc(name)}" x="{_n(x)}" y="{_n(y)}" '
                   f'width="{_n(w)}" height="{_n(h)}" rx="8"/>')
    return out


def _svg_labels(lay: _Layout) -> list[str]:
    """Stage and block labels, haloed so that edges passing under them stay legible."""
    out = []
    for s in lay.sections:
        if s.stage is not None:
            name, detail = _stage_label(lay.g, s)
            x, y = s.left + 14, s.top + 20
            if s.wrap:
                second = f'<tspan class="detail" x="{_n(x)}" y="{_n(y + STAGE_LINE)}">{_esc(detail)}</tspan>'
            else:
                second = f'<tspan class="detail" dx="6">· {_esc(detail)}</tspan>'
            out.append(f'<text class="stage-label" x="{_n(x)}" y="{_n(y)}">{_esc(name)}{second}</text>')
    params: dict[str, int] = {}
    for n in lay.g.nodes():
        if n.block:
            params[n.block] = params.get(n.block, 0) + _params(n)
    for name, x, y, w, h in lay.blocks:
        out.append(f'<text class="block-label" x="{_n(x + 8)}" y="{_n(y + 14)}">'
                   f"{_esc(_fit(name, 10.5, False, lay.node_w - 40))}</text>")
        if params.get(name):
            px = x + SIDE + lay.node_w - 8  # above the nodes' parameter counts
            out.append(f'<text class="block-label" x="{_n(px)}" y="{_n(y + 14)}" text-anchor="end">'
                       f"{_short(params[name])}</text>")
    return out


def _svg_edges(lay: _Layout) -> list[str]:
    """One path per graph edge, with its ends in data-src / data-dst."""
    out = []
    for e in sorted(lay.edges, key=lambda e: not e.skip):  # main flow drawn on top
        if e.curve:
            d = _arc_path(e.points)
        else:
            d = _rounded_path(e.points, 14 if e.skip else 8)
        kind = lay.g.nx.edges[e.src, e.dst].get("kind", "data")
        cls, marker = ("edge skip", "arrow-skip") if e.skip else ("edge", "arrow")
        if kind != "data":  # attention scores (ReViT) and shared parameters
            cls, marker = f"edge skip {kind}", "arrow-score"
        out.append(f'<path class="{cls}" data-src="{_esc(e.src)}" data-dst="{_esc(e.dst)}" '
                   f'd="{d}" marker-end="url(#{marker})"><title>{_esc(e.src)} → {_esc(e.dst)}</title></path>')
    return out


def _fit(s: str, size: float, bold: bool, room: float) -> str:
    """Shorten `s` with an ellipsis until its estimated width fits `room`."""
    if _text_w(s, size, bold) <= room:
        return s
    keep = max(1, int(room / (size * (0.64 if bold else 0.6))) - 1)
    return s[:keep] + "…"


def _svg_node(lay: _Layout, n: Node) -> str:
    """A node's box: local name, parameter count, op and output shape; full facts in its tooltip."""
    x, y = lay.boxes[n.name]
    w = lay.node_w
    p = _params(n)
    ptxt = _short(p) if p else ""
    name = _fit(_local(n), 12, True, w - 22 - _text_w(ptxt, 10))
    sub = _fit(f"{n.op} · {_shape(n)}", 10.5, False, w - 16)
    c = n.cost
    tip = f"{n.name}\n{n.op} → {_shape(n)}\n{p:,} params" + (f" · {c.macs:,} MACs" if c else "")
    parts = [
        f'<g class="node" data-name="{_esc(n.name)}" data-op="{_esc(n.op)}">',
        f"<title>{_esc(tip)}</title>",
        f'<rect x="{_n(x)}" y="{_n(y)}" width="{_n(w)}" height="{NODE_H}" rx="7" fill="{_color(n.op)}"/>',
        f'<text class="name" x="{_n(x + 9)}" y="{_n(y + 16)}">{_esc(name)}</text>',
        f'<text class="sub" x="{_n(x + 9)}" y="{_n(y + 31)}">{_esc(sub)}</text>',
    ]
    if ptxt:
        parts.append(f'<text class="params" x="{_n(x + w - 8)}" y="{_n(y + 16)}" text-anchor="end">{_esc(ptxt)}</text>')
    parts.append("</g>")
    return "".join(parts)


def to_svg(graph: Graph) -> str:
    """A standalone SVG picture of the graph, laid out without Graphviz.

    Stages are labelled clusters, blocks light sub-boxes, nodes rounded boxes with
    their (local) name, op kind, output shape and parameter count; skip/residual
    edges are orange and run beside the main flow.
    """
    lay = _Layout(graph)
    title_w = MARGIN + max(_text_w(graph.name, 20, True), 420.0) + MARGIN
    width = max(lay.width, title_w)
    lines = _svg_head(lay, width, lay.height)
    lines += _svg_clusters(lay)
    lines += _svg_edges(lay)
    lines += _svg_labels(lay)
    lines += [_svg_node(lay, n) for n in graph.nodes()]
    lines.append("</svg>")
    return "\n".join(lines) + "\n"
