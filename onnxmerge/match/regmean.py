"""RegMean (Jin et al. 2023, "Dataless knowledge fusion by merging weights of language models").

For a linear layer ``Y = X W`` (W of shape [in, out]) the merged weight minimises
``sum_i ||X_i W - X_i W_i||^2`` over every model's own inputs X_i, which gives
``W = (sum_i G_i)^-1 sum_i G_i W_i`` with ``G_i = X_i^T X_i`` the Gram matrix of the layer's
input on model i's run of the calibration data. The off-diagonal entries of each G_i are
scaled by ``alpha`` (alpha = 1: the exact solution; alpha = 0: a per-input-feature weighted
average), which the paper found to regularise it. A convolution is the same linear map on
its input patches (C * kh * kw features per output position; groups of 1 only). Written as
``W = mean_i W_i + (sum G)^+ sum_i G_i (W_i - mean W)``, directions no input reaches keep
the plain average, and identical Gram matrices give exactly the plain average.
Every other parameter (biases, norms, grouped convolutions) is averaged.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx

from ..graph.facts import op_facts
from ..choices import default


@dataclass(frozen=True)
class RegMeanParams:
    """alpha: scale of the Gram matrices' off-diagonal entries, in [0, 1]."""

    alpha: float = default("alpha")


@dataclass(frozen=True)
class Layer:
    """A weight layer RegMean merges, in the reference model's names.

    Attributes:
        weight: its weight initializer: [in, out] (MatMul, Gemm), [out, in] when
            ``transposed``, [out, C, kh, kw] for a convolution.
        input: the tensor it multiplies.
        transposed: Gemm's transB.
        conv: a convolution's kernel_shape, pads, strides and dilations (2-D), else None.
    """

    weight: str
    input: str
    transposed: bool = False
    conv: tuple | None = None


def regmean_layers(model: onnx.ModelProto, nodes: Iterable[int]) -> list[Layer]:
    """The matrix weight layers (MatMul, Gemm with transA 0) and 2-D ungrouped convolutions on
    patches (Conv) among ``nodes`` (indices) whose weight is an initializer."""
    weights = {init.name: init for init in model.graph.initializer}
    layers = []
    for index in nodes:
        node = model.graph.node[index]
        layout = op_facts(node.op_type).layout
        matrix = layout is not None and layout.kernel in ("", "patches")  # a transposed conv is not one
        if not matrix or len(node.input) < 2 or node.input[1] not in weights:
            continue
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if attributes.get("transA", 0):
            continue
        conv = None
        if layout.kernel == "patches":
            kernel = tuple(weights[node.input[1]].dims[2:])
            if len(kernel) != 2 or attributes.get("group", 1) != 1 or attributes.get("auto_pad", b"NOTSET") not in (
                    b"NOTSET", "NOTSET"):
                continue
            conv = (kernel, tuple(attributes.get("pads", (0, 0, 0, 0))), tuple(attributes.get("strides", (1, 1))),
                    tuple(attributes.get("dilations", (1, 1))))
        layers.append(Layer(node.input[1], node.input[0], bool(attributes.get("transB", 0)), conv))
    return layers


def patches(x: np.ndarray, conv: tuple) -> np.ndarray:
    """Rows of a 2-D convolution's input patches: [N, C, H, W] -> [N * oh * ow, C * kh * kw],
    features in the order of the weight's (C, kh, kw)."""
    (kh, kw), (top, left, bottom, right), (sh, sw), (dh, dw) = conv
    x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    windows = np.lib.stride_tricks.sliding_window_view(x, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(2, 3))
    windows = windows[:, :, ::sh, ::sw, ::dh, ::dw]  # [N, C, oh, ow, kh, kw]
    n, c, oh, ow = windows.shape[:4]
    return windows.transpose(0, 2, 3, 1, 4, 5).reshape(n * oh * ow, c * kh * kw)


def input_rows(x: np.ndarray, layer: Layer) -> np.ndarray:
    """The rows the layer multiplies by its [in, out] weight."""
    if layer.conv is not None:
        return patches(x, layer.conv)
    return x.reshape(-1, x.shape[-1])


def as_matrix(weight: np.ndarray, layer: Layer) -> np.ndarray:
    """The weight as the [in, out] matrix of ``Y = X W``."""
    if layer.conv is not None:
        return weight.reshape(weight.shape[0], -1).T
    return weight.T if layer.transposed else weight


def from_matrix(matrix: np.ndarray, layer: Layer, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of ``as_matrix``."""
    if layer.conv is not None:
        return matrix.T.reshape(shape)
    return matrix.T if layer.transposed else matrix


def merged_weight(weights: list[np.ndarray], grams: list[np.ndarray], layer: Layer, alpha: float) -> np.ndarray:
    """RegMean's weight from each model's weight (as stored) and input Gram matrix, in float64."""
    matrices = [as_matrix(w.astype(np.float64), layer) for w in weights]
    shrunk = [alpha * g + (1 - alpha) * np.diag(np.diag(g)) for g in grams]
    mean = sum(matrices) / len(matrices)
    correction = np.linalg.pinv(sum(shrunk), hermitian=True) @ sum(g @ (m - mean) for g, m in zip(shrunk, matrices))
    return from_matrix(mean + correction, layer, weights[0].shape)


def gram_matrices(sessions, inputs: list[list[str]], layers: list[Layer], batches) -> list[list[np.ndarray]]:
    """Per model, per layer, the Gram matrix X^T X of the layer's input rows over ``batches``
    (per step, one feed per model), accumulated in float64.

    Args:
        sessions: one onnxruntime session per model whose outputs include ``inputs[i]``.
        inputs: per model, the tensor each layer reads (the models' own names).
    """
    grams = [[0.0 for _ in layers] for _ in sessions]
    for feeds in batches:
        for i, (session, names, feed) in enumerate(zip(sessions, inputs, feeds)):
            values = session.run(names, feed)
            for k, (layer, value) in enumerate(zip(layers, values)):
                rows = input_rows(np.asarray(value, dtype=np.float64), layer)
                grams[i][k] = grams[i][k] + rows.T @ rows
    return grams

