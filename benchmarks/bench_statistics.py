"""Statistics accumulated on the device that runs the models (``calib.device``, the default with
``--provider cuda``) against accumulated on the host (each batch's X^T X blocks copied out and
added in numpy), on a pair of wide MLPs: wall time of each, their ratio (target on a GPU: the
device path faster), and the largest difference between the two (relative to the largest entry).

Run: python benchmarks/bench_statistics.py [--provider cuda] [--width 2048] [--layers 4] [--rows 4096] [--batch 256]
On the CPU both run there; scripts/gpu_check.sh runs it with --provider cuda.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from onnxmerge import api
from onnxmerge.calib.capture import collect_statistics
from onnxmerge.rewrite.heads import split_trunk
from onnxmerge.sources import read_data, read_models
from onnxmerge.stages.prepare import lockstep_batches, prepare
from onnxmerge.stages.statistics import plan_units


def mlp(width: int, layers: int, seed: int):
    """x [N, W] -> (Gemm -> Relu) x layers, random weights."""
    rng = np.random.default_rng(seed)
    nodes, inits, current = [], [], "x"
    for k in range(layers):
        inits += [numpy_helper.from_array(rng.standard_normal((width, width), dtype=np.float32) / np.float32(width ** 0.5),
                                          f"w{k}"),
                  numpy_helper.from_array(rng.standard_normal(width, dtype=np.float32) * np.float32(0.1), f"b{k}")]
        nodes += [helper.make_node("Gemm", [current, f"w{k}", f"b{k}"], [f"g{k}"], transB=1),
                  helper.make_node("Relu", [f"g{k}"], [f"h{k}"])]
        current = f"h{k}"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
                              [helper.make_tensor_value_info(current, TensorProto.FLOAT, ["N", width])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--provider", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rows", type=int, default=4096, help="calibration rows (default 4096)")
    parser.add_argument("--batch", type=int, default=256, help="rows per batch (default 256)")
    args = parser.parse_args()
    x = np.random.default_rng(0).standard_normal((args.rows, args.width), dtype=np.float32)
    members, _, _, calib, _, _ = prepare(read_models([mlp(args.width, args.layers, s) for s in (0, 1)]), read_data(x),
                                         api.MergeOptions())
    split = split_trunk(members[0].model, members[0].graph, heads="separate", zip_layers=None)
    _, per_model, widths = plan_units(members, split)
    models = [m.model for m in members]
    results, seconds = {}, {}
    for where, on_device in (("host", False), ("device", True)):
        start = time.perf_counter()
        results[where], ran = collect_statistics(models, per_model, lockstep_batches(calib, 2, args.batch), widths,
                                                 args.provider, on_device=on_device)
        seconds[where] = time.perf_counter() - start
    difference = max(float(np.abs(d.outer - h.outer).max() / np.abs(h.outer).max())
                     for d, h in zip(results["device"], results["host"]))
    print(f"two MLPs of {args.layers} Gemm {args.width}x{args.width}, {len(widths)} spaces, {args.rows} rows "
          f"in batches of {args.batch}, on {ran}")
    print(f"host accumulation {seconds['host']:.2f} s, device accumulation {seconds['device']:.2f} s, "
          f"device / host {seconds['device'] / seconds['host']:.2f}; largest difference {difference:.1e} of the largest entry")


if __name__ == "__main__":
    main()
