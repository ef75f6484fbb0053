"""AST -> Graph: resolve imports, `extends` and variables, repeat stages, expand
composite ops, and wire data flow.  Shape inference and the other passes run after.
"""
from __future__ import annotations

import os
from typing import Any, Literal

import networkx as nx
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from . import ast as A
from .errors import Span, SpecError, did_you_mean
from .graph import Graph, Node, Stmt
from .ops.base import Attrs, OpDef, get_op, validate_attrs, REGISTRY
from .values import CallValue, evaluate

MAX_DEPTH = 4096
MAX_NODES = 200_000
RESERVED = {"from"}  # keys every op statement accepts besides its schema


class StageAttrs(BaseModel):
    """`stage NAME depth=N [dim=C] [downsample=merge]`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    depth: int = Field(1, ge=1, le=MAX_DEPTH)
    dim: int | None = Field(None, ge=1)  # width after the downsample (merge: default 2x)
    downsample: Literal["none", "merge"] = "none"


# ------------------------------------------------------------------ templates
def _models(spec: A.SpecFile, base_dir: str, seen: set[str]) -> tuple[dict[str, A.ModelDef], list[A.LetStmt]]:
    """All model/template definitions visible in a file (imports first) and file-level lets."""
    models: dict[str, A.ModelDef] = {}
    lets: list[A.LetStmt] = []
    from .syntax import parse

    for item in spec.items:
        if isinstance(item, A.ImportStmt):
            path = os.path.normpath(os.path.join(base_dir, item.path))
            if path in seen:
                raise SpecError(f"import cycle through '{item.path}'", item.span)
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError as e:
                raise SpecError(f"cannot import '{item.path}': {e.strerror}", item.span) from None
            sub = parse(data, path)
            sub_models, sub_lets = _models(sub, os.path.dirname(path), seen | {path})
            models.update(sub_models)
            lets += sub_lets
        elif isinstance(item, A.LetStmt):
            lets.append(item)
        else:
            if item.name in models and models[item.name].span.file == item.span.file:
                raise SpecError(f"duplicate model name '{item.name}'", item.span)
            models[item.name] = item
    return models, lets


def _stmt_key(s: A.Stmt) -> str | None:
    """The name by which a child's statement overrides its parent's."""
    if isinstance(s, A.LetStmt):
        return "let " + s.name
    if isinstance(s, A.OpStmt):
        if s.label:
            return s.label
        op = REGISTRY.get(s.op)
        return (op.default_name if op and op.default_name else s.op)
    if isinstance(s, (A.StageStmt, A.ShortcutStmt)):
        return s.name
    if isinstance(s, A.BitsBlock):
        return "bits"
    return None


def _flatten_extends(model: A.ModelDef, models: dict[str, A.ModelDef], chain: tuple[str, ...] = ()) -> list[A.Stmt]:
    """A model's body with its `extends` chain applied: the child's lets, stages and
    labelled statements replace the parent's of the same name; the rest is appended."""
    if not model.extends:
        return list(model.body)
    if model.extends in chain + (model.name,):
        raise SpecError(f"'{model.name}' extends itself through {' -> '.join(chain + (model.name, model.extends))}", model.extends_span)
    if model.extends not in models:
        raise SpecError(f"unknown model or template '{model.extends}'{did_you_mean(model.extends, set(models))}", model.extends_span)
    body = _flatten_extends(models[model.extends], models, chain + (model.name,))
    index = {_stmt_key(s): i for i, s in enumerate(body)}
    for s in model.body:
        k = _stmt_key(s)
        if k is not None and k in index:
            body[index[k]] = s
        else:
            body.append(s)
    return body


def select_model(spec: A.SpecFile, name: str | None = None) -> tuple[A.ModelDef, dict[str, A.ModelDef], list[A.LetStmt]]:
    base_dir = os.path.dirname(os.path.abspath(spec.filename)) if spec.filename and not spec.filename.startswith("<") else os.getcwd()
    models, lets = _models(spec, base_dir, {os.path.abspath(spec.filename)})
    own = [m for m in spec.items if isinstance(m, A.ModelDef) and not m.template]
    if name is not None:
        if name not in models:
            raise SpecError(f"no model named '{name}'{did_you_mean(name, set(models))}")
        return models[name], models, lets
    if not own:
        raise SpecError("no 'model' in this file (templates are not built by themselves)",
                        next((m.span for m in spec.items if isinstance(m, A.ModelDef)), Span()))
    if len(own) > 1:
        raise SpecError(f"{len(own)} models in one file; keep one 'model' and make the others 'template'", own[1].span)
    return own[0], models, lets


