"""The ``onnxmerge`` command. Parses arguments, calls ``api``, renders results.

Results go to stdout, logs to stderr. An ``OnnxMergeError`` prints ``onnxmerge: error: ...``
and exits 1; usage errors exit 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from . import __version__, api, inspection
from .errors import OnnxMergeError
from .graph.canonical import BN_MODES
from .calib.capture import PROVIDERS
from .calib.data import MIN_SAMPLES
from .calib.stats import save_stats
from .io import check_writable, save_model
from .limits import MAX_DEEPEN_PER_BLOCK, MAX_MULTIPLE, MAX_SEED, argument
from .match import METHODS
from .depth import ALIGNMENTS
from .depth import describe as describe_alignment
from .report import plot_alignment, render_alignment, write_json
from .rewrite.heads import HEADS
from .rewrite.repair import REPAIRS


def _common_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("-v", "--verbose", action="count", default=0, help="more log output on stderr")
    return parent


def _graph_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False, parents=[_common_options()])
    parent.add_argument("--bn", choices=BN_MODES, default="keep",
                        help="keep BatchNormalization nodes or fold them into the Conv before (default keep)")
    return parent


def cmd_inspect(args: argparse.Namespace) -> int:
    """Show a model's inputs, outputs, ops, feature spaces and barriers."""
    report = api.inspect(args.model, bn=args.bn)
    print(json.dumps(report, indent=2) if args.json else inspection.render(report))
    if args.strict and report["barriers"]:
        first = report["barriers"][0]
        raise OnnxMergeError(f"{args.model}: node {first['node']!r} ({first['op']}) is a barrier: "
                             f"{first['reason']}; {len(report['barriers'])} barrier(s) in all")
    return 0


def _rewritten(args: argparse.Namespace, rewrite) -> int:
    """Write ``rewrite()``'s model to ``--output`` (checked writable before the work)."""
    check_writable(args.output, "model", [args.model])
    save_model(rewrite(), args.output)
    print(f"wrote {args.output}")
    return 0


def cmd_permute(args: argparse.Namespace) -> int:
    """Randomly permute every free feature space; the outputs stay the same."""
    return _rewritten(args, lambda: api.permute(api.load(args.model), seed=args.seed, bn=args.bn))


def _calibration_options(required: bool = False) -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("calibration")
    group.add_argument("--calib", metavar="DATA", required=required,
                       help=".npz (one array per input name, or one array) or .npy inputs")
    group.add_argument("--batch-size", type=argument(int, 1), default=64, help="samples per onnxruntime run (default 64)")
    group.add_argument("--max-samples", type=argument(int, 1), help="use at most this many calibration samples")
    group.add_argument("--allow-few-samples", action="store_true",
                       help=f"accept fewer than {MIN_SAMPLES} calibration samples (refused by default: "
                            "correlations and repair statistics from so few are noise)")
    group.add_argument("--provider", choices=PROVIDERS, default="auto",
                       help="onnxruntime provider: auto uses CUDA when a session really runs on it (default auto)")
    return parent


def _plan_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("what is merged")
    group.add_argument("--heads", choices=HEADS, default="separate",
                       help="separate: one head per model, outputs suffixed _m<i>; shared: heads averaged (default separate)")
    group.add_argument("--zip-layers", type=_zip_layers, metavar="N|auto",
                       help="merge only the spaces of the first N weight layers (Conv/Gemm/MatMul in graph order); "
                            "the rest stays per model. auto: merge at each cut on 80%% of the --calib samples and "
                            "keep the largest N whose argmax disagreement with the source models on the other "
                            "20%% stays within --max-loss (the curve goes to the report). Default: every layer")
    group.add_argument("--max-loss", type=argument(float, 0.0, 1.0), default=0.05,
                       help="--zip-layers auto: largest share of joint predictions that may differ from the ensemble of the models, 0-1 (default 0.05)")
    group.add_argument("--input-layout", action="append", type=_layout_spec, metavar="MODEL=LAYOUT",
                       help="MODEL (its path as given or file name) takes a channels-last input, e.g. NHWC: "
                            "a transpose is inserted so it reads the channels-first input (NCHW) of the others; "
                            "the merged model and the calibration data are channels-first (repeatable)")
    return parent


