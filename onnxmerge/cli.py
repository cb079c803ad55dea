"""The ``onnxmerge`` command. Parses arguments, calls ``api``, renders results.
(Long because of the argument declarations of ten commands and the signal handling.)

Results go to stdout, logs to stderr. Exit codes: 0 success; 1 an ``OnnxMergeError`` (bad input
or option), printed as one line ``onnxmerge: error: ...``; 2 a usage error (argparse); 70 any
other exception, a bug, printed as one line (the traceback with ``-v``); 130 interrupted
(SIGINT, Ctrl-C); 143 terminated (SIGTERM); 141, silently, when the reader of stdout went away
(``| head``), as for a tool that SIGPIPE ends. Output files are written atomically, so an
interrupted command leaves no partial file and no temporary file.

The pipeline (``api`` and what it imports: onnx, onnxruntime, scipy) is imported inside the
command functions, so that ``--help``, ``--version`` and usage errors answer at once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Iterator
from typing import TYPE_CHECKING

from . import __version__
from .choices import ALIGNMENTS, BN_MODES, HEADS, METHODS, MIN_SAMPLES, PARAMETERS, PROVIDERS, REPAIRS
from .errors import OnnxMergeError
from .limits import MAX_DEEPEN_PER_BLOCK, MAX_MULTIPLE, MAX_SEED, _range_text, argument
from .options import OPTION_NAMES, MergeOptions
from .progress import set_quiet

if TYPE_CHECKING:
    from .api import MergeResult

DEFAULTS = MergeOptions()  # every merge option's default, declared once in options.py
EXIT_ERROR, EXIT_BUG = 1, 70
EXIT_INTERRUPTED, EXIT_BROKEN_PIPE, EXIT_TERMINATED = 130, 141, 143  # 128 + SIGINT, SIGPIPE, SIGTERM as shells report


class Terminated(BaseException):
    """Raised by SIGTERM while a command runs, as SIGINT raises ``KeyboardInterrupt``: the
    ``finally`` blocks that remove temporary files run. A BaseException, so that no
    ``except Exception`` on the way swallows it."""


def _common_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output on stderr: -v each stage with its time, -vv details")
    parent.add_argument("-q", "--quiet", action="store_true",
                        help="no progress bars (they are drawn on stderr only when it is a terminal)")
    return parent


def _graph_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False, parents=[_common_options()])
    parent.add_argument("--bn", choices=BN_MODES, default=DEFAULTS.bn,
                        help=f"keep BatchNormalization nodes or fold them into the Conv before (default {DEFAULTS.bn})")
    return parent


def cmd_inspect(args: argparse.Namespace) -> int:
    """Show a model's inputs, outputs, ops, feature spaces and barriers."""
    from . import api, inspection
    report = api.inspect(args.model, bn=args.bn)
    print(json.dumps(report, indent=2) if args.json else inspection.render(report))
    if args.strict and report["barriers"]:
        first = report["barriers"][0]
        raise OnnxMergeError(f"{args.model}: node {first['node']!r} ({first['op']}) is a barrier: "
                             f"{first['reason']}; {len(report['barriers'])} barrier(s) in all")
    return 0


def _rewritten(args: argparse.Namespace, rewrite) -> int:
    """Write ``rewrite()``'s model to ``--output`` (checked writable before the work)."""
    from .errors import about
    from .io import check_writable, save_model
    check_writable(args.output, "model", [args.model])
    with about(args.model):
        model = rewrite()
    save_model(model, args.output)
    print(f"wrote {args.output}")
    return 0


def cmd_permute(args: argparse.Namespace) -> int:
    """Randomly permute every free feature space; the outputs stay the same."""
    from . import api
    return _rewritten(args, lambda: api.permute(api.load(args.model), seed=args.seed, bn=args.bn))


def _calibration_options(required: bool = False) -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("calibration")
    group.add_argument("--calib", metavar="DATA", nargs="+", type=_data_file, required=required,
                       help=".npz (one array per input name, or one array) or .npy inputs; several files are one "
                            "data set, their samples in the order given (the same arrays in each)")
    group.add_argument("--batch-size", type=argument(int, 1), default=DEFAULTS.batch_size,
                       help=f"samples per onnxruntime run (default {DEFAULTS.batch_size})")
    group.add_argument("--max-samples", type=argument(int, 1), help="use at most this many calibration samples")
    group.add_argument("--allow-few-samples", action="store_true",
                       help=f"accept fewer than {MIN_SAMPLES} calibration samples (refused by default: "
                            "correlations and repair statistics from so few are noise)")
    group.add_argument("--provider", choices=PROVIDERS, default=DEFAULTS.provider,
                       help=f"onnxruntime provider: auto uses CUDA when a session really runs on it "
                            f"(default {DEFAULTS.provider})")
    return parent


