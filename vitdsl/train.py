"""`vitdsl train`: train a spec on a small image-classification data set, on CPU.

    metrics = vitdsl.train.train("specs/digits_vit.vit", data="digits", epochs=30,
                                 out="build/digits_vit.safetensors")

Data
  ``digits``  scikit-learn's digits (1797 real 8x8 grey handwritten digits, shipped
              inside scikit-learn): upsampled (bilinear) to the spec's input size,
              replicated to its channel count.
  ``PATH``    an image folder, torchvision style: ``PATH/<class>/*.png`` (or jpg, bmp,
              gif, tif, webp, ppm/pgm).  With ``PATH/train/<class>/`` and
              ``PATH/test/<class>/`` (or ``val``) those are the two splits.  Images are
              resized (bilinear) to the spec's input size and held in memory.
  Without given splits, a fixed stratified split holds out 20 % of every class
  (``test_fraction``, at most 50 %); it depends on SPLIT_SEED only, never on the training
  seed, so every run of every spec is scored on the same images.  The splits are nested:
  every class's images are taken in one fixed order, the test split is its first
  ``round(n_c * test_fraction)``, so a larger fraction only moves images from train to
  test; the second half of every class's order is therefore training data at every
  allowed fraction (what ``vitdsl quantize --calib digits:N`` draws from).  Inputs are
  normalised with the training split's per-channel mean and standard deviation
  (recorded in the outputs).
  Cross-validation: ``fold`` k holds out positions [round(n_c f k), round(n_c f (k+1)))
  of the same fixed order instead of the first block (fold 0 is the split above), so
  the floor(1 / test_fraction) folds hold out disjoint images, and with a fraction of
  1/K every image exactly once: K models scored on all the data, for comparisons finer
  than one held-out split resolves.

Training
  AdamW, a linear warm-up then a cosine schedule (per step), optional label smoothing,
  optional random shifts (augmentation).  Under a seed the run is deterministic: the
  initialisation, the data order (DistributedSampler with the seed), the shifts.  The
  held-out accuracy is measured after every epoch on the test split only.

Distributed
  Runs unchanged under ``torchrun --nproc_per_node=N``: with WORLD_SIZE > 1 it joins a
  gloo process group, wraps the model in DistributedDataParallel and splits every
  batch between the ranks.  ``batch_size`` is the global batch (each rank takes
  ``batch_size // world_size``), and the sampler deals out one global permutation, so
  N processes visit the same batches in the same order as one process would.  Only
  rank 0 writes files.

Outputs (rank 0, atomically: temp file + os.replace, nothing on failure)
  ``OUT.safetensors``  the weights (state_dict keys = node names); loads strictly into
                       ``vitdsl.compile(vitdsl.load(spec))``
  ``OUT.json``         metrics: per-epoch loss and accuracy, the final held-out
                       accuracy, time, data, normalisation, hyperparameters
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from .atomic import probe_write, writable_parent
from .errors import SpecError

SPLIT_SEED = 0
"""Seed of the fixed train/test split (independent of the training seed)."""

TEST_FRACTION = 0.2
MAX_TEST_FRACTION = 0.5
"""Largest held-out fraction; calibration images come from the training split at this fraction,
which (the splits being nested) is training data at every allowed fraction."""
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
MAX_DATA_BYTES = 4 << 30  # this is for small data sets: everything is held in memory
_NO_DECAY = {"pos_embed", "cls_token", "dist_token", "relative_position_bias_table"}


# ---------------------------------------------------------------------------- data
@dataclass
class Data:
    """A data set resized to the spec's input, normalised, split in two."""

    name: str
    classes: list[str]
    x_train: Any  # float32 (N, C', H, W); C' is 1 when grey images are replicated lazily
    y_train: Any  # int64 (N,)
    x_test: Any
    y_test: Any
    mean: list[float]
    std: list[float]
    channels: int  # the spec's channel count (x is expanded to it batch by batch)
    info: dict = field(default_factory=dict)

    def batch(self, x, idx):
        b = x[idx]
        if b.shape[1] != self.channels:
            b = b.expand(-1, self.channels, -1, -1).contiguous()
        return b


def env_int(name: str, default: int) -> int:
    """A torchrun environment variable (WORLD_SIZE, RANK) as a non-negative integer."""
    text = os.environ.get(name)
    if text is None:
        return default
    if not (text.isascii() and text.strip().isdigit()):
        raise SpecError(f"environment variable {name} must be a non-negative integer, got {text!r}")
    return int(text)


