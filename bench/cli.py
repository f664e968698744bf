"""``redistill memory`` (theoretical peak activation memory), ``redistill compare`` and ``redistill export-report``."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import List, Sequence, Tuple

from redistill.errors import UserError
from redistill.report import add_page_options


def add_commands(sub) -> None:
    p = sub.add_parser(
        "memory",
        help="theoretical peak activation memory (liveness and the paper's layer-wise estimate)",
        description="Peak activation memory for one image, weights excluded: liveness over the ONNX execution "
        "order, optionally with in-place reuse, beside the paper's layer-wise estimate. Give ONNX files, or "
        "--arch NAME [--red-config CFG] to size a design without training, or --pair PRESET for a preset's "
        "teacher, student and student+RED, or --checkpoint CK for a trained network (its builder options and RED "
        "blocks). Denoisers (unet-A-R) are sized for one denoising step (inputs x, t). --eager also measures one "
        "eager forward pass with PyTorch's allocator traced (byte-exact), split into activations, input and "
        "runtime scratch. See docs/memory.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  redistill memory model.onnx --inplace --json mem.json\n"
        "  redistill memory --arch mobilenetv2-4-1221111 --red-config mobilenetv2_x4 --image-size 128\n"
        "  redistill memory --pair mobilenetv2_x4 --image-size 128 --plot mem.png\n"
        "  redistill memory --pair ddpm_cifar10_x2 --image-size 32\n"
        "  redistill memory --pair mobilenetv3_small_x4 --eager --plot mem.png --json mem.json\n"
        "  redistill memory --checkpoint runs/ddpm/student/best.pt",
    )
    p.add_argument("models", nargs="*", metavar="MODEL.onnx", help="ONNX files; several are compared to the first")
    p.add_argument("--arch", default=None, help="build this architecture (e.g. mobilenetv2-4-1221111) instead of reading ONNX")
    p.add_argument("--red-config", default=None, metavar="CFG",
                   help="with --arch: add the RED blocks of this preset or YAML config (its red.sites)")
    p.add_argument("--pair", default=None, metavar="PRESET",
                   help="analyse the preset's teacher, student and student+RED (e.g. mobilenetv2_x4)")
    p.add_argument("--checkpoint", default=None, metavar="CK.pt",
                   help="analyse the network of this checkpoint (best.pt/last.pt), at its own image size")
    p.add_argument("--image-size", type=int, default=128, help="input size in px for --arch/--pair (default 128)")
    p.add_argument("--batch", type=int, default=1, help="batch size set on the graph inputs (default 1)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "int8"], default=None,
                   help="re-cost every floating-point tensor at this size (what-if); default: the graph's own types")
    p.add_argument("--inplace", action="store_true",
                   help="also report the peak when element-wise ops reuse a dying input's buffer (Relu, Add, Mul, ...)")
    p.add_argument("--nodes", action="store_true", help="print the per-node table (node, op, live bytes, tensors alive)")
    p.add_argument("--plot", default=None, metavar="OUT.png", help="write live memory per node, models overlaid")
    p.add_argument("--json", default=None, metavar="OUT.json", help="write the full reports (bytes) as JSON")
    p.add_argument("--eager", action="store_true",
                   help="with --arch/--pair/--checkpoint: also measure one eager forward pass (PyTorch allocator, "
                   "traced; peak split into activations, input and scratch by op; implies --inplace)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="with --eager: where to run it (default cpu)")
    p.set_defaults(func=_memory)

    c = sub.add_parser(
        "compare",
        help="theory against measurement: accuracy, theoretical and measured peak memory, latency (tables and plots)",
        description="Collect distillation runs (accuracy, or a denoiser's test denoising loss), bundles (theoretical "
        "peak memory, INT8 accuracy) and device reports (measured memory, latency) and write compare.md/.csv/.json and "
        "PNG plots. Every measured memory figure (batch-1 delta, per-image slopes, TensorRT device memory) is shown "
        "beside the liveness, in-place and layer-wise peaks with its ratio, or flagged when below its method's "
        "resolution. With no PATH the default folders are scanned. See docs/compare.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  redistill compare\n"
        "  redistill compare runs/quick bundles/quick-fp32 reports/tx2 --out /tmp/cmp\n"
        "  redistill compare --pages-only --out bench/results/reproduce   # rewrite the tables and plots from compare.json",
    )
    c.add_argument("paths", nargs="*", metavar="PATH",
                   help="run folders, bundle folders, device report files, or folders holding any of them")
    c.add_argument("--runs", default=None, help="folder of distillation runs (default with no PATH: runs)")
    c.add_argument("--bundles", default=None, help="folder of bundles (default with no PATH: bundles)")
    c.add_argument("--reports", default=None, help="folder of device reports (default with no PATH: reports)")
    c.add_argument("--out", default="bench/results/compare", help="output folder (default bench/results/compare)")
    c.add_argument("--quality", nargs="+", default=(), metavar="FILE",
                   help="`redistill quality --json` results (CFD, precision, recall) to join to the denoiser runs they scored")
    c.add_argument("--no-analyze", action="store_true",
                   help="do not rebuild checkpoints to size models that have no bundle (faster; fewer theory figures)")
    add_page_options(c, "OUT/compare.json (compare.md, compare.csv and the plots; no runs, bundles or reports read)",
                     remarks=False)
    c.set_defaults(func=_compare)

    r = sub.add_parser(
        "export-report", help="FP32 vs INT8 top-1 and ONNX Runtime CPU latency of two bundles -> results file",
        description="Read the test accuracy (a denoiser's denoising MSE) from two bundles' manifests, time each "
        "model.onnx in ONNX Runtime on the CPU (batch 1, median of repeated runs) and write OUT.md and OUT.json. "
        "--pages-only rewrites OUT.md from OUT.json without timing anything.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    r.add_argument("fp32", nargs="?", help="FP32 bundle folder")
    r.add_argument("int8", nargs="?", help="INT8 bundle folder")
    r.add_argument("--out", default="bench/results/export_quick", help="results path without extension")
    r.add_argument("--runs", type=int, default=300, help="timed runs per model")
    r.add_argument("--warmup", type=int, default=30, help="untimed runs first")
    r.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (0 = its default)")
    add_page_options(r, "OUT.json (no bundles needed)", remarks=False)
    r.set_defaults(func=_export_report)


def _export_report(args) -> int:
    from bench.export_report import rewrite_pages, write_report

    if args.pages_only:
        if args.fp32 or args.int8:
            raise UserError("--pages-only rewrites OUT.md from OUT.json; give no bundles")
        rewrite_pages(args.out)
    elif not (args.fp32 and args.int8):
        raise UserError("give the FP32 and the INT8 bundle folders (or --pages-only)")
    else:
        write_report(args.fp32, args.int8, args.out, runs=args.runs, warmup=args.warmup, threads=args.threads)
    return 0


def _compare(args) -> int:
    from bench.compare import FOOTPRINT_PLOT, compare, rewrite_pages

    if args.pages_only:
        if args.paths or args.runs or args.bundles or args.reports or args.quality or args.no_analyze:
            raise UserError("--pages-only rewrites the pages from OUT/compare.json; give only --out")
        files = rewrite_pages(args.out)
        if FOOTPRINT_PLOT not in files:
            print(f"kept {FOOTPRINT_PLOT}: this compare.json predates the footprint curves (a full run records them)")
        for path in files.values():
            print(f"wrote {path}")
        return 0
    files = compare(args.paths, runs=args.runs, bundles=args.bundles, reports=args.reports, out=args.out,
                    analyze=not args.no_analyze, quality=args.quality)
    for path in files.values():
        print(f"wrote {path}")
    return 0


def _memory(args) -> int:
    from redistill import memory as M

    sources = sum(bool(x) for x in (args.models, args.arch, args.pair, args.checkpoint))
    if sources != 1:
        raise UserError("give ONNX files, or --arch NAME, or --pair PRESET, or --checkpoint CK.pt (exactly one of them)")
    if args.red_config and not args.arch:
        raise UserError("--red-config needs --arch NAME (the student architecture to put RED blocks in)")
    if args.eager and args.models:
        raise UserError("--eager runs a PyTorch model: give --arch, --pair or --checkpoint instead of ONNX files")
    if args.eager and args.dtype:
        raise UserError("--eager measures the FP32 model as built; drop --dtype (or run without --eager)")
    if args.device != "cpu" and not args.eager:
        raise UserError("--device chooses where --eager runs; add --eager")
    reports, eager = [], []
    if args.models:
        for path, label in zip(args.models, distinct_labels(args.models)):
            reports.append(M.analyze_onnx(path, batch=args.batch, dtype=args.dtype, inplace=args.inplace, name=label))
    else:
        from train.design import analyze_model
        from train.eager_memory import measure_eager

        for label, model in _designs(args):
            reports.append(analyze_model(model, args.image_size, batch=args.batch, dtype=args.dtype,
                                         inplace=args.inplace or args.eager, name=label))
            if args.eager:
                eager.append(measure_eager(model, args.image_size, batch=args.batch, device=args.device, name=label))
    print(format_summary(reports))
    if eager:
        print()
        print(format_eager(eager, reports))
    for r in reports:
        if args.nodes:
            print()
            print(format_nodes(r))
    if args.json:
        from redistill.io import atomic_write_json

        doc = {
            "command": command_line(args),
            "definition": M.DEFINITION,
            "reductions": reductions(reports),
            "models": [r.to_dict() for r in reports],
        }
        if eager:
            from train.eager_memory import EAGER_DEFINITION

            doc["eager_definition"] = EAGER_DEFINITION
            for d, e in zip(doc["models"], eager):
                d["eager"] = e.to_dict()
        atomic_write_json(args.json, doc)
        print(f"wrote {args.json}")
    if args.plot:
        from redistill.memory.plot import plot_reports

        plot_reports(reports, args.plot, overlays=[eager_overlays(e, r) for e, r in zip(eager, reports)])
        print(f"wrote {args.plot}")
    return 0


def distinct_labels(paths: Sequence[str]) -> List[str]:
    """Each path's shortest tail no other path ends with: ``A/model.onnx`` and ``B/model.onnx``, not ``model.onnx`` twice."""
    parts = [Path(p).parts for p in paths]
    labels = []
    for i, own in enumerate(parts):
        others = [q for j, q in enumerate(parts) if j != i]
        n = next((n for n in range(1, len(own)) if all(q[-n:] != own[-n:] for q in others)), len(own))
        labels.append(str(Path(*own[-n:])))
    return labels


