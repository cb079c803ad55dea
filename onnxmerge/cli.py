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
from .io import load_model, save_model


def _graph_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--bn", choices=BN_MODES, default="keep",
                        help="keep BatchNormalization nodes or fold them into the Conv before (default keep)")
    parent.add_argument("-v", "--verbose", action="count", default=0, help="more log output on stderr")
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


def cmd_permute(args: argparse.Namespace) -> int:
    """Randomly permute every free feature space; the outputs stay the same."""
    permuted = api.permute(load_model(args.model), seed=args.seed, bn=args.bn)
    save_model(permuted, args.output)
    print(f"wrote {args.output}")
    return 0


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

    permute = commands.add_parser("permute", parents=[graph], help=cmd_permute.__doc__, description=cmd_permute.__doc__)
    permute.add_argument("model", help="ONNX file")
    permute.add_argument("-o", "--output", required=True, help="where to write the permuted model")
    permute.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    permute.set_defaults(run=cmd_permute)
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