def _data_file(text: str) -> str:
    """A data file; a model's name is refused: ``--calib`` and ``--data`` take one or more
    files, so ``--calib DATA A.onnx B.onnx`` would read the models as data."""
    if text.endswith(".onnx"):
        raise argparse.ArgumentTypeError(f"{text!r} is a model, not data; put the data files after the models")
    return text


def _ray_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("distributed calibration (docs/scale.md)")
    group.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                       help="compute the calibration statistics in shards on Ray workers: without ADDRESS on a "
                            "Ray instance started on this machine for the command (one worker per core), with it "
                            "on the cluster there (auto, host:6379, ray://host:10001); the same result as without. "
                            "Needs pip install 'onnxmerge[ray]'")
    group.add_argument("--ray-shards", type=argument(int, 1), metavar="N",
                       help="with --ray: split the calibration samples into N shards (Ray tasks) of whole batches "
                            "(default: one per CPU of the cluster)")
    return parent


def _ray_scope(args: argparse.Namespace) -> contextlib.AbstractContextManager:
    """With ``--ray``: Ray checked before any work, and one Ray instance (or connection) for
    every statistics pass of the command, shut down at its end."""
    if args.ray is None:
        if args.ray_shards is not None:
            raise OnnxMergeError("--ray-shards splits the samples for Ray workers; add --ray [ADDRESS]")
        return contextlib.nullcontext()
    from .calib.distributed import check, held, import_ray
    check(args.ray, args.ray_shards)
    import_ray()
    return held()


def _plan_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("what is merged")
    group.add_argument("--heads", choices=HEADS, default=DEFAULTS.heads,
                       help=f"separate: one head per model, outputs suffixed _m<i>; shared: heads averaged "
                            f"(default {DEFAULTS.heads})")
    group.add_argument("--zip-layers", type=_zip_layers, metavar="N|auto",
                       help="merge only the spaces of the first N weight layers (Conv/Gemm/MatMul in graph order); "
                            "the rest stays per model. A space is merged when its first weight layer is among the N, "
                            "so a residual stream opened before the cut stays merged with the layers that write "
                            "into it: a cut inside such a block gives the model of the cut at the block's end "
                            "(the report's layers line counts the layers merged). auto: merge at each cut on 80%% of the --calib samples and "
                            "keep the largest N whose argmax disagreement with the source models on the other "
                            "20%% stays within --max-loss (the curve goes to the report). Default: every layer")
    group.add_argument("--max-loss", type=argument(float, 0.0, 1.0), default=DEFAULTS.max_loss,
                       help=f"--zip-layers auto: largest share of joint predictions that may differ from the ensemble "
                            f"of the models, 0-1 (default {DEFAULTS.max_loss})")
    group.add_argument("--align", choices=ALIGNMENTS, default=DEFAULTS.align,
                       help=f"depth alignment of models with different numbers of blocks: auto (sma when depths "
                            f"differ), sma, lma, uniform, head-tail, none (default {DEFAULTS.align}); calibrate "
                            "stores it in the statistics, so merge --stats needs no data")
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
    from . import api
    return _rewritten(args, lambda: api.widen(api.load(args.model), factor=args.factor, seed=args.seed, bn=args.bn))


def cmd_deepen(args: argparse.Namespace) -> int:
    """Insert identity blocks at random positions of the model's stages; the outputs stay the same."""
    from . import api
    return _rewritten(args, lambda: api.deepen(api.load(args.model), blocks=args.blocks, seed=args.seed, bn=args.bn))


def cmd_align(args: argparse.Namespace) -> int:
    """Align the blocks of models of different depths onto the deepest, stage by stage (CKA)."""
    from . import api
    from .depth import describe as describe_alignment
    from .io import check_writable
    from .report import plot_alignment, render_alignment
    if args.plot:
        check_writable(args.plot, "plot", [*args.models, *(args.calib or [])])
    alignment = api.align(args.models, args.calib, options=_options(args))
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


def _options(args: argparse.Namespace) -> MergeOptions:
    values = {name: getattr(args, name) for name in OPTION_NAMES if hasattr(args, name)}
    values["input_layout"] = tuple(values.get("input_layout") or ())
    return MergeOptions(**values)