# ------------------------------------------------------------------ resolution
def resolve_program(spec: A.SpecFile, name: str | None = None) -> tuple[str, list[Stmt]]:
    """Evaluate variables and templates into a list of resolved statements."""
    model, models, file_lets = select_model(spec, name)
    env: dict[str, Any] = {}
    body = _flatten_extends(model, models)
    # Lets are visible everywhere in the model (a child may override a let that the
    # parent uses above it), so evaluate them first, in order.
    for let in file_lets + [s for s in body if isinstance(s, A.LetStmt)]:
        env[let.name] = evaluate(let.value, env)
    return model.name, _resolve_body([s for s in body if not isinstance(s, A.LetStmt)], env, None)


def _resolve_body(body: list[A.Stmt], env: dict[str, Any], stage: str | None) -> list[Stmt]:
    out: list[Stmt] = []
    for s in body:
        if isinstance(s, A.LetStmt):
            env = {**env, s.name: evaluate(s.value, env)}
        elif isinstance(s, A.OpStmt):
            out.append(_resolve_op(s, env, stage))
        elif isinstance(s, A.StageStmt):
            if stage is not None:
                raise SpecError("stages cannot nest; put the blocks in one stage", s.span)
            vals, spans = {}, {}
            for a in s.args:
                if a.key is None:
                    raise SpecError(f"stage arguments are key=value, e.g. depth=12; got {a.value.model_dump().get('value', '?')!r}", a.span)
                vals[a.key], spans[a.key] = evaluate(a.value, env), a.span
            attrs = _validate_stage(vals, spans, s.span)
            st = Stmt(kind="stage", name=s.name, attrs=attrs.model_dump(exclude_defaults=True) | {"depth": attrs.depth}, span=s.span)
            st.__dict__["_spans"] = spans
            st.body = _resolve_body(s.body, dict(env), s.name)
            if not st.body:
                raise SpecError(f"stage '{s.name}' is empty", s.span)
            out.append(st)
        elif isinstance(s, A.BitsBlock):
            if stage is not None:
                raise SpecError("a bits section belongs at model level, not inside a stage", s.span)
            if any(st.kind == "bits" for st in out):
                raise SpecError("a model has one bits section", s.span)
            st = Stmt(kind="bits", name="bits", attrs={"rules": [(r.selector, r.spec) for r in s.rules]}, span=s.span)
            st.__dict__["_rule_spans"] = [(r.span, _spec_span(r)) for r in s.rules]
            out.append(st)
        elif isinstance(s, A.ShortcutStmt):
            if stage is not None:
                raise SpecError("a shortcut belongs at model level, not inside a stage", s.span)
            out.append(_resolve_shortcut(s, env))
    return out


def _spec_span(r: A.BitsRule) -> Span:
    """The span of the width word (`w4a8`) in a bits rule: the end of the rule."""
    end = r.span.end_column or (r.span.column + len(r.selector) + 1 + len(r.spec))
    return Span(line=r.span.end_line or r.span.line, column=end - len(r.spec), end_line=r.span.end_line,
                end_column=end, file=r.span.file)


