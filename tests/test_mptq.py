"""MPTQ-ViT calibration, greedy mixed precision and `vitdsl quantize`."""
import json
import subprocess
import sys

import pytest
import torch

import vitdsl
from vitdsl.quant import calibrate
from vitdsl.quant.bits import quant_layers
from vitdsl.quant.fake import FakeQuant
from vitdsl.quant.quantize import quantize
from helpers import BASE


@pytest.fixture(scope="module")
def setup():
    g = vitdsl.loads(BASE)
    state = vitdsl.compile(g, seed=1).state_dict()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return g, state, images


def test_twin_range_quantizer_matches_its_definition():
    q = FakeQuant(4, signed=False)
    q.set_twin(0.5, m=3)  # Δ+ = 0.5, Δ- = 0.5 / 8
    x = torch.linspace(-1.0, 5.0, 121)
    neg = torch.clamp(torch.round(x / 0.0625), -8, 0) * 0.0625
    pos = torch.clamp(torch.round(x / 0.5), 0, 7) * 0.5
    torch.testing.assert_close(q(x), torch.where(x < 0, neg, pos))


def test_mptq_is_deterministic_and_uses_twin_ranges_after_gelu(setup):
    g, state, images = setup
    qg = vitdsl.loads(BASE.replace("  head pool=cls classes=10\n", "  head pool=cls classes=10\n  bits {\n    default w4a4\n  }\n"))
    runs = []
    for _ in range(2):
        m = vitdsl.compile(qg)
        m.load_state_dict(state, strict=False)
        calibrate(m, images, method="mptq")
        runs.append(m.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert runs[0]["blocks.0.mlp.fc2.input_quant.neg_scale"].item() > 0   # post-GELU: twin range
    assert runs[0]["blocks.0.mlp.fc1.input_quant.neg_scale"].item() == 0  # elsewhere: one range


def test_greedy_mixed_precision_meets_the_budget(setup):
    g, state, images = setup
    qg, qm, report = quantize(g, state, images, budget=5.0, method="minmax")
    sizes = {q.name: (q.weights, q.act_elems) for q in quant_layers(g)}
    wb = sum(qg.bits[n].weight * w for n, (w, _) in sizes.items()) / sum(w for w, _ in sizes.values())
    ab = sum(qg.bits[n].act * a for n, (_, a) in sizes.items()) / sum(a for _, a in sizes.values())
    assert wb <= 5.0 + 1e-9 and ab <= 5.0 + 1e-9
    assert all(qg.bits[n].weight in (4, 5, 6, 8) and qg.bits[n].act in (4, 5, 6, 8) for n in sizes)
    assert vitdsl.loads(qg.to_vit()) == qg
    assert report[-1]["layer"] == "(logits)" and report[-1]["output_mse"] >= 0


def _w8a8_and_reference(setup) -> tuple[torch.nn.Module, torch.Tensor]:
    """The search's starting point: the model at w8a8 (uncalibrated), and the FP32 logits."""
    from vitdsl.quant.quantize import with_bits

    g, state, images = setup
    f = vitdsl.compile(g).eval()
    f.load_state_dict(state)
    with torch.no_grad():
        ref = f(images)
    m8 = vitdsl.compile(with_bits(g, [("default", "w8a8")]))
    m8.load_state_dict(state, strict=False)
    return m8, ref


def test_greedy_search_reports_the_true_kl_of_each_configuration(setup):
    """The search's running loss is the current configuration's own KL: it once added
    cached steps' stale deltas and drifted (a 'KL' below 0 on the digits models)."""
    from vitdsl.quant.mixed import greedy_mixed_precision
    from vitdsl.quant.mptq import kl_to_reference

    g, state, images = setup
    m8, ref = _w8a8_and_reference(setup)
    calls, pairs = [], []

    def progress(done, total, label):  # called with the model in the configuration it reports
        calls.append((done, total, label))
        if " KL " in label:
            pairs.append((label.rsplit("KL ", 1)[1], kl_to_reference(m8, images, ref)))

    sizes = {q.name: (q.weights, q.act_elems) for q in quant_layers(g)}
    greedy_mixed_precision(m8, images, ref, 4.5, sizes, progress=progress, method="minmax")
    assert len(pairs) > 5 and min(float(shown) for shown, _ in pairs) >= 0
    assert [shown for shown, _ in pairs] == [f"{true:.3g}" for _, true in pairs]  # every step, as printed
    done = [c[0] for c in calls]
    assert done == sorted(done) and calls[-1][:2] == (100, 100) and all(c[1] == 100 for c in calls)
    first_round = [c[2] for c in calls[:next(i for i, c in enumerate(calls) if " KL " in c[2])]]
    moves = sum((w > 0) + (a > 0) for w, a in sizes.values())  # every layer's weights and inputs, once
    assert first_round == [f"{label.split(' (')[0]} ({i}/{moves})" for i, label in enumerate(first_round, start=1)]
    assert all(label.startswith("trying ") for label in first_round) and len(first_round) == moves


RESIDUAL = BASE.replace("transformer heads=2 qkv_bias", "transformer heads=2 qkv_bias residual(alpha=0.5, learnable)")


@pytest.mark.parametrize("text", [BASE, RESIDUAL, "specs/digits_hybrid.vit"], ids=["vit", "residual", "hybrid"])
def test_search_trials_rerun_from_the_changed_node_with_the_whole_forwards_result(text):
    """A trial reruns the model from the changed layer's graph node only; its KL equals a
    whole forward's for every layer (attention, MLP, windowed attention, convolutions, the
    head; residual attention's carried scores), and a commit keeps the changed
    configuration's run for the next trial."""
    from vitdsl.quant.mixed import _KL
    from vitdsl.quant.mptq import LayerCalibrator, kl_to_reference
    from vitdsl.quant.quantize import with_bits

    g = vitdsl.load(text) if text.endswith(".vit") else vitdsl.loads(text)
    f = vitdsl.compile(g, seed=1).eval()
    images = torch.randn(4, *g.input.out.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = f(images)
    m = vitdsl.compile(with_bits(g, [("default", "w8a8")]))
    m.load_state_dict(f.state_dict(), strict=False)
    cal = LayerCalibrator(m, images, "minmax")
    for n in cal.layers:
        cal.calibrate(n)
    kl = _KL(m, images, ref, cal.block)
    base = kl.commit()
    assert kl.resumable and base == kl_to_reference(m, images, ref)
    for layer, start in kl.start.items():  # the longest node name that is a dotted prefix of the layer's
        owners = [n for n in g.order if layer == n or layer.startswith(n + ".")]
        assert g.order[start] == max(owners, key=len), layer
    assert set(kl.start) == set(cal.layers) and len(set(kl.start.values())) > 2 and min(kl.start.values()) > 0
    for n in cal.order:
        snap = cal.snapshot(n)
        cal.set_bits(n, 4, 4)
        cal.calibrate(n)
        trial = kl.trial(n)
        assert trial == kl_to_reference(m, images, ref) and trial != base, n
        cal.restore(n, snap)
    assert kl.commit(cal.order[0]) == base  # every trial undone: the kept run is still the configuration's
    first, last = cal.order[0], cal.order[-1]
    assert kl.start[first] < kl.start[last]
    cal.set_bits(first, 4, 4)
    cal.calibrate(first)
    assert kl.commit(first) == kl_to_reference(m, images, ref)
    cal.set_bits(last, 5, 5)
    cal.calibrate(last)
    starts = []
    run_from = m.run_from
    m.run_from = lambda x, start=0, values=None, keep=True: starts.append(start) or run_from(x, start, values, keep)
    assert kl.trial(last) == kl_to_reference(m, images, ref)  # the first change is in the kept run
    assert starts == [kl.start[last]]  # ... which the trial reused up to the last layer's node


def test_search_runs_whole_forwards_when_kept_values_would_not_fit(setup, monkeypatch):
    """Past KEEP_LIMIT_BYTES of kept node values the search runs whole forward passes:
    the same configuration either way."""
    import vitdsl.quant.mixed as mixed

    g, state, images = setup
    sizes = {q.name: (q.weights, q.act_elems) for q in quant_layers(g)}
    assert 0 < mixed.kept_bytes(g, images) <= mixed.KEEP_LIMIT_BYTES
    m8, ref = _w8a8_and_reference(setup)
    kept = mixed.greedy_mixed_precision(m8, images, ref, 6.0, sizes, method="minmax")
    monkeypatch.setattr(mixed, "KEEP_LIMIT_BYTES", mixed.kept_bytes(g, images) - 1)
    monkeypatch.setattr(mixed._KL, "trial", lambda self, layer: (self.resumable and pytest.fail("kept")) or
                        mixed.kl_to_reference(self.model, self.data, self.ref))
    m8, ref = _w8a8_and_reference(setup)
    whole = mixed.greedy_mixed_precision(m8, images, ref, 6.0, sizes, method="minmax")
    assert whole == kept and len(set(kept.values())) > 1


def test_quantize_reports_progress_for_the_search_then_the_calibration(setup):
    g, state, images = setup
    calls = []
    quantize(g, state, images, budget=6.0, method="minmax", progress=lambda *a: calls.append(a))
    search = [c for c in calls if c[2].startswith("search: ")]
    calib = [c for c in calls if c[2].startswith("calibrating (minmax): ")]
    assert len(search) + len(calib) == len(calls) and calls.index(calib[0]) > calls.index(search[-1])
    assert search[-1][:2] == (100, 100) and calib == [(1, 1, "calibrating (minmax): observing ranges")]
    calls.clear()  # mptq: layer by layer
    quantize(g, state, images, bits="w6a6", method="mptq", progress=lambda *a: calls.append(a))
    calib = [c for c in calls if c[2].startswith("calibrating (mptq): ")]
    assert calib == calls
    n = len(quant_layers(g))
    assert [c[:2] for c in calib] == [(i, n) for i in range(1, n + 1)]
    assert {c[2].split(": ", 1)[1] for c in calib} == {q.name for q in quant_layers(g)}


def test_greedy_mixed_precision_with_minmax_is_deterministic(setup):
    g, state, images = setup
    a, _, _ = quantize(g, state, images, budget=5.5, method="minmax")
    b, _, _ = quantize(g, state, images, budget=5.5, method="minmax")
    assert a.bits == b.bits and len({str(v) for v in a.bits.values()}) > 1  # a real mixture


@pytest.mark.slow
def test_greedy_mixed_precision_is_deterministic(setup):
    g, state, images = setup
    a, _, _ = quantize(g, state, images, budget=5.5, method="mptq")
    b, _, _ = quantize(g, state, images, budget=5.5, method="mptq")
    assert a.bits == b.bits


def test_quantize_bad_input(setup):
    g, state, images = setup
    with pytest.raises(vitdsl.SpecError, match="below the smallest candidate width 4"):
        quantize(g, state, images, budget=3.0)
    with pytest.raises(vitdsl.SpecError, match=r"calibration images have shape \(4, 1, 32, 32\)"):
        quantize(g, state, images[:, :1], bits="w8a8")
    with pytest.raises(vitdsl.SpecError, match="calibration images have shape|empty"):
        quantize(g, state, images[:0], bits="w8a8")
    with pytest.raises(vitdsl.SpecError, match="calibration set is empty") as info:
        quantize(g, state, images[:0], bits="w8a8", images_name="c.pt")
    assert info.value.filename == "c.pt"  # the diagnostic names the --calib file
    with pytest.raises(vitdsl.SpecError, match="keeps every layer in floating point: there is nothing to calibrate"):
        quantize(g, state, images, bits="fp16")
    bad = dict(state)
    bad.pop("head.weight")
    bad["stray.tensor"] = torch.zeros(1)
    with pytest.raises(vitdsl.SpecError, match="missing head.weight; unexpected stray.tensor"):
        quantize(g, bad, images, bits="w8a8")


def test_cli_quantize_refuses_a_foreign_output_directory_before_calibrating(setup, tmp_path):
    """An -o directory vitdsl did not write is refused up front (it used to be refused
    only when the outputs were written, after minutes of calibration)."""
    g, state, images = setup
    from safetensors.torch import save_file

    (tmp_path / "m.vit").write_text(BASE)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    torch.save(images[:, :1], tmp_path / "calib.pt")  # wrong channels: calibration would fail first
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("x")
    r = subprocess.run([sys.executable, "-m", "vitdsl", "quantize", str(tmp_path / "m.vit"), "--weights",
                        str(tmp_path / "w.safetensors"), "--calib", str(tmp_path / "calib.pt"), "--bits", "w8a8",
                        "-o", str(tmp_path / "mine")], capture_output=True, text=True)
    assert r.returncode == 1
    assert "exists and is not a vitdsl output directory" in r.stderr and "calibration images" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.pt", "m.vit", "mine", "w.safetensors"]
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["keep.txt"]
    # the calibration file's errors name it
    (tmp_path / "mine" / "keep.txt").unlink()
    r = subprocess.run([sys.executable, "-m", "vitdsl", "quantize", str(tmp_path / "m.vit"), "--weights",
                        str(tmp_path / "w.safetensors"), "--calib", str(tmp_path / "calib.pt"), "--bits", "w8a8",
                        "-o", str(tmp_path / "q")], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.startswith(f"{tmp_path / 'calib.pt'}:1:1: error: calibration images have shape")


def test_cli_quantize_then_build_gives_the_same_model(setup, tmp_path):
    g, state, images = setup
    from safetensors.torch import save_file

    (tmp_path / "m.vit").write_text(BASE)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    torch.save(images, tmp_path / "calib.pt")
    r = subprocess.run([sys.executable, "-m", "vitdsl", "quantize", str(tmp_path / "m.vit"), "--weights",
                        str(tmp_path / "w.safetensors"), "--calib", str(tmp_path / "calib.pt"), "--bits", "w6a6",
                        "--method", "mptq", "-o", str(tmp_path / "q")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == ["model.safetensors", "report.json", "spec.vit"]
    report = json.loads((tmp_path / "q" / "report.json").read_text())
    assert report["avg_weight_bits"] == 6 and {row["bits"] for row in report["layers"][:-1]} == {"w6a6"}
    assert "blocks.0.mlp.fc1" in r.stdout  # the per-layer table
    r = subprocess.run([sys.executable, "-m", "vitdsl", "build", str(tmp_path / "q" / "spec.vit"), "--weights",
                        str(tmp_path / "q" / "model.safetensors"), "-o", str(tmp_path / "b"), "-q"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    from safetensors.torch import load_file

    qg = vitdsl.load(tmp_path / "q" / "spec.vit")
    a, b = vitdsl.compile(qg).eval(), vitdsl.compile(qg).eval()
    a.load_state_dict(load_file(str(tmp_path / "q" / "model.safetensors")))
    b.load_state_dict(load_file(str(tmp_path / "b" / "model.safetensors")))
    with torch.no_grad():
        torch.testing.assert_close(a(images), b(images))
    r = subprocess.run([sys.executable, "-m", "vitdsl", "quantize", str(tmp_path / "m.vit"), "--weights",
                        str(tmp_path / "calib.pt"), "--calib", str(tmp_path / "calib.pt"), "--bits", "w6a6",
                        "-o", str(tmp_path / "q2")], capture_output=True, text=True)
    assert r.returncode == 1 and "cannot read weights" in r.stderr and not (tmp_path / "q2").exists()


def test_digits_calibration_images_match_the_model_input(setup, tmp_path):
    """`--calib digits:N`: N digits of the training split, upsampled to the model's input
    and replicated over its channels; held-out images are never used."""
    from vitdsl.quant.quantize import load_images
    from vitdsl.train import load_digits

    x = load_images("digits:5", (3, 32, 32))
    assert x.shape == (5, 3, 32, 32) and torch.equal(x[:, 0], x[:, 2])
    ref = load_digits((3, 32, 32))
    def rows_in(a, pool):  # which rows of a equal some row of pool
        return [bool((pool.flatten(1) == r.flatten()).all(1).any()) for r in a]

    assert all(rows_in(x[:, :1], ref.x_train)) and not any(rows_in(x[:, :1], ref.x_test))
    for bad in ("digits:abc", "digits:0", "digits:100000"):
        with pytest.raises(vitdsl.SpecError):
            load_images(bad, (3, 32, 32))
    g, state, _ = setup
    from safetensors.torch import save_file

    (tmp_path / "m.vit").write_text(BASE)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    r = subprocess.run([sys.executable, "-m", "vitdsl", "quantize", str(tmp_path / "m.vit"), "--weights",
                        str(tmp_path / "w.safetensors"), "--calib", "digits:8", "--bits", "w8a8",
                        "--method", "minmax", "-o", str(tmp_path / "q")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def _guarded_search(x: torch.Tensor, half: torch.Tensor) -> float:
    """Run mptq's range search for a lone 4-bit quantizer whose output is its input
    (ref = x); returns the clipping factor chosen (the range found / the full range)."""
    from vitdsl.quant.mptq import LayerCalibrator

    cal = object.__new__(LayerCalibrator)  # only the search: no model needed
    cal.ranges = {"x": (x.min(), x.max())}
    fq = FakeQuant(4, signed=True)
    cal._search(fq, "x", lambda: fq(x), x, half)
    return float(fq.scale * fq.qmax / x.abs().max())


def test_the_overfitting_guard_keeps_minmax_unless_both_halves_gain():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(1000, 1, generator=g) * 2 - 1  # half A: values in [-1, 1]
    b = torch.cat([torch.rand(1000, 1, generator=g) * 2 - 1, torch.full((24, 1), 10.0)])  # half B: 24 outliers at 10
    x = torch.cat([a, b])
    half = torch.arange(len(x)) < len(a)
    # Half A gains far more from clipping the outliers' range than half B loses, so the
    # summed error alone picks a clip; B alone is worse off, so the guard keeps minmax.
    assert _guarded_search(x, torch.ones(len(x), dtype=torch.bool)) < 0.9  # one half: the plain search
    assert _guarded_search(x, half) == pytest.approx(1.0)
    # When both halves gain, the guard lets the clip through.
    both = torch.cat([a, torch.rand(1000, 1, generator=g) * 2 - 1, torch.full((1, 1), 10.0)])
    assert _guarded_search(both, torch.arange(len(both)) < 1000) < 0.9


RESIDUAL = """\
model revit_tiny {
  input image 3x32x32
  embed patch size=8 dim=32
  tokens cls=1 pos=learned
  stage s1 depth=3 {
    transformer heads=2 mlp=2.0 qkv_bias residual(alpha=0.3, MODE)
  }
  norm layernorm
  head pool=cls classes=10
}
"""


@pytest.mark.parametrize("mode", ["fixed", "learnable", "per_block"])
def test_q_and_k_are_scored_with_the_alpha_the_softmax_sees(mode):
    """ReViT Eq. 5: a block that mixes in earlier scores sees α·S_l, the first block all of
    S_l; the calibrator reads α from the run (the fixed value, the shared learnable one,
    or each block's own) for the q/k error it scores through the softmax."""
    from vitdsl.quant.mptq import LayerCalibrator

    text = RESIDUAL.replace(", MODE", "" if mode == "fixed" else f", {mode}")
    qmodel = vitdsl.compile(vitdsl.loads(text.replace("  head pool", "  bits { default w8a8 }\n  head pool")), seed=0)
    with torch.no_grad():  # trained values that differ from the spec's 0.3
        for i, (k, p) in enumerate(sorted((k, p) for k, p in qmodel.named_parameters() if "alpha" in k)):
            p.fill_(0.6 + 0.1 * i)
    cal = LayerCalibrator(qmodel, torch.randn(2, 3, 32, 32))
    got = [cal.score_weight[n] for n in sorted(cal.score_weight)]
    assert len(got) == 3 and got[0] == 1.0  # the first block has no earlier scores
    want = {"fixed": [0.3, 0.3], "learnable": [0.6, 0.6], "per_block": [0.7, 0.8]}[mode]
    assert got[1:] == pytest.approx(want)


def test_sequential_calibration_reads_each_node_with_the_nodes_before_it_quantized(setup):
    """calibrate(method="mptq") calibrates graph node by graph node (an attention, an MLP:
    the residual branches BRECQ reconstructs one at a time): a node's layers are searched
    on the inputs the model produces with every earlier node quantized and the node
    itself float, against the float model's outputs.  Checked against an independent
    run of the finished model with that node's quantizers off and its float weights back
    (GPTQ replaced them by rounded ones after the node's inputs were read)."""
    from vitdsl.quant.mptq import LayerCalibrator

    g, state, images = setup
    qg = vitdsl.loads(BASE.replace("  head pool=cls classes=10\n", "  head pool=cls classes=10\n  bits {\n    default w4a4\n  }\n"))
    qmodel = vitdsl.compile(qg)
    qmodel.load_state_dict(state, strict=False)
    cal = LayerCalibrator(qmodel, images, sequential=True)
    cal.calibrate_all()
    first = cal.order[0]
    assert first == "patch_embed.proj" and torch.equal(cal.inputs[first], cal.float_inputs[first])  # nothing upstream
    for node in ("blocks.1.attn", "blocks.1.mlp"):
        layers = [n for n in cal.order if n.startswith(node + ".")]
        assert len(layers) == 2 and all(cal.block[n] == node for n in layers)
        seen = {}
        hooks = [qmodel.get_submodule(n).register_forward_pre_hook(
            lambda mod, args, n=n: seen.__setitem__(n, args[0].reshape(-1, args[0].shape[-1]))) for n in layers]
        off = [q for n in layers for q in cal.quantizers(n)]
        rounded = {n: qmodel.get_submodule(n).weight.detach().clone() for n in layers}
        try:
            for q in off:
                q.bypass = True
            with torch.no_grad():
                for n in layers:
                    qmodel.get_submodule(n).weight.copy_(state[n + ".weight"])
                qmodel(images)
        finally:
            for q in off:
                q.bypass = False
            with torch.no_grad():
                for n in layers:
                    qmodel.get_submodule(n).weight.copy_(rounded[n])
            for h in hooks:
                h.remove()
        for n in layers:  # 4 images x 17 tokens: every row is kept, in order
            torch.testing.assert_close(cal.inputs[n], seen[n], rtol=0, atol=0)
            assert not torch.allclose(cal.inputs[n], cal.float_inputs[n])  # the upstream quantization shows


@pytest.mark.parametrize("bits", [8, 4])
def test_an_activation_keeps_its_full_range_from_8_bits(bits, monkeypatch):
    """The output-error search may clip an activation's range below FULL_RANGE_BITS only:
    on data where a clip lowers the error on both halves of the sample at either width
    (checked first, with the rule switched off), the 8-bit quantizer still gets the full
    observed range and the 4-bit one the clip."""
    from types import SimpleNamespace

    from vitdsl.quant import mptq

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 512, generator=g).clamp(-1, 1)
    x[[0, 17, 32, 49], 0] = 2.0  # a few outliers, in both halves (even and odd rows) of the sample
    half = torch.arange(64) % 2 == 0
    amax = float(x.abs().max())

    def searched() -> float:
        fq = FakeQuant(bits, signed=True)
        cal = SimpleNamespace(ranges={"x": (x.min(), x.max())}, _half_errors=mptq.LayerCalibrator._half_errors,
                              _consistent=mptq.LayerCalibrator._consistent)
        mptq.LayerCalibrator._search(cal, fq, "x", lambda: fq(x), x, half)
        return float(fq.scale) * fq.qmax

    with monkeypatch.context() as mp:
        mp.setattr(mptq, "FULL_RANGE_BITS", 99)
        assert searched() < amax - 1e-6  # without the rule the search clips at this width
    if bits == 8:
        assert searched() == pytest.approx(amax, rel=1e-6)
    else:
        assert searched() < amax - 1e-6


def test_at_w8a8_mptq_keeps_full_ranges_but_still_searches_twin_ranges_and_weights(setup):
    """The 8-bit rule in a whole calibration: every softmax output keeps its known range
    [0, 1] (unsigned 8 bits: step 1/255; the search clipped it here before the rule),
    while the twin range after GELU and the weight clips are still chosen by their
    searches."""
    g, state, images = setup
    qg = vitdsl.loads(BASE.replace("  head pool=cls classes=10\n", "  head pool=cls classes=10\n  bits {\n    default w8a8\n  }\n"))
    m = vitdsl.compile(qg)
    m.load_state_dict(state, strict=False)
    calibrate(m, images, method="mptq")
    sd = m.state_dict()
    probs = [k for k in sd if k.endswith("probs.scale")]
    assert probs and all(float(sd[k]) == pytest.approx(1 / 255) for k in probs)
    assert float(sd["blocks.0.mlp.fc2.input_quant.neg_scale"]) > 0  # OPT-m twin range after GELU
    clipped = [k for k in sd if k.endswith("weight_quant.scale") and
               (sd[k] < sd[k.replace("weight_quant.scale", "weight")].flatten(1).abs().amax(1) / 127 - 1e-9).any()]
    assert clipped  # some weight channel's clip was searched below its largest magnitude
