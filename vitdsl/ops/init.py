"""Weight initialisation shared by the builders."""
from __future__ import annotations

import torch


@torch.no_grad()
def trunc_normal(t: torch.Tensor, std: float = 0.02, a: float = -2.0, b: float = 2.0) -> torch.Tensor:
    """N(0, std²) truncated to [a, b], as timm initialises ViT weights.

    With timm's bounds (±2, i.e. ±100σ at std 0.02) no sample is ever rejected, so a
    normal draw clamped to the bounds has the same distribution and costs two passes
    over memory instead of torch.nn.init.trunc_normal_'s rejection loop (sample, two
    compares, any) — initialisation is most of the time it takes to build a model.
    Narrow bounds fall back to the exact rejection sampler."""
    if t.is_meta:
        return t
    if min(-a, b) < 6 * std:
        return torch.nn.init.trunc_normal_(t, std=std, a=a, b=b)
    return t.normal_(0.0, std).clamp_(a, b)
