"""MobileViT: conv / mv2 / mobilevit ops, image pooling, and the two MobileViT-S specs
(timm's mobilevit_s exactly, and the ExMobileViT baseline by parameter count)."""
import os

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import vitdsl
from helpers import err, where
from vitdsl.interop.timm import convert_state_dict, key_map

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMM_S = os.path.join(ROOT, "specs", "mobilevit_s.vit")
OFFICIAL_S = os.path.join(ROOT, "specs", "mobilevit_s_official.vit")

# Independent references: timm 1.0.31 `mobilevit_s` (sum of parameter numels), and the
# ExMobileViT paper's baseline MobileViT-S as built by EmPasLab/ExMobileVIT (1000 classes).
TIMM_PARAMS = 5_578_632
OFFICIAL_PARAMS = 5_636_720


@pytest.fixture(scope="module")
def timm_graph():
    return vitdsl.load(TIMM_S)


@pytest.fixture(scope="module")
def official_graph():
    return vitdsl.load(OFFICIAL_S)


def built_params(g) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in vitdsl.compile(g, seed=None).parameters())


# ------------------------------------------------------------------ the two specs
def test_timm_parameter_count(timm_graph):
    timm = pytest.importorskip("timm")
    assert sum(p.numel() for p in timm.create_model("mobilevit_s").parameters()) == TIMM_PARAMS
    assert timm_graph.total().params == TIMM_PARAMS
    assert built_params(timm_graph) == TIMM_PARAMS


def test_official_parameter_count(official_graph):
    assert official_graph.total().params == OFFICIAL_PARAMS
    assert built_params(official_graph) == OFFICIAL_PARAMS
    # per-block numbers of the reference arithmetic (docs/research/seed_architectures.md 2.4)
    got = {n.name: n.cost.params for n in official_graph.nodes()}
    assert (got["stem"], got["s2.1"], got["s3.1"], got["s4.1"], got["head"]) == (464, 482_400, 1_778_304, 2_251_200, 640_000)


def test_logits_match_timm(timm_graph):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ref = timm.create_model("mobilevit_s", pretrained=False).eval()
    model = vitdsl.compile(timm_graph).eval()
    model.load_state_dict(convert_state_dict(timm_graph, ref.state_dict()), strict=True)
    x = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = ref(x), model(x)
    assert got.shape == (2, 1000)
    assert want.abs().max().item() > 1e-2  # not trivially zero
    assert (got - want).abs().max().item() <= 1e-4


def test_timm_keys_follow_stage_order_not_stage_names(timm_graph):
    """The i-th stage maps to timm's stages.i whatever the spec calls it."""
    text = timm_graph.to_vit()
    for i, new in enumerate(["a", "b", "c", "d", "e"]):
        text = text.replace(f"stage s{i} ", f"stage {new} ")
    g = vitdsl.loads(text)
    with torch.device("meta"):
        keys = list(vitdsl.compile(g, seed=None).state_dict())
    import timm

    mapping = key_map(g, keys, set(timm.create_model("mobilevit_s").state_dict()))
    assert mapping["c.1.transformer.1.attn.qkv.weight"] == "stages.2.1.transformer.1.attn.qkv.weight"
    assert mapping["a.0.conv2_kxk.bn.running_var"] == "stages.0.0.conv2_kxk.bn.running_var"
    assert mapping["stem.conv.weight"] == "stem.conv.weight"
    assert mapping["head.weight"] == "head.fc.weight"


@pytest.mark.parametrize("path", [TIMM_S, OFFICIAL_S], ids=["timm", "official"])
def test_macs_match_flop_counter(path):
    g = vitdsl.load(path)
    model = vitdsl.compile(g).eval()
    counter = FlopCounterMode(display=False, depth=None)
    # torch has no flop formula for the CPU flash-attention kernel; the math backend
    # spells SDPA out as bmm, which the counter sees.
    with torch.no_grad(), counter, sdpa_kernel([SDPBackend.MATH]):
        model(torch.randn(1, *g.input.out.shape))
    measured = counter.get_total_flops() / 2  # flops = 2 * MACs
    predicted = g.total().macs
    assert abs(measured - predicted) <= 0.02 * predicted, (measured, predicted)
    per_module = counter.get_flop_counts()
    for n in g.nodes():
        if n.cost.macs:
            got = sum(per_module.get(f"VitModel.{n.name}", {}).values()) / 2
            assert abs(got - n.cost.macs) <= 0.02 * n.cost.macs, (n.name, got, n.cost.macs)


