"""`vitdsl bench`: runs end to end, its JSON, the timm comparison, bad input, CUDA.

Correctness only: no timing thresholds (the machines are shared).  Everything runs in
this process through `vitdsl.cli.main` so that torch and timm are imported once.
"""
import json
import os

import pytest
import torch

import vitdsl
from conftest import ROOT, TINY
from vitdsl import benchmark as B
from vitdsl.cli import main

FAST = ["--device", "cpu", "--warmup", "0", "--runs", "2", "--threads", "1", "-q"]


@pytest.fixture
def tiny(tmp_path):
    p = tmp_path / "tiny.vit"
    p.write_text(TINY)
    return p


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: vitdsl bench" in out
    for opt in ("--backend", "--batch", "--dtype", "--device", "--warmup", "--runs", "--threads", "--json", "--no-timm"):
        assert opt in out


def test_tiny_end_to_end(tiny, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["bench", str(tiny), "--batch", "1", "2", "--json", str(out), *FAST]) == 0
    text = capsys.readouterr().out
    assert "median ms" in text and "images/s" in text and "vitdsl/timm" not in text
    rep = json.loads(out.read_text())
    assert rep["model"] == "tiny" and rep["comparison"] is None and "timm has no model named 'tiny'" in rep["note"]
    assert rep["device"]["type"] == "cpu" and rep["device"]["threads"] == 1 and rep["dtype"] == "fp32"
    assert rep["macs_per_image"] == vitdsl.loads(TINY).total().macs
    assert [r["batch"] for r in rep["results"]] == [1, 2]
    for r in rep["results"]:
        assert list(r["contenders"]) == ["vitdsl"] and "ratio" not in r
        c = r["contenders"]["vitdsl"]
        assert len(c["times_s"]) == 2 and c["q25_s"] <= c["median_s"] <= c["q75_s"]
        assert c["images_per_s"] == pytest.approx(r["batch"] / c["median_s"])
        assert c["tflops"] == pytest.approx(2 * rep["macs_per_image"] * r["batch"] / c["median_s"] / 1e12)
        assert c["peak_fraction"] is None  # no peak for a CPU


@pytest.mark.parametrize("inductor", [pytest.param(True, marks=pytest.mark.slow), False])
def test_compile_backend_and_low_precision(tiny, tmp_path, monkeypatch, inductor):
    if not inductor:  # dynamo traces the module as it would for inductor; code generation is skipped (tens of s)
        real = torch.compile
        monkeypatch.setattr(torch, "compile", lambda m, **kw: real(m, backend="eager", **kw))
    out = tmp_path / "r.json"
    assert main(["bench", str(tiny), "--backend", "compile", "--dtype", "bf16", "--json", str(out), *FAST]) == 0
    rep = json.loads(out.read_text())
    assert rep["backend"] == "compile" and rep["dtype"] == "bf16"


def test_timm_same_architecture_agrees(tmp_path, capsys):
    out = tmp_path / "r.json"
    spec = os.path.join(ROOT, "specs", "vit_tiny_patch16_224.vit")
    assert main(["bench", spec, "--json", str(out), *FAST, "--runs", "1"]) == 0  # the last --runs wins
    text = capsys.readouterr().out
    assert "timm:vit_tiny_patch16_224" in text and "vitdsl/timm" in text
    rep = json.loads(out.read_text())
    assert rep["comparison"]["same_architecture"] and rep["comparison"]["check"]["agree"]
    assert rep["comparison"]["check"]["max_abs_diff"] < 1e-4
    r = rep["results"][0]
    assert r["agreement"]["agree"] and r["ratio"] > 0
    assert list(r["contenders"]) == ["vitdsl", "timm:vit_tiny_patch16_224"]


@pytest.mark.parametrize("flag", [[], ["--no-prepack"]])
def test_cpu_eager_prepacks_vitdsl_unless_told_not_to(tmp_path, monkeypatch, flag):
    """On the CPU the vitdsl contender runs prepacked (as bench/latency.py times it), the
    outputs still agree with timm's; --no-prepack leaves its linear layers plain."""
    import vitdsl.ops.linear as L

    packed = []
    real = L.prepack
    monkeypatch.setattr(L, "prepack", lambda m: packed.append(real(m)) or packed[-1])
    out = tmp_path / "r.json"
    spec = os.path.join(ROOT, "specs", "vit_tiny_patch16_224.vit")
    threads = torch.get_num_threads()
    try:
        assert main(["bench", spec, "--json", str(out), *FAST, "--threads", "2", "--runs", "1", *flag]) == 0
    finally:
        torch.set_num_threads(threads)
    rep = json.loads(out.read_text())
    assert rep["prepacked"] is (not flag)
    assert packed == ([] if flag else [4 * 12])  # qkv, proj, fc1, fc2 per block (the head pools first: not packed)
    assert rep["results"][0]["agreement"]["agree"] and rep["results"][0]["agreement"]["max_abs_diff"] < 1e-4


def test_vit_small_weights_copy_agrees():
    g = vitdsl.load(os.path.join(ROOT, "specs", "vit_small_patch16_224.vit"))
    prep = B.prepare(g, "cpu")
    assert prep.counterpart.timm_name == "vit_small_patch16_224" and prep.counterpart.same
    assert prep.check["agree"] and prep.check["max_abs_diff"] < 1e-4


def _toy(cls: int = 1, pool: str = "cls", residual: str = "") -> str:
    """conftest's TINY with a learned position embedding, as timm's ViT has."""
    return (TINY.replace("tokens cls=1", f"tokens cls={cls} pos=learned").replace("pool=cls", f"pool={pool}")
            .replace("qkv_bias", f"qkv_bias eps=1e-6{residual}"))