def _stratified_split(labels, test_fraction: float = TEST_FRACTION, seed: int = SPLIT_SEED, fold: int = 0):
    """Hold out round(n_c * test_fraction) images of every class c; a fixed permutation.

    The permutation of each class depends on `seed` only, so the test split of a larger
    fraction contains that of a smaller one (fold 0).  Fold k holds out positions
    [round(n_c f k), round(n_c f (k+1))) of that permutation: adjacent folds share their
    boundary, so the folds are disjoint and, when k f reaches 1, cover every image."""
    import numpy as np

    _check_split(test_fraction, fold)
    labels = np.asarray(labels)
    rng = np.random.RandomState(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        lo, hi = int(round(len(idx) * test_fraction * fold)), int(round(len(idx) * test_fraction * (fold + 1)))
        test.extend(idx[lo:hi].tolist())
        train.extend(idx[:lo].tolist() + idx[hi:].tolist())
    return sorted(train), sorted(test)


def n_folds(test_fraction: float) -> int:
    """How many disjoint held-out blocks of this share fit in the data: floor(1 / f)."""
    return int(1.0 / test_fraction + 1e-9)


def _check_split(test_fraction, fold) -> tuple[float, int]:
    """(fraction, fold) checked: the fold must be one of the fraction's n_folds."""
    f = _check_fraction(test_fraction)
    if isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < n_folds(f):
        raise SpecError(f"fold must be an integer in [0, {n_folds(f) - 1}] for test_fraction {f:g} "
                        f"({n_folds(f)} disjoint held-out blocks), got {fold!r}")
    return f, fold


def _check_fraction(test_fraction) -> float:
    """The held-out share as a float, or a SpecError: above one half the training split
    would no longer contain the calibration pool (see MAX_TEST_FRACTION)."""
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) \
            or not 0.0 < test_fraction <= MAX_TEST_FRACTION:
        raise SpecError(f"test_fraction must be a number in (0, {MAX_TEST_FRACTION}], got {test_fraction!r}")
    return float(test_fraction)


def _split_label(test_fraction: float, fold: int = 0) -> str:
    label = f"stratified {1 - test_fraction:.0%}/{test_fraction:.0%}, seed {SPLIT_SEED}"
    return label + (f", fold {fold} of {n_folds(test_fraction)}" if fold else "")


def _normalise(x_train, x_test):
    """Per-channel mean/std of the training split, applied to both splits."""
    mean = x_train.mean(dim=(0, 2, 3))
    std = x_train.std(dim=(0, 2, 3)).clamp_min(1e-6)
    m, s = mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)
    return (x_train - m) / s, (x_test - m) / s, mean.tolist(), std.tolist()


def load_digits(shape: tuple[int, int, int], test_fraction: float = TEST_FRACTION, fold: int = 0) -> Data:
    """scikit-learn's digits, upsampled to HxW, split 80/20 (stratified, fixed; `test_fraction`
    holds out more, `fold` another block)."""
    import torch
    import torch.nn.functional as F

    try:
        from sklearn.datasets import load_digits as _sk_digits
    except ImportError:
        raise SpecError("the built-in 'digits' data set needs scikit-learn: pip install scikit-learn "
                        "(or pass --data PATH, an image folder)") from None
    c, h, w = shape
    d = _sk_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8) in [0, 1]
    if (h, w) != (8, 8):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    y = torch.tensor(d.target, dtype=torch.int64)
    train, test = _stratified_split(y.numpy(), test_fraction, fold=fold)
    xtr, xte, mean, std = _normalise(x[train], x[test])
    return Data("digits", [str(i) for i in range(10)], xtr, y[train], xte, y[test], mean, std, c,
                info={"source": "sklearn.datasets.load_digits", "split": _split_label(test_fraction, fold),
                      "test_fraction": test_fraction, "fold": fold, "original_size": "1x8x8"})


def calibration_images(n: int, shape: tuple[int, int, int], test_fraction: float = TEST_FRACTION, fold: int = 0):
    """The first n digits training images at the model's input shape, normalised as for a
    model trained with `test_fraction` and `fold`: what `vitdsl quantize --calib digits:N`
    calibrates on.

    Fold 0: only images that are training data at MAX_TEST_FRACTION qualify; the splits
    being nested, they are training data at every fraction, so the same images serve
    every fold-0 model and none of them is ever held out.  Other folds: the fold's own
    training images (never its held-out ones)."""
    import numpy as np
    from sklearn.datasets import load_digits as _sk_digits

    data = load_digits(tuple(shape), test_fraction, fold)
    labels = np.asarray(_sk_digits().target)
    train, _ = _stratified_split(labels, test_fraction, fold=fold)
    pool = set(_stratified_split(labels, MAX_TEST_FRACTION)[0]) if fold == 0 else set(train)
    usable = [i for i, k in enumerate(train) if k in pool]
    if not 0 < n <= len(usable):
        raise SpecError(f"digits has {len(usable)} images usable for calibration; asked for {n}")
    return data.batch(data.x_train, usable[:n])