def command_line(args) -> str:
    """The equivalent ``redistill memory ...`` invocation, rebuilt from the parsed arguments."""
    parts = ["redistill", "memory"] + list(args.models)
    for opt in ("arch", "red_config", "pair", "checkpoint"):
        if getattr(args, opt):
            parts += ["--" + opt.replace("_", "-"), getattr(args, opt)]
    if args.arch or args.pair:
        parts += ["--image-size", str(args.image_size)]
    if args.batch != 1:
        parts += ["--batch", str(args.batch)]
    if args.dtype:
        parts += ["--dtype", args.dtype]
    for flag in ("inplace", "nodes", "eager"):
        if getattr(args, flag):
            parts.append("--" + flag)
    for opt in ("plot", "json"):
        if getattr(args, opt):
            parts += ["--" + opt, getattr(args, opt)]
    if getattr(args, "device", "cpu") != "cpu":
        parts += ["--device", args.device]
    return " ".join(shlex.quote(p) for p in parts)


def _designs(args) -> List[Tuple[str, object]]:
    from train.design import build_design, checkpoint_design, pair_designs

    if args.pair:
        designs, _ = pair_designs(args.pair, args.image_size)
        return designs
    if args.checkpoint:
        model, size = checkpoint_design(args.checkpoint)
        args.image_size = size
        return [(model.arch_name, model)]
    label = f"{args.arch}+RED" if args.red_config else args.arch
    return [(label, build_design(args.arch, args.image_size, args.red_config))]