_KW = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2, "num_classes": 10}


def test_baseline_comparison_is_labelled_and_checked():
    """ReViT-style spec against a plain-attention baseline: weights copied, checked with
    alpha = 1, then the spec's alpha restored for timing."""
    g = vitdsl.loads(_toy(cls=0, pool="mean", residual=" residual(alpha=0.5, learnable)"))
    base = B.BASELINES["revit_base_patch16_224"]
    cp = B.Counterpart("vit_tiny_patch16_224", {**_KW, **base.kwargs}, same=False, note=base.note, neutral=base.neutral)
    prep = B.prepare(g, "cpu", counterpart=cp)
    assert prep.check["agree"]
    assert prep.ours.state_dict()["alpha.value"].item() == 0.5
    cs = B.contenders(prep, "fp32", "torch")
    assert [c.label for c in cs] == ["vitdsl", "timm:vit_tiny_patch16_224 (baseline)"]
    r = B.finish(B.measure(cs, 1, (3, 32, 32), "cpu", "fp32", warmup=0, runs=1, check=B.same_outputs(prep)), prep, None)
    assert "agreement" not in r and r["ratio"] > 0


def test_revit_names_its_baseline():
    g = vitdsl.load(os.path.join(ROOT, "specs", "revit_base_patch16_224.vit"))
    cp, note = B.find_counterpart(g)
    assert cp.timm_name == "vit_base_patch16_224" and not cp.same and "class_token=False" in note


def test_disagreeing_outputs_withhold_the_ratio():
    # same weights, but timm pools the class token where the spec mean-pools
    g = vitdsl.loads(_toy(pool="mean"))
    prep = B.prepare(g, "cpu", counterpart=B.Counterpart("vit_tiny_patch16_224", _KW))
    assert not prep.check["agree"] and "DISAGREE" in prep.note
    cs = B.contenders(prep, "fp32", "torch")
    r = B.finish(B.measure(cs, 1, (3, 32, 32), "cpu", "fp32", warmup=0, runs=1, check=B.same_outputs(prep)), prep, None)
    assert "ratio" not in r and "ratio_withheld" in r


def test_mismatched_counterpart_times_vitdsl_alone():
    g = vitdsl.loads(_toy())
    prep = B.prepare(g, "cpu", counterpart=B.Counterpart("vit_tiny_patch16_224", {**_KW, "embed_dim": 32}))
    assert prep.theirs is None and "does not match the spec" in prep.note


@pytest.mark.parametrize("argv, msg", [
    (["--batch", "0"], "--batch must be a positive integer, got '0'"),
    (["--batch", "x"], "--batch must be a positive integer, got 'x'"),
    (["--runs", "0"], "--runs >= 1"),
    (["--threads", "0"], "--threads must be a positive integer"),
    (["--device", "tpu"], "device 'tpu'"),
])
def test_bad_options_exit_1(tiny, capsys, argv, msg):
    assert main(["bench", str(tiny), "--device", "cpu", *argv]) == 1
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err


def test_missing_spec_exits_1(tmp_path, capsys):
    assert main(["bench", str(tmp_path / "nope.vit"), "--device", "cpu"]) == 1
    assert "cannot read spec" in capsys.readouterr().err


def test_spec_error_exits_1(tiny, capsys):
    tiny.write_text(TINY.replace("heads=2", "heads=3"))
    assert main(["bench", str(tiny), "--device", "cpu"]) == 1
    assert "dim 64 is not divisible by heads 3" in capsys.readouterr().err


def test_dtype_the_device_cannot_run_is_a_diagnostic(tiny, capsys, monkeypatch):
    def unsupported(module, example):
        def run(x):
            raise RuntimeError('"addmm_impl_cpu_" not implemented for \'Half\'\nmore detail')
        return run

    monkeypatch.setitem(B.BACKENDS, "torch", unsupported)
    assert main(["bench", str(tiny), *FAST, "--dtype", "fp16"]) == 1
    err = capsys.readouterr().err
    assert "vitdsl cannot run in fp16 on cpu" in err and "not implemented for 'Half'" in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_unavailable_is_a_diagnostic(tiny, capsys):
    assert main(["bench", str(tiny), "--device", "cuda"]) == 1
    assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_end_to_end(tiny, tmp_path):
    out = tmp_path / "r.json"
    assert main(["bench", str(tiny), "--device", "cuda", "--dtype", "fp16", "--batch", "1", "4", "--runs", "3",
                 "--json", str(out), "-q"]) == 0
    rep = json.loads(out.read_text())
    assert rep["device"]["type"] == "cuda" and rep["device"]["name"]


@pytest.mark.parametrize("name, dtype, peak", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.5),
    ("NVIDIA H100 PCIe", "fp16", 756.5),
    ("NVIDIA H100 NVL", "fp16", 835.5),
    ("NVIDIA H200", "bf16", 989.5),
    ("NVIDIA A100-SXM4-80GB", "fp16", 312.0),
    ("NVIDIA A100 80GB PCIe", "bf16", 312.0),
    ("NVIDIA L40S", "fp16", 362.05),
    ("NVIDIA L4", "bf16", 121.0),
    ("NVIDIA A10", "fp16", 125.0),
    ("Tesla T4", "fp16", 65.0),
    ("Tesla T4", "bf16", None),
    ("NVIDIA H100 80GB HBM3", "fp32", None),
    ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", "fp16", None),
    ("AMD EPYC", "fp16", None),
])
def test_peak_table(name, dtype, peak):
    got = B.peak_tflops(name, dtype)
    assert (got[0] if got else None) == peak