def _class_files(root: str) -> dict[str, list[str]]:
    classes = {}
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        files = sorted(os.path.join(entry.path, f) for f in os.listdir(entry.path)
                       if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)
                       and os.path.isfile(os.path.join(entry.path, f)))
        if files:
            classes[entry.name] = files
    return classes


def _split_dirs(root: str) -> tuple[str, str] | None:
    train = os.path.join(root, "train")
    for name in ("test", "val"):
        test = os.path.join(root, name)
        if os.path.isdir(train) and os.path.isdir(test) and _class_files(train):
            return train, test
    return None


_GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


def load_image_folder(root: str, shape: tuple[int, int, int], where: tuple | None = None,
                      test_fraction: float = TEST_FRACTION, fold: int = 0) -> Data:
    """``root/<class>/*.png`` (or ``root/{train,test}/<class>/...``), resized to HxW."""
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    c, h, w = shape
    if not os.path.isdir(root):
        raise SpecError("data is neither 'digits' nor an image folder (no such directory)", filename=root)
    splits = _split_dirs(root)
    if splits and fold:
        raise SpecError(f"fold {fold}: this image folder has its own train/test split; folds are blocks of "
                        "the split vitdsl makes for a folder without one", filename=root)
    if splits:
        train_files, test_files = _class_files(splits[0]), _class_files(splits[1])
        unknown = sorted(set(test_files) - set(train_files))
        if unknown:
            raise SpecError(f"the test split has classes the train split lacks: {', '.join(unknown)}", filename=splits[1])
    else:
        train_files, test_files = _class_files(root), None
    if not train_files:
        raise SpecError("empty data set: expected one folder per class holding images "
                        f"({', '.join(IMAGE_EXTENSIONS)}), e.g. {os.path.join(root, 'cat', '0001.png')}", filename=root)
    classes = sorted(train_files)
    if len(classes) < 2:
        raise SpecError(f"a classifier needs at least 2 classes; found only '{classes[0]}'", filename=root)
    index = {k: i for i, k in enumerate(classes)}

    def listing(files):
        return [(p, index[k]) for k in sorted(files) for p in files[k]]

    train_list = listing(train_files)
    test_list = listing(test_files) if test_files is not None else []
    n = len(train_list) + len(test_list)
    src = 1 if c not in (1, 3, 4) else c
    if n * src * h * w * 4 > MAX_DATA_BYTES:
        raise SpecError(f"{n:,} images at {c}x{h}x{w} would take {n * src * h * w * 4 / 2**30:.1f} GiB in memory; "
                        f"vitdsl train is for small data sets (at most {MAX_DATA_BYTES >> 30} GiB)", filename=root)

    # Pass 1 reads only the headers: the images' colour kind decides the channel rule.
    files = [p for p, _ in train_list + test_list]
    kinds = set()
    for p in files:
        try:
            with Image.open(p) as im:
                mode = im.mode
                if mode == "P":
                    kinds.add("rgba" if "transparency" in im.info else "rgb")
                else:
                    kinds.add("grey" if mode in _GREY_MODES else "rgba" if "A" in mode else "rgb")
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise SpecError(f"cannot read image: {e}", filename=p) from None
    kind = "rgba" if "rgba" in kinds else "rgb" if "rgb" in kinds else "grey"
    if c == 1 or kind == "grey":
        mode = "L"
    elif c == 3:
        mode = "RGB"
    elif c == 4 and kind == "rgba":
        mode = "RGBA"
    else:
        msg = (f"the images in {root} are colour ({kind.upper()}) but the spec's input has {c} channels; "
               "colour images can feed 1 (as greyscale), 3 (RGB) or, with alpha, 4 (RGBA) channels, "
               "greyscale images any number")
        if where is not None:
            raise SpecError(msg, where[1]).located(where[0], where[2])
        raise SpecError(msg, filename=root)

    # Pass 2 decodes, converts and resizes one image at a time.
    k = 1 if mode == "L" else len(mode)
    x = torch.empty(n, k, h, w)
    for i, p in enumerate(files):
        try:
            with Image.open(p) as im:
                arr = np.asarray(im.convert(mode).resize((w, h), Image.BILINEAR), dtype=np.float32)
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise SpecError(f"cannot read image: {e}", filename=p) from None
        x[i] = torch.from_numpy(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1).copy()) / 255.0
    y = torch.tensor([k for _, k in train_list + test_list], dtype=torch.int64)
    if test_files is not None:
        tr, te = list(range(len(train_list))), list(range(len(train_list), n))
        split = f"given: {os.path.basename(splits[0])}/ and {os.path.basename(splits[1])}/"
    else:
        tr, te = _stratified_split(y.numpy(), test_fraction, fold=fold)
        split = _split_label(test_fraction, fold)
    if not te:
        raise SpecError(f"too few images ({n}) to hold out a test split: add images (or a test/ folder)", filename=root)
    if not tr:
        raise SpecError("the train split is empty", filename=root)
    xtr, xte, mean, std = _normalise(x[tr], x[te])
    return Data(os.path.abspath(root), classes, xtr, y[tr], xte, y[te], mean, std, c,
                info={"source": "image folder", "split": split, "mode": mode, "images": n})