def reductions(reports) -> List[dict]:
    """Each report's peaks as a factor of the first report's (first = reference, e.g. the teacher)."""
    if not reports:
        return []
    ref = reports[0]

    def ratio(a, b):
        return round(a / b, 3) if a and b else None

    return [{
        "model": r.model,
        "peak_reduction": ratio(ref.peak_bytes, r.peak_bytes),
        "inplace_peak_reduction": ratio(ref.inplace_peak_bytes, r.inplace_peak_bytes),
        "layerwise_peak_reduction": ratio(ref.layerwise_peak_bytes, r.layerwise_peak_bytes),
    } for r in reports]


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]

    def line(cells):
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def format_summary(reports) -> str:
    """One row per model: liveness, in-place and layer-wise peaks, weights, reduction vs the first model."""
    from redistill.memory import fmt_bytes

    inplace = any(r.inplace_peak_bytes is not None for r in reports)
    header = ["model", "liveness peak"] + (["in-place peak"] if inplace else []) + ["layer-wise (paper)", "weights", "peak node"]
    if len(reports) > 1:
        header.append("reduction")
    red = reductions(reports)
    rows = []
    for r, f in zip(reports, red):
        row = [r.model, fmt_bytes(r.peak_bytes)]
        if inplace:
            row.append(fmt_bytes(r.inplace_peak_bytes))
        row += [fmt_bytes(r.layerwise_peak_bytes), fmt_bytes(r.weights_bytes), f"{r.peak_node} ({r.peak_row.op if r.peak_row else '-'})"]
        if len(reports) > 1:
            row.append(f"{f['peak_reduction']:.2f}x" if f["peak_reduction"] else "-")
        rows.append(row)
    r0 = reports[0]
    head = f"theoretical activation memory, batch {r0.batch}, {r0.dtype} (weights not counted)"
    lines = [head, "", _table(header, rows, right=[1, 2, 3, 4] if inplace else [1, 2, 3])]
    for r in reports:
        lines.append(f"\npeak of {r.model}: {r.peak_explanation()}")
    return "\n".join(lines)