class ShortcutAttrs(BaseModel):
    """`shortcut NAME from A -> 128, B -> 160 [act=silu] [norm=bn] [pool=mean] into NODE`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    act: Literal["silu", "relu", "gelu", "none"] = "silu"
    norm: Literal["bn", "none"] = "bn"
    pool: Literal["mean"] = "mean"


def _resolve_shortcut(s: A.ShortcutStmt, env: dict[str, Any]) -> Stmt:
    vals, spans = {}, {}
    for a in s.args:
        if a.key is None:
            raise SpecError("shortcut options are key=value, e.g. act=silu", a.span)
        vals[a.key], spans[a.key] = evaluate(a.value, env), a.span
    for k in vals:
        if k not in ShortcutAttrs.model_fields:
            raise SpecError(f"unknown shortcut attribute '{k}'{did_you_mean(k, set(ShortcutAttrs.model_fields))}", spans[k])
    try:
        attrs = ShortcutAttrs.model_validate(vals)
    except ValidationError as e:
        err = e.errors()[0]
        f = str(err["loc"][0])
        raise SpecError(f"invalid value {vals.get(f)!r} for '{f}' of shortcut: {err['msg'][0].lower()}{err['msg'][1:]}", spans.get(f, s.span)) from None
    if s.into is None:
        raise SpecError("a shortcut needs a destination: `... into head`", s.span)
    taps = []
    for t in s.taps:
        w = evaluate(t.width, env)
        if not isinstance(w, int) or isinstance(w, bool) or w < 1:
            raise SpecError(f"a tap's width must be a positive integer, got {w!r}", t.width.span)
        taps.append((t.ref.dotted, w))
    st = Stmt(kind="shortcut", name=s.name, attrs={"taps": taps, "into": s.into.dotted, **attrs.model_dump()}, span=s.span)
    st.__dict__["_tap_spans"] = [t.span for t in s.taps]
    st.__dict__["_into_span"] = s.into.span
    return st


def _validate_stage(vals: dict[str, Any], spans: dict[str, Span], where: Span) -> StageAttrs:
    for k in vals:
        if k not in StageAttrs.model_fields:
            raise SpecError(f"unknown stage attribute '{k}'{did_you_mean(k, set(StageAttrs.model_fields))}", spans[k])
    try:
        return StageAttrs.model_validate(vals)
    except ValidationError as e:
        err = e.errors()[0]
        f = str(err["loc"][0])
        raise SpecError(f"invalid value {vals.get(f)!r} for '{f}' of stage: {err['msg'][0].lower()}{err['msg'][1:]}", spans.get(f, where)) from None


def _resolve_op(s: A.OpStmt, env: dict[str, Any], stage: str | None) -> Stmt:
    op = get_op(s.op, s.op_span)
    if s.label and stage is not None:
        raise SpecError(f"statements inside stage '{stage}' are named {stage}.0, {stage}.1, ...; drop the label '{s.label}'", s.span)
    values: dict[str, Any] = {}
    spans: dict[str, Span] = {}
    inputs: list[str] | None = None
    input_span = None
    pos = list(op.positional)
    bool_fields = {k for k, f in op.Attrs.model_fields.items() if f.annotation is bool}
    for a in s.args:
        v = evaluate(a.value, env)
        if a.key is None:
            if isinstance(a.value, A.Ref) and isinstance(v, str) and v in bool_fields and v not in values:
                key, v = v, True
            elif isinstance(v, CallValue) and v.name in op.Attrs.model_fields:
                key = v.name  # `residual(alpha=0.5)` fills the attribute `residual`
            elif isinstance(a.value, A.Ref) and v in op.word_fields and v not in values:
                key = v  # a bare `residual` means residual(...) with its defaults
            elif pos:
                key = pos.pop(0)
            else:
                word = v if isinstance(v, str) else v.name if isinstance(v, CallValue) else None
                if word in values:
                    raise SpecError(f"'{word}' given twice", a.span)
                hint = did_you_mean(word, set(op.Attrs.model_fields)) if word else ""
                what = f"attribute '{word}'" if word else f"value {a.value.model_dump().get('value', '')!r}"
                raise SpecError(f"unknown {what} for {op.kind}{hint}", a.span)
        else:
            key = a.key
        if key in values or (key == "from" and inputs is not None):
            raise SpecError(f"'{key}' given twice", a.span)
        if key == "from":
            refs = v if isinstance(v, tuple) else (v,)
            if not all(isinstance(r, str) for r in refs):
                raise SpecError("from= takes node names, e.g. from=blocks.3 or from=(a, b)", a.span)
            inputs, input_span = list(refs), a.span
            continue
        values[key], spans[key] = v, a.span
    attrs = validate_attrs(op, values, spans, s.span)
    st = Stmt(kind="op", name=s.label or "", label=s.label, op=op.kind, attrs=attrs, inputs=inputs, span=s.span)
    st.__dict__["_spans"] = spans  # attribute spans, for diagnostics after expansion
    st.__dict__["_input_span"] = input_span
    return st


# ------------------------------------------------------------------ nodes
def _node(**fields: Any) -> Node:
    """A Node from trusted values (validated attrs, spans from the parser): no re-validation."""
    return Node.model_construct(inputs=[], input_spans=[], out=None, scores=None, cost=None, **fields)


def build_graph(name: str, program: list[Stmt], filename: str = "<string>", source: str | None = None) -> Graph:
    """Turn resolved statements into nodes and edges (not yet shape-checked)."""
    g = Graph(name, program, filename, source)
    prev: list[str | None] = [None]
    count = [0]
    expanded: dict[int, list] = {}

    def emit(st: Stmt, node_name: str, stage: str | None, index: int = 0) -> None:
        op = REGISTRY[st.op]
        spans = st.__dict__.get("_spans", {})
        if node_name in g or node_name in g.aliases:
            raise SpecError(f"duplicate name '{node_name}'; give this statement another label (`other_name: {st.op} ...`)", st.span)
        explicit = st.inputs
        if op.composite:
            if id(st) not in expanded:  # a stage repeats one statement: expand and check it once
                subs = op.expand(st.attrs)
                checked = []
                for sub in subs:
                    sub_spans = {k: spans[src] for k, src in sub.spans_from.items() if src in spans}
                    checked.append((sub, sub_spans, validate_attrs(get_op(sub.op), sub.attrs, sub_spans, st.span)))
                expanded[id(st)] = checked
            local: dict[str, str] = {}
            subs = [c[0] for c in expanded[id(st)]]
            for sub, sub_spans, attrs in expanded[id(st)]:
                full = f"{node_name}.{sub.suffix}"
                ins = [local[i] if i != "<in>" else "<in>" for i in sub.inputs]
                node = _node(name=full, op=sub.op, attrs=attrs, block=node_name, stage=stage, span=st.span,
                             attr_spans=sub_spans, index=index)
                _add(node, ins, explicit, st)
                local[sub.suffix] = full
            g.aliases[node_name] = local[subs[-1].suffix]
            prev[0] = g.aliases[node_name]
        else:
            node = _node(name=node_name, op=op.kind, attrs=st.attrs, block=node_name, stage=stage, span=st.span,
                         attr_spans=spans, index=index)
            _add(node, ["<in>"] if op.inputs[1] != 0 else [], explicit, st)
            prev[0] = node_name

    def _add(node: Node, ins: list[str], explicit: list[str] | None, st: Stmt) -> None:
        count[0] += 1
        if count[0] > MAX_NODES:
            raise SpecError(f"model expands to more than {MAX_NODES:,} nodes", st.span)
        if "<in>" in ins:
            if explicit is not None:
                i = ins.index("<in>")
                ins = ins[:i] + ["<ref>" + r for r in explicit] + ins[i + 1 :]
            elif prev[0] is None:
                raise SpecError(f"'{node.op}' has no input: the first statement must be 'input'", st.span)
            else:
                ins = [prev[0] if i == "<in>" else i for i in ins]
        node.inputs = ins
        node.input_spans = [st.__dict__.get("_input_span") or st.span] * len(ins)
        g.add_node(node)

    for st in program:
        if st.kind == "bits":
            continue
        if st.kind == "shortcut":
            if st.name in g or st.name in g.aliases:
                raise SpecError(f"duplicate name '{st.name}'", st.span)
            g.aliases[st.name] = f"{st.name}.cat"
            continue
        if st.kind == "stage":
            if st.name in g or st.name in g.aliases:
                raise SpecError(f"duplicate name '{st.name}'", st.span)
            depth = st.attrs["depth"]
            sspans = st.__dict__.get("_spans", {})
            if st.attrs.get("downsample", "none") == "merge":
                down = Stmt(kind="op", name=f"{st.name}.downsample", op="merge",
                            attrs=validate_attrs(get_op("merge"), {"out": st.attrs.get("dim")}, {"out": sspans.get("dim", st.span)}, st.span),
                            span=st.span)
                down.__dict__["_spans"] = {"out": sspans["dim"]} if "dim" in sspans else {}
                emit(down, f"{st.name}.downsample", st.name)
            elif st.attrs.get("dim") is not None:
                raise SpecError("stage dim= sets the width after downsampling; add downsample=merge", sspans.get("dim", st.span))
            i = 0
            for _ in range(depth):
                for child in st.body:
                    emit(child, f"{st.name}.{i}", st.name, i)
                    i += 1
            g.aliases[st.name] = prev[0]
        else:
            op = REGISTRY[st.op]
            node_name = st.label or op.default_name or op.kind
            if not st.label:
                st.name = node_name
            else:
                st.name = st.label
            emit(st, node_name, None)
    _wire(g)
    for st in program:
        if st.kind == "shortcut":
            _add_shortcut(g, st)
    _link_scores(g)
    return g


def _add_shortcut(g: Graph, st: Stmt) -> None:
    """One `tap` node per tapped stage, a concat of their pooled outputs and the
    destination's own input, and the destination rewired to read the concat."""
    a = st.attrs
    tap_spans, into_span = st.__dict__["_tap_spans"], st.__dict__["_into_span"]
    known = set(g.order) | set(g.aliases)
    into = g.aliases.get(a["into"], a["into"])
    if into not in g:
        raise SpecError(f"unknown name '{a['into']}' after into{did_you_mean(a['into'], known)}", into_span)
    dest = g.node(into)
    if len(dest.inputs) != 1:
        raise SpecError(f"a shortcut feeds a node with one input; '{into}' has {len(dest.inputs)}", into_span)
    names = []
    for i, ((ref, width), span) in enumerate(zip(a["taps"], tap_spans)):
        src = g.aliases.get(ref, ref)
        if src not in g:
            raise SpecError(f"shortcut taps unknown stage '{ref}'{did_you_mean(ref, known)}", span)
        if src == into or nx.has_path(g.nx, into, src):
            raise SpecError(f"shortcut taps '{ref}', which comes after '{a['into']}'", span)
        name = f"{st.name}.{i}"
        attrs = validate_attrs(get_op("tap"), {"out": width, "act": a["act"], "norm": a["norm"], "pool": a["pool"]}, {}, span)
        node = Node(name=name, op="tap", attrs=attrs, inputs=[src], input_spans=[span], span=span, block=st.name, stage=None)
        g.add_node(node)
        g.nx.add_edge(src, name, slot=0)
        names.append(name)
    cat = Node(name=f"{st.name}.cat", op="concat", attrs=validate_attrs(get_op("concat"), {}, {}, st.span),
               inputs=names + [dest.inputs[0]], input_spans=[st.span] * (len(names) + 1), span=st.span, block=st.name)
    g.add_node(cat)
    for slot, src in enumerate(cat.inputs):
        g.nx.add_edge(src, cat.name, slot=slot)
    g.nx.remove_edge(dest.inputs[0], into)
    dest.inputs = [cat.name]
    g.nx.add_edge(cat.name, into, slot=0)
    index = {name: i for i, name in enumerate(g.order)}
    g.order = list(nx.lexicographical_topological_sort(g.nx, key=lambda x: index[x]))


