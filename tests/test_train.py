"""`vitdsl train`: learning on real data, weights that load back, data-parallel replicas
that stay identical under torchrun, and clear errors with no partial output."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import vitdsl
from conftest import ROOT

pytest.importorskip("sklearn", reason="the digits data set ships with scikit-learn")

from vitdsl.train import load_digits, main, train  # noqa: E402

# specs/digits_vit.vit, narrower and shallower: 4 patch tokens of 8x8 pixels.
SMALL = """\
model digits_small {
  input image 1x16x16
  embed patch size=8 dim=32
  tokens cls=1 pos=learned
  stage blocks depth=2 {
    transformer heads=2 mlp=2.0 qkv_bias
  }
  norm layernorm
  head pool=mean classes=10
}
"""


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one intra-op thread is as fast, and far faster when other
    jobs share the cores (spinning OpenMP threads then wait on each other)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def small(tmp_path):
    p = tmp_path / "small.vit"
    p.write_text(SMALL)
    return p


def test_digits_split_is_fixed_and_stratified():
    a, b = load_digits((3, 16, 16)), load_digits((3, 16, 16))
    assert len(a.y_train) + len(a.y_test) == 1797
    assert 0.19 < len(a.y_test) / 1797 < 0.21
    assert torch.equal(a.y_test, b.y_test) and torch.equal(a.x_test, b.x_test)
    assert set(torch.bincount(a.y_test).tolist()) <= {35, 36, 37}  # every class held out in proportion
    assert a.x_train.shape[1:] == (1, 16, 16)  # grey, replicated to 3 channels batch by batch
    assert a.batch(a.x_train, torch.arange(4)).shape == (4, 3, 16, 16)
    assert abs(float(a.x_train.mean())) < 1e-4 and abs(float(a.x_train.std()) - 1) < 1e-3


def _image_keys(x):
    """One hashable key per image (the split is checked by content, not by position)."""
    return {bytes(v.numpy().tobytes()) for v in x.reshape(len(x), -1)}


def test_larger_held_out_fractions_are_nested_and_calibration_never_sees_them():
    from vitdsl.train import calibration_images

    small, half = load_digits((1, 8, 8)), load_digits((1, 8, 8), 0.5)
    assert len(half.y_test) == 898 and len(half.y_train) == 899
    per_class = torch.bincount(small.y_train) + torch.bincount(small.y_test)
    assert torch.equal(torch.bincount(half.y_test), torch.round(per_class / 2).long())  # still stratified
    # Normalisation differs between the two (training split statistics); compare raw pixels.
    def raw(d, x):
        return x * torch.tensor(d.std).view(1, -1, 1, 1) + torch.tensor(d.mean).view(1, -1, 1, 1)

    def keys(d, x):
        return _image_keys(torch.round(raw(d, x) * 16))  # the digits' pixels are 0..16

    test_small, test_half = keys(small, small.x_test), keys(half, half.x_test)
    train_half = keys(half, half.x_train)
    # digits has a few exact duplicate images; compare the sets as a whole, not by count
    assert test_small <= test_half | train_half and len(test_small - test_half) <= 2
    # the calibration images are training images at every allowed fraction, in both normalisations
    for frac, d in ((0.2, small), (0.5, half)):
        cal = calibration_images(64, (1, 8, 8), frac)
        assert cal.shape == (64, 1, 8, 8)
        cal_keys = _image_keys(torch.round(raw(d, cal) * 16))
        assert not cal_keys & test_half, frac
        assert cal_keys <= keys(d, d.x_train)
    with pytest.raises(vitdsl.SpecError, match="usable for calibration"):
        calibration_images(900, (1, 8, 8))


@pytest.mark.parametrize("bad", [0.0, -0.1, 0.51, 1.0, "0.3", True])
def test_a_held_out_fraction_outside_0_to_half_is_refused(small, bad):
    with pytest.raises(vitdsl.SpecError, match="test_fraction must be a number in"):
        train(small, epochs=1, max_steps=1, progress=False, test_fraction=bad)


def test_the_trained_fraction_travels_with_the_weights(small, tmp_path):
    out = tmp_path / "half.safetensors"
    assert main([str(small), "--epochs", "1", "--max-steps", "2", "--test-fraction", "0.5", "-q", "-o", str(out)]) == 0
    m = json.loads(out.with_suffix(".json").read_text())
    assert m["test_fraction"] == 0.5 and m["test_size"] == 898 and m["data_info"]["split"].startswith("stratified 50%/50%")
    from vitdsl.cli import _trained_split

    assert _trained_split(str(out)) == (0.5, 0)


def _raw_keys(d, x):
    """Keys of images by their raw digits pixels (0..16), whatever a split's normalisation."""
    raw = x * torch.tensor(d.std).view(1, -1, 1, 1) + torch.tensor(d.mean).view(1, -1, 1, 1)
    return [bytes(v.numpy().tobytes()) for v in torch.round(raw * 16).to(torch.int8).reshape(len(x), -1)]


