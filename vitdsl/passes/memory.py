"""Inference activation memory: a liveness analysis over the graph's execution order.

What it predicts: the high-water mark of the bytes that the torch backend's forward
pass allocates for activations (fp32), parameters and the caller's input excluded,
i.e. what a CPU allocator trace of one forward shows above the memory held before it.

The model, node by node along ``graph.order``:

* every node's output is a fresh allocation of ``node.cost.act_bytes`` bytes per sample
  (both ports of residual attention: the tokens and the score matrix);
* while node ``n`` runs, the memory in use is

      live(n) + act_bytes(n) + workspace(n)

  where ``live(n)`` is the bytes of the outputs produced before ``n`` that are still
  alive (its own inputs included: they stay alive while it runs) and
  ``workspace(n)`` is :meth:`vitdsl.OpDef.workspace`, the op's temporaries at its own
  high-water mark (the qkv projection, attention's score matrix when it is
  materialised, window-partition copies, the MLP's hidden activation, ...);
* then the outputs whose last consumer was ``n`` are released;
* an op that reuses a dead input (``OpDef.reuses_dead_input``: the residual add) writes
  its output into that input when it dies at this step (vitdsl.ops.inplace.donated_input, the
  executor's own rule): no new allocation, and the input's bytes pass to the output.
  This is the executor under ``torch.inference_mode()``; it also declines, at run time,
  an input that shares memory with a live value (a view of one), which the model does
  not see (it then predicts too little by one output).

What the executor keeps alive is an assumption, and it is a parameter:

* ``free_after_last_use=True`` (the default) models ``backends/torch.py`` as of commit
  1b858b9 ("executor frees values after their last use"): after each step, the values
  that no later step reads are dropped.  A node's outputs (both ports) live from its
  step until the step of its *last* consumer of either port; the graph's output lives
  to the end.
* ``free_after_last_use=False`` models the earlier executor, which kept the output of
  every node in a list until forward returned: memory is then the running *sum* of all
  outputs so far, plus the current node's workspace.

Not modelled (documented in docs/benchmarks.md, where the prediction is checked against
allocator traces): per-call scratch that does not scale with the batch (the fused CPU
attention kernel's per-thread blocks; mkldnn's reordered convolution weights), ops whose
``workspace`` is left at the default 0 (LayerNorm's contiguous copy of a transposed
input, for instance), outputs that are views of their input (counted as new memory),
and allocator rounding.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import InputError
from ..graph import Graph
from ..ops.base import REGISTRY
from ..ops.inplace import donated_input


@dataclass(frozen=True)
class Step:
    """Memory at one node, in bytes for the whole batch."""

    name: str
    live_before: int  # outputs alive when the node starts (its inputs included)
    out: int  # the node's own output(s)
    workspace: int  # the op's temporaries at its high-water mark, beyond `out`
    released: int  # bytes freed once the node has run

    @property
    def peak(self) -> int:
        return self.live_before + self.out + self.workspace


def last_uses(graph: Graph) -> dict[str, int]:
    """Node name -> index in graph.order of its last consumer (either output port).
    The graph's output, and a node nobody reads, map to len(order): alive to the end."""
    last: dict[str, int] = {}
    for i, n in enumerate(graph.nodes()):  # in execution order: later consumers overwrite
        for ref in n.inputs:
            last[ref.partition("#")[0]] = i
    end = len(graph.order)
    last = {name: last.get(name, end) for name in graph.order}
    last[graph.order[-1]] = end
    return last


def workspace_bytes(graph: Graph, name: str) -> int:
    """Per-sample working memory of one node (its op's ``workspace`` rule)."""
    n = graph.node(name)
    return int(REGISTRY[n.op].workspace(n, [graph.value_type(i) for i in n.inputs], n.out))


def memory_profile(graph: Graph, batch: int = 1, free_after_last_use: bool = True,
                   *, include_input: bool = False) -> list[Step]:
    """The per-node steps of the liveness analysis (see the module docstring)."""
    if batch < 1:
        raise InputError(f"batch must be at least 1, got {batch}")
    last = last_uses(graph)
    expiring: dict[int, list[str]] = {}
    for name, i in last.items():
        expiring.setdefault(i, []).append(name)
    size: dict[str, int] = {}
    live = 0
    steps = []
    for i, n in enumerate(graph.nodes()):
        out = n.cost.act_bytes if n.cost else 0
        if n.op == "input" and not include_input:
            out = 0  # the caller's tensor: allocated before forward, never freed by it
        out *= batch
        ws = workspace_bytes(graph, n.name) * batch
        size[n.name] = out
        k = donated_input(graph, n, i, last) if free_after_last_use else None
        if k is not None:  # the output takes over the dying input's memory
            src = n.inputs[k]
            out = 0
            size[n.name], size[src] = size[src], 0
        released = 0
        if free_after_last_use:
            released = sum(size[m] for m in expiring.get(i, ()))
        steps.append(Step(n.name, live, out, ws, released))
        live += out - released
    return steps


def peak_activation_bytes(graph: Graph, batch: int = 1, free_after_last_use: bool = True,
                          *, include_input: bool = False) -> int:
    """Predicted peak activation memory of one forward pass, in bytes, for `batch`
    samples: the maximum over nodes of live outputs + the node's output + its
    workspace.  ``free_after_last_use`` says what the executor keeps alive (True: the
    current torch backend; False: every output until forward returns).  The input
    image is the caller's and is left out unless ``include_input``."""
    return max((s.peak for s in memory_profile(graph, batch, free_after_last_use, include_input=include_input)),
               default=0)


def peak_node(graph: Graph, batch: int = 1, free_after_last_use: bool = True) -> Step:
    """The step at which the predicted peak occurs (the first, if several tie)."""
    steps = memory_profile(graph, batch, free_after_last_use)
    return max(steps, key=lambda s: s.peak)
