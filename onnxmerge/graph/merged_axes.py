"""Canonical passes for axes an exporter merges with an axis of unknown size.

torch's ``nn.MultiheadAttention`` runs on ``[T, B, D]`` and writes its heads as
``[T, B, D] -> [T, B*H, d] -> [B*H, T, d] -> [B, H, T, d]`` and its out-projection as
``[T, B, H, d] -> [T*B, D] -> Gemm -> [T, B, D]``. Shape inference names ``B*H`` and ``T*B``
by fresh symbols, so the rule table cannot tell which factors an axis holds. Both are
rewritten so that no axis ever holds the unknown size merged with another factor: the heads
as one Transpose of the factors ``[T, B, H, d]``, the out-projection as a MatMul on ``[T, B, D]``.
"""

from __future__ import annotations

from math import prod

import numpy as np
import onnx_graphsurgeon as gs

from .layers import CANONICAL_GEMM
from .spaces import Dim
from .surgery import constant, fresh_variable, producer, sole_consumer


class _Factors:
    """Row-major factorisations of one tensor's elements. Each factor has an id and a size
    (None when unknown); a split factor keeps its id and gets two children, so every axis
    recorded as a list of ids expands to the finest factors known."""

    def __init__(self) -> None:
        self.sizes: list[int | None] = []
        self.children: dict[int, tuple[int, int]] = {}

    def axes(self, shape: tuple[Dim, ...]) -> list[list[int]]:
        return [[self._new(d if isinstance(d, int) else None)] for d in shape]

    def _new(self, size: int | None) -> int:
        self.sizes.append(size)
        return len(self.sizes) - 1

    def expand(self, ids: list[int]) -> list[int]:
        """The finest factors of ``ids``, size-1 factors left out."""
        fine = []
        for i in ids:
            if i in self.children:
                fine.extend(self.expand(list(self.children[i])))
            elif self.sizes[i] != 1:
                fine.append(i)
        return fine

    def _split(self, factor: int, outer: int) -> int:
        """Split a known factor into ``outer`` times the rest; returns the outer part."""
        self.children[factor] = (self._new(outer), self._new(self.sizes[factor] // outer))
        return self.children[factor][0]

    def regroup(self, source: list[list[int]], target: list[int], allowzero: bool) -> list[list[int]] | None:
        """The factors of each output axis of a Reshape from axes ``source`` to ``target``
        (0 copies the source axis unless ``allowzero``, -1 takes the rest); None when the
        factors cannot be told: an unknown factor must sit whole in one output axis."""
        copies = {p: self.expand(source[p]) for p, e in enumerate(target) if e == 0 and not allowzero}
        if any(p >= len(source) for p in copies) or target.count(-1) > 1 or any(e < -1 for e in target):
            return None
        stream = self.expand([i for axis in source for i in axis])
        known = [e for p, e in enumerate(target) if e > 0 or (e == 0 and allowzero)]
        copied = [i for ids in copies.values() for i in ids]
        static_out = prod(known) * prod(self.sizes[i] for i in copied if self.sizes[i] is not None)
        static_in = prod(self.sizes[i] for i in stream if self.sizes[i] is not None)
        unknown_rest = sum(self.sizes[i] is None for i in stream) - sum(self.sizes[i] is None for i in copied)
        if static_out == 0 or static_in % static_out:
            return None
        groups = []
        for p, entry in enumerate(target):
            if p in copies:
                group = stream[:len(copies[p])] if stream[:len(copies[p])] == copies[p] else None
            elif entry == -1:
                group = self._take(stream, static_in // static_out, unknown_rest)
            else:
                group = self._take(stream, entry, 0)
            if group is None:
                return None
            del stream[:len(group)]
            groups.append(group)
        return groups if not stream else None

    def _take(self, stream: list[int], size: int, unknown: int) -> list[int] | None:
        """The leading factors of ``stream`` holding ``unknown`` unknown factors and known
        ones of product ``size`` (splitting the last known one if needed); the stream's head
        is replaced by the parts of a split factor."""
        taken, position = [], 0
        while size > 1 or unknown:
            if position == len(stream):
                return None
            factor = stream[position]
            width = self.sizes[factor]
            if width is None:
                if not unknown:
                    return None
                unknown -= 1
            elif size % width == 0:
                size //= width
            elif width % size == 0 and not unknown:
                factor = self._split(factor, size)
                stream[position:position + 1] = list(self.children[stream[position]])
                size = 1
            else:
                return None
            taken.append(factor)
            position += 1
        return taken

    def target(self, groups: list[list[int]], source: list[list[int]]) -> np.ndarray | None:
        """A Reshape target (allowzero 0) from axes ``source`` to axes ``groups``: known sizes,
        0 where an unknown axis stays in place, -1 for at most one other."""
        values = []
        for p, group in enumerate(groups):
            sizes = [self.sizes[i] for i in self.expand(group)]
            if None not in sizes:
                values.append(prod(sizes))
            else:
                values.append(0 if p < len(source) and self.expand(group) == self.expand(source[p]) else -1)
        return np.array(values, dtype=np.int64) if values.count(-1) <= 1 else None


def _target(node: gs.Node) -> list[int] | None:
    value = constant(node.inputs[1]) if node.op == "Reshape" and node.inputs[0].shape is not None else None
    return None if value is None else [int(v) for v in value.reshape(-1)]


def heads_through_batch(graph: gs.Graph) -> int:
    """Reshape -> Transpose -> Reshape that merges an unknown axis with known factors, moves
    the merged axis and splits it again (``[T, B, D] -> [T, B*H, d] -> [B*H, T, d] ->
    [B, H, T, d]``) is a Reshape to the finest common factors ``[T, B, H, d]``, a Transpose
    of them and a Reshape to the last shape: the same elements in the same order."""
    count = 0
    for first in graph.nodes:
        middle = sole_consumer(graph, first.outputs[0]) if _target(first) is not None else None
        last = sole_consumer(graph, middle.outputs[0]) if middle is not None and middle.op == "Transpose" else None
        if last is None or _target(last) is None or "perm" not in middle.attrs:
            continue
        plan = _fine_transpose(first, [int(p) for p in middle.attrs["perm"]], last)
        if plan is None:
            continue
        first_target, perm, last_target = plan
        for node, target in ((first, first_target), (last, last_target)):
            node.inputs[1] = gs.Constant(f"{node.outputs[0].name}_factors", target)
            node.attrs.pop("allowzero", None)
        middle.attrs["perm"] = perm
        count += 1
    return count


def _fine_transpose(first: gs.Node, perm: list[int], last: gs.Node) -> tuple[np.ndarray, list[int], np.ndarray] | None:
    """Targets and permutation of the rewrite, or None when the first Reshape merges no
    unknown axis with another factor or the factors cannot be told."""
    factors = _Factors()
    source = factors.axes(first.inputs[0].shape)
    merged = factors.regroup(source, _target(first), bool(first.attrs.get("allowzero", 0)))
    if merged is None or len(perm) != len(merged):
        return None
    moved = [merged[p] for p in perm]
    result = factors.regroup(moved, _target(last), bool(last.attrs.get("allowzero", 0)))
    if result is None or not any(len(factors.expand(g)) > 1 and None in [factors.sizes[i] for i in factors.expand(g)]
                                 for g in merged):
        return None
    fine = factors.expand([i for axis in source for i in axis])
    order = factors.expand([i for axis in moved for i in axis])
    first_target = factors.target([[i] for i in fine], source)
    last_target = factors.target(result, [[i] for i in order])
    if first_target is None or last_target is None:
        return None
    return first_target, [fine.index(i) for i in order], last_target


def gemm_on_merged_rows(graph: gs.Graph) -> int:
    """A canonical Gemm reading only a Reshape that merges leading axes into its rows
    (``[T, B, D] -> [T*B, D]``) is ``MatMul(x, W^T) + b`` on those axes kept, merged after:
    a linear layer acts on every row alike."""
    count = 0
    for gemm in list(graph.nodes):
        weight = constant(gemm.inputs[1]) if gemm.op == "Gemm" and gemm.attrs == CANONICAL_GEMM else None
        reshape = producer(gemm.inputs[0]) if weight is not None else None
        if reshape is None or reshape.op != "Reshape" or sole_consumer(graph, reshape.outputs[0]) is not gemm:
            continue
        kept = _leading_axes(reshape.inputs[0].shape, weight.shape[1])
        bias = constant(gemm.inputs[2])
        if kept is None or bias is None:
            continue
        rows = fresh_variable(graph, reshape.outputs[0], "rows")
        product, biased = (fresh_variable(graph, gemm.outputs[0], suffix) for suffix in ("matmul", "bias"))
        reshape.inputs[1] = gs.Constant(f"{rows.name}_target", np.array([0] * kept + [weight.shape[1]], np.int64))
        reshape.attrs.pop("allowzero", None)
        reshape.outputs[0] = rows
        merged = gemm.outputs[0]
        gemm.inputs.clear()
        gemm.outputs.clear()
        graph.nodes.extend([
            gs.Node("MatMul", f"{gemm.name}_matmul", {}, [rows, gs.Constant(f"{gemm.name}_weight", weight.T.copy())],
                    [product]),
            gs.Node("Add", f"{gemm.name}_add", {}, [product, gs.Constant(f"{gemm.name}_bias", bias)], [biased]),
            gs.Node("Reshape", f"{gemm.name}_rows", {}, [biased, gs.Constant(
                f"{merged.name}_target", np.array([-1, weight.shape[0]], np.int64))], [merged]),
        ])
        count += 1
    return count


def _leading_axes(shape: tuple[Dim, ...] | None, width: int) -> int | None:
    """How many leading axes of ``shape`` a Reshape to ``[rows, width]`` merges into the rows:
    the trailing axes must be known and hold ``width``; None unless two or more are merged."""
    if shape is None:
        return None
    for kept in range(len(shape) - 1, 0, -1):
        trailing = shape[kept:]
        if not all(isinstance(d, int) for d in trailing):
            return None
        if prod(trailing) >= width:
            return kept if prod(trailing) == width and kept >= 2 else None
    return None
