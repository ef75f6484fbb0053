"""The pre-norm transformer block, as a composite of primitive ops:

    x = x + attn(norm1(x))      (res1)
    x = x + mlp(norm2(x))       (res2)

Sub-node names (norm1, attn, norm2, mlp) follow timm, so state_dict keys line up.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from .attention import AttnKind, Residual
from .base import Attrs, OpDef, SubNode, register_op


@register_op
class Transformer(OpDef):
    """`transformer dim=384 heads=6 mlp=4.0 qkv_bias`: one pre-norm ViT block."""

    kind = "transformer"
    default_name = "block"
    composite = True
    word_fields = ("residual",)

    class Attrs(Attrs):
        heads: int = Field(ge=1, le=4096)
        dim: int | None = Field(None, ge=1)
        mlp: float = Field(4.0, gt=0, le=1024)
        act: Literal["gelu", "gelu_tanh", "relu", "silu"] = "gelu"
        attn: AttnKind = AttnKind()
        residual: Residual | None = None
        qkv_bias: bool = False
        eps: float = Field(1e-6, gt=0, lt=1)
        ls: float | None = Field(None, gt=0, le=1e6)  # LayerScale init (CaiT, DeiT III); none: off

    def expand(self, a):
        if a.ls is not None:
            return self._with_layer_scale(a)
        return [
            SubNode(suffix="norm1", op="norm", attrs={"eps": a.eps}, inputs=["<in>"], spans_from={"eps": "eps"}),
            SubNode(suffix="attn", op="attention",
                    attrs={"heads": a.heads, "attn": a.attn, "residual": a.residual, "qkv_bias": a.qkv_bias, "dim": a.dim},
                    inputs=["norm1"], spans_from={"heads": "heads", "dim": "dim", "attn": "attn", "residual": "residual"}),
            SubNode(suffix="res1", op="add", attrs={}, inputs=["<in>", "attn"]),
            SubNode(suffix="norm2", op="norm", attrs={"eps": a.eps}, inputs=["res1"], spans_from={"eps": "eps"}),
            SubNode(suffix="mlp", op="mlp", attrs={"ratio": a.mlp, "act": a.act}, inputs=["norm2"], spans_from={"ratio": "mlp", "act": "act"}),
            SubNode(suffix="res2", op="add", attrs={}, inputs=["res1", "mlp"]),
        ]

    def _with_layer_scale(self, a):
        """x = x + ls1(attn(norm1(x))); x = x + ls2(mlp(norm2(x)))."""
        subs = self.expand(a.model_copy(update={"ls": None}))
        by = {s.suffix: s for s in subs}
        ls = lambda name, src: SubNode(suffix=name, op="layer_scale", attrs={"init": a.ls}, inputs=[src], spans_from={"init": "ls"})  # noqa: E731
        by["res1"] = by["res1"].model_copy(update={"inputs": ["<in>", "ls1"]})
        by["res2"] = by["res2"].model_copy(update={"inputs": ["res1", "ls2"]})
        return [by["norm1"], by["attn"], ls("ls1", "attn"), by["res1"], by["norm2"], by["mlp"], ls("ls2", "mlp"), by["res2"]]
