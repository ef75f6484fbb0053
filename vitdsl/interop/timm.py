"""timm weights -> vitdsl state dicts.

Node names were chosen to follow timm (patch_embed, blocks.N.attn.qkv, norm, head),
so most keys map to themselves; the exceptions are listed per op kind below.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch

from ..errors import InputError
from ..graph import Graph, Node

RENAMES: dict[str, Callable[[Node, Graph], dict[str, str]]] = {}
"""op kind -> function(node, graph) returning {our key: timm key} for the keys of that
node whose timm name differs.  Op modules register their own entries here."""


def _tokens(n: Node, g: Graph) -> dict[str, str]:
    # timm keeps class/dist tokens and the position embedding at the top level.
    return {f"{n.name}.cls_token": "cls_token", f"{n.name}.dist_token": "dist_token", f"{n.name}.pos_embed": "pos_embed"}


RENAMES["tokens"] = _tokens


def _candidates(key: str, node: Node, stage_index: dict[str, int]) -> list[str]:
    """timm names a parameter may have, most specific first.  timm lays out the same
    architecture differently per family: ViT keeps `blocks.N`, Swin nests blocks as
    `layers.S.blocks.N` (downsampling at `layers.S.downsample`), MobileViT uses
    `stages.S.N`; classifiers are `head` or `head.fc`."""
    out = [key]
    if node.stage is not None:
        j = stage_index[node.stage]
        rest = key[len(node.stage) + 1:]
        if rest.startswith("downsample."):
            out.append(f"layers.{j}.{rest}")
        else:
            out.append(f"layers.{j}.blocks.{rest}")
        out.append(f"stages.{j}.{rest}")
    if key.startswith("head."):
        out.append("head.fc." + key[len("head."):])
    return out


def key_map(graph: Graph, model_keys: "list[str]", timm_keys: "set[str] | None" = None) -> dict[str, str]:
    """Our state_dict key -> timm's, for every key of the compiled model.  With
    `timm_keys`, the first candidate name that timm has wins."""
    renames: dict[str, str] = {}
    for n in graph.nodes():
        if n.op in RENAMES:
            renames.update(RENAMES[n.op](n, graph))
    stages: dict[str, int] = {}
    for n in graph.nodes():
        if n.stage is not None and n.stage not in stages:
            stages[n.stage] = len(stages)
    owner = {}
    names = sorted(graph.order, key=len, reverse=True)
    result = {}
    for k in model_keys:
        if k in renames:
            result[k] = renames[k]
            continue
        node = owner.get(k) or next((graph.node(n) for n in names if k.startswith(n + ".")), None)
        cands = _candidates(k, node, stages) if node is not None else [k]
        result[k] = next((c for c in cands if timm_keys is None or c in timm_keys), cands[0])
    return result


def convert_state_dict(graph: Graph, timm_state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a timm state dict onto ``vitdsl.compile(graph)``; raises KeyError naming every
    missing or unexpected tensor, ValueError on a shape mismatch."""
    from ..api import compile

    with torch.device("meta"):
        ours = compile(graph, seed=None).state_dict()
    mapping = key_map(graph, list(ours), set(timm_state_dict))
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
            raise InputError(f"{t}: timm has shape {tuple(v.shape)}, spec node expects {tuple(ours[k].shape)} at {k}")
        out[k] = v
    return out