def load_data(data: str, graph, test_fraction: float = TEST_FRACTION, fold: int = 0) -> Data:
    """'digits' or an image folder, shaped for `graph`'s input and checked against its head
    (`test_fraction`, `fold`: the held-out block where the data has no given test split)."""
    inp = graph.input
    shape = tuple(inp.out.shape)
    if inp.out.kind != "image" or len(shape) != 3:
        raise _at(graph, inp, f"training needs an image input, got {inp.out.kind} {shape}")
    out = graph.output
    if out.out.kind != "vector" or len(out.out.shape) != 1:
        raise _at(graph, out, f"training needs a classifier: the output '{out.name}' is {out.out.kind} "
                              f"{'x'.join(map(str, out.out.shape))}, not a vector of class scores")
    if data == "digits":
        d = load_digits(shape, test_fraction, fold)
    else:
        d = load_image_folder(data, shape, where=(graph.filename, inp.span, graph.source), test_fraction=test_fraction,
                              fold=fold)
    k = out.out.shape[0]
    if k != len(d.classes):
        raise _at(graph, out, f"'{out.name}' has {k} classes but the data set '{data}' has {len(d.classes)}; "
                              f"set `classes={len(d.classes)}`")
    return d


def _at(graph, node, message: str) -> SpecError:
    return SpecError(message, node.span).located(graph.filename, graph.source)


