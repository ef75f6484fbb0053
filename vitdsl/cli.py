"""The `vitdsl` command line.  User errors print a diagnostic and exit 1, never a traceback."""
from __future__ import annotations

import argparse
import difflib
import os
import sys
import time
from typing import NoReturn

from .errors import InputError, Span, SpecError


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error (unknown option, `--epochs x`) exits 1 like every other
    user error (DESIGN.md §3), not argparse's 2; `--help` and `--version` still exit 0.
    Subcommand parsers inherit the class through add_subparsers."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(1, f"{self.prog}: error: {message}\n")


def path_arg(text: str) -> str:
    """argparse type of every file or directory argument: an empty string (`-o ""`, an
    unset shell variable) is an error, not 'not given' (build/MODEL, random weights) nor
    the current directory."""
    if not text:
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    return text


def _load(args):
    from .api import load

    return load(args.spec, max_params=args.max_params)


def _spec_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", metavar="SPEC", type=path_arg, help="path to a .vit file")
    p.add_argument("--max-params", type=int, default=10**10, metavar="N",
                   help="refuse models with more parameters than this (default: 10^10)")


def cmd_check(args) -> int:
    """Validate a spec and print its per-layer table."""
    from .table import human, render

    g = _load(args)
    bits_col = g.bits is not None
    per_node: dict[str, list[str]] = {}
    if bits_col:
        from .quant.bits import summary

        info = summary(g)
        for q in info["layers"]:
            per_node.setdefault(q.node, [])
            spec = str(g.bits[q.name])
            if spec not in per_node[q.node]:
                per_node[q.node].append(spec)
    rows = []
    for r in g.summary():
        row = [r["name"], r["op"], r["shape"], f"{r['params']:,}" if r["params"] else "-", human(r["macs"]) if r["macs"] else "-"]
        if bits_col:
            row.append("/".join(per_node.get(r["name"], [])) or "-")
        rows.append(row)
    t = g.total()
    footer = [["total", f"{len(g)} nodes", f"in {g.input.out}", f"{t.params:,}", human(t.macs)] + ([""] if bits_col else [])]
    headers = ["name", "op", "output", "params", "MACs"] + (["bits"] if bits_col else [])
    print(f"{g.name}  ({args.spec})")
    print(render(headers, rows, right={3, 4}, footer=footer))
    print(f"params {t.params:,} ({human(t.params)})  MACs {human(t.macs)}  activations {human(t.act_bytes, 'B')} per image (fp32)")
    if bits_col:
        print(f"bits: weights {info['avg_weight_bits']:.2f} average (by parameters), activations "
              f"{info['avg_act_bits']:.2f} average (by elements per image); model size {info['size_bytes']:,} bytes "
              f"({human(info['size_bytes'], 'B')}; fp32: {human(4 * t.params, 'B')})")
    return 0


BUILD_STEPS = {  # the progress messages vitdsl.build sends, per backend, in order
    "torch": ["building module", "writing weights", "exporting with torch.export", "done"],
    "onnx": ["building module", "exporting to ONNX", "checking with onnxruntime", "writing", "done"],
    "trt": ["building module", "compiling with torch-tensorrt", "writing", "done"],
}


