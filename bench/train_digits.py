"""Train the two digits specs to their held-out accuracy (target >= 97 %) and record it.

    .venv/bin/python bench/train_digits.py                        # train both (seed 0), print the table
    .venv/bin/python bench/train_digits.py --seeds 0 1 2 --write-doc   # ... three seeds, rewrite the doc section
    .venv/bin/python bench/train_digits.py --quick                # 2 epochs each (smoke test; doc untouched)

Each spec trains with `vitdsl.train.train` (the same code as `vitdsl train`) on
scikit-learn's digits: 1797 real 8x8 handwritten digits, upsampled to the spec's input,
a fixed stratified 80/20 split (split seed 0, whatever the training seed), so held-out
accuracy is measured on the same 359 images every time.  The settings are the
command-line defaults except for the epochs in RUNS; the weights and metrics land in
build/digits/ (or --out-dir).  The target is met when every seed reaches it.
With --write-doc the `## Digits training` section of docs/benchmarks.md (between
`<!-- BEGIN bench:train_digits -->` and `<!-- END ... -->`) is rewritten atomically.
Needs scikit-learn (`pip install scikit-learn`).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

SECTION = "train_digits"
TARGET = 0.97
# spec -> train() keyword arguments (everything else: the `vitdsl train` defaults)
RUNS = {
    "digits_vit": {"epochs": 30},
    "digits_hybrid": {"epochs": 20},
}
FLAGS = {"epochs": "--epochs", "batch_size": "--batch-size", "lr": "--lr", "seed": "--seed",
         "label_smoothing": "--label-smoothing", "augment": "--augment", "warmup_epochs": "--warmup",
         "weight_decay": "--weight-decay"}


def command(name: str, kw: dict, threads: int | None) -> str:
    flags = " ".join(f"{FLAGS[k]} {v}" for k, v in kw.items())
    return (f"vitdsl train specs/{name}.vit {flags}{f' --threads {threads}' if threads else ''} "
            f"-o build/digits/{name}.safetensors")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=sorted(RUNS), default=list(RUNS), help="specs to train")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0], metavar="N", help="training seeds (default: 0)")
    ap.add_argument("--quick", action="store_true", help="2 epochs each, leave the doc alone")
    ap.add_argument("--write-doc", action="store_true", help="rewrite the `## Digits training` section of docs/benchmarks.md")
    ap.add_argument("--json", metavar="PATH", help="also write the metrics of every run here")
    ap.add_argument("--out-dir", default=str(C.ROOT / "build" / "digits"), help="where the weights go (default: %(default)s)")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    args = ap.parse_args(argv)

    import torch

    from vitdsl import load
    from vitdsl.table import human
    from vitdsl.train import train

    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = C.loadavg()
    results: dict[str, list[dict]] = {}
    for name in args.only:
        spec = C.SPECS / f"{name}.vit"
        macs = load(str(spec)).total().macs
        for seed in args.seeds:
            kw = dict(RUNS[name])
            if args.quick:
                kw["epochs"] = 2
            out = os.path.join(args.out_dir, f"{name}.safetensors" if seed == args.seeds[0] else f"{name}.seed{seed}.safetensors")
            print(f"[train_digits] {name}, seed {seed}: {command(name, dict(kw, seed=seed), args.threads)}", flush=True)
            cpu0, t0 = time.process_time(), time.perf_counter()
            m = train(str(spec), data="digits", out=out, progress=True, seed=seed, **kw)
            m["wall_s"], m["cpu_s"], m["macs"] = time.perf_counter() - t0, time.process_time() - cpu0, macs
            results.setdefault(name, []).append(m)
            print(f"[train_digits] {name}, seed {seed}: held-out {m['test_acc']:.2%} in {m['wall_s']:.1f} s "
                  f"(CPU {m['cpu_s']:.1f} s)", flush=True)
    load_end = C.loadavg()

    rows = []
    for name, runs in results.items():
        m0 = runs[0]
        accs = [m["test_acc"] for m in runs]
        rows.append([f"`specs/{name}.vit`", f"{m0['params']:,}", human(m0["macs"]), "x".join(map(str, m0["input"])),
                     m0["epochs"], m0["steps"], " / ".join(f"{a:.2%}" for a in accs), f"**{min(accs):.2%}**",
                     f"{statistics.median(m['wall_s'] for m in runs):.0f}",
                     f"{statistics.median(m['cpu_s'] for m in runs):.0f}",
                     "met" if min(accs) >= TARGET else "**NOT met**"])
    seeds = ", ".join(map(str, args.seeds))
    headers = ["spec", "params", "MACs", "input", "epochs", "steps", f"held-out acc, seed {seeds}", "worst",
               "wall s", "CPU s", f"target >= {TARGET:.0%}"]
    tbl = C.table(headers, rows)
    print(tbl)

    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if args.write_doc and not args.quick:
        m = next(iter(results.values()))[0]
        cmds = "\n".join(command(n, RUNS[n], args.threads) for n in results)
        body = f"""## Digits training

Date: {C.now()}

Command (from the repository root):

```
{C.command_line()}
```

The same runs from the command line (seed 0; `python -m vitdsl.train` takes the same arguments):

```
{cmds}
```

{chr(10).join(C.machine_lines([f"- torch intra-op threads: {m['threads']}"]))}

Data: scikit-learn's digits (1797 real 8x8 grey handwritten digits) upsampled (bilinear) to the
spec's input and normalised with the training split's mean and std; a fixed stratified split
(seed {m['split_seed']}): {m['train_size']} training and {m['test_size']} held-out images. Training: AdamW (lr {m['lr']:g},
weight decay {m['weight_decay']:g}), batch {m['batch_size']}, {m['warmup_steps']} warm-up steps then a cosine to 0, label
smoothing {m['label_smoothing']:g}, random shifts of up to {m['augment_shift_px']} px. The held-out accuracy is measured
after the last epoch (the weights that are saved), never chosen by epoch.

{tbl}

Wall time includes loading the data (medians over the seeds); CPU s is process CPU time,
less sensitive to other jobs on the machine. Load average (1/5/15 min) at start:
{load_start}; at end: {load_end}.
"""
        C.update_doc(SECTION, body)
        print(f"[train_digits] updated {C.DOC.relative_to(C.ROOT)} (section {SECTION})")
    return 0 if args.quick or all(min(m["test_acc"] for m in r) >= TARGET for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
