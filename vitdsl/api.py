"""The public entry points: load/loads (text -> validated Graph) and compile."""
from __future__ import annotations

import gc
import os

from . import ops  # noqa: F401  (registers the built-in ops)
from .errors import InputError, SpecError
from .expand import build_graph, resolve_program
from .graph import Graph
from .passes.cost import DEFAULT_MAX_PARAMS, check_budget, cost
from .passes.shapes import infer_shapes
from .passes.validate import validate
from .syntax import parse


def run_passes(g: Graph, max_params: int | None = DEFAULT_MAX_PARAMS) -> Graph:
    """The standard pipeline after expansion: shapes -> validate -> cost -> budget -> bits."""
    return assign_bit_widths(check_budget(cost(validate(infer_shapes(g))), max_params))


def assign_bit_widths(g: Graph) -> Graph:
    """Resolve the bits section (if any) into a width per quantizable layer."""
    st = next((s for s in g.program if s.kind == "bits"), None)
    if st is None:
        g.bits = None
        return g
    from .quant.bits import assign_bits

    spans = st.__dict__.get("_rule_spans") or [(st.span, st.span)] * len(st.attrs["rules"])
    rules = [(sel, spec, a, b) for (sel, spec), (a, b) in zip(st.attrs["rules"], spans)]
    g.bits = assign_bits(g, rules)
    return g


def loads(text: "str | bytes", filename: str = "<string>", *, model: str | None = None,
          max_params: int | None = DEFAULT_MAX_PARAMS) -> Graph:
    """Parse and validate spec text.  Raises SpecError pointing into the text."""
    source = None
    gc_was_enabled = gc.isenabled()
    gc.disable()  # the front end allocates many small acyclic objects; collection only costs time
    try:
        spec = parse(text, filename)
        source = spec.source
        name, program = resolve_program(spec, model)
        g = build_graph(name, program, filename, source)
        return run_passes(g, max_params)
    except SpecError as e:
        if source is None and isinstance(text, str) and "\x00" not in text and len(text) < 10**6:
            source = text
        raise e.located(filename, source) from None
    except RecursionError:
        raise SpecError("spec is nested too deeply", filename=filename) from None
    finally:
        if gc_was_enabled:
            gc.enable()


def load(path: "str | os.PathLike[str]", **kw) -> Graph:
    """Read a .vit file and return its validated graph."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        from .syntax import MAX_SOURCE_BYTES

        if size > MAX_SOURCE_BYTES:
            raise SpecError(f"file is {size:,} bytes, over the {MAX_SOURCE_BYTES:,}-byte limit for a spec", filename=path)
        with open(path, "rb") as f:
            data = f.read()
    except IsADirectoryError:
        raise SpecError("is a directory, not a spec file", filename=path) from None
    except OSError as e:
        raise SpecError(f"cannot read spec: {e.strerror}", filename=path) from None
    return loads(data, path, **kw)


def compile(graph: Graph, backend: str = "torch", **options):  # noqa: A001 - the contract's name
    """Compile a graph.  backend="torch" returns an nn.Module."""
    if backend == "torch":
        from .backends.torch import compile_torch

        return compile_torch(graph, **options)
    raise InputError(f"unknown backend '{backend}'; available: torch")