def _progress(enabled: bool, backend: str = "torch"):
    start = time.perf_counter()
    steps = BUILD_STEPS[backend]

    def report(msg: str) -> None:
        if not enabled:
            return
        i = steps.index(msg) + 1 if msg in steps else 0
        bar = "#" * (i * 20 // len(steps))
        print(f"\r[{bar:<20}] {i}/{len(steps)} {msg:<32} {time.perf_counter() - start:5.1f}s", end="", file=sys.stderr, flush=True)
        if msg == "done":
            print(file=sys.stderr)

    return report


def cmd_build(args) -> int:
    """Compile a spec and write its artifacts to a directory, atomically."""
    from .build import build

    g = _load(args)
    out = args.output if args.output is not None else os.path.join("build", g.name)
    from .build import parse_batch

    batch = parse_batch(args.batch) if args.batch else None
    if args.backend == "torch" and (args.batch or args.opset):
        raise SpecError("--batch and --opset apply to --backend onnx and trt", filename=args.spec)
    if args.opset and args.backend != "onnx":
        raise SpecError("--opset applies to --backend onnx", filename=args.spec)
    manifest = build(g, out, backend=args.backend, seed=args.seed, weights=args.weights,
                     progress=_progress(not args.quiet and sys.stderr.isatty(), args.backend), batch=batch, opset=args.opset)
    print(f"wrote {out}/: {', '.join(manifest['files'])}")
    for item in manifest.get("not_native", []):
        print(f"note: {item['quantizer']} ({item['bits']}-bit) runs on TensorRT as {item['runs_as']}")
    if manifest.get("trtexec"):
        print(f"build the engine on the target machine with:\n  cd {out} && {manifest['trtexec']}")
    return 0


def cmd_verify(args) -> int:
    """Re-run the numerical comparison of a build directory's ONNX model (onnxruntime, CPU)
    or TensorRT engine (GPU) against the torch backend, as Polygraphy's `run --onnxrt` does:
    the same seeded inputs through both, outputs compared elementwise, quantized tensors
    in units of their quantization step.  Exits 1 when they differ."""
    from .backends.deploy import verify
    from .table import render

    batches = None
    if args.batch:
        try:
            batches = [int(b) for b in args.batch]
        except ValueError:
            raise SpecError(f"--batch takes whole numbers, got {' '.join(args.batch)}", filename=args.out) from None
    result = verify(args.out, batches=batches, seed=args.seed)
    if not result.get("ran", True):
        print(f"{args.out}: {result['summary']}")
        return 0
    rows = [[str(r["batch"]), r["output"], f"{r['max_abs']:.3g}", f"{r['mean_abs']:.3g}", f"{r['atol']:.3g}",
             f"{r['max_steps']:.3g}" if "max_steps" in r else "-", "PASS" if r["passed"] else "FAIL"] for r in result["rows"]]
    print(render(["batch", "output", "max |Δ|", "mean |Δ|", "tolerance", "quantized: max steps", "result"], rows,
                 right={0, 2, 3, 4, 5}))
    print(f"{args.out} ({result['backend']}): {'PASS' if result['passed'] else 'FAIL'}: {result['summary']}")
    return 0 if result["passed"] else 1


def cmd_fmt(args) -> int:
    """Rewrite a spec in canonical layout (or with --check, report whether it is)."""
    from .atomic import write_text
    from .fmt import format_text

    try:
        with open(args.spec, "rb") as f:
            data = f.read()
    except OSError as e:
        raise SpecError(f"cannot read spec: {e.strerror}", filename=args.spec) from None
    new = format_text(data, args.spec)
    old = data.decode("utf-8")
    if args.check:
        if new != old:
            sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), new.splitlines(True), args.spec, args.spec + " (formatted)"))
            print(f"{args.spec}: would reformat", file=sys.stderr)
            return 1
        return 0
    if new != old:
        write_text(args.spec, new)
        print(f"formatted {args.spec}")
    return 0


def cmd_graph(args) -> int:
    """Draw the graph as SVG or Graphviz DOT (chosen by the output's extension)."""
    from .atomic import write_text
    from .render import to_dot, to_svg

    g = _load(args)
    ext = os.path.splitext(args.output)[1].lower()
    if ext not in (".svg", ".dot", ".gv"):
        raise SpecError(f"output must end in .svg or .dot, got '{args.output}'", filename=args.output)
    write_text(args.output, to_svg(g) if ext == ".svg" else to_dot(g))
    print(f"wrote {args.output}")
    return 0


def cmd_import(args) -> int:
    """Write a spec (and optionally converted weights) for a timm model."""
    from .atomic import write_text
    from .interop.timm_import import spec_from_timm

    source, _, name = args.source.partition(":")
    if source != "timm" or not name:
        raise SpecError(f"expected timm:MODEL_NAME, got '{args.source}'")
    text, model = spec_from_timm(name)
    from .api import loads

    g = loads(text, args.output)
    if args.weights:
        from safetensors.torch import save

        from .atomic import write_bytes
        from .interop.timm import convert_state_dict

        state = {k: v.contiguous() for k, v in convert_state_dict(g, model.state_dict()).items()}
        try:  # serialised here, written by vitdsl: an error names the user's path, not a temp file
            write_bytes(args.weights, save(state, metadata={"source": f"timm:{name}"}))
        except OSError as e:  # an unwritable destination is a user error
            raise SpecError(f"cannot write weights: {e.strerror or e}", filename=args.weights) from None
    write_text(args.output, text)
    print(f"wrote {args.output} ({g.total().params:,} params)" + (f" and {args.weights}" if args.weights else ""))
    return 0


