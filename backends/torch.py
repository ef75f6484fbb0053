"""The torch backend: a validated Graph -> an nn.Module.

Each node's module sits at the node's own name (``blocks.3.attn``), so state_dict keys,
diagnostics and summaries share one naming scheme.  The forward pass runs the nodes
in the graph's execution order; under torch.compile / torch.export the loop unrolls.
"""
from __future__ import annotations

import math
import threading
from contextlib import contextmanager

import torch
import torch.nn as nn

from vitdsl.errors import SpecError
from vitdsl.graph import Graph
from vitdsl.ops.base import REGISTRY
from vitdsl.ops.inplace import donated_input, held_only_by_caller, inference_reuse_allowed, unhooked
from vitdsl.passes.memory import last_uses


class VitModel(nn.Module):
    """A compiled vitdsl graph.  ``model.graph`` is the graph it came from."""

    def __init__(self, graph: Graph):
        super().__init__()
        self.graph_name = graph.name
        plan: list[tuple[str, bool, tuple[tuple[int, int], ...]]] = []
        slot = {name: i for i, name in enumerate(graph.order)}
        multi = {n.name for n in graph.nodes() if n.scores is not None}
        for n in graph.nodes():
            ins = [graph.value_type(i) for i in n.inputs]
            with _deferred_default_init() as pending:
                module = REGISTRY[n.op].build_torch(n, ins, n.out)
            _finish_default_init(pending)
            _place(self, n.name, module)
        if graph.bits:  # per-layer bit widths: fake-quantized layers (vitdsl.quant.fake)
            from vitdsl.quant.fake import apply_bits

            apply_bits(self, graph.bits)
        for n in graph.nodes():
            refs = []
            for ref in n.inputs:  # (producer slot, output port); port -1: a single output
                name, _, port = ref.partition("#")
                refs.append((slot[name], (1 if port == "scores" else 0) if name in multi else -1))
            plan.append((n.name, n.op == "input", tuple(refs)))
        # After each step, drop the values no later step reads (inference memory then
        # follows the live set, not the sum of all activations); the same liveness as the
        # memory model's.  In inference an add may also write into an input that dies at
        # its step (vitdsl.ops.inplace.donated_input): (input position, its slot).
        last = last_uses(graph)
        release = [[] for _ in plan]
        for name, step in last.items():
            if step < len(plan):
                release[step].append(slot[name])
        donate = []
        for k, n in enumerate(graph.nodes()):
            pos = donated_input(graph, n, k, last)
            donate.append(None if pos is None else (pos, plan[k][2][pos][0]))
        # Plain attributes (not registered twice): the modules in execution order.
        self._steps = [(self.get_submodule(name), is_input, refs, tuple(release[k]), donate[k])
                       for k, (name, is_input, refs) in enumerate(plan)]
        self.__dict__["graph"] = graph

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return output_of(self._run(x, [], keep=False, donate=True))

    def run_from(self, x: torch.Tensor, start: int = 0, values: list | None = None, keep: bool = True) -> list:
        """Every step's value in execution order (graph.order), the first `start` taken
        from `values`, an earlier run's list (left unchanged), and the rest computed.  A
        search that changes one node at a time reruns only the steps from that node on.
        Nothing is written in place.  keep=False drops each computed step's inputs after
        their last reader, as the forward does (the list then holds the output, None for
        the dropped values, and any earlier values no computed step reads).  The model's
        output is ``output_of(values)``."""
        if start < 0 or (start and (values is None or start > len(values))):
            raise ValueError(f"run_from: start {start} needs the values of the {start} steps before it")
        return self._run(x, list(values[:start]) if start else [], keep=keep, donate=False)

    def _run(self, x: torch.Tensor, values: list, keep: bool, donate: bool) -> list:
        donating = donate and inference_reuse_allowed()
        for module, is_input, refs, release, into in self._steps[len(values):]:
            if is_input:
                values.append(module(x))
            else:
                args = [values[i] if p < 0 else values[i][p] for i, p in refs]
                if donating and into is not None and unhooked(module) and _sole_owner(args, values, into):
                    values.append(module(*args, into=into[0]))
                else:
                    values.append(module(*args))
            if not keep:
                for i in release:
                    values[i] = None
        return values