def _zip_layers(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number of layers nor auto") from None


def _layout_spec(text: str) -> tuple[str, str]:
    model, _, layout = text.rpartition("=")
    if not model or not layout.isalpha():
        raise argparse.ArgumentTypeError(f"{text!r} is not MODEL=LAYOUT, e.g. keras_cnn.onnx=NHWC")
    return model, layout.upper()


def _multiple(text: str) -> float | str:
    if text == "min":
        return text
    try:
        value = float(text[:-1] if text.endswith("x") else text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a multiple like 1.5x") from None
    if not 0 < value <= MAX_MULTIPLE:  # NaN too
        raise argparse.ArgumentTypeError(f"{text!r}: the multiple must be a finite number above 0 and at most "
                                         f"{MAX_MULTIPLE:g}")
    return value


def cmd_widen(args: argparse.Namespace) -> int:
    """Widen every free space by duplicating channels (Net2Net); the outputs stay the same."""
    return _rewritten(args, lambda: api.widen(api.load(args.model), factor=args.factor, seed=args.seed, bn=args.bn))


def cmd_deepen(args: argparse.Namespace) -> int:
    """Insert identity blocks at random positions of the model's stages; the outputs stay the same."""
    return _rewritten(args, lambda: api.deepen(api.load(args.model), blocks=args.blocks, seed=args.seed, bn=args.bn))


def cmd_align(args: argparse.Namespace) -> int:
    """Align the blocks of models of different depths onto the deepest, stage by stage (CKA)."""
    if args.plot:
        check_writable(args.plot, "plot", [*args.models, args.calib])
    alignment = api.align(args.models, args.calib, _options(args))
    report = describe_alignment(alignment)
    if args.plot:
        plot_alignment(alignment, args.plot)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(render_alignment(report))
    if args.plot:
        print(f"wrote {args.plot}")
    return 0


def _options(args: argparse.Namespace) -> api.MergeOptions:
    fields = api.MergeOptions.__dataclass_fields__
    values = {name: getattr(args, name) for name in fields if hasattr(args, name)}
    values["input_layout"] = tuple(values.get("input_layout") or ())
    return api.MergeOptions(**values)


def cmd_merge(args: argparse.Namespace) -> int:
    """Merge two or more models of one design (widths and depths may differ) into one ONNX model."""
    inputs = [*args.models, args.calib, *(args.stats or [])]
    check_writable(args.output, "merged model", inputs)
    if args.report:
        check_writable(args.report, "report", [*inputs, args.output])
    result = api.merge(args.models, calibration=args.calib, stats=args.stats, options=_options(args))
    save_model(result.model, args.output)
    if args.report:
        write_json(result.report, args.report)
    alignment = result.report.get("alignment")
    lifted = "" if alignment is None else (
        f", depths aligned by {alignment['method']} ({_identities(alignment)} identity blocks inserted)")
    print(f"wrote {args.output}: {result.report['layers']}, method {result.report['method']}, "
          f"repair {result.report['repair']}, provider {result.report['provider']}{lifted}")
    return 0


def _identities(alignment: dict) -> int:
    return sum(unit is None for stages in alignment["maps"].values() for stage in stages for unit in stage["map"])


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Compute the statistics a merge needs and save them (combine shards with merge --stats)."""
    if not args.calib:
        raise OnnxMergeError("calibrate needs --calib DATA")
    check_writable(args.output, "statistics", [*args.models, args.calib])
    stats, meta = api.calibrate(args.models, args.calib, _options(args))
    save_stats(args.output, stats, meta)
    print(f"wrote {args.output}: {len(stats)} statistics over {meta['samples']} samples, provider {meta['provider']}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Accuracy of models (joint, per task, average); --ensemble scores their output ensemble."""
    results = api.evaluate(args.models, args.data, labels=args.labels, tasks=args.tasks,
                           ensemble=args.ensemble, provider=args.provider)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for row in results:
        tasks = "  ".join(f"task {name}: {acc:6.2%}" for name, acc in row["tasks"].items())
        print(f"{row['model']}: joint {row['joint']:6.2%}  {tasks}  average {row['average']:6.2%}")
    return 0


def _rewrite_command(commands, graph: argparse.ArgumentParser, run, written: str, seed_help: str):
    """A command that rewrites one model into a function-preserving copy."""
    name = run.__name__.removeprefix("cmd_")
    parser = commands.add_parser(name, parents=[graph], help=run.__doc__, description=run.__doc__)
    parser.add_argument("model", help="ONNX file")
    parser.add_argument("-o", "--output", required=True, help=f"where to write the {written} model")
    parser.add_argument("--seed", type=argument(int, 0, MAX_SEED), default=0, help=seed_help)
    parser.set_defaults(run=run)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onnxmerge", description="Merge neural networks at the ONNX graph level.")
    parser.add_argument("--version", action="version", version=f"onnxmerge {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    graph = _graph_options()

    inspect = commands.add_parser("inspect", parents=[graph], help=cmd_inspect.__doc__, description=cmd_inspect.__doc__)
    inspect.add_argument("model", help="ONNX file")
    inspect.add_argument("--json", action="store_true", help="print the stable JSON report (docs/inspect-json.md)")
    inspect.add_argument("--strict", action="store_true", help="exit 1 when the graph has a barrier")
    inspect.set_defaults(run=cmd_inspect)

    _rewrite_command(commands, graph, cmd_permute, "permuted", "random seed (default 0)")
    widen = _rewrite_command(commands, graph, cmd_widen, "widened", "random seed choosing the copied channels (default 0)")
    widen.add_argument("--factor", type=argument(float, 1.0, MAX_MULTIPLE), required=True,
                       help=f"new width / old width of each widened space (1 to {MAX_MULTIPLE:g})")
    deepen = _rewrite_command(commands, graph, cmd_deepen, "deepened", "random seed choosing the positions (default 0)")
    deepen.add_argument("--blocks", type=argument(int, 1), required=True,
                        help=f"how many identity blocks to insert (at most {MAX_DEEPEN_PER_BLOCK} per block of "
                             "the stages deepened)")

    calibration, plan = _calibration_options(), _plan_options()
    merge = commands.add_parser("merge", parents=[graph, calibration, plan], help=cmd_merge.__doc__,
                                description=cmd_merge.__doc__)
    merge.add_argument("models", nargs="+", help="ONNX files; the first is the reference graph")
    merge.add_argument("-o", "--output", required=True, help="merged ONNX file")
    merge.add_argument("--stats", nargs="+", metavar="FILE", help="statistics from onnxmerge calibrate (shards add up)")
    merge.add_argument("--method", choices=[m.name for m in METHODS],
                       help="default: zip with --calib/--stats, weight without; "
                            + "; ".join(f"{m.name}: {m.summary}" for m in METHODS))
    merge.add_argument("--alpha", type=argument(float, 0.0, 1.0), default=0.5,
                       help="zip: correlation decay of joined clusters, 0-1 (0.5)")
    merge.add_argument("--beta", type=argument(float, 0.0), default=1.0,
                       help="zip: scale of within-model merge budgets, >= 0 (1.0)")
    merge.add_argument("--width", type=_multiple, metavar="Fx|min",
                       help="zip: merged width of every space as a multiple of the widest model's, e.g. 1.5x "
                            "(capped at the sum of the widths; default 1x), or min: the narrowest model's")
    merge.add_argument("--repair", choices=REPAIRS, default="auto",
                       help="auto: BN reset when the graph has BatchNormalization, REPAIR otherwise")
    merge.add_argument("--repair-samples", type=int, metavar="N",
                       help="measure the repair on N calibration samples drawn at random with --seed "
                            "(default: all); the statistics for matching always use all")
    merge.add_argument("--align", choices=ALIGNMENTS, default="auto",
                       help="depth alignment of models with different numbers of blocks: auto (sma when depths "
                            "differ), sma, lma, uniform, head-tail, none (default auto)")
    merge.add_argument("--strict", action="store_true",
                       help="exit 1 instead of warning when a full merge leaves more than half of the weight "
                            "layers per model (barriers near the input)")
    merge.add_argument("--seed", type=argument(int, 0, MAX_SEED), default=0, help="random seed (default 0)")
    merge.add_argument("--report", metavar="JSON", help="write the matching summary, timings and provider")
    merge.set_defaults(run=cmd_merge)

    align = commands.add_parser("align", parents=[graph, calibration], help=cmd_align.__doc__,
                                description=cmd_align.__doc__)
    align.add_argument("models", nargs="+", help="ONNX files of one design at different depths")
    align.add_argument("--method", dest="align", choices=[a for a in ALIGNMENTS if a not in ("auto", "none")],
                       default="sma", help="sma: segment-wise, lma: layer-wise (CKA, need --calib); "
                                           "uniform, head-tail: data-free baselines (default sma)")
    align.add_argument("--json", action="store_true", help="print the alignment report as JSON")
    align.add_argument("--plot", metavar="PNG", help="write CKA heatmaps (self, cross before/after alignment); "
                                                     "needs matplotlib (pip install 'onnxmerge[plot]')")
    align.set_defaults(run=cmd_align)

    calibrate = commands.add_parser("calibrate", parents=[graph, _calibration_options(required=True), plan],
                                    help=cmd_calibrate.__doc__, description=cmd_calibrate.__doc__)
    calibrate.add_argument("models", nargs="+", help="the ONNX files of the merge, in the same order")
    calibrate.add_argument("-o", "--output", required=True, help="statistics file (.npz)")
    calibrate.set_defaults(run=cmd_calibrate)

    evaluate = commands.add_parser("eval", parents=[_common_options()], help=cmd_eval.__doc__,
                                   description=cmd_eval.__doc__)
    evaluate.add_argument("models", nargs="+", help="ONNX files (a merged multi-head model, or source models)")
    evaluate.add_argument("--data", required=True, help=".npz with the inputs and the labels")
    evaluate.add_argument("--labels", default="y", help="name of the labels array (default y)")
    evaluate.add_argument("--tasks", help="classes of each head, e.g. 0-4,5-9 (default: one head, classes 0..k-1)")
    evaluate.add_argument("--ensemble", action="store_true", help="score the models' outputs together as one multi-head model")
    evaluate.add_argument("--provider", choices=PROVIDERS, default="auto", help="onnxruntime provider")
    evaluate.add_argument("--json", action="store_true", help="print JSON")
    evaluate.set_defaults(run=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING - 10 * min(args.verbose, 2), format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except OnnxMergeError as error:
        print(f"onnxmerge: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