def cmd_merge(args: argparse.Namespace) -> int:
    """Merge two or more models of one design (widths and depths may differ) into one ONNX model;
    its recipe goes to OUTPUT.recipe.yaml (re-run it with onnxmerge run)."""
    from . import api
    from .results import check_outputs
    scope = _ray_scope(args)
    check_outputs(args.output, args.report, True, [*args.models, args.base, *(args.calib or []), *(args.stats or [])])
    with scope:  # the outputs are checked before any work
        result = api.merge(args.models, args.calib, base=args.base, stats=args.stats, options=_options(args))
    _print_merge(result, result.save(args.output, report=args.report))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Run a recipe (YAML: models, calibration, method, parameters, outputs; docs/recipe.md), such
    as the OUTPUT.recipe.yaml a merge writes: the same files give the same model, byte for byte."""
    from . import api
    result = api.run(args.recipe)
    _print_merge(result, [path for path in (result.recipe.output, result.recipe.report) if path])
    return 0


def _print_merge(result: MergeResult, written: list[str]) -> None:
    report = result.report
    alignment = report.get("alignment")
    lifted = "" if alignment is None else (
        f", depths aligned by {alignment['method']} ({_identities(alignment)} identity blocks inserted)")
    also = f" (and {', '.join(written[1:])})" if len(written) > 1 else ""
    print(f"wrote {written[0]}{also}: {report['layers']}, method {report['method']}, "
          f"repair {report['repair']}, provider {report['provider']}{lifted}")


def _identities(alignment: dict) -> int:
    return sum(unit is None for stages in alignment["maps"].values() for stage in stages for unit in stage["map"])


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Compute the statistics a merge needs and save them (combine shards with merge --stats)."""
    from . import api
    from .calib.stats import save_stats
    from .io import check_writable
    if not args.calib:
        raise OnnxMergeError("calibrate needs --calib DATA")
    scope = _ray_scope(args)
    check_writable(args.output, "statistics", [*args.models, *args.calib])
    with scope:
        stats, meta = api.calibrate(args.models, args.calib, options=_options(args))
    save_stats(args.output, stats, meta)
    tensors = sum(len(model) for model in stats.moments)
    print(f"wrote {args.output}: {len(stats)} statistics and the source moments of {tensors} tensors over "
          f"{meta['samples']} samples, provider {meta['provider']}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Accuracy of models (joint, per task, average); --ensemble scores their output ensemble."""
    from . import api
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


def _method_parameters(parser: argparse.ArgumentParser) -> None:
    """One flag per method parameter (choices.PARAMETERS, the registry's parameter fields)."""
    group = parser.add_argument_group("method parameters")
    for name, (default, text, methods, allowed, bounds) in PARAMETERS.items():
        flag = "--" + name.replace("_", "-")
        described = f"{'/'.join(methods)}: {text}"
        if allowed:
            group.add_argument(flag, choices=allowed, default=default, help=f"{described} (default {default})")
        elif default is None:  # a list, one value per model
            group.add_argument(flag, type=argument(float, 0.0), nargs="+", metavar="W", help=described)
        else:
            low, high, low_open, high_open = bounds
            where = "" if low is None and high is None else f", {_range_text(low, high, low_open, high_open)}"
            group.add_argument(flag, type=argument(float, low, high, low_open=low_open, high_open=high_open),
                               default=default, help=f"{described}{where} (default {default})")


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

    calibration, plan, distributed = _calibration_options(), _plan_options(), _ray_options()
    merge = commands.add_parser("merge", parents=[graph, calibration, plan, distributed], help=cmd_merge.__doc__,
                                description=cmd_merge.__doc__)
    merge.add_argument("models", nargs="+", help="ONNX files; the first is the reference graph")
    merge.add_argument("-o", "--output", required=True, help="merged ONNX file")
    merge.add_argument("--stats", nargs="+", metavar="FILE", help="statistics from onnxmerge calibrate (shards add up); they hold the "
                       "source moments REPAIR reads, so its passes with --calib run the merged model only")
    merge.add_argument("--method", choices=list(METHODS),
                       help="default: task-arithmetic with --base, else zip with --calib/--stats, else weight; "
                            + "; ".join(f"{name}: {summary}" for name, summary in METHODS.items()))
    merge.add_argument("--base", metavar="BASE.onnx",
                       help="the pre-trained model the MODELS were fine-tuned from: the same-base methods "
                            "(task-arithmetic, ties, dare) add their task vectors (MODEL - BASE) to it; "
                            "with --base the method defaults to task-arithmetic")
    merge.add_argument("--align-first", action="store_true",
                       help="same-base methods: align every model's features to the first model's before combining "
                            "(activation matching on --calib, else weight matching); for models of one "
                            "architecture trained apart, or fine-tunes whose features drifted")
    _method_parameters(merge)
    merge.add_argument("--width", type=_multiple, metavar="Fx|min",
                       help="zip: merged width of every space as a multiple of the widest model's, e.g. 1.5x "
                            "(capped at the sum of the widths; default 1x), or min: the narrowest model's")
    merge.add_argument("--repair", choices=REPAIRS, default=DEFAULTS.repair,
                       help=f"auto: BN reset when the graph has BatchNormalization, REPAIR otherwise; same-base "
                            f"methods: none (default {DEFAULTS.repair})")
    merge.add_argument("--repair-samples", type=int, metavar="N",
                       help="measure the repair on N calibration samples drawn at random with --seed "
                            "(default: all); the statistics for matching always use all")
    merge.add_argument("--strict", action="store_true",
                       help="exit 1 instead of warning when a full merge leaves more than half of the weight "
                            "layers per model (barriers near the input)")
    merge.add_argument("--seed", type=argument(int, 0, MAX_SEED), default=DEFAULTS.seed,
                       help=f"random seed (default {DEFAULTS.seed})")
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

    run = commands.add_parser("run", parents=[_common_options()], help=cmd_run.__doc__, description=cmd_run.__doc__)
    run.add_argument("recipe", help="recipe file (.yaml)")
    run.set_defaults(run=cmd_run)

    calibrate = commands.add_parser("calibrate",
                                    parents=[graph, _calibration_options(required=True), plan, distributed],
                                    help=cmd_calibrate.__doc__, description=cmd_calibrate.__doc__)
    calibrate.add_argument("models", nargs="+", help="the ONNX files of the merge, in the same order")
    calibrate.add_argument("-o", "--output", required=True, help="statistics file (.npz)")
    calibrate.set_defaults(run=cmd_calibrate)

    evaluate = commands.add_parser("eval", parents=[_common_options()], help=cmd_eval.__doc__,
                                   description=cmd_eval.__doc__)
    evaluate.add_argument("models", nargs="+", help="ONNX files (a merged multi-head model, or source models)")
    evaluate.add_argument("--data", required=True, nargs="+", type=_data_file, metavar="DATA",
                          help=".npz with the inputs and the labels; several files are one test set, in order")
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
    set_quiet(args.quiet)
    signals: list[int] = []  # the signals received while the command ran
    try:
        with _signals_raise(signals):
            status = args.run(args)
            sys.stdout.flush()  # a reader that went away (| head) shows here, not at exit
    except KeyboardInterrupt:
        signals.append(signal.SIGINT)
    except Terminated:
        signals.append(signal.SIGTERM)
    except BrokenPipeError:
        _stdout_to_devnull()
        return EXIT_BROKEN_PIPE
    except Exception as error:
        if not signals:
            return _failed(args, error)
    else:
        if not signals:
            return status
    # A signal whose exception became another on its way (the C extensions of onnxruntime, numpy
    # and torch turn an interrupted import into an ImportError) or was swallowed (a best-effort
    # step) still ends the command as that signal.
    if signals[0] == signal.SIGINT:
        print("onnxmerge: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    print("onnxmerge: terminated", file=sys.stderr)
    return EXIT_TERMINATED


def _failed(args: argparse.Namespace, error: Exception) -> int:
    """Print the one line for an exception that ended a command; return the exit code."""
    if isinstance(error, OnnxMergeError):
        print(f"onnxmerge: error: {error}", file=sys.stderr)
        return EXIT_ERROR
    # the last resort: anything else is a bug in onnxmerge
    if args.verbose:
        traceback.print_exception(error)
    detail = " ".join(str(error).split())
    print(f"onnxmerge: internal error in {args.command}: {type(error).__name__}"
          f"{': ' + detail if detail else ''}; this is a bug: please report it with this model and command"
          f"{'' if args.verbose else ' (-v shows the traceback)'}", file=sys.stderr)
    return EXIT_BUG


@contextlib.contextmanager
def _signals_raise(received: list[int]) -> Iterator[None]:
    """While the body runs, SIGTERM raises ``Terminated`` and SIGINT ``KeyboardInterrupt`` (as
    Python's default does; a SIGINT ignored or handled by the caller stays so), and each signal
    is appended to ``received``. The previous handlers come back after. Outside the main thread
    Python cannot set handlers, and the signals keep theirs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame) -> None:
        received.append(signum)
        raise KeyboardInterrupt if signum == signal.SIGINT else Terminated

    handled = [signal.SIGTERM]
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        handled.append(signal.SIGINT)
    previous = {signum: signal.signal(signum, handler) for signum in handled}
    try:
        yield
    finally:
        for signum, action in previous.items():
            signal.signal(signum, action)


def _stdout_to_devnull() -> None:
    """Point stdout at the null device, so that the interpreter's last flush does not fail again."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is no file (in tests): nothing is flushed to a pipe
        pass


if __name__ == "__main__":
    sys.exit(main())