def output_of(values: list) -> torch.Tensor:
    """The model's output from a run's values (a multi-output last node: its first)."""
    out = values[-1]
    return out[0] if isinstance(out, tuple) else out


# ------------------------------------------------------------ buffer donation
def _sole_owner(args: list, values: list, donate: tuple[int, int]) -> bool:
    """Drop the executor's other references to the donated input (it is released after
    this step anyway), then ask whether anything else holds it."""
    k, slot = donate
    t = args[k]
    args[k] = values[slot] = None
    ok = held_only_by_caller(t)
    args[k] = t
    return ok


# ------------------------------------------------------------ initialisation
# Most builders overwrite every weight with their own initialisation (truncated normal,
# as timm does), so PyTorch's default kaiming-uniform init at construction is wasted
# work: about a third of the build time of a ViT.  While a builder runs, Linear and
# Conv layers are created uninitialised, with a NaN in the first element of the weight
# and bias as a sentinel; afterwards any weight or bias whose sentinel survived gets
# PyTorch's default initialisation, so a builder that relies on the defaults (a
# custom op, say) still gets them.  Builders initialise a tensor wholly or not at all.
_DEFERRED = (nn.Linear, nn.Conv1d, nn.Conv2d)
_lock = threading.Lock()


@contextmanager
def _deferred_default_init():
    pending: list[nn.Module] = []
    saved = {cls: cls.reset_parameters for cls in _DEFERRED}

    def mark(self) -> None:
        with torch.no_grad():
            for t in (self.weight, self.bias):
                if t is not None and t.numel() and t.device.type != "meta":
                    t.view(-1)[0] = math.nan
        pending.append(self)

    with _lock:
        for cls in _DEFERRED:
            cls.reset_parameters = mark
        try:
            yield pending
        finally:
            for cls, fn in saved.items():
                cls.reset_parameters = fn


@torch.no_grad()
def _finish_default_init(pending: list[nn.Module]) -> None:
    """PyTorch's default init (nn.Linear/_ConvNd.reset_parameters) for what is still NaN."""
    def untouched(t: torch.Tensor | None) -> bool:
        return t is not None and t.numel() > 0 and t.device.type != "meta" and bool(torch.isnan(t.view(-1)[0]))

    for m in pending:
        if m.weight.device.type == "meta":  # shape-only builds (vitdsl.quant.bits.quant_layers)
            continue
        if untouched(m.weight):
            nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5))
        if untouched(m.bias):
            fan_in, _ = nn.init._calculate_fan_in_and_fan_out(m.weight)
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(m.bias, -bound, bound)


def _place(root: nn.Module, name: str, module: nn.Module) -> None:
    """Register `module` at dotted path `name`, creating plain containers on the way."""
    parent = root
    *path, leaf = name.split(".")
    for part in path:
        child = parent._modules.get(part)
        if child is None:
            child = nn.Module()
            parent.add_module(part, child)
        parent = child
    parent.add_module(leaf, module)


def check_seed(seed) -> None:
    """torch's generators take seeds in [0, 2^63); anything else is a user error, not an overflow."""
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise SpecError(f"seed must be an integer in [0, 2^63), got {seed!r}", filename="--seed")


def compile_torch(graph: Graph, seed: int | None = 0, **options) -> VitModel:
    """Build the module; with a seed, initialisation is the same on every call."""
    if options:
        raise TypeError(f"unknown option(s) for the torch backend: {', '.join(sorted(options))}")
    if seed is None:
        return VitModel(graph)
    check_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return VitModel(graph)