def test_folds_hold_out_every_image_exactly_once_and_fold_0_is_the_fixed_split():
    from collections import Counter

    from sklearn.datasets import load_digits as sk_digits

    every = Counter(bytes(v.tobytes()) for v in sk_digits().images.astype("int8").reshape(1797, -1))
    held = Counter()
    for k in range(5):
        d = load_digits((1, 8, 8), 0.2, k)
        assert len(d.y_train) + len(d.y_test) == 1797 and 355 <= len(d.y_test) <= 362
        per_class = torch.bincount(d.y_train) + torch.bincount(d.y_test)
        assert ((torch.bincount(d.y_test) - per_class / 5).abs() < 1).all()  # stratified in every fold
        held.update(_raw_keys(d, d.x_test))
        assert not set(_raw_keys(d, d.x_test)) - set(every)
        if k:
            assert d.info["split"].endswith(f"fold {k} of 5") and d.info["fold"] == k
    assert held == every  # the five held-out blocks are a partition of the data set (duplicates included)
    fixed, fold0 = load_digits((1, 8, 8)), load_digits((1, 8, 8), 0.2, 0)
    assert torch.equal(fixed.x_test, fold0.x_test) and torch.equal(fixed.y_train, fold0.y_train)


def test_calibration_images_of_a_fold_are_its_training_images():
    from vitdsl.train import calibration_images

    d = load_digits((1, 8, 8), 0.2, 3)
    cal = calibration_images(64, (1, 8, 8), 0.2, 3)
    assert cal.shape == (64, 1, 8, 8)
    train_keys = _raw_keys(d, d.x_train)
    assert _raw_keys(d, cal) == train_keys[:64]  # the first 64, normalised as the fold's model
    # ... and those are never held out: the fold's two index sets partition the data set
    from sklearn.datasets import load_digits as sk_digits

    from vitdsl.train import _stratified_split

    train_idx, test_idx = _stratified_split(sk_digits().target, 0.2, fold=3)
    assert not set(train_idx) & set(test_idx) and len(train_idx) + len(test_idx) == 1797
    assert len(train_idx) == len(d.y_train)


@pytest.mark.parametrize("meta, want", [
    ({}, (None, 0)),  # weights from elsewhere
    ({"test_fraction": "0.2"}, (0.2, 0)),  # written before folds existed
    ({"test_fraction": "0.2", "fold": "3"}, (0.2, 3)),
    ({"test_fraction": "0.2", "fold": "-1"}, "fold '-1', not a fold number"),
    ({"test_fraction": "0.2", "fold": "x"}, "fold 'x', not a fold number"),
    ({"test_fraction": "0.2", "fold": "\u00b2"}, "not a fold number"),
    ({"test_fraction": "a fifth", "fold": "1"}, "test_fraction 'a fifth', not a number"),
])
def test_the_split_in_the_weights_metadata_is_read_or_refused(tmp_path, meta, want):
    """A wrong value must not fall back to fold 0: fold 0's calibration images are other
    folds' held-out images."""
    from safetensors.torch import save_file

    from vitdsl.cli import _trained_split

    path = str(tmp_path / "w.safetensors")
    save_file({"x": torch.zeros(1)}, path, metadata=meta)
    if isinstance(want, tuple):
        assert _trained_split(path) == want
    else:
        with pytest.raises(vitdsl.SpecError, match=want) as e:
            _trained_split(path)
        assert e.value.filename == path


