"""The op table's facts beyond channel flow: for each ONNX op, what lifting, blocks, merging,
canonical layers, correspondence and repair need to know of it.

``rules.py`` says how an op moves channel axes; this module says everything else, one fact
at a time (which ops preserve zero, keep the sign, end a block, hold weights in which
layout). Together they are the op table: no other module names an op type, except the
canonical passes that pattern-match exporter idioms (``tests/test_layers.py`` checks). An op
without a row here claims nothing: it is never assumed to preserve zero, keep a sign or pass
its input through, so an unknown op makes a proof fail rather than go wrong.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class WeightLayout:
    """Where a weight layer's constant weight (input 1) keeps its channels.

    Attributes:
        output: the weight axis indexing the output channels.
        input: the weight axis contracted with the input channels.
        grouped: the ``group`` attribute splits channels into groups; weight axis 0 then holds
            all its channels, axis 1 one group's.
        swapped_by: an attribute that, when set, swaps ``output`` and ``input`` (Gemm's transB).
        kernel: "" for a matrix; "patches" when the weight multiplies the input's sliding
            windows (a matrix on the patches); "scatter" when each input position spreads over
            a window of the output.
        channels: the axis of the layer's output holding its channels (-1: the last).
    """

    output: int
    input: int
    grouped: bool = False
    swapped_by: str = ""
    kernel: str = ""
    channels: int = 1


@dataclass(frozen=True)
class OpFacts:
    """What is known of one op besides its channel flow; the defaults claim nothing.

    Attributes:
        zero: how a zero output follows from zero inputs: "preserves" (f(0) = 0 on its first
            data input), "additive" (every data input zero, its constant operands zeroed as
            biases), "product" (any data input zero), "quotient" (the first input zero, over a
            nonzero constant).
        sign: "non-negative" (the output is >= 0 for every input), "keeps" (non-negative data
            inputs give a non-negative output), "bounded" (non-negative when its lower bound,
            input 1 or attribute min, is).
        joins: the output is its data inputs side by side (Concat): zero and sign follow every
            data input rather than the first; a run-time Reshape target is its parts' widths.
        adds: the output is the sum of its two inputs: a residual join, and a constant operand
            is a bias (zero in an identity block).
        identity: its setting in an identity block: "kernel" (a centred identity kernel, zero
            bias), "matrix" (an identity matrix, zero bias), "rectifier" (passes non-negative
            inputs), "bounded" (a rectifier with an upper bound, input 2 or attribute max:
            passes non-negative inputs when it is infinite), "pass" (always passes its input).
        norm: "running" when it normalises with stored statistics (BatchNormalization: scale,
            bias, mean and variance at inputs 1-4; a merge makes them stale), "sample" when
            with each sample's (scale and bias at inputs 1 and 2).
        weight: it holds constant weights: a segment with one is a block.
        layout: where its constant weight keeps its channels (weight layers with a fixed
            layout; an Einsum's comes from its equation).
        trailing: a parameter-free segment of only such ops ends the block before it
            (activations, the norms after a conv).
        parameters: its constant inputs after the first are learned parameters (weights,
            biases, norm scales).
        resize: the width-bearing constant to rewrite when a space changes width: "target"
            (Reshape's input 1), "sizes" (Split's input 1, or its equal parts), "bounds"
            (Slice's inputs 1 and 2), "group" (a depthwise instance's group attribute).
    """

    zero: str = ""
    sign: str = ""
    joins: bool = False
    adds: bool = False
    identity: str = ""
    norm: str = ""
    weight: bool = False
    layout: WeightLayout | None = None
    trailing: bool = False
    parameters: bool = False
    resize: str = ""


_NOTHING = OpFacts()
_WORDS = {"zero": {"preserves", "additive", "product", "quotient"}, "sign": {"non-negative", "keeps", "bounded"},
          "identity": {"kernel", "matrix", "rectifier", "bounded", "pass"}, "norm": {"running", "sample"},
          "resize": {"target", "sizes", "bounds", "group"}}


def _build() -> dict[str, OpFacts]:
    rows: dict[str, dict] = {}

    def mark(ops: str, **facts) -> None:
        for op in ops.split():
            row = rows.setdefault(op, {})
            if row.keys() & facts.keys():
                raise ValueError(f"op {op}: {', '.join(row.keys() & facts.keys())} stated twice")
            if any(value not in _WORDS.get(name, (value,)) for name, value in facts.items()):
                raise ValueError(f"op {op}: a fact outside {_WORDS}")
            row.update(facts)

    mark("Relu LeakyRelu PRelu Tanh Gelu Erf Elu Selu Celu HardSwish Mish Neg Abs Sqrt Sin Asinh Atan Sign "
         "Clip Identity Dropout Cast Reshape Transpose Flatten Squeeze Unsqueeze Expand Tile DepthToSpace "
         "SpaceToDepth Slice Split Gather Concat Resize MaxPool AveragePool GlobalAveragePool GlobalMaxPool "
         "ReduceMean ReduceSum ReduceMax", zero="preserves")
    mark("Add Sub", zero="additive")
    mark("Mul MatMul Einsum", zero="product")
    mark("Div", zero="quotient")
    mark("Relu Sigmoid Softmax Abs Exp Softplus HardSigmoid Sqrt", sign="non-negative")
    mark("MaxPool AveragePool GlobalAveragePool GlobalMaxPool Flatten Reshape Transpose Identity Dropout "
         "Squeeze Unsqueeze Concat Resize ReduceMean", sign="keeps")
    mark("Clip", sign="bounded", identity="bounded")
    mark("Concat", joins=True)
    mark("Conv", identity="kernel")
    mark("Gemm MatMul", identity="matrix")
    mark("Add", adds=True)
    mark("Relu LeakyRelu", identity="rectifier")
    mark("Identity Dropout", identity="pass")
    mark("BatchNormalization", norm="running")
    mark("LayerNormalization InstanceNormalization GroupNormalization", norm="sample")
    mark("Conv ConvTranspose Gemm MatMul Einsum", weight=True)
    mark("Conv", layout=WeightLayout(0, 1, grouped=True, kernel="patches"))
    mark("ConvTranspose", layout=WeightLayout(1, 0, grouped=True, kernel="scatter"))
    mark("Gemm", layout=WeightLayout(1, 0, swapped_by="transB"))
    mark("MatMul", layout=WeightLayout(-1, -2, channels=-1))
    mark("Relu LeakyRelu PRelu Clip Sigmoid HardSigmoid HardSwish Tanh Gelu Elu Selu Celu Softplus Mish Dropout "
         "Identity BatchNormalization InstanceNormalization GroupNormalization Reshape Mul Add", trailing=True)
    mark("Conv ConvTranspose Gemm MatMul BatchNormalization LayerNormalization GroupNormalization "
         "InstanceNormalization PRelu", parameters=True)
    mark("Reshape", resize="target")
    mark("Split", resize="sizes")
    mark("Slice", resize="bounds")
    mark("Conv", resize="group")
    return {op: OpFacts(**facts) for op, facts in rows.items()}


FACTS: dict[str, OpFacts] = _build()


def op_facts(op: str) -> OpFacts:
    """The facts of ``op`` (an op type); none for an op without a row."""
    return FACTS.get(op, _NOTHING)


def output_axis(layout: WeightLayout, attrs: Mapping) -> int:
    """The weight axis indexing output channels, given the node's attributes."""
    swapped = bool(layout.swapped_by) and bool(attrs.get(layout.swapped_by, 0))
    return layout.input if swapped else layout.output


def depthwise(op: str, weight_shape: tuple[int, ...] | None, group: int) -> bool:
    """Whether a node of ``op`` with this weight and group count is depthwise (one input
    channel per group), its group attribute then being its width."""
    layout = op_facts(op).layout
    return (op_facts(op).resize == "group" and group > 1 and weight_shape is not None
            and weight_shape[layout.input] == 1)