@pytest.mark.parametrize("path", [TIMM_S, OFFICIAL_S], ids=["timm", "official"])
def test_roundtrip(path):
    g = vitdsl.load(path)
    text = g.to_vit()
    assert vitdsl.loads(text) == g
    assert vitdsl.loads(text).to_vit() == text


def test_official_differs_from_timm_only_in_mobilevit_blocks_and_head(timm_graph, official_graph):
    a = {n.name: n for n in timm_graph.nodes()}
    b = {n.name: n for n in official_graph.nodes()}
    assert list(a) == list(b)
    differ = [k for k in a if a[k].key() != b[k].key()]
    assert differ == ["s2.1", "s3.1", "s4.1", "head"]
    assert b["s3.1"].attrs.model_dump(exclude_defaults=True) == {
        "dim": 192, "depth": 4, "head_dim": 8, "mlp": 4.0, "conv_1x1_bn": True,
        "norm_after": False, "fuse_order": "local_first"}


# ------------------------------------------------------------------ block semantics
SMALL = """\
model m {
  input image 3x32x32
  stem: conv out=8 stride=2
  mv2 out=8
  mobilevit dim=12 depth=1 heads=2 head_dim=4 mlp=4.0 conv_1x1_bn norm_after=false fuse_order=local_first
  head pool=mean classes=5 bias=false
}
"""


def test_official_block_equals_textbook_formula():
    """ExMobileViT's block written out independently: patch offset (py, px) of every
    patch forms one sequence (x[..., py::2, px::2]); attention softmax(q k^T * 4^-0.5) v
    with inner width 8; concat (local, input)."""
    g = vitdsl.loads(SMALL)
    model = vitdsl.compile(g).eval()
    blk = model.get_submodule("mobilevit")
    x = torch.randn(2, 8, 16, 16)
    with torch.no_grad():
        y = blk.conv_1x1(blk.conv_kxk(x))  # (2, 12, 16, 16)
        out = torch.empty_like(y)
        layer = blk.transformer[0]
        for py in range(2):
            for px in range(2):
                s = y[:, :, py::2, px::2].flatten(2).transpose(1, 2)  # (2, 64, 12)
                q, k, v = layer.attn.qkv(layer.norm1(s)).split(8, dim=-1)
                heads = [torch.softmax(q[..., h * 4:(h + 1) * 4] @ k[..., h * 4:(h + 1) * 4].transpose(1, 2) * 4 ** -0.5, -1)
                         @ v[..., h * 4:(h + 1) * 4] for h in range(2)]
                s = s + layer.attn.proj(torch.cat(heads, -1))
                s = s + layer.mlp(layer.norm2(s))
                out[:, :, py::2, px::2] = s.transpose(1, 2).reshape(2, 12, 8, 8)
        want = blk.conv_fusion(torch.cat((blk.conv_proj(out), x), dim=1))
        torch.testing.assert_close(blk(x), want, atol=1e-5, rtol=1e-5)
    assert layer.attn.qkv.bias is None and layer.attn.qkv.out_features == 24
    assert isinstance(blk.norm, torch.nn.Identity)


def test_mv2_residual_only_when_shape_is_kept():
    g = vitdsl.loads(SMALL)
    model = vitdsl.compile(g)
    assert model.get_submodule("mv2").residual  # 8 -> 8, stride 1
    g2 = vitdsl.loads(SMALL.replace("mv2 out=8", "mv2 out=8 stride=2"))
    assert not vitdsl.compile(g2).get_submodule("mv2").residual
    assert vitdsl.compile(g2)(torch.randn(1, 3, 32, 32)).shape == (1, 5)