def format_nodes(report) -> str:
    """The per-node table: index, node, op, live memory (and in-place), the tensors alive."""
    from redistill.memory import fmt_bytes

    inplace = report.inplace_peak_bytes is not None
    header = ["#", "node", "op", "live"] + (["in-place"] if inplace else []) + ["tensors alive"]
    rows = []
    for row in report.nodes:
        mark = " <- peak" if row.name == report.peak_node else ""
        cells = [str(row.index), row.name + mark, row.op, fmt_bytes(row.live_bytes)]
        if inplace:
            cells.append(fmt_bytes(row.inplace_live_bytes))
        cells.append(", ".join(row.alive))
        rows.append(cells)
    return f"per-node live memory of {report.model}\n" + _table(header, rows, right=[0, 3, 4] if inplace else [0, 3])


def eager_overlays(record, report) -> list:
    """The eager timeline as two curves on the report's node axis: all traced bytes, and activations alone."""
    from redistill.memory.plot import Overlay
    from train.eager_memory import node_positions

    x = node_positions(record, report)
    return [Overlay("eager, all allocations", x, [s.peak_bytes for s in record.timeline], style=":"),
            Overlay("eager, activations", x, [s.activation_peak_bytes for s in record.timeline], style="-.",
                    mark_peak=False)]


def format_eager(records, reports) -> str:
    """The measured table: allocation peak split by kind, the op at the peak, activation peak against theory."""
    from redistill.memory import fmt_bytes

    e0 = records[0]
    where = "CPU allocator" if e0.device == "cpu" else "CUDA caching allocator"
    head = (f"measured: one eager forward pass, PyTorch {where} traced (profiler [memory] events; resolution "
            f"{e0.resolution}), batch {e0.batch}, FP32, BatchNorm {'folded' if e0.fold_bn else 'kept'}, "
            f"{e0.threads} threads; weights not counted")
    header = ["model", "peak", "activations", "input", "scratch", "op at the peak", "activation peak",
              "vs in-place", "largest scratch block"]
    rows = []
    for e, r in zip(records, reports):
        ratio = f"{e.activation_peak_bytes / r.inplace_peak_bytes:.2f}x" if r.inplace_peak_bytes else "-"
        rows.append([e.model, fmt_bytes(e.peak_bytes), fmt_bytes(e.activation_bytes), fmt_bytes(e.input_bytes),
                     fmt_bytes(e.scratch_bytes), e.peak_op, fmt_bytes(e.activation_peak_bytes), ratio,
                     f"{fmt_bytes(e.max_scratch_bytes)} {e.max_scratch_op}"])
    lines = [head, "", _table(header, rows, right=[1, 2, 3, 4, 6, 7])]
    for e in records:
        lines.append(f"\nmeasured peak of {e.model}: {e.explain()}")
        lines.append(f"  activation peak: {e.explain_activations()}")
        if e.allocator_peak_bytes is not None:
            lines.append(f"  allocator check: max_memory_allocated {fmt_bytes(e.allocator_peak_bytes)} "
                         f"({e.allocator_peak_bytes} B; trace {e.peak_bytes} B), reserved peak "
                         f"{fmt_bytes(e.reserved_peak_bytes)}")
    return "\n".join(lines)