def _wire(g: Graph) -> None:
    """Resolve from= references, add edges, reject cycles, fix execution order."""
    known = set(g.order) | set(g.aliases)
    for n in g.nodes():
        resolved = []
        for i, ref in enumerate(n.inputs):
            if ref.startswith("<ref>"):
                ref = ref[5:]
                target = g.aliases.get(ref, ref)
                if target not in g:
                    raise SpecError(f"unknown name '{ref}' in from={ref}{did_you_mean(ref, known)}", n.input_spans[i])
                if target == n.name:
                    raise SpecError(f"'{n.name}' takes its own output as input (a cycle)", n.input_spans[i])
                ref = target
            resolved.append(ref)
        n.inputs = resolved
        op = REGISTRY[n.op]
        lo, hi = op.inputs
        if len(resolved) < lo or (hi is not None and len(resolved) > hi):
            want = f"{lo}" if lo == hi else f"{lo} or more" if hi is None else f"{lo} to {hi}"
            raise SpecError(f"{n.op} takes {want} input(s), got {len(resolved)}", n.input_spans[0] if n.input_spans else n.span)
        for slot, src in enumerate(resolved):
            g.nx.add_edge(src, n.name, slot=slot)
    index = {name: i for i, name in enumerate(g.order)}
    try:  # a topological order exists exactly when there is no cycle; find one only on failure
        g.order = list(nx.lexicographical_topological_sort(g.nx, key=lambda n: index[n]))
        return
    except nx.NetworkXUnfeasible:
        cycle = nx.find_cycle(g.nx)
    if cycle:
        names = [u for u, _ in cycle] + [cycle[0][0]]
        # Point at the explicit reference that closes the loop.
        culprit = next((g.node(v) for u, v in cycle if g.node(v).input_spans and g.node(v).input_spans[0] != g.node(v).span), g.node(cycle[0][1]))
        raise SpecError(f"cycle in data flow: {' -> '.join(names)}", culprit.input_spans[0] if culprit.input_spans else culprit.span)