# ---------------------------------------------------------------------------- helpers
class _Progress:
    """A one-line text progress bar on stderr (no tqdm)."""

    def __init__(self, enabled: bool, tty: bool, epochs: int):
        self.enabled, self.tty, self.epochs = enabled, tty, epochs
        self.t0 = time.perf_counter()
        self.last = 0.0

    def step(self, epoch: int, i: int, n: int, loss: float) -> None:
        if not (self.enabled and self.tty):
            return
        now = time.perf_counter()
        if i < n and now - self.last < 0.1:
            return
        self.last = now
        bar = "#" * (i * 20 // max(n, 1))
        sys.stderr.write(f"\repoch {epoch}/{self.epochs} [{bar:<20}] {i}/{n} loss {loss:.4f} {now - self.t0:6.1f}s ")
        sys.stderr.flush()

    def line(self, text: str) -> None:
        if self.enabled:
            sys.stderr.write(("\r" if self.tty else "") + f"{text:<72}\n")
            sys.stderr.flush()


def state_checksum(model) -> str:
    """sha256 over every tensor of the state dict, in key order (bit-exact comparison)."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(str(v.dtype).encode())
        h.update(repr(tuple(v.shape)).encode())
        h.update(v.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def _check_output(out: str) -> str:
    if not out.endswith(".safetensors"):
        raise SpecError("output must end in .safetensors (the metrics go beside it, as .json)", filename=out)
    if os.path.isdir(out):
        raise SpecError("output is a directory; give a file name ending in .safetensors", filename=out)
    probe = writable_parent(out)
    try:
        probe_write(probe)
    except OSError as e:
        raise SpecError(f"cannot write to {probe}: {e.strerror or e}", filename=out) from None
    for path in (out, out[: -len(".safetensors")] + ".json"):
        if os.path.exists(path) and not os.access(path, os.W_OK):
            raise SpecError("cannot overwrite: permission denied", filename=path)
    return os.path.abspath(out)


def _write_outputs(out: str, state: dict, metadata: dict, metrics: dict) -> None:
    """Weights and metrics through temp files in the target directory + os.replace."""
    from safetensors.torch import save_file

    parent = os.path.dirname(out)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise SpecError(f"cannot create {parent}: {e.strerror}", filename=out) from None
    json_path = out[: -len(".safetensors")] + ".json"
    tmps = []
    try:
        fd, tw = tempfile.mkstemp(prefix=".vitdsl-", suffix=".safetensors.tmp", dir=parent)
        os.close(fd)
        tmps.append(tw)
        save_file(state, tw, metadata=metadata)
        fd, tj = tempfile.mkstemp(prefix=".vitdsl-", suffix=".json.tmp", dir=parent)
        tmps.append(tj)
        with os.fdopen(fd, "w") as f:
            json.dump(metrics, f, indent=1)
            f.write("\n")
        mask = os.umask(0)
        os.umask(mask)
        for t in tmps:
            os.chmod(t, 0o666 & ~mask)
        os.replace(tw, out)
        os.replace(tj, json_path)
    except OSError as e:
        raise SpecError(f"cannot write output: {e.strerror or e}", filename=out) from None
    finally:
        for t in tmps:
            with contextlib.suppress(OSError):
                os.unlink(t)


def _shift(x, shifts, fill: float):
    """Translate each image by its (dy, dx), filling the uncovered border with `fill`."""
    import torch.nn.functional as F

    m = int(shifts.abs().max()) if len(shifts) else 0
    if m == 0:
        return x
    n, _, h, w = x.shape
    p = F.pad(x, (m, m, m, m), value=fill)
    out = x.new_empty(x.shape)
    for i in range(n):
        dy, dx = int(shifts[i, 0]), int(shifts[i, 1])
        out[i] = p[i, :, m - dy: m - dy + h, m - dx: m - dx + w]
    return out


# ---------------------------------------------------------------------------- training
def train(spec_path_or_graph, data: str = "digits", epochs: int = 30, batch_size: int = 32, lr: float = 1e-3,
          seed: int = 0, out: str | None = None, progress: bool | None = None, *, weight_decay: float = 0.05,
          label_smoothing: float = 0.1, warmup_epochs: float = 1.0, augment: int | None = None,
          max_steps: int | None = None, checksum_dir: str | None = None, max_params: int | None = None,
          test_fraction: float = TEST_FRACTION, fold: int = 0) -> dict:
    """Train a spec; returns the metrics (also written to OUT.json when `out` is given).

    spec_path_or_graph  a .vit path or a vitdsl.Graph
    data                'digits' or an image folder (see the module docstring)
    batch_size          the global batch (split between ranks under torchrun)
    progress            None: a progress bar when stderr is a terminal; True: always
                        report (per-epoch lines when not a terminal); False: quiet
    augment             random shifts of up to this many pixels per image (None: 1/16 of
                        the image side; 0: off)
    max_steps           stop after this many optimizer steps (smoke tests)
    checksum_dir        every rank writes rank<R>.json with its parameters' sha256 there
    test_fraction       held-out share of every class (fixed split, nested; at most 0.5)
    fold                which block of that share is held out (cross-validation; 0: the first)
    """
    import torch.distributed as dist

    from .api import load
    from .graph import Graph

    for name, v, lo in (("epochs", epochs, 1), ("batch_size", batch_size, 1), ("seed", seed, 0),
                        ("augment", augment, 0), ("max_steps", max_steps, 1)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < lo):
            raise SpecError(f"{name} must be an integer >= {lo}, got {v!r}")
    from .backends.torch import check_seed

    check_seed(seed)  # before the data split and shuffles seed their generators with it
    for name, v in (("weight_decay", weight_decay), ("warmup_epochs", warmup_epochs)):
        if not (v >= 0 and math.isfinite(v)):
            raise SpecError(f"{name} must be a number >= 0, got {v!r}")
    if not (lr > 0 and math.isfinite(lr)):
        raise SpecError(f"lr must be a positive number, got {lr!r}")
    if not 0.0 <= label_smoothing < 1.0:
        raise SpecError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
    test_fraction, fold = _check_split(test_fraction, fold)
    if isinstance(spec_path_or_graph, Graph):
        graph = spec_path_or_graph
        spec_name = graph.filename
    else:
        spec_name = os.fspath(spec_path_or_graph)
        graph = load(spec_name, **({"max_params": max_params} if max_params is not None else {}))
    out = _check_output(out) if out is not None else None
    if checksum_dir is not None:  # made and tried now: an unwritable directory must not cost a whole training
        try:
            os.makedirs(checksum_dir, exist_ok=True)
            probe_write(checksum_dir)
        except OSError as e:
            raise SpecError(f"cannot write to the replica checksum directory: {e.strerror or e}",
                            filename=checksum_dir) from None

    world = env_int("WORLD_SIZE", 1)
    own_group = False
    if world > 1 and not dist.is_initialized():
        try:
            dist.init_process_group("gloo")
        except ValueError as e:  # torchrun's variables set by hand, some missing or wrong
            raise SpecError(f"cannot start torch.distributed: {e}") from None
        own_group = True
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    world = dist.get_world_size() if distributed else 1
    rank = dist.get_rank() if distributed else 0
    try:
        return _train(graph, spec_name, data, epochs, batch_size, lr, seed, out, progress, weight_decay,
                      label_smoothing, warmup_epochs, augment, max_steps, checksum_dir, distributed, world, rank,
                      test_fraction, fold)
    finally:
        if own_group:
            dist.destroy_process_group()


def _train(graph, spec_name, data, epochs, batch_size, lr, seed, out, progress, weight_decay, label_smoothing,
           warmup_epochs, augment, max_steps, checksum_dir, distributed, world, rank, test_fraction, fold):
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.utils.data.distributed import DistributedSampler

    from .api import compile as vit_compile
    from .build import spec_hash

    t_start = time.perf_counter()
    if batch_size % world:
        raise SpecError(f"batch_size {batch_size} does not split evenly between {world} processes")
    per_rank = batch_size // world
    d = load_data(data, graph, test_fraction, fold)
    n_train = len(d.y_train)
    if n_train < batch_size:
        raise SpecError(f"the train split has {n_train} images, fewer than one batch of {batch_size}; "
                        "lower the batch size", filename=data if data != "digits" else "<digits>")
    c, h, w = graph.input.out.shape
    if augment is None:
        augment = max(h, w) // 16
    fill = [(0.0 - m) / s for m, s in zip(d.mean, d.std)]  # background (0) after normalisation
    fill_value = fill[0] if len(set(fill)) == 1 else 0.0

    torch.manual_seed(seed)
    model = vit_compile(graph, seed=seed)
    from .quant.fake import require_ranges

    require_ranges(model, graph, "vitdsl train (from random weights)")
    n_params = sum(p.numel() for p in model.parameters())
    ddp = torch.nn.parallel.DistributedDataParallel(model) if distributed else model

    # No weight decay on biases, norms, scalars, position embeddings, class tokens and
    # relative position tables (as timm does).
    def decays(name: str, p) -> bool:
        return p.ndim >= 2 and name.rsplit(".", 1)[-1] not in _NO_DECAY

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if decays(n, p)]
    no_decay = [p for n, p in named if not decays(n, p)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    # One global permutation per epoch, dealt out to the ranks: rank r's k-th batch plus
    # the other ranks' k-th batches is exactly the k-th global batch of one process.
    sampler = DistributedSampler(range(n_train), num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
    steps_per_epoch = len(sampler) // per_rank
    total_steps = steps_per_epoch * epochs
    if max_steps is not None:
        total_steps = min(total_steps, max_steps)
    warmup = min(int(round(warmup_epochs * steps_per_epoch)), total_steps // 10)  # at most 10% of the run
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, total_steps, warmup))

    tty = sys.stderr.isatty()
    bar = _Progress(rank == 0 and (progress is True or (progress is None and tty)), tty, epochs)
    test_idx = torch.arange(rank, len(d.y_test), world)  # evaluation is split between ranks too

    def evaluate() -> float:
        model.eval()
        correct = torch.zeros(2, dtype=torch.float64)
        with torch.no_grad():
            for i in range(0, len(test_idx), 256):
                idx = test_idx[i: i + 256]
                pred = model(d.batch(d.x_test, idx)).argmax(1)
                correct[0] += (pred == d.y_test[idx]).sum().item()
                correct[1] += len(idx)
        if distributed:
            dist.all_reduce(correct)
        model.train()
        return float(correct[0] / correct[1])

    history = []
    step = 0
    model.train()
    for epoch in range(epochs):
        if step >= total_steps:
            break
        t_epoch = time.perf_counter()
        sampler.set_epoch(epoch)
        order = torch.tensor(list(iter(sampler)), dtype=torch.int64)
        if augment:  # per-image shifts drawn for the whole data set: the same in any world size
            g = torch.Generator().manual_seed(seed * 100_003 + epoch)
            shifts_all = torch.randint(-augment, augment + 1, (n_train, 2), generator=g)
        stats = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, count (this rank)
        for k in range(steps_per_epoch):
            if step >= total_steps:
                break
            idx = order[k * per_rank: (k + 1) * per_rank]
            x = d.batch(d.x_train, idx)
            if augment:
                x = _shift(x, shifts_all[idx], fill_value)
            y = d.y_train[idx]
            logits = ddp(x)
            loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            stats += torch.tensor([loss.item() * len(idx), (logits.argmax(1) == y).sum().item(), len(idx)],
                                  dtype=torch.float64)
            bar.step(epoch + 1, k + 1, steps_per_epoch, loss.item())
        if distributed:
            dist.all_reduce(stats)
        acc = evaluate()
        row = {"epoch": epoch + 1, "steps": step, "train_loss": round(float(stats[0] / stats[2]), 6),
               "train_acc": round(float(stats[1] / stats[2]), 6), "test_acc": round(acc, 6),
               "lr": round(opt.param_groups[0]["lr"], 9), "seconds": round(time.perf_counter() - t_epoch, 3)}
        history.append(row)
        bar.line(f"epoch {epoch + 1}/{epochs}  loss {row['train_loss']:.4f}  train {row['train_acc']:.2%}  "
                 f"held-out {acc:.2%}  {time.perf_counter() - t_start:.1f}s")

    checksum = state_checksum(model)
    replicas = [checksum]
    if distributed:
        replicas = [None] * world
        dist.all_gather_object(replicas, checksum)
    if checksum_dir is not None:
        os.makedirs(checksum_dir, exist_ok=True)
        with open(os.path.join(checksum_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"rank": rank, "world_size": world, "steps": step, "sha256": checksum}, f)

    elapsed = time.perf_counter() - t_start
    final = history[-1]["test_acc"] if history else float("nan")
    metrics = {
        "model": graph.name, "spec": spec_name, "spec_sha256": spec_hash(graph), "params": n_params,
        "input": [c, h, w], "data": d.name, "data_info": d.info, "classes": d.classes,
        "train_size": n_train, "test_size": len(d.y_test), "normalise": {"mean": d.mean, "std": d.std},
        "epochs": epochs, "steps": step, "batch_size": batch_size, "batch_size_per_rank": per_rank,
        "lr": lr, "weight_decay": weight_decay, "label_smoothing": label_smoothing,
        "warmup_steps": warmup, "schedule": "linear warm-up, cosine to 0 (per step)", "optimizer": "AdamW",
        "augment_shift_px": augment, "seed": seed, "split_seed": SPLIT_SEED, "test_fraction": test_fraction, "fold": fold,
        "world_size": world,
        "replica_sha256": replicas, "replicas_identical": len(set(replicas)) == 1,
        "test_acc": final, "history": history, "seconds": round(elapsed, 3),
        "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    }
    if out is not None:
        metrics["weights"] = out
        if rank == 0:
            state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
            meta = {"spec_sha256": metrics["spec_sha256"], "model": graph.name, "data": d.name,
                    "test_acc": f"{final:.6f}", "epochs": str(epochs), "seed": str(seed),
                    "test_fraction": str(test_fraction), "fold": str(fold),
                    "normalise": json.dumps(metrics["normalise"]), "classes": json.dumps(d.classes)}
            _write_outputs(out, state, meta, metrics)
        if distributed:
            dist.barrier()  # no rank returns before the files exist
    return metrics


# ---------------------------------------------------------------------------- command line
def add_cli(subparsers) -> argparse.ArgumentParser:
    """Register `vitdsl train` on an argparse subparsers object."""
    from .cli import path_arg

    p = subparsers.add_parser(
        "train", help="train a spec on a small data set (digits or an image folder)",
        description="Train a spec on a small image-classification data set on CPU: AdamW with a cosine "
                    "schedule, random shifts, held-out accuracy after every epoch. Writes OUT.safetensors "
                    "(weights that load into the compiled spec) and OUT.json (metrics), atomically. Runs "
                    "unchanged under `torchrun --nproc_per_node=N` (gloo, DistributedDataParallel; only rank 0 "
                    "writes).",
        epilog="data: 'digits' is scikit-learn's 1797 8x8 handwritten digits, upsampled to the spec's input "
               "size and replicated to its channel count, with a fixed stratified 80/20 split. PATH is an image "
               "folder PATH/<class>/*.png (or PATH/train/<class>/ and PATH/test/<class>/). The spec's head must "
               "have as many classes as the data. Example: vitdsl train specs/digits_vit.vit -o "
               "build/digits_vit.safetensors",
    )
    p.add_argument("spec", metavar="SPEC", type=path_arg, help="path to a .vit file")
    p.add_argument("--data", default="digits", type=path_arg, metavar="digits|PATH", help="the data set (default: digits)")
    p.add_argument("--epochs", type=int, default=30, metavar="N", help="passes over the train split (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, metavar="N",
                   help="global batch size, divided between the processes under torchrun (default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, metavar="X", help="peak learning rate of AdamW (default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=0.05, metavar="X", help="AdamW weight decay, on weight matrices only (default: %(default)s)")
    p.add_argument("--label-smoothing", type=float, default=0.1, metavar="X", help="label smoothing of the loss (default: %(default)s)")
    p.add_argument("--warmup", type=float, default=1.0, metavar="EPOCHS",
                   help="linear warm-up length in epochs, at most 10%% of the run (default: %(default)s)")
    p.add_argument("--augment", type=int, default=None, metavar="PX",
                   help="random shifts of up to PX pixels (default: 1/16 of the image side; 0 turns them off)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the initialisation, the data order and the shifts (default: 0)")
    p.add_argument("-o", "--output", required=True, type=path_arg, metavar="OUT.safetensors",
                   help="weights to write; the metrics go to OUT.json beside them")
    p.add_argument("--test-fraction", type=float, default=TEST_FRACTION, metavar="F",
                   help="held-out share of every class when the data has no test/ folder: a fixed, nested "
                        f"stratified split (default: %(default)s; at most {MAX_TEST_FRACTION})")
    p.add_argument("--fold", type=int, default=0, metavar="K",
                   help="cross-validation: hold out the K-th block of that share instead of the first; the "
                        "floor(1/F) folds hold out disjoint images (default: %(default)s)")
    p.add_argument("--max-steps", type=int, default=None, metavar="N", help="stop after N optimizer steps (smoke tests)")
    p.add_argument("--replica-checksums", type=path_arg, metavar="DIR",
                   help="every process writes DIR/rank<R>.json with the sha256 of its parameters "
                        "(to check that data-parallel replicas agree)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="intra-op threads per process (default: torch's choice; torchrun sets 1). Small models "
                        "on a busy machine often train fastest with 1")
    p.add_argument("--max-params", type=int, default=10**10, metavar="N",
                   help="refuse models with more parameters than this (default: 10^10)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    g.add_argument("--progress", action="store_true",
                   help="report progress even when stderr is not a terminal (one line per epoch)")
    p.set_defaults(func=cmd_train)
    return p


def cmd_train(args) -> int:
    """Train a spec (the `vitdsl train` command)."""
    if args.threads is not None:
        if args.threads < 1:
            raise SpecError(f"--threads must be at least 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    m = train(args.spec, data=args.data, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
              out=args.output, progress=False if args.quiet else (True if args.progress else None),
              weight_decay=args.weight_decay, label_smoothing=args.label_smoothing, warmup_epochs=args.warmup,
              augment=args.augment, max_steps=args.max_steps, checksum_dir=args.replica_checksums,
              max_params=args.max_params, test_fraction=args.test_fraction, fold=args.fold)
    if m["world_size"] == 1 or env_int("RANK", 0) == 0:  # several processes: torch.distributed has read RANK
        print(f"{m['model']}: held-out accuracy {m['test_acc']:.2%} on {m['test_size']} images of {m['data']} "
              f"after {m['epochs']} epoch{'s' if m['epochs'] != 1 else ''} ({m['steps']} steps, {m['seconds']:.1f}s, {m['world_size']} process"
              f"{'es' if m['world_size'] > 1 else ''}); wrote {args.output} and "
              f"{args.output[: -len('.safetensors')]}.json")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m vitdsl.train ...`: the same as `vitdsl train ...` (used under torchrun)."""
    parser = argparse.ArgumentParser(prog="vitdsl")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_cli(sub)
    args = parser.parse_args(["train", *(sys.argv[1:] if argv is None else argv)])
    from .cli import run

    return run(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