def _trained_split(weights: str) -> tuple[float | None, int]:
    """The held-out fraction and fold `vitdsl train` recorded in the weights' metadata
    (None and 0 if absent): digits calibration images are then drawn from that model's
    training split and normalised as its inputs were."""
    import re

    from safetensors import safe_open

    try:
        with safe_open(weights, "pt") as f:
            meta = f.metadata() or {}
    except Exception:  # noqa: BLE001 - unreadable weights are reported when they are loaded
        return None, 0
    fraction, fold = meta.get("test_fraction"), meta.get("fold", "0")
    # A wrong value must not fall back to the defaults: another split's calibration images
    # can be this model's held-out ones.
    if fraction is not None:
        try:
            fraction = float(fraction)
        except ValueError:
            raise SpecError(f"the weights' metadata has test_fraction '{fraction}', not a number",
                            filename=weights) from None
    if not re.fullmatch(r"[0-9]{1,6}", fold):
        raise SpecError(f"the weights' metadata has fold '{fold}', not a fold number", filename=weights)
    return fraction, int(fold)


def cmd_quantize(args) -> int:
    """Calibrate a float model and write a quantized spec, weights and a report."""
    from safetensors.torch import load_file

    from .build import check_writable
    from .progress import Bar
    from .quant.quantize import load_images, quantize, write_outputs
    from .table import render

    g = _load(args)
    check_writable(args.output)  # before the calibration, not after it
    try:
        state = load_file(args.weights)
    except Exception as e:  # noqa: BLE001 - unreadable weights are a user error
        raise SpecError(f"cannot read weights: {e}", filename=args.weights) from None
    images = load_images(args.calib, g.input.out.shape, *_trained_split(args.weights))
    qgraph, qmodel, report = quantize(g, state, images, bits=args.bits, budget=args.budget, method=args.method,
                                      progress=Bar(not args.quiet and sys.stderr.isatty()), weights_name=args.weights,
                                      images_name=args.calib)
    files = write_outputs(args.output, qgraph, qmodel, report)
    rows = [[r["layer"], r["bits"], f"{r['output_mse']:.3g}"] for r in report]
    print(render(["layer", "bits", "output MSE (last: KL of logits)"], rows, right={2}))
    print(f"wrote {args.output}/: {', '.join(files)}")
    return 0