def _data_preds(g: Graph, name: str) -> list[str]:
    return [u for u, _, d in g.nx.in_edges(name, data=True) if d.get("kind", "data") == "data"]


def _link_scores(g: Graph) -> None:
    """Residual attention: give each such attention node the mixed scores of the
    nearest residual attention upstream (port #scores), and the shared α node
    (ReViT's single learnable scalar) when it is used.  Scores never merge: if two
    paths bring scores, that is an error."""
    users = [n for n in g.nodes() if n.op == "attention" and n.attrs.residual is not None]
    if not users:
        return
    is_res = {n.name for n in users}
    shared = [n for n in users if n.attrs.residual.mode == "learnable"]
    if shared:
        if "alpha" in g:
            raise SpecError("the name 'alpha' is taken by the shared residual-attention α; rename that node", g.node("alpha").span)
        init = {n.attrs.residual.alpha for n in shared}
        if len(init) > 1:
            raise SpecError(f"blocks share one learnable α but give different initial values {sorted(init)}", shared[1].span_of("residual"))
        alpha = Node(name="alpha", op="scalar", attrs=validate_attrs(get_op("scalar"), {"init": init.pop()}, {}, None),
                     span=shared[0].span, block="alpha")
        g.add_node(alpha)
    # Forward over the data flow: latest[n] is the residual attention whose scores
    # are the most recent at n.  Where paths join, a source that is itself upstream
    # (in the chain of scores) of another is superseded; two unrelated ones are an error.
    chain: dict[str, str | None] = {}
    latest: dict[str, frozenset[str]] = {}

    def upstream(u: str, v: str) -> bool:
        while v is not None:
            v = chain.get(v)
            if v == u:
                return True
        return False

    for name in g.order:
        incoming: set[str] = set()
        for u in _data_preds(g, name):
            incoming |= latest.get(u, frozenset())
        if len(incoming) > 1:
            incoming = {u for u in incoming if not any(upstream(u, v) for v in incoming if v != u)}
        if name not in is_res:
            latest[name] = frozenset(incoming)
            continue
        n = g.node(name)
        if len(incoming) > 1:
            raise SpecError(
                f"residual attention in '{n.name}' would have to merge scores from {len(incoming)} paths "
                f"({', '.join(sorted(incoming))}); residual attention cannot cross a join", n.span_of("residual"))
        src = next(iter(incoming), None)
        chain[name] = src
        latest[name] = frozenset({name})
        extra: list[tuple[str, str]] = []
        if n.attrs.residual.mode == "learnable":
            extra.append(("alpha", "alpha"))
        if src is not None:
            extra.append((f"{src}#scores", "scores"))
        for ref, kind in extra:
            g.nx.add_edge(ref.partition("#")[0], n.name, slot=len(n.inputs), kind=kind)
            n.inputs.append(ref)
            n.input_spans.append(n.span_of("residual"))
    index: dict[str, float] = {name: i for i, name in enumerate(g.order)}
    if "alpha" in index and shared:
        index["alpha"] = 0.5  # right after the input: keeps stages contiguous in tables and pictures
    g.order = list(nx.lexicographical_topological_sort(g.nx, key=lambda x: index[x]))
