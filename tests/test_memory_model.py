"""The activation-memory model (vitdsl.passes.memory): the liveness analysis against
numbers worked out by hand from tensor shapes, the working-memory rules of attention and
the MLP, the scaling of the prediction with the token count, and (small models) the
prediction against torch's allocator."""
import math

import pytest
import torch
from pydantic import Field

import vitdsl
from vitdsl.passes.memory import last_uses, memory_profile, peak_activation_bytes, workspace_bytes

F32 = 4


# ----------------------------------------------------------------- a hand-built graph
@vitdsl.register_op
class MemProbe(vitdsl.OpDef):
    """Test op: output = input shape, declares `ws` bytes of working memory per sample."""

    kind = "memprobe"
    default_name = "probe"

    class Attrs(vitdsl.Attrs):
        ws: int = Field(0, ge=0)

    def workspace(self, node, ins, out):
        return node.attrs.ws


def hand_graph():
    b = vitdsl.Builder("hand")
    b.input("image", (3, 8, 8))
    b.embed("patch", size=4, dim=8)                     # patch_embed: 2x2 = 4 tokens x 8
    b.norm("layernorm", label="a")                      # a
    b.mlp(ratio=2.0, label="b")                         # b: hidden 16
    b.add("add", label="c", inputs=["patch_embed", "b"])  # c = patch_embed + b: patch_embed lives until here
    b.memprobe(ws=1000, label="d")                      # d
    b.head(pool="mean", classes=3)                      # head: 3 logits
    return b.build()


# Tensor sizes, by hand: 4 tokens x 8 channels, fp32; MLP hidden 16; 3 logits.
TOK = 4 * 8 * F32  # 128
HID = 4 * 16 * F32  # 256
LOGITS = 3 * F32  # 12
IMAGE = 3 * 8 * 8 * F32  # 768
# b (mlp): GELU overwrites fc1's output in inference (1 hidden), later the activation's
# and fc2's (hidden + tokens) are alive together; its peak beyond its own output:
MLP_WS = max(HID, HID + TOK) - TOK  # 256


def test_hand_graph_liveness():
    g = hand_graph()
    assert g.order == ["input", "patch_embed", "a", "b", "c", "d", "head"]
    assert last_uses(g) == {"input": 1, "patch_embed": 4, "a": 3, "b": 4, "c": 5, "d": 6, "head": 7}
    assert workspace_bytes(g, "b") == MLP_WS and workspace_bytes(g, "d") == 1000
    assert workspace_bytes(g, "a") == 0  # the default rule

    # Executor frees after the last use; the caller's image is not counted.
    steps = {s.name: s for s in memory_profile(g)}
    # live before each node / its peak, by hand:
    #   patch_embed: nothing alive; peak = its output
    #   a: patch_embed                       b: patch_embed, a
    #   c: patch_embed, b (a released); both die at c, so the sum is written into b:
    #      no new memory, and b's bytes become c's
    #   d: c (patch_embed released)          head: d (c released)
    expect_live = {"input": 0, "patch_embed": 0, "a": TOK, "b": 2 * TOK, "c": 2 * TOK, "d": TOK, "head": TOK}
    expect_peak = {
        "input": 0, "patch_embed": TOK, "a": 2 * TOK, "b": 3 * TOK + MLP_WS, "c": 2 * TOK,
        "d": 2 * TOK + 1000, "head": TOK + LOGITS,
    }
    assert {k: s.live_before for k, s in steps.items()} == expect_live
    assert {k: s.peak for k, s in steps.items()} == expect_peak
    assert peak_activation_bytes(g) == 2 * TOK + 1000  # at d: 1256 bytes

    # Keep-all executor: every output stays, so memory is the running sum.
    keep = {s.name: s.peak for s in memory_profile(g, free_after_last_use=False)}
    assert keep["b"] == 3 * TOK + MLP_WS
    assert keep["d"] == 5 * TOK + 1000  # patch_embed, a, b, c alive, plus d and its workspace
    assert keep["head"] == 5 * TOK + LOGITS
    assert peak_activation_bytes(g, free_after_last_use=False) == 5 * TOK + 1000  # 1640

    # Batch scales everything; the caller's image can be counted on request.
    assert peak_activation_bytes(g, batch=3) == 3 * (2 * TOK + 1000)
    assert peak_activation_bytes(g, include_input=True) == 2 * TOK + 1000  # the image is released after patch_embed
    assert peak_activation_bytes(g, free_after_last_use=False, include_input=True) == IMAGE + 5 * TOK + 1000
    with pytest.raises(ValueError):
        peak_activation_bytes(g, batch=0)


# ----------------------------------------------------------------- attention
def vit_text(size, extra="", dim=384, heads=6, depth=12, patch=16):
    return f"""model m {{
  input image 3x{size}x{size}
  embed patch size={patch} dim={dim}
  tokens cls=0 pos=learned
  stage blocks depth={depth} {{
    transformer heads={heads} mlp=4.0 qkv_bias eps=1e-6 {extra}
  }}
  norm layernorm eps=1e-6
  head pool=mean classes=10
}}"""


def test_two_port_output_lives_until_its_last_reader():
    """Residual attention's (tokens, scores) output is one value: it stays alive until the
    next block's attention has read the scores, although res1 read the tokens earlier."""
    g = vitdsl.loads(vit_text(64, "residual(alpha=0.5)", dim=32, heads=2, depth=2))
    T, C, h = 16, 32, 2
    tok, scores = F32 * T * C, F32 * h * T * T
    assert last_uses(g)["blocks.0.attn"] == g.order.index("blocks.1.attn")
    s = {x.name: x for x in memory_profile(g)}["blocks.1.attn"]
    # alive: blocks.0.res2 (read again by blocks.1.res1), blocks.1.norm1, blocks.0.attn (both ports)
    assert s.live_before == 3 * tok + scores
    assert s.out == tok + scores


