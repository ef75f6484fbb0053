"""timm weights -> vitdsl state dicts.

Node names were chosen to follow timm (patch_embed, blocks.N.attn.qkv, norm, head),
so most keys map to themselves; the exceptions are listed per op kind below.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch

from ..graph import Graph, Node

RENAMES: dict[str, Callable[[Node, Graph], dict[str, str]]] = {}
"""op kind -> function(node, graph) returning {our key: timm key} for the keys of that
node whose timm name differs.  Op modules register their own entries here."""


def _tokens(n: Node, g: Graph) -> dict[str, str]:
    # timm keeps class/dist tokens and the position embedding at the top level.
    return {f"{n.name}.cls_token": "cls_token", f"{n.name}.dist_token": "dist_token", f"{n.name}.pos_embed": "pos_embed"}


RENAMES["tokens"] = _tokens


def key_map(graph: Graph, model_keys: "list[str]") -> dict[str, str]:
    """Our state_dict key -> timm's, for every key of the compiled model."""
    renames: dict[str, str] = {}
    for n in graph.nodes():
        if n.op in RENAMES:
            renames.update(RENAMES[n.op](n, graph))
    return {k: renames.get(k, k) for k in model_keys}


def convert_state_dict(graph: Graph, timm_state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a timm state dict onto ``vitdsl.compile(graph)``; raises KeyError naming every
    missing or unexpected tensor, ValueError on a shape mismatch."""
    from ..api import compile

    with torch.device("meta"):
        ours = compile(graph, seed=None).state_dict()
    mapping = key_map(graph, list(ours))
    missing = [t for t in mapping.values() if t not in timm_state_dict]
    used = set(mapping.values())
    unexpected = [k for k in timm_state_dict if k not in used]
    if missing or unexpected:
        raise KeyError(
            "timm state dict does not match the spec: "
            + (f"missing {', '.join(missing)}" if missing else "")
            + ("; " if missing and unexpected else "")
            + (f"unexpected {', '.join(unexpected)}" if unexpected else "")
        )
    out = {}
    for k, t in mapping.items():
        v = timm_state_dict[t]
        if tuple(v.shape) != tuple(ours[k].shape):
            raise ValueError(f"{t}: timm has shape {tuple(v.shape)}, spec node expects {tuple(ours[k].shape)} at {k}")
        out[k] = v
    return out
