"""GPTQ weight rounding (vitdsl.quant.gptq) and its use in mptq's sequential calibration."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import vitdsl
from vitdsl.quant.gptq import DAMP, input_rows, quantize_columns
from vitdsl.quant.mptq import LayerCalibrator
from helpers import BASE


def _rtn(w: torch.Tensor, s: torch.Tensor, qmax: int) -> torch.Tensor:
    return torch.clamp(torch.round(w / s[:, None]), -qmax, qmax) * s[:, None]


def _obs_reference(w: torch.Tensor, h: torch.Tensor, s: torch.Tensor, qmax: int) -> torch.Tensor:
    """The optimal brain surgeon recursion of the GPTQ paper written out (Eq. 2-3 for the
    update, Eq. 4 for removing a column from the inverse Hessian), one column at a time in
    order, with the full inverse: no Cholesky factor, no blocks."""
    W = w.double().clone()
    H = h.double().clone()
    H.diagonal().add_(DAMP * H.diagonal().mean())
    hinv = torch.linalg.inv(H)
    Q = torch.zeros_like(W)
    for i in range(W.shape[1]):
        q = torch.clamp(torch.round(W[:, i] / s), -qmax, qmax) * s
        Q[:, i] = q
        d = hinv[i, i]
        W -= ((W[:, i] - q) / d)[:, None] * hinv[i][None, :]  # δ_F = -(w_q - quant(w_q)) / [H⁻¹]_qq · (H⁻¹):,q
        hinv = hinv - hinv[:, i:i + 1] @ hinv[i:i + 1, :] / d  # Eq. 4: H⁻¹ without column i
    return Q


def _problem(out=12, n=40, rows=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=g, dtype=torch.float64) @ torch.randn(n, n, generator=g, dtype=torch.float64)
    w = torch.randn(out, n, generator=g, dtype=torch.float64)
    s = w.abs().amax(1) / 7  # 4 bits, minmax per output channel
    return w, x, s


@pytest.mark.parametrize("block", [128, 16, 1])
def test_gptq_equals_the_optimal_brain_surgeon_recursion(block):
    """The Cholesky form with lazy block updates (Algorithm 1) gives the same grid codes as
    the plain recursion, for one block and for several."""
    w, x, s = _problem()
    ours = quantize_columns(w, x.T @ x, s, 7, block=block)
    ref = _obs_reference(w, x.T @ x, s, 7)
    assert torch.equal(torch.round(ours / s[:, None]), torch.round(ref / s[:, None]))
    assert not torch.equal(ours, _rtn(w, s, 7))  # the feedback changed some roundings


def test_gptq_lowers_the_layer_output_error_below_rounding_to_nearest():
    w, x, s = _problem(seed=1)
    q = quantize_columns(w, x.T @ x, s, 7)
    codes = q / s[:, None]
    assert torch.allclose(codes, codes.round(), atol=1e-9) and codes.round().abs().max() <= 7  # on the grid
    err = ((w - q) @ x.T).pow(2).sum()
    err_rtn = ((w - _rtn(w, s, 7)) @ x.T).pow(2).sum()
    assert err < 0.8 * err_rtn


def test_gptq_with_uncorrelated_inputs_is_rounding_to_nearest():
    """A diagonal H (inputs uncorrelated) leaves nothing to compensate through."""
    w, _, s = _problem(seed=2)
    h = torch.diag(torch.rand(w.shape[1], dtype=torch.float64) + 0.5)
    assert torch.equal(quantize_columns(w, h, s, 7), _rtn(w, s, 7))


def test_input_rows_of_a_conv_are_its_unfolded_patches():
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1, bias=False)
    x = torch.randn(2, 3, 9, 9)
    rows = input_rows(conv, x)
    y = rows @ conv.weight.flatten(1).T  # (positions, out)
    ref = conv(x).permute(0, 2, 3, 1).reshape(-1, 5)
    torch.testing.assert_close(y, ref)
    assert input_rows(nn.Conv2d(4, 4, 3, groups=2), torch.randn(1, 4, 5, 5)) is None
    lin = nn.Linear(6, 2)
    assert input_rows(lin, torch.randn(2, 3, 6)).shape == (6, 6)


def _calibrated(images, sequential):
    g = vitdsl.loads(BASE.replace("  head pool=cls classes=10\n",
                                  "  head pool=cls classes=10\n  bits {\n    default w4a8\n  }\n"))
    state = vitdsl.compile(vitdsl.loads(BASE), seed=1).state_dict()
    m = vitdsl.compile(g)
    m.load_state_dict(state, strict=False)
    cal = LayerCalibrator(m, images, sequential=sequential)
    cal.calibrate_all()
    assert not cal.whole_inputs  # every one used and freed
    return cal, [n for n, layer in cal.layers.items() if not torch.equal(layer.weight, state[n + ".weight"])]


def test_mptq_puts_gptq_weights_on_the_grid_and_only_in_the_sequential_calibration():
    images = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert _calibrated(images, sequential=False)[1] == []  # the mixed-precision search's trials round to nearest
    cal, changed = _calibrated(images, sequential=True)
    assert len(changed) >= 3
    with torch.no_grad():  # a replaced weight is on its quantizer's grid: quantizing it changes nothing
        for n in changed:
            layer = cal.layers[n]
            assert torch.equal(layer.weight_quant(layer.weight), layer.weight)


def test_gptq_is_refused_where_the_other_half_of_the_images_says_it_overfits():
    """Two images: the patch embedding's 192 inputs (3 x 8 x 8) are seen in 16 patches
    per half, so GPTQ fitted on one image moves weights along directions the other image
    contradicts; the cross-fitted guard keeps rounding to nearest there."""
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    cal, changed = _calibrated(images, sequential=True)
    assert "patch_embed.proj" not in changed


def test_the_guard_splits_by_image_where_windows_fold_into_the_batch():  # (review)
    """Windowed attention runs its layers on (images x windows) rows: the halves must be
    images, so one calibration image is nothing to cross-check on (GPTQ refused)."""
    from vitdsl.quant.quantize import with_bits

    g = vitdsl.load("specs/digits_hybrid.vit")
    qg = with_bits(g, [("default", "w4a8")])
    state = vitdsl.compile(g, seed=0).state_dict()
    for n_images, expect_any in ((1, False), (16, True)):
        m = vitdsl.compile(qg)
        m.load_state_dict(state, strict=False)
        images = torch.randn(n_images, *g.input.out.shape, generator=torch.Generator().manual_seed(0))
        cal = LayerCalibrator(m, images, sequential=True)
        cal.calibrate_all()
        changed = [n for n, layer in cal.layers.items() if not torch.equal(layer.weight, state[n + ".weight"])]
        assert bool(changed) == expect_any, changed
        if expect_any:
            assert any(".attn.qkv" in n for n in changed)  # a windowed layer, split by image