@pytest.mark.parametrize("extra", ["", "residual(alpha=0.5)"])
def test_global_attention_workspace_by_hand(extra):
    g = vitdsl.loads(vit_text(64, extra, dim=32, heads=2, depth=2))
    T, C, h = 16, 32, 2
    TC, S = T * C, h * T * T
    # fused SDPA: qkv (3TC), its output (TC), log-sum-exp (hT); then proj (TC) after qkv is gone
    fused = max(3 * TC + TC + h * T, TC + TC) - TC
    # materialised, first block: qkv + q*scale + scores; qkv + scores + softmax + A@v;
    # qkv + scores + A@v + head-merge copy
    first = max(4 * TC + S, 4 * TC + 2 * S, 5 * TC + S) - (TC + S)
    # later blocks also mix with the previous scores: unmixed, a*S, (1-a)*prev, sum
    later = max(4 * TC + S, 3 * TC + 4 * S, 4 * TC + 2 * S, 5 * TC + S) - (TC + S)
    if extra:
        assert workspace_bytes(g, "blocks.0.attn") == F32 * first
        assert workspace_bytes(g, "blocks.1.attn") == F32 * later
    else:
        assert workspace_bytes(g, "blocks.0.attn") == workspace_bytes(g, "blocks.1.attn") == F32 * fused
    assert workspace_bytes(g, "blocks.0.mlp") == F32 * 4 * TC  # hidden (4 TC), GELU in place; then hidden + out
    relu = vitdsl.loads(vit_text(64, extra, dim=32, heads=2, depth=2).replace("mlp=4.0", "mlp=4.0 act=relu"))
    assert workspace_bytes(relu, "blocks.0.mlp") == F32 * (2 * 4 * TC - TC)  # fc1's and relu's outputs together


def test_window_attention_workspace_by_hand():
    # grid 8, window 7: pads to 14x14 = 4 windows of 49 tokens; block 1 shifts by 3
    g = vitdsl.loads(vit_text(128, "attn=window(7, shift=alternate)", dim=32, heads=2, depth=2))
    N, T, n, C, h = 64, 196, 49, 32, 2
    S, bias = h * T * n, h * n * n
    # unshifted: pad copy, window partition copy, qkv, gathered bias, SDPA output, log-sum-exp,
    # SDPA's copy of the (permuted) bias
    b0 = T * C + T * C + 3 * T * C + bias + T * C + h * T + bias
    # shifted: the rolled grid is dropped before the partition; bias + mask (S) and SDPA's copy of it
    b1 = T * C + T * C + 3 * T * C + bias + S + T * C + h * T + S
    assert workspace_bytes(g, "blocks.0.attn") == F32 * (b0 - N * C)
    assert workspace_bytes(g, "blocks.1.attn") == F32 * (b1 - N * C)


# ----------------------------------------------------------------- scaling of the prediction
def _exponent(extra, sizes, **kw):
    p = [peak_activation_bytes(vitdsl.loads(vit_text(s, extra)), **kw) for s in sizes]
    return math.log(p[1] / p[0]) / math.log((sizes[1] / sizes[0]) ** 2)


@pytest.mark.parametrize("keep_all", [False, True])
def test_prediction_scaling(keep_all):
    kw = {"free_after_last_use": not keep_all}
    # fused global and windowed attention: linear in the tokens (grids 28 -> 56, no padding)
    assert _exponent("", (448, 896), **kw) == pytest.approx(1.0, abs=0.01)
    assert _exponent("attn=window(7, shift=alternate)", (448, 896), **kw) == pytest.approx(1.0, abs=0.01)
    # materialised scores: quadratic as the N x N term takes over
    k = _exponent("residual(alpha=1.0)", (896, 1024), **kw)
    assert 1.85 < k <= 2.0
    # the attention op's own working memory: exactly linear for fused, ~quadratic materialised
    def ws(extra, size):
        g = vitdsl.loads(vit_text(size, extra))
        return workspace_bytes(g, "blocks.1.attn")
    assert ws("", 896) / ws("", 448) == pytest.approx(4.0, rel=1e-3)
    assert ws("residual(alpha=1.0)", 896) / ws("residual(alpha=1.0)", 448) > 15


# ----------------------------------------------------------------- against torch's allocator
def allocator_peak(model, x) -> int:
    """Peak of the running sum of torch CPU allocations minus frees during one forward."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        model(x)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            model(x)
    level = peak = 0
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    for e in events:
        level += e.nbytes()
        peak = max(peak, level)
    return peak


@pytest.mark.parametrize("extra", [
    "",
    "attn=window(7, shift=alternate)",
    "residual(alpha=0.5, learnable)",
    "residual(alpha=1.0)",
    "attn=window(5, shift=alternate) residual(alpha=0.5)",
])
def test_prediction_matches_allocator(extra):
    g = vitdsl.loads(vit_text(128, extra, dim=64, heads=2, depth=2, patch=8))  # 16x16 grid
    model = vitdsl.compile(g).eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the fused kernel's per-thread blocks are not modelled
    try:
        measured = allocator_peak(model, torch.randn(1, 3, 128, 128))
    finally:
        torch.set_num_threads(threads)
    assert peak_activation_bytes(g) == pytest.approx(measured, rel=0.05)