def make_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = Parser(prog="vitdsl", description="A language and compiler for vision transformers.")
    p.add_argument("--version", action="version", version=f"vitdsl {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    c = sub.add_parser("check", help="validate a spec and print its per-layer table", description=cmd_check.__doc__)
    _spec_arg(c)
    c.set_defaults(func=cmd_check)

    b = sub.add_parser("build", help="compile a spec into artifacts", description=cmd_build.__doc__)
    _spec_arg(b)
    b.add_argument("--backend", default="torch", choices=["torch", "onnx", "trt"],
                   help="torch: weights + torch.export program; onnx: TensorRT-ready ONNX (Q/DQ where quantized); "
                        "trt: a TensorRT engine through torch-tensorrt (needs vitdsl[trt] and a CUDA GPU) (default: torch)")
    b.add_argument("--batch", metavar="MIN:OPT:MAX", help="dynamic batch range of onnx/trt builds (default: 1:8:64)")
    b.add_argument("--opset", type=int, metavar="N", help="ONNX opset, 17..21 (default: 17, or 21 when 4-bit weights need INT4)")
    b.add_argument("-o", "--output", type=path_arg, metavar="OUT", help="output directory (default: build/MODEL)")
    b.add_argument("--seed", type=int, default=0, help="initialisation seed (default: 0)")
    b.add_argument("--weights", type=path_arg, metavar="FILE", help="safetensors weights to load instead of random init")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=cmd_build)

    f = sub.add_parser("fmt", help="format a spec in place", description=cmd_fmt.__doc__)
    f.add_argument("spec", metavar="SPEC", type=path_arg, help="path to a .vit file")
    f.add_argument("--check", action="store_true", help="do not write; exit 1 and show a diff if the file is not formatted")
    f.set_defaults(func=cmd_fmt)

    gr = sub.add_parser("graph", help="draw the graph (.svg or .dot)", description=cmd_graph.__doc__)
    _spec_arg(gr)
    gr.add_argument("-o", "--output", required=True, type=path_arg, metavar="FILE", help="FILE.svg or FILE.dot")
    gr.set_defaults(func=cmd_graph)
    q = sub.add_parser("quantize", help="calibrate and write a quantized spec", description=cmd_quantize.__doc__)
    _spec_arg(q)
    q.add_argument("--weights", required=True, type=path_arg, metavar="FILE", help="float weights (safetensors)")
    q.add_argument("--calib", required=True, type=path_arg, metavar="DATA",
                   help="calibration images: a .safetensors/.pt tensor (N, C, H, W), or digits[:N]")
    group = q.add_mutually_exclusive_group(required=True)
    group.add_argument("--bits", metavar="wNaM", help="one width for every layer, e.g. w4a8")
    group.add_argument("--budget", type=float, metavar="B", help="average width for the mixed-precision search, e.g. 5.0")
    q.add_argument("--method", default="mptq", choices=["minmax", "percentile", "mptq"], help="calibration: minmax (observed range), percentile (99.99th), or mptq (MPTQ-ViT: "
                        "SQ-b, twin ranges after GELU, ranges by output error, node by node on the quantized "
                        "upstream; docs/quantization.md) (default: mptq)")
    q.add_argument("-o", "--output", required=True, type=path_arg, metavar="OUT", help="output directory")
    q.add_argument("-q", "--quiet", action="store_true", help="no progress")
    q.set_defaults(func=cmd_quantize)

    v = sub.add_parser("verify", help="compare a build's ONNX model or engine with the torch backend",
                       description=cmd_verify.__doc__)
    v.add_argument("out", metavar="OUT", type=path_arg, help="a directory written by vitdsl build --backend onnx|trt")
    v.add_argument("--batch", nargs="+", metavar="N", help="batch sizes to compare (default: the smallest and one more)")
    v.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default: 0)")
    v.set_defaults(func=cmd_verify)

    im = sub.add_parser("import", help="write a spec for a timm model", description=cmd_import.__doc__)
    im.add_argument("source", metavar="timm:NAME", help="e.g. timm:vit_small_patch16_224, timm:swin_tiny_patch4_window7_224")
    im.add_argument("-o", "--output", required=True, type=path_arg, metavar="SPEC", help="the .vit file to write")
    im.add_argument("--weights", type=path_arg, metavar="FILE", help="also write timm's (random-init) weights, converted, as safetensors")
    im.set_defaults(func=cmd_import)

    from .train import add_cli

    add_cli(sub)
    from .benchmark import add_cli as add_bench

    add_bench(sub)
    return p


def _error_text(e: SpecError) -> str:
    """A diagnostic as the terminal shows it: `file:line:col: error: ...` for a file; a
    problem with an option or built-in data (no file: `<string>`, `<digits>`, `--batch`,
    or an empty path) is `vitdsl: error: ...`, as argparse words its own."""
    if e.source is None and e.span == Span():
        if not e.filename or e.filename.startswith(("<", "-")):
            return f"vitdsl: error: {e.message}"
        if e.filename.startswith("vitdsl "):  # a command's own options (vitdsl bench)
            return f"{e.filename}: error: {e.message}"
    return str(e)


def main(argv: list[str] | None = None) -> int:
    return run(make_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Run a parsed command; user errors become a message and exit code 1, not a traceback."""
    try:
        return args.func(args)
    except SpecError as e:
        print(_error_text(e), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        print(f"{getattr(e, 'filename', '') or 'vitdsl'}: error: {e.strerror or e}", file=sys.stderr)
        return 1
    except InputError as e:  # calibration and search inputs (empty set, wrong shapes, budgets)
        print(f"vitdsl: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
