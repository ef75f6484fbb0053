"""Weight rounding with error feedback (GPTQ: Frantar et al., "GPTQ: Accurate
Post-Training Quantization for Generative Pre-trained Transformers", ICLR 2023).

Why: rounding every weight to its nearest grid point (what a scale alone gives) ignores
that the layer's output error is ||(W - Q) X||^2, in which the columns' rounding errors
add up through the inputs' correlations.  GPTQ quantizes one input column at a time and
moves the columns not yet quantized to cancel the error already made (the optimal brain
surgeon update, §3, Eq. 2-3), with H = X Xᵀ the Hessian of that error.  The scales
(per output channel) are chosen before and kept: the result lies on the same grid, so
a fake quantizer with those scales reproduces it exactly.

Implementation (§4, "Step 3: Cholesky reformulation"; Algorithm 1): the rows of H⁻¹ the
column-by-column updates need are the rows of the upper Cholesky factor of H⁻¹, so H⁻¹
is factored once; updates are applied lazily in blocks of columns.  H is damped by a
fraction of its mean diagonal (the paper's λ = 1 %), which also makes a column whose
input is always zero (a zero diagonal) harmless: its rounding error moves nothing.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

DAMP = 0.01  # λ: fraction of the mean diagonal of H added to it (§4)
BLOCK = 128  # columns per lazy batch update (§4, "Step 2")


def can_round(layer: torch.nn.Module) -> bool:
    """Whether the layer's weight is one matrix applied to rows of its input: a linear
    layer, or a conv with one group and plain zero padding (not a grouped/depthwise conv)."""
    if isinstance(layer, torch.nn.Conv2d):
        return layer.groups == 1 and layer.padding_mode == "zeros" and not isinstance(layer.padding, str)
    return isinstance(layer, torch.nn.Linear)


def input_rows(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows X (one per output position) that the layer's flattened weight multiplies:
    a linear layer's inputs, or a conv's unfolded patches (channel-major, the order of
    `weight.flatten(1)`).  None where `can_round` says no."""
    if not can_round(layer):
        return None
    if isinstance(layer, torch.nn.Conv2d):
        cols = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


def quantize_columns(w: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, qmax: int,
                     damp: float = DAMP, block: int = BLOCK) -> torch.Tensor:
    """GPTQ (Algorithm 1) of the weight matrix `w` (out, in) on the symmetric per-row grid
    `scale` (out,) · {-qmax, ..., qmax}, for inputs with second moment `h` (in, in) = Σ x xᵀ.
    Returns the quantized matrix (on the grid), in w's dtype."""
    W = w.detach().double().clone()
    H = h.detach().double().clone()
    n = W.shape[1]
    s = scale.detach().double().reshape(-1)
    H.diagonal().add_(damp * H.diagonal().mean().clamp_min(1e-12))
    zero = H.diagonal() <= 0  # cannot happen after damping unless H was all zero
    H[zero, zero] = 1.0
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.empty_like(W)
    for a in range(0, n, block):
        b = min(a + block, n)
        Wb = W[:, a:b].clone()
        Eb = torch.empty_like(Wb)
        Ub = U[a:b, a:b]
        for j in range(b - a):
            col = Wb[:, j]
            q = torch.clamp(torch.round(col / s), -qmax, qmax) * s
            Q[:, a + j] = q
            e = (col - q) / Ub[j, j]
            Wb[:, j:] -= e.unsqueeze(1) * Ub[j, j:].unsqueeze(0)  # Eq. 3 within the block
            Eb[:, j] = e
        W[:, b:] -= Eb @ U[a:b, b:]  # the block's errors, applied to the later columns at once
    return Q.to(w.dtype)