@pytest.mark.parametrize("fraction,fold", [(0.2, 5), (0.2, -1), (0.3, 3), (0.5, 2), (0.2, 1.0), (0.2, True)])
def test_a_fold_outside_the_fractions_blocks_is_refused(small, fraction, fold):
    with pytest.raises(vitdsl.SpecError, match=r"fold must be an integer in \[0, "):
        train(small, epochs=1, max_steps=1, progress=False, test_fraction=fraction, fold=fold)


def test_the_fold_travels_with_the_weights_to_quantize(small, tmp_path):
    out = tmp_path / "f2.safetensors"
    assert main([str(small), "--epochs", "1", "--max-steps", "2", "--fold", "2", "-q", "-o", str(out)]) == 0
    m = json.loads(out.with_suffix(".json").read_text())
    assert m["fold"] == 2 and m["data_info"]["split"] == "stratified 80%/20%, seed 0, fold 2 of 5"
    d = load_digits((1, 16, 16), 0.2, 2)
    assert m["test_size"] == len(d.y_test)
    from vitdsl.cli import _trained_split
    from vitdsl.quant.quantize import load_images

    assert _trained_split(str(out)) == (0.2, 2)
    cal = load_images("digits:8", (1, 16, 16), *_trained_split(str(out)))
    assert torch.equal(cal, d.x_train[:8])


