"""The `bits` section: per-layer bit widths chosen by selectors over layer names.

    bits {
      default       w8a8
      blocks.*.mlp  w4a8
      head          fp16
    }

A *layer* is a weight-bearing linear or convolution inside a node, named by its module
path: `blocks.3.mlp.fc1`, `patch_embed.proj`, `head`.  A selector matches a layer when
its dotted parts match a prefix of the layer's parts (`*` matches within one part), so
`blocks.*.mlp` covers fc1 and fc2 of every block.

Precedence: an exact name (no `*`) beats any pattern; among patterns, more parts beat
fewer, then more literal characters beat fewer; everything beats `default`.  Two
equally specific selectors that both match a layer and disagree are an error.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict

from ..errors import Span, SpecError

WIDTHS = (2, 3, 4, 5, 6, 7, 8)
FLOATS = ("fp32", "fp16", "bf16")
_INT = re.compile(r"w([0-9]+)a([0-9]+)")


class BitSpec(BaseModel):
    """`w4a8` (4-bit weights, 8-bit inputs) or a floating type kept for the layer."""

    model_config = ConfigDict(frozen=True)
    weight: int | None = None
    act: int | None = None
    float_type: Literal["fp32", "fp16", "bf16"] | None = None

    @classmethod
    def parse(cls, text: str, span: Span | None = None) -> "BitSpec":
        if text in FLOATS:
            return cls(float_type=text)
        m = _INT.fullmatch(text)
        if not m:
            raise SpecError(f"unknown bit width '{text}'; write wNaM (e.g. w4a8) or one of {', '.join(FLOATS)}", span)
        w, a = int(m.group(1)), int(m.group(2))
        if text != f"w{w}a{a}":  # one spelling per width, so fmt and diffs see one text
            raise SpecError(f"write '{text}' as 'w{w}a{a}' (no leading zeros)", span)
        for what, v in (("weight", w), ("activation", a)):
            if v not in WIDTHS:
                raise SpecError(f"{what} width {v} in '{text}' is outside the supported set {WIDTHS[0]}..{WIDTHS[-1]}", span)
        return cls(weight=w, act=a)

    @property
    def bytes_per_weight(self) -> float:
        if self.float_type is not None:
            return 4.0 if self.float_type == "fp32" else 2.0
        return self.weight / 8

    @property
    def weight_bits(self) -> int:
        return self.weight if self.weight is not None else (32 if self.float_type == "fp32" else 16)

    @property
    def act_bits(self) -> int:
        return self.act if self.act is not None else (32 if self.float_type == "fp32" else 16)

    def __str__(self) -> str:
        return self.float_type or f"w{self.weight}a{self.act}"


FP32 = BitSpec(float_type="fp32")


@dataclass(frozen=True)
class QLayer:
    """A quantizable layer: its name, kind, weight count and input elements per image."""

    name: str
    node: str
    kind: Literal["linear", "conv"]
    weights: int
    act_elems: int


def quant_layers(graph) -> list[QLayer]:
    """Every linear/conv layer of the compiled model, found by building it on the meta
    device (the builders are the one source of truth) and recording each layer's input
    size with a forward hook."""
    from ..api import compile

    cached = graph.__dict__.get("_quant_layers")
    if cached is not None:
        return cached
    saved, graph.bits = graph.bits, None  # the float model: layers are the same, without quantizers
    try:
        with torch.device("meta"):
            model = compile(graph, seed=None).eval()
            x = torch.empty(1, *graph.input.out.shape)
    finally:
        graph.bits = saved
    owners = sorted(graph.order, key=len, reverse=True)
    seen: dict[str, int] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            hooks.append(m.register_forward_hook(lambda mod, inp, out, name=name: seen.__setitem__(name, _input_elems(mod, inp[0]))))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    layers = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            node = next((n for n in owners if name == n or name.startswith(n + ".")), name)
            layers.append(QLayer(name=name, node=node, kind="linear" if isinstance(m, nn.Linear) else "conv",
                                 weights=m.weight.numel(), act_elems=seen.get(name, 0)))
    graph.__dict__["_quant_layers"] = layers
    return layers


def _input_elems(mod: nn.Module, x: torch.Tensor) -> int:
    if getattr(mod, "pool", None) is not None:  # the head pools inside: its linear reads one vector
        return mod.in_features
    return x.numel()


def _parts_match(pattern: str, name: str) -> bool:
    p, n = pattern.split("."), name.split(".")
    return len(p) <= len(n) and all(fnmatch.fnmatchcase(b, a) for a, b in zip(p, n))


def specificity(selector: str) -> tuple[int, int, int]:
    return ("*" not in selector, selector.count(".") + 1, len(selector.replace("*", "").replace(".", "")))


def assign_bits(graph, rules: list[tuple[str, str, Span, Span]]) -> dict[str, BitSpec]:
    """rules: (selector, spec text, selector span, spec span).  Returns layer -> BitSpec."""
    layers = quant_layers(graph)
    parsed = [(sel, BitSpec.parse(spec, sspan), span) for sel, spec, span, sspan in rules]
    seen: dict[str, Span] = {}
    for sel, _, span in parsed:
        if sel in seen:
            raise SpecError(f"selector '{sel}' appears twice in bits", span)
        seen[sel] = span
    default = next((b for s, b, _ in parsed if s == "default"), None)
    selectors = [(s, b, span) for s, b, span in parsed if s != "default"]
    for sel, _, span in selectors:
        if any(_parts_match(sel, q.name) for q in layers):
            continue
        nodes = [n for n in graph.order if _parts_match(sel, n)]
        if nodes:
            n = graph.node(nodes[0])
            raise SpecError(f"'{sel}' selects {n.op} '{n.name}', which has nothing to quantize "
                            f"(only linear and conv layers have bit widths)", span)
        raise SpecError(f"selector '{sel}' matches no layer", span)
    out: dict[str, BitSpec] = {}
    for q in layers:
        hits = [(specificity(s), s, b, span) for s, b, span in selectors if _parts_match(s, q.name)]
        if not hits:
            out[q.name] = default or FP32
            continue
        hits.sort(key=lambda h: h[0], reverse=True)
        best = hits[0]
        for other in hits[1:]:
            if other[0] == best[0] and other[2] != best[2]:
                later = max(best, other, key=lambda h: (h[3].line, h[3].column))
                first = other if later is best else best
                raise SpecError(f"'{later[1]}' and '{first[1]}' are equally specific and disagree on "
                                f"'{q.name}' ({later[2]} vs {first[2]})", later[3])
        out[q.name] = best[2]
    return out


def summary(graph) -> dict:
    """Weighted average widths and model size: weights weighted by parameter count,
    activations by input elements per image; parameters outside quantized layers count
    as fp32."""
    layers = quant_layers(graph)
    bits = graph.bits or {}
    wsum = sum(q.weights for q in layers) or 1
    asum = sum(q.act_elems for q in layers) or 1
    avg_w = sum(bits.get(q.name, FP32).weight_bits * q.weights for q in layers) / wsum
    avg_a = sum(bits.get(q.name, FP32).act_bits * q.act_elems for q in layers) / asum
    qparams = sum(q.weights for q in layers)
    size = sum(bits.get(q.name, FP32).bytes_per_weight * q.weights for q in layers)
    size += 4 * (graph.total().params - qparams)
    return {"avg_weight_bits": avg_w, "avg_act_bits": avg_a, "size_bytes": int(round(size)), "layers": layers}
