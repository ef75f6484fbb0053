"""Value types that flow along graph edges, and the cost record of a node."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class TensorType(BaseModel, frozen=True):
    """The per-sample type of an edge (the batch dimension is implicit).

    image:  shape (C, H, W)
    tokens: shape (N, C); ``grid`` is the (h, w) patch grid of the last
            h*w tokens and ``prefix`` the count of class/distillation tokens
            in front of them.
    vector: shape (C,)
    """

    kind: Literal["image", "tokens", "vector"]
    shape: tuple[int, ...]
    grid: tuple[int, int] | None = None
    prefix: int = 0

    @property
    def channels(self) -> int:
        return self.shape[0] if self.kind == "image" else self.shape[-1]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def __str__(self) -> str:
        return "x".join(str(d) for d in self.shape)


class Cost(BaseModel, frozen=True):
    """What a node costs: parameters, multiply-accumulates and output activation bytes
    (fp32, one sample).  MACs count matmul-like work only (linear, conv, attention
    products), which is what torch's FlopCounterMode measures (flops = 2 * MACs)."""

    params: int = 0
    macs: int = 0
    act_bytes: int = 0