def test_a_fold_of_a_folder_with_its_own_split_is_refused(small, tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        for c in range(10):
            os.makedirs(tmp_path / "data" / split / str(c))
            Image.new("L", (8, 8), 30 * c % 255).save(tmp_path / "data" / split / str(c) / "a.png")
    with pytest.raises(vitdsl.SpecError, match="has its own train/test split"):
        train(small, data=str(tmp_path / "data"), epochs=1, max_steps=1, progress=False, fold=1)


def test_short_run_learns_and_weights_load_strictly(small, tmp_path):
    out = tmp_path / "w" / "small.safetensors"  # the directory is created on write
    m = train(small, epochs=1, batch_size=32, lr=3e-3, seed=0, out=str(out), progress=False)
    assert m["test_size"] == 359 and m["train_size"] == 1438 and m["steps"] == 1438 // 32
    assert m["test_acc"] > 0.4, m["history"]  # after 44 steps; chance is 10%
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["test_acc"] == m["test_acc"] and saved["history"] == m["history"]
    model = vitdsl.compile(vitdsl.load(small), seed=123)
    from vitdsl.build import load_weights

    load_weights(model, str(out))  # strict: raises on any missing or unexpected tensor
    # the loaded model reproduces the reported held-out accuracy
    d = load_digits((1, 16, 16))
    with torch.no_grad():
        acc = (model.eval()(d.x_test).argmax(1) == d.y_test).float().mean().item()
    assert acc == pytest.approx(m["test_acc"], abs=1e-6)
    assert sorted(os.listdir(out.parent)) == ["small.json", "small.safetensors"]  # no temp files left


def test_deterministic_under_a_seed(small):
    kw = dict(epochs=1, batch_size=64, max_steps=4, progress=False)
    a, b, c = train(small, seed=1, **kw), train(small, seed=1, **kw), train(small, seed=2, **kw)
    def strip(m):
        return [{k: v for k, v in h.items() if k != "seconds"} for h in m["history"]]

    assert a["replica_sha256"] == b["replica_sha256"] and strip(a) == strip(b)
    assert a["replica_sha256"] != c["replica_sha256"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_replicas_stay_identical(small, tmp_path):
    sums, out = tmp_path / "sums", tmp_path / "ddp.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "--master_addr=127.0.0.1", "-m", "vitdsl.train", str(small), "--epochs", "1", "--batch-size", "32",
           "--max-steps", "6", "--lr", "3e-3", "--seed", "3", "-q", "--replica-checksums", str(sums), "-o", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    ranks = [json.loads((sums / f"rank{i}.json").read_text()) for i in range(2)]
    assert [x["world_size"] for x in ranks] == [2, 2] and [x["steps"] for x in ranks] == [6, 6]
    assert ranks[0]["sha256"] == ranks[1]["sha256"]  # bit-identical replicas after 6 DDP steps
    m = json.loads(out.with_suffix(".json").read_text())
    assert m["world_size"] == 2 and m["batch_size_per_rank"] == 16 and m["replicas_identical"]
    assert m["replica_sha256"] == [ranks[0]["sha256"]] * 2
    # The same run in one process visits the same global batches: the same weights up to
    # float summation order.
    single = tmp_path / "single.safetensors"
    train(small, epochs=1, batch_size=32, max_steps=6, lr=3e-3, seed=3, out=str(single), progress=False)
    from safetensors.torch import load_file

    a, b = load_file(str(out)), load_file(str(single))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-4, msg=k)


# ---------------------------------------------------------------------------- bad input
def _digit_pngs(root, classes=(0, 1), per_class=12, mode="L"):
    from PIL import Image
    from sklearn.datasets import load_digits as sk

    d = sk()
    for c in classes:
        os.makedirs(root / f"class_{c}", exist_ok=True)
        for i, img in enumerate(d.images[d.target == c][:per_class]):
            Image.fromarray((img * 255 / 16).astype("uint8"), "L").convert(mode).save(root / f"class_{c}" / f"{i}.png")


def test_image_folder(tmp_path):
    _digit_pngs(tmp_path / "imgs")
    spec = tmp_path / "two.vit"
    spec.write_text(SMALL.replace("classes=10", "classes=2").replace("1x16x16", "3x16x16"))
    m = train(spec, data=str(tmp_path / "imgs"), epochs=1, batch_size=8, progress=False)
    assert m["classes"] == ["class_0", "class_1"] and m["train_size"] + m["test_size"] == 24
    assert m["test_size"] == 4  # round(20%) of each class held out
    # given splits: PATH/train/<class>/ and PATH/test/<class>/, RGB images into 3 channels
    _digit_pngs(tmp_path / "split" / "train", per_class=8, mode="RGB")
    _digit_pngs(tmp_path / "split" / "test", per_class=3, mode="RGB")
    m = train(spec, data=str(tmp_path / "split"), epochs=1, batch_size=8, progress=False)
    assert (m["train_size"], m["test_size"], m["data_info"]["mode"]) == (16, 6, "RGB")


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "usage: vitdsl train" in out and "--data" in out and "torchrun" in out


def test_bad_input_is_a_spec_error_with_no_output(tmp_path, small, capsys):
    out = tmp_path / "o" / "w.safetensors"
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "cat").mkdir()
    with pytest.raises(vitdsl.SpecError, match="empty data set"):
        train(small, data=str(tmp_path / "empty"), out=str(out), progress=False)

    _digit_pngs(tmp_path / "rgb", mode="RGB")
    two = tmp_path / "two.vit"
    two.write_text(SMALL.replace("classes=10", "classes=2").replace("1x16x16", "2x16x16"))
    with pytest.raises(vitdsl.SpecError, match="colour .* 2 channels") as e:
        train(two, data=str(tmp_path / "rgb"), out=str(out), progress=False)
    assert str(e.value).startswith(f"{two}:2:3: error:")  # points at the spec's input

    with pytest.raises(vitdsl.SpecError, match="has 10 classes but the data set .* has 2"):
        train(small, data=str(tmp_path / "rgb"), out=str(out), progress=False)

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if not os.access(ro, os.W_OK):  # (root can write anywhere)
            with pytest.raises(vitdsl.SpecError, match="permission denied"):
                train(small, out=str(ro / "w.safetensors"), progress=False)
    finally:
        ro.chmod(0o755)
    with pytest.raises(vitdsl.SpecError, match="must end in .safetensors"):
        train(small, out=str(tmp_path / "w.pt"), progress=False)
    assert not out.parent.exists() and os.listdir(ro) == []

    assert main([str(small), "--data", str(tmp_path / "empty"), "-o", str(out)]) == 1  # the command: a diagnostic
    assert capsys.readouterr().err.startswith(f"{tmp_path / 'empty'}:1:1: error: empty data set")
    assert not out.parent.exists()


def test_unwritable_output_leaves_nothing(small, tmp_path, monkeypatch):
    """A failure while writing (here: the final rename) raises SpecError and leaves no files."""
    out = tmp_path / "w.safetensors"

    def fail(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(vitdsl.SpecError, match="cannot write output: No space left"):
        train(small, epochs=1, max_steps=1, out=str(out), progress=False)
    assert os.listdir(tmp_path) == ["small.vit"]


def test_main_entry(small, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    assert main([str(small), "--epochs", "1", "--max-steps", "2", "-q", "-o", str(out)]) == 0
    assert "held-out accuracy" in capsys.readouterr().out and out.exists()