def test_conv_attributes_and_keys():
    text = """\
model m {
  input image 3x17x17
  a: conv out=6 kernel=5 stride=2 dilation=2 bias norm=none act=relu
  b: conv out=6 kernel=3 groups=3 padding=0 act=none
  pool mean
  head classes=3
}
"""
    g = vitdsl.loads(text)
    # padding none = kernel // 2 * dilation = 4: (17 + 8 - 2*4 - 1) // 2 + 1 = 9; then 9 - 2 = 7
    assert [g.node(n).out.shape for n in ("a", "b")] == [(6, 9, 9), (6, 7, 7)]
    model = vitdsl.compile(g)
    a = model.get_submodule("a")(torch.randn(1, 3, 17, 17))
    assert a.shape[1:] == (6, 9, 9) and model.get_submodule("b")(a).shape[1:] == (6, 7, 7)
    keys = set(model.state_dict())
    assert {"a.conv.weight", "a.conv.bias", "b.conv.weight", "b.bn.running_mean"} <= keys
    assert "a.bn.weight" not in keys
    assert g.total().params == sum(p.numel() for p in model.parameters())
    assert model(torch.randn(2, 3, 17, 17)).shape == (2, 3)
    assert vitdsl.loads(g.to_vit()) == g


def test_image_pool_is_global_average():
    text = """\
model m {
  input image 3x8x8
  pool mean
}
"""
    model = vitdsl.compile(vitdsl.loads(text))
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(model(x), x.mean(dim=(2, 3)))


# ------------------------------------------------------------------ diagnostics
def test_patch_must_divide_the_feature_map():
    text = SMALL.replace("mobilevit dim=12", "mobilevit patch=3 dim=12")
    e = err(text)
    assert (e.line, e.column) == where(text, "patch=3")
    assert e.message == "feature map 16x16 is not divisible by the patch size 3"


@pytest.mark.parametrize("stmt", ["mv2 out=16", "conv out=16", "mobilevit dim=16 depth=1"])
def test_conv_ops_need_an_image(stmt):
    text = f"""\
model m {{
  input image 3x32x32
  embed patch size=8 dim=16
  {stmt}
  head pool=mean classes=10
}}
"""
    e = err(text)
    assert (e.line, e.column) == where(text, stmt)
    assert e.message == f"{stmt.split()[0]} needs an image (C x H x W), got tokens 16x16"


@pytest.mark.parametrize("old, new, needle, message", [
    ("mobilevit dim=12 depth=1 heads=2 head_dim=4", "mobilevit dim=12 depth=1 heads=5", "heads=5",
     "dim 12 is not divisible by heads 5 (or set head_dim)"),
    ("conv out=8 stride=2", "conv out=8 stride=2 groups=2", "groups=2", "groups=2 does not divide the 3 input channels"),
    ("conv out=8 stride=2", "conv out=8 stride=0", "stride=0", None),
    ("conv out=8 stride=2", "conv out=8 kernel=40 padding=0", "kernel=40", None),
    ("conv out=8 stride=2", "conv out=8 act=tanh", "act=tanh", None),
    ("head pool=mean", "head pool=cls", "pool=cls", "an image (8x16x16) pools with pool=mean (global average), not cls"),
    ("mv2 out=8", "mv2 out=8 expand=0.01", "expand=0.01", "expand=0.01 leaves no hidden channels for 8 input channels"),
])
def test_attribute_diagnostics(old, new, needle, message):
    text = SMALL.replace(old, new)
    assert text != SMALL
    e = err(text)
    assert (e.line, e.column) == where(text, needle)
    if message:
        assert e.message == message


def test_head_on_an_image_needs_pool():
    text = SMALL.replace("head pool=mean", "head")
    e = err(text)
    assert (e.line, e.column) == where(text, "head classes")
    assert e.message == "head on image needs pool=mean"
