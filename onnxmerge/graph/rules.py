"""The op-rule table: for each ONNX op, how channel axes flow from inputs to outputs.
(Long by design: one row and one small handler per op family, kept together as the one table.)

This is the only module that knows what an ONNX op does to channels (``facts.py``, the rest of
the op table, holds every other per-op fact). Each row names the op (default domain), the kind
of flow and the handler that applies it to a ``Context`` (see ``spaces.py``). An op without a
row is a barrier when it touches a tracked axis; a handler that meets a structure it cannot map
raises ``LayoutConflict``, which also becomes a barrier. Never guess: a wrong rule silently
changes the function.

Parameters are recorded with a role: ``producer`` (the axis indexes the space's features, as a
Conv's output channels or a bias) or ``consumer`` (the axis is contracted with the space, as a
Conv's input channels).

Opset differences (Split sizes, Squeeze/Unsqueeze/Reduce axes moving from attribute to input
in opsets 13/18, GroupNormalization scale shape in 21) are handled inside the handlers by
reading the input when present and the attribute otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import onnx

from .layout import Concat, Interleave, Layout, LayoutConflict, StackBody, Stacked, grid_factors, make_grid


class Context(Protocol):
    """What a handler may ask and do; implemented in ``spaces.py``."""

    def layouts(self, name: str) -> dict[int, Layout]: ...
    def shape(self, name: str) -> tuple: ...
    def const(self, name: str) -> np.ndarray | None: ...
    def set_output(self, name: str, layouts: dict[int, Layout | None]) -> None: ...
    def new_space(self, width: int) -> Layout: ...
    def unify(self, a: Layout | None, b: Layout | None) -> None: ...
    def param(self, name: str, axis: int, layout: Layout | None, role: str) -> None: ...
    def opset(self) -> int: ...
    def is_uniform(self, name: str) -> bool: ...
    def mark_uniform(self, name: str) -> None: ...
    def expanded(self, name: str) -> str | None: ...
    def mark_expanded(self, name: str, source: str) -> None: ...
    def fix(self, layout: Layout, reason: str) -> None: ...
    def mark_mixed(self, layout: Layout | None, reason: str) -> None: ...
    def keep_width(self, layout: Layout) -> None: ...
    def select(self, layout: Layout) -> None: ...


Handler = Callable[[onnx.NodeProto, Context], None]


@dataclass(frozen=True)
class Rule:
    """One row of the table."""

    kind: str
    handler: Handler
    summary: str


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def inputs(node: onnx.NodeProto) -> list[str]:
    return [name for name in node.input]


def rank(ctx: Context, name: str) -> int:
    return len(ctx.shape(name))


def axis_of(axis: int, rank_: int) -> int:
    return axis + rank_ if axis < 0 else axis


def const_ints(ctx: Context, node: onnx.NodeProto, index: int, attr_name: str) -> list[int] | None:
    """Integers from input ``index`` (newer opsets) or attribute ``attr_name`` (older ones)."""
    if len(node.input) > index and node.input[index]:
        value = ctx.const(node.input[index])
        if value is None:
            raise LayoutConflict(f"input {node.input[index]!r} is not a constant")
        return [int(v) for v in np.asarray(value).reshape(-1)]
    value = attr(node, attr_name)
    return None if value is None else [int(v) for v in value]


# --- same space ----------------------------------------------------------------------------


def same_space(node: onnx.NodeProto, ctx: Context) -> None:
    """Output 0 has exactly the input's channel structure (unary elementwise ops)."""
    ctx.set_output(node.output[0], ctx.layouts(node.input[0]))


def broadcast(node: onnx.NodeProto, ctx: Context, data: list[str]) -> None:
    """Numpy broadcasting: aligned axes of the dynamic inputs are the same space; constant
    inputs that vary along a tracked axis are per-channel parameters of it."""
    out = node.output[0]
    out_shape = ctx.shape(out)
    out_rank = len(out_shape)
    dynamic = [n for n in data if n and ctx.const(n) is None and not ctx.is_uniform(n)]
    result: dict[int, Layout | None] = {}
    for axis in range(out_rank):
        aligned = []
        for name in dynamic:
            k = axis - (out_rank - rank(ctx, name))
            if k >= 0 and not (ctx.shape(name)[k] == 1 and out_shape[axis] != 1):
                aligned.append(ctx.layouts(name).get(k))
        tracked = [a for a in aligned if a is not None]
        if tracked:
            for other in aligned:
                ctx.unify(tracked[0], other)
            result[axis] = tracked[0]
    for name in data:
        if name and ctx.const(name) is not None:
            shape = ctx.const(name).shape
            for axis, layout in result.items():
                k = axis - (out_rank - len(shape))
                if k >= 0 and shape[k] != 1:
                    ctx.param(name, k, layout, "producer")
    ctx.set_output(out, result)


def elementwise(node: onnx.NodeProto, ctx: Context) -> None:
    broadcast(node, ctx, inputs(node))


def first_input_broadcast(node: onnx.NodeProto, ctx: Context) -> None:
    """Expand: input 1 is a shape, not data. An expanded constant (a class token repeated over
    the batch) is that constant's values: a Concat reads it as the constant (``constant_of``)."""
    if ctx.const(node.input[0]) is not None:
        ctx.mark_expanded(node.output[0], node.input[0])
    broadcast(node, ctx, [node.input[0]])


def constant_of(ctx: Context, name: str) -> str | None:
    """The constant whose values ``name`` holds: itself, or the constant an Expand repeated
    (broadcast from the right, so its axes are the last ones)."""
    return name if ctx.const(name) is not None else ctx.expanded(name)


def batch_norm(node: onnx.NodeProto, ctx: Context) -> None:
    if len([o for o in node.output if o]) > 1 or attr(node, "training_mode", 0):
        raise LayoutConflict("BatchNormalization in training mode")
    channel = ctx.layouts(node.input[0]).get(1)
    for name in node.input[1:]:
        ctx.param(name, 0, channel, "producer")
    same_space(node, ctx)


def instance_norm(node: onnx.NodeProto, ctx: Context) -> None:
    """Per channel; statistics over the axes after it (which may carry channels: GroupNorm
    exported as Reshape -> InstanceNormalization -> Reshape)."""
    for axis, layout in ctx.layouts(node.input[0]).items():
        if axis >= 2:
            ctx.mark_mixed(layout, "InstanceNormalization statistics")
    channel = ctx.layouts(node.input[0]).get(1)
    for name in node.input[1:]:
        ctx.param(name, 0, channel, "producer")
    same_space(node, ctx)


def layer_norm(node: onnx.NodeProto, ctx: Context) -> None:
    """Statistics over axes [axis:] are permutation invariant; scale/bias follow those axes."""
    x = node.input[0]
    r = rank(ctx, x)
    first = axis_of(attr(node, "axis", -1), r)
    layouts = ctx.layouts(x)
    for k in range(first, r):
        ctx.mark_mixed(layouts.get(k), "LayerNormalization statistics")
    for name in node.input[1:3]:
        if name:
            p_rank = len(ctx.const(name).shape) if ctx.const(name) is not None else r - first
            for k in range(p_rank):
                ctx.param(name, k, layouts.get(r - p_rank + k), "producer")
    ctx.set_output(node.output[0], layouts)


def group_norm(node: onnx.NodeProto, ctx: Context) -> None:
    """Channels form (group, within-group) pairs: permutations move whole groups and permute
    inside groups alike, which keeps every group's statistics intact."""
    x = node.input[0]
    groups = attr(node, "num_groups")
    channel = ctx.layouts(x).get(1)
    width = ctx.shape(x)[1]
    outer, inner = ctx.split(channel, width, groups)
    ctx.mark_mixed(channel, "GroupNormalization statistics")
    for name in node.input[1:3]:
        per_group = ctx.const(name) is not None and ctx.const(name).shape[0] == groups != width
        ctx.param(name, 0, outer if per_group else make_grid([outer, inner]), "producer")
    ctx.set_output(node.output[0], ctx.layouts(x))


# --- new space: weight layers --------------------------------------------------------------


def conv(node: onnx.NodeProto, ctx: Context) -> None:
    _conv_like(node, ctx, out_axis=0, in_axis=1)


def conv_transpose(node: onnx.NodeProto, ctx: Context) -> None:
    _conv_like(node, ctx, out_axis=1, in_axis=0)


def _conv_like(node: onnx.NodeProto, ctx: Context, out_axis: int, in_axis: int) -> None:
    """Conv W is [Cout, Cin/g, k...], ConvTranspose W is [Cin, Cout/g, k...]. Groups tie
    input and output channels group by group: depthwise keeps the input's space."""
    x, w = node.input[0], node.input[1]
    weight = ctx.const(w)
    if weight is None:
        raise LayoutConflict("weights are not a constant")
    groups = attr(node, "group", 1)
    c_in = ctx.shape(x)[1]
    channel = ctx.layouts(x).get(1)
    per_group_out = weight.shape[out_axis] if out_axis == 1 else weight.shape[0] // groups
    if groups == 1:
        group_space, in_layout = None, channel
    elif c_in == groups:
        group_space, in_layout = channel, None
    else:
        group_space, in_layout = ctx.split(channel, c_in, groups)
    fresh = ctx.new_space(per_group_out) if per_group_out > 1 else None
    # an untracked group axis (a fixed input, say) still takes its size in the grid
    group_factor = group_space if group_space is not None else groups
    out_layout = make_grid([group_factor, fresh]) if groups > 1 else fresh
    if out_axis == 0:
        ctx.param(w, 0, out_layout, "producer")
        ctx.param(w, 1, in_layout, "consumer")
    else:
        ctx.param(w, 0, make_grid([group_factor, in_layout]) if groups > 1 else in_layout, "consumer")
        ctx.param(w, 1, fresh, "producer")
    if len(node.input) > 2 and node.input[2]:
        ctx.param(node.input[2], 0, out_layout, "producer")
    ctx.set_output(node.output[0], {1: out_layout} if out_layout is not None else {})


def gemm(node: onnx.NodeProto, ctx: Context) -> None:
    """Y = op(A) op(B) + C for 2-D A and B."""
    a, b = node.input[0], node.input[1]
    k_a = 0 if attr(node, "transA", 0) else 1
    k_b = 1 if attr(node, "transB", 0) else 0
    rows, cols = _contract(ctx, a, k_a, 1 - k_a, b, k_b, 1 - k_b)
    if len(node.input) > 2 and node.input[2]:
        broadcast_param(ctx, node.input[2], {0: rows, 1: cols}, 2)
    ctx.set_output(node.output[0], {0: rows, 1: cols})


def matmul(node: onnx.NodeProto, ctx: Context) -> None:
    """[..., M, K] x [..., K, N]; batch axes broadcast like elementwise ops."""
    a, b = node.input[0], node.input[1]
    ra, rb = rank(ctx, a), rank(ctx, b)
    if ra < 2 or rb < 2:
        if ctx.layouts(a) or ctx.layouts(b):
            raise LayoutConflict("MatMul with a 1-D operand on tracked channels")
        ctx.set_output(node.output[0], {})
        return
    rows, cols = _contract(ctx, a, ra - 1, ra - 2, b, rb - 2, rb - 1)
    out_rank = max(ra, rb)
    result = {out_rank - 2: rows, out_rank - 1: cols}
    for axis in range(out_rank - 2):
        aligned = []
        for name, r in ((a, ra), (b, rb)):
            k = axis - (out_rank - r)
            if k >= 0 and ctx.shape(name)[k] != 1:
                aligned.append((name, k))
        layout = next((ctx.layouts(n).get(k) for n, k in aligned if ctx.const(n) is None), None)
        for name, k in aligned:
            if ctx.const(name) is None:
                ctx.unify(layout, ctx.layouts(name).get(k))
            else:
                ctx.param(name, k, layout, "producer")
        result[axis] = layout
    ctx.set_output(node.output[0], result)


def _contract(ctx: Context, a: str, ka: int, ma: int, b: str, kb: int, nb: int):
    """Contract axis ka of A with axis kb of B; return layouts of A's free axis and B's."""
    const_a, const_b = ctx.const(a) is not None, ctx.const(b) is not None
    if const_a and const_b:
        raise LayoutConflict("both operands constant (not folded)")
    if const_b:
        fresh = ctx.new_space(ctx.const(b).shape[nb])
        ctx.param(b, kb, ctx.layouts(a).get(ka), "consumer")
        ctx.param(b, nb, fresh, "producer")
        return ctx.layouts(a).get(ma), fresh
    if const_a:
        fresh = ctx.new_space(ctx.const(a).shape[ma])
        ctx.param(a, ka, ctx.layouts(b).get(kb), "consumer")
        ctx.param(a, ma, fresh, "producer")
        return fresh, ctx.layouts(b).get(nb)
    ctx.unify(ctx.layouts(a).get(ka), ctx.layouts(b).get(kb))
    ctx.mark_mixed(ctx.layouts(a).get(ka), "contracted between two activations")
    return ctx.layouts(a).get(ma), ctx.layouts(b).get(nb)


def einsum(node: onnx.NodeProto, ctx: Context) -> None:
    """Einsum: each label's axes are one space. A label kept in the output carries it
    through; one summed away is contracted (with a constant operand: its consumer axis;
    between activations, or summed in one, the features are combined). A label only constant
    operands hold is a weight layer's new space, producer axis; several such output labels
    are a grid in output order (``abc,cde->abde``: a projection to heads x head_dim), all
    but the last blocks."""
    operands = inputs(node)
    terms, output = einsum_labels(attr(node, "equation").decode(), [rank(ctx, n) for n in operands])
    if all(ctx.const(n) is not None for n in operands):
        raise LayoutConflict("every operand constant (not folded)")
    if any(len(set(term)) != len(term) for term in terms):
        raise LayoutConflict("a label repeated within an operand (a diagonal)")
    result: dict[int, Layout | None] = {}
    fresh: list[Layout] = []
    for label in dict.fromkeys(l for term in terms for l in term):
        axes = _label_axes(ctx, operands, terms, label)
        dynamic = [(n, k) for n, k in axes if ctx.const(n) is None]
        layout = next((ctx.layouts(n).get(k) for n, k in dynamic if ctx.layouts(n).get(k) is not None), None)
        for name, k in dynamic:
            ctx.unify(layout, ctx.layouts(name).get(k))
        if not dynamic and label in output:
            size = ctx.shape(axes[0][0])[axes[0][1]]
            layout = ctx.new_space(size) if size > 1 else None
            fresh += [layout] if layout is not None else []
        elif label not in output and len(dynamic) == len(axes):
            ctx.mark_mixed(layout, "contracted between activations" if len(dynamic) > 1 else "summed over by Einsum")
        for name, k in axes:
            if ctx.const(name) is not None:
                ctx.param(name, k, layout, "producer" if label in output else "consumer")
        if label in output:
            result[output.index(label)] = layout
    for block in fresh[:-1]:
        ctx.keep_width(block)
    ctx.set_output(node.output[0], result)


def einsum_labels(equation: str, ranks: list[int]) -> tuple[list[list[str]], list[str]]:
    """Each operand's axis labels and the output's, an ellipsis spelt out as one label per
    axis it covers (``...0`` the outermost), right-aligned across operands as it broadcasts;
    without ``->`` the output is the ellipsis then the labels used once, sorted."""
    equation = equation.replace(" ", "")
    left, arrow, right = equation.partition("->")
    spans = [rank - len(term.replace("...", "")) for term, rank in zip(left.split(","), ranks)]
    if len(spans) != len(ranks) or any(s < 0 or (s and "..." not in t) for s, t in zip(spans, left.split(","))):
        raise LayoutConflict(f"Einsum equation {equation!r} does not fit its operands' ranks")
    widest = max(spans)

    def spell(term: str, span: int) -> list[str]:
        head, dots, tail = term.partition("...")
        return list(head) + ([f"...{widest - span + i}" for i in range(span)] if dots else []) + list(tail)

    terms = [spell(t, s) for t, s in zip(left.split(","), spans)]
    if arrow:
        return terms, spell(right, widest)
    used = [l for term in left.split(",") for l in term.replace("...", "")]
    return terms, spell("...", widest) + sorted(l for l in set(used) if used.count(l) == 1)


def _label_axes(ctx: Context, operands: list[str], terms: list[list[str]], label: str) -> list[tuple[str, int]]:
    """The (operand, axis) pairs of a label, less those of size 1 broadcast against a larger size."""
    axes = [(n, k) for n, term in zip(operands, terms) for k, l in enumerate(term) if l == label]
    wide = [(n, k) for n, k in axes if ctx.shape(n)[k] != 1]
    return wide or axes


def broadcast_param(ctx: Context, name: str, out: dict[int, Layout | None], out_rank: int) -> None:
    value = ctx.const(name)
    if value is None:
        raise LayoutConflict(f"bias {name!r} is not a constant")
    for axis, layout in out.items():
        k = axis - (out_rank - value.ndim)
        if k >= 0 and value.shape[k] != 1:
            ctx.param(name, k, layout, "producer")


def gather(node: onnx.NodeProto, ctx: Context) -> None:
    """Embedding lookup (constant table, axis 0) makes a space; indexing an untracked axis
    (token selection) keeps the other axes."""
    data, indices = node.input[0], node.input[1]
    r = rank(ctx, data)
    axis = axis_of(attr(node, "axis", 0), r)
    table = ctx.const(data)
    if table is not None:
        if axis != 0 or table.ndim != 2:
            raise LayoutConflict("Gather from a constant other than an embedding table")
        fresh = ctx.new_space(table.shape[1])
        ctx.param(data, 1, fresh, "producer")
        ctx.set_output(node.output[0], {rank(ctx, node.output[0]) - 1: fresh})
        return
    layouts = ctx.layouts(data)
    shift = rank(ctx, indices) - 1
    if isinstance(layouts.get(axis), Stacked):
        index = ctx.const(indices)
        if index is None or index.ndim > 1:
            raise LayoutConflict("Gather of parts by indices that are not a constant scalar or vector")
        layouts = picked(layouts, axis, [int(i) for i in index.reshape(-1)])
    elif layouts.get(axis) is not None:
        ctx.select(layouts[axis])
        raise LayoutConflict("Gather along a tracked channel axis")
    ctx.set_output(node.output[0], {(k if k < axis else k + shift): v for k, v in layouts.items()})


def picked(layouts: dict[int, Layout], axis: int, indices: list[int]) -> dict[int, Layout]:
    """The layouts after taking positions ``indices`` of a Stacked axis (a selector: the q, k
    and v of a packed projection): each StackBody axis holds the picked parts, one part as
    itself; the selector keeps the picked parts' order, or is untracked for one pick."""
    if [k for k, v in layouts.items() if isinstance(v, Stacked)] != [axis]:
        raise LayoutConflict("picks from a tensor with several stacked axes")
    width = len(layouts[axis].parts)
    if any(not -width <= i < width for i in indices):
        raise LayoutConflict("picks outside the stacked axis")
    result = {}
    for k, layout in layouts.items():
        if not isinstance(layout, Stacked | StackBody):
            result[k] = layout
        elif len(indices) > 1:
            result[k] = type(layout)(tuple(layout.parts[i] for i in indices))
        elif k != axis:
            result[k] = layout.parts[indices[0]]
    return result


# --- structure: concat, split, slice, reshape, transpose -----------------------------------


def concat(node: onnx.NodeProto, ctx: Context) -> None:
    out = node.output[0]
    r = rank(ctx, out)
    axis = axis_of(attr(node, "axis"), r)
    result: dict[int, Layout | None] = {}
    for k in range(r):
        if k == axis:
            continue
        tracked = [ctx.layouts(n).get(k) for n in node.input if constant_of(ctx, n) is None]
        base = next((t for t in tracked if t is not None), None)
        for other in tracked:
            ctx.unify(base, other)
        for source in filter(None, (constant_of(ctx, n) for n in node.input)):
            j = k - (r - ctx.const(source).ndim)
            if j >= 0 and ctx.const(source).shape[j] != 1:
                ctx.param(source, j, base, "producer")
        result[k] = base
    if not any(ctx.layouts(n).get(axis) is not None for n in node.input):
        ctx.set_output(out, {k: v for k, v in result.items() if v is not None})
        return
    parts = []
    for name in node.input:
        part = ctx.layouts(name).get(axis)
        if ctx.const(name) is not None:
            part = ctx.new_space(ctx.const(name).shape[axis])
            ctx.param(name, axis, part, "producer")
        parts.append(part)
    parts = [ctx.untracked_as_fixed(p, ctx.shape(n)[axis], "concatenated with untracked data")
             for p, n in zip(parts, node.input)]
    result[axis] = Concat(tuple(parts)) if len(parts) > 1 else parts[0]
    ctx.set_output(out, {k: v for k, v in result.items() if v is not None})


def split(node: onnx.NodeProto, ctx: Context) -> None:
    x = node.input[0]
    r = rank(ctx, x)
    axis = axis_of(attr(node, "axis", 0), r)
    sizes = [ctx.shape(o)[axis] for o in node.output]
    if any(not isinstance(s, int) for s in sizes):
        raise LayoutConflict("Split sizes unknown")
    layouts = ctx.layouts(x)
    if isinstance(layouts.get(axis), Stacked):
        bounds = np.cumsum([0, *sizes]).tolist()
        for name, start, end in zip(node.output, bounds, bounds[1:]):
            ctx.set_output(name, picked(layouts, axis, list(range(start, end))))
        return
    if layouts.get(axis) is not None:
        ctx.select(layouts[axis])
    pieces = ctx.cut(layouts.get(axis), sizes)
    for name, piece in zip(node.output, pieces):
        out = {k: v for k, v in layouts.items() if k != axis}
        if piece is not None:
            out[axis] = piece
        ctx.set_output(name, out)


def slice_(node: onnx.NodeProto, ctx: Context) -> None:
    """Contiguous slices of a tracked axis cut its space; strided ones are barriers. Bounds
    computed at run time are fine on a tensor with no tracked axis (position ids cut to the
    sequence length)."""
    x = node.input[0]
    if all(layout is None for layout in ctx.layouts(x).values()):
        ctx.set_output(node.output[0], {})
        return
    r = rank(ctx, x)
    starts = const_ints(ctx, node, 1, "starts")
    ends = const_ints(ctx, node, 2, "ends")
    axes = const_ints(ctx, node, 3, "axes") or list(range(len(starts)))
    steps = const_ints(ctx, node, 4, "steps") or [1] * len(starts)
    layouts = dict(ctx.layouts(x))
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = axis_of(axis, r)
        if layouts.get(axis) is None:
            continue
        if isinstance(layouts[axis], Stacked):
            layouts = picked(layouts, axis, list(range(ctx.shape(x)[axis]))[start:end:step])
            continue
        ctx.select(layouts[axis])
        if step != 1:
            raise LayoutConflict("strided Slice of a tracked channel axis")
        width = ctx.shape(x)[axis]
        lo, hi = (min(max(v + width if v < 0 else v, 0), width) for v in (start, end))
        sizes = [lo, hi - lo, width - hi]
        pieces = ctx.cut(layouts[axis], [s for s in sizes if s])
        layouts[axis] = pieces[1 if lo else 0]
    ctx.set_output(node.output[0], layouts)


def transpose(node: onnx.NodeProto, ctx: Context) -> None:
    x = node.input[0]
    perm = attr(node, "perm") or list(reversed(range(rank(ctx, x))))
    layouts = ctx.layouts(x)
    ctx.set_output(node.output[0], {i: layouts[p] for i, p in enumerate(perm) if p in layouts})


def reshape(node: onnx.NodeProto, ctx: Context) -> None:
    """Reshape, Flatten, Squeeze, Unsqueeze: regroup the row-major factors of the input axes
    into the output axes (Flatten of [C,H,W] gives a C x HW grid; [T, C] -> [T, h, d]
    splits the space into heads)."""
    x, out = node.input[0], node.output[0]
    src, dst = ctx.shape(x), ctx.shape(out)
    layouts = ctx.layouts(x)
    if not layouts:
        ctx.set_output(out, {})
        return
    stream: list = []
    for k, dim in enumerate(src):
        if isinstance(dim, int):
            stream.extend(grid_factors(layouts.get(k), dim))
        elif layouts.get(k) is not None:
            raise LayoutConflict("tracked axis of unknown size")
        else:
            stream.append(_Symbol())
    ctx.set_output(out, _regroup(ctx, stream, src, dst))


class _Symbol:
    """A dimension of unknown size (the batch) in the factor stream of a reshape."""


def _regroup(ctx: Context, stream: list, src: tuple, dst: tuple) -> dict[int, Layout]:
    static_in = int(np.prod([d for d in src if isinstance(d, int)]))
    static_out = int(np.prod([d for d in dst if isinstance(d, int)]))
    if not static_out or static_in % static_out:  # an empty tensor (a size-0 axis) has no channels to map
        raise LayoutConflict(f"cannot map reshape {src} -> {dst}")
    absorb = static_in // static_out  # extra size the first unknown output dim takes
    result: dict[int, Layout] = {}
    for k, dim in enumerate(dst):
        if not isinstance(dim, int):
            if not _skip_ones(ctx, stream) or not isinstance(stream[0], _Symbol):
                raise LayoutConflict(f"cannot map reshape {src} -> {dst}")
            # unknown dims map onto unknown dims: one output dim takes several input ones when
            # they outnumber it ((N, T, C) -> (-1, C); (N, C, h, w) -> (N, C, hw)), several output
            # dims split one input dim when they do ((N*T, C) -> (N, T, C))
            later = sum(1 for d in dst[k + 1:] if not isinstance(d, int))
            if sum(isinstance(f, _Symbol) for f in stream) <= later:
                continue
            stream.pop(0)
            while _skip_ones(ctx, stream) and isinstance(stream[0], _Symbol) and \
                    sum(isinstance(f, _Symbol) for f in stream) > later:
                stream.pop(0)
            dim, absorb = absorb, 1
        taken = _take(ctx, stream, dim)
        layout = make_grid(taken)
        if layout is not None:
            if any(not isinstance(t, int) for t in taken) and not isinstance(dst[k], int):
                raise LayoutConflict("tracked channels merged into an unknown dimension")
            result[k] = layout
    if any(isinstance(f, _Symbol) or ctx.width(f) != 1 for f in stream):
        raise LayoutConflict(f"cannot map reshape {src} -> {dst}")
    return result


def _skip_ones(ctx: Context, stream: list) -> bool:
    """Drop the size-1 factors at the head of the stream; whether any factor is left."""
    while stream and not isinstance(stream[0], _Symbol) and ctx.width(stream[0]) == 1:
        stream.pop(0)
    return bool(stream)


def _take(ctx: Context, stream: list, need: int) -> list:
    taken = []
    while need > 1:
        if not stream or isinstance(stream[0], _Symbol):
            raise LayoutConflict("reshape crosses an unknown dimension")
        width = ctx.width(stream[0])
        if width == 1:
            stream.pop(0)
        elif need % width == 0:
            taken.append(stream.pop(0))
            need //= width
        elif width % need == 0:
            outer, inner = ctx.split_factor(stream[0], need)
            taken.append(outer)
            stream[0] = inner
            need = 1
        else:
            raise LayoutConflict(f"reshape splits {width} positions into groups of {need}")
    return _join_stack(taken)


def _join_stack(taken: list) -> list:
    """(c, g) after a channel-shuffle transpose reads the parts interleaved; (g, c) reads
    them back in order."""
    for i in range(len(taken) - 1):
        first, second = taken[i], taken[i + 1]
        if isinstance(first, StackBody) and isinstance(second, Stacked) and first.parts == second.parts:
            return taken[:i] + [Interleave(first.parts)] + taken[i + 2:]
        if isinstance(first, Stacked) and isinstance(second, StackBody) and first.parts == second.parts:
            return taken[:i] + [Concat(first.parts)] + taken[i + 2:]
    return taken


def reduce(node: onnx.NodeProto, ctx: Context) -> None:
    """Sum/mean/max over an axis are invariant to permuting it; the reduced axis leaves."""
    x = node.input[0]
    r = rank(ctx, x)
    axes = const_ints(ctx, node, 1, "axes")
    if not axes:
        axes = [] if attr(node, "noop_with_empty_axes", 0) else list(range(r))
    axes = {axis_of(a, r) for a in axes}
    keep = attr(node, "keepdims", 1)
    result, position = {}, 0
    for k in range(r):
        layout = ctx.layouts(x).get(k)
        if k in axes:
            ctx.mark_mixed(layout, f"{node.op_type} over it")
        if k not in axes and layout is not None:
            result[position] = layout
        position += 1 if (keep or k not in axes) else 0
    ctx.set_output(node.output[0], result)


def arg_reduce(node: onnx.NodeProto, ctx: Context) -> None:
    """ArgMax/ArgMin return positions along the axis, so that axis must keep its order."""
    x = node.input[0]
    r = rank(ctx, x)
    axis = axis_of(attr(node, "axis", 0), r)
    layouts = ctx.layouts(x)
    if axis in layouts:
        ctx.fix(layouts[axis], f"{node.op_type} returns positions along it")
    keep = attr(node, "keepdims", 1)
    ctx.set_output(node.output[0], {(k if keep or k < axis else k - 1): v for k, v in layouts.items() if k != axis})


def keyed_by_position(node: onnx.NodeProto, ctx: Context) -> None:
    """ZipMap, ArrayFeatureExtractor (skl2onnx's label and probability maps) key or pick their
    outputs by positions along the input's axes, which must keep their order."""
    for name in node.input:
        for layout in ctx.layouts(name).values():
            ctx.fix(layout, f"{node.op_type} keys its output by position")
    for name in node.output:
        ctx.set_output(name, {})


def softmax(node: onnx.NodeProto, ctx: Context) -> None:
    """Softmax-like ops mix the positions of their axis; the order does not matter."""
    x = node.input[0]
    axis = axis_of(attr(node, "axis", -1), rank(ctx, x))
    ctx.mark_mixed(ctx.layouts(x).get(axis), f"{node.op_type} over it")
    same_space(node, ctx)


def pool(node: onnx.NodeProto, ctx: Context) -> None:
    """Pools act per channel: batch and channel axes pass, spatial axes change size."""
    if len(node.output) > 1 and node.output[1]:
        raise LayoutConflict("MaxPool indices encode channel positions")
    layouts = ctx.layouts(node.input[0])
    if any(k > 1 for k in layouts):
        raise LayoutConflict("pooling over a tracked axis")
    ctx.set_output(node.output[0], layouts)


def same_size_axes(node: onnx.NodeProto, ctx: Context) -> None:
    """Resize, Upsample: tracked axes must keep their size."""
    x, out = node.input[0], node.output[0]
    layouts = ctx.layouts(x)
    for k in layouts:
        if ctx.shape(x)[k] != ctx.shape(out)[k]:
            raise LayoutConflict(f"{node.op_type} changes the size of tracked axis {k}")
    ctx.set_output(out, layouts)


def pad(node: onnx.NodeProto, ctx: Context) -> None:
    """Constant Pad: a padded tracked axis is a concat of constant blocks around the input (the
    ResNet option-A shortcut pads channels with zeros). A block reads the same in any order, so
    it is a space of its own, but the pads fix its width: it is permuted, never widened or zipped."""
    x, out = node.input[0], node.output[0]
    layouts = dict(ctx.layouts(x))
    grown = [k for k in layouts if ctx.shape(x)[k] != ctx.shape(out)[k]]
    if not grown:
        ctx.set_output(out, layouts)
        return
    if attr(node, "mode", b"constant") != b"constant":
        raise LayoutConflict(f"{attr(node, 'mode').decode()} Pad of tracked axis {grown[0]} copies its positions")
    r = rank(ctx, x)
    pads = const_ints(ctx, node, 1, "pads")
    axes = [axis_of(a, r) for a in (const_ints(ctx, node, 3, "axes") or range(r))]
    for k in grown:
        before, after = pads[axes.index(k)], pads[axes.index(k) + len(axes)]
        if before < 0 or after < 0:
            raise LayoutConflict(f"Pad crops tracked axis {k}")
        blocks = [ctx.new_space(w) if w else None for w in (before, after)]
        for block in filter(None, blocks):
            ctx.keep_width(block)
        layouts[k] = Concat(tuple(p for p in (blocks[0], layouts[k], blocks[1]) if p is not None))
    ctx.set_output(out, layouts)


def depth_to_space(node: onnx.NodeProto, ctx: Context) -> None:
    """DepthToSpace puts input channel (i*r + j)*C + c (DCR mode) or c*r*r + i*r + j (CRD) at
    spatial offset (i, j) of output channel c: the input axis is the output's space replicated
    r*r times, outer in DCR, inner in CRD."""
    x, out = node.input[0], node.output[0]
    layouts = _channels_only(node, ctx)
    if 1 not in layouts:
        ctx.set_output(out, layouts)
        return
    blocks = attr(node, "blocksize") ** 2
    space = ctx.new_space(ctx.shape(x)[1] // blocks)
    dcr = attr(node, "mode", b"DCR") == b"DCR"
    ctx.unify(layouts[1], make_grid([blocks, space] if dcr else [space, blocks]))
    ctx.set_output(out, {**layouts, 1: space})


def space_to_depth(node: onnx.NodeProto, ctx: Context) -> None:
    """SpaceToDepth, DepthToSpace's DCR inverse: output channel (i*r + j)*C + c is input channel
    c at spatial offset (i, j), the input's space replicated r*r times."""
    layouts = _channels_only(node, ctx)
    blocks = attr(node, "blocksize") ** 2
    ctx.set_output(node.output[0], {**layouts, 1: make_grid([blocks, layouts.get(1)])})


def _channels_only(node: onnx.NodeProto, ctx: Context) -> dict[int, Layout]:
    """The input's layouts when no spatial axis (which the op scrambles) is tracked."""
    layouts = ctx.layouts(node.input[0])
    if any(k > 1 for k in layouts):
        raise LayoutConflict(f"{node.op_type} moves positions of a tracked spatial axis")
    return layouts


def no_channels(node: onnx.NodeProto, ctx: Context) -> None:
    """Shape-like ops: outputs describe sizes, not features."""
    for name in node.output:
        ctx.set_output(name, {})


def uniform(node: onnx.NodeProto, ctx: Context) -> None:
    """ConstantOfShape: one value everywhere, so it broadcasts against any channel order."""
    ctx.set_output(node.output[0], {})
    ctx.mark_uniform(node.output[0])


UNARY = (
    "Abs Acos Acosh Asin Asinh Atan Atanh Cast CastLike Ceil Celu Clip Cos Cosh Dropout Elu Erf "
    "Exp Floor Gelu HardSigmoid HardSwish Identity IsInf IsNaN LeakyRelu Log Mish Neg "
    "Not Reciprocal Relu Round Selu Shrink Sigmoid Sign Sin Sinh Softplus Softsign Sqrt "
    "Tan Tanh ThresholdedRelu"
).split()
BINARY = "Add And BitwiseAnd Div Equal Greater GreaterOrEqual Less LessOrEqual Max Mean Min Mul Or Pow PRelu Sub Sum Where Xor".split()
SOFTMAXES = ("Softmax", "LogSoftmax", "Hardmax")
REDUCTIONS = ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
              "ReduceLogSumExp", "ReduceSumSquare")


def _build() -> dict[str, Rule]:
    rows: dict[str, Rule] = {}

    def register(op: str, kind: str, handler: Handler) -> None:
        if op in rows:
            raise ValueError(f"op {op} registered twice")
        rows[op] = Rule(kind, handler, (handler.__doc__ or "").strip().split("\n")[0])

    for op in UNARY:
        register(op, "same-space", same_space)
    for op in BINARY:
        register(op, "broadcast", elementwise)
    register("Expand", "broadcast", first_input_broadcast)
    for op in SOFTMAXES:
        register(op, "same-space", softmax)
    register("BatchNormalization", "same-space", batch_norm)
    register("InstanceNormalization", "same-space", instance_norm)
    register("LayerNormalization", "same-space", layer_norm)
    register("GroupNormalization", "same-space", group_norm)
    register("Conv", "new-space", conv)
    register("ConvTranspose", "new-space", conv_transpose)
    register("Gemm", "new-space", gemm)
    register("MatMul", "new-space", matmul)
    register("Einsum", "new-space", einsum)
    register("Gather", "new-space", gather)
    register("Concat", "concat", concat)
    register("Split", "split", split)
    register("Slice", "split", slice_)
    register("Transpose", "transpose", transpose)
    for op in ("Reshape", "Flatten", "Squeeze", "Unsqueeze"):
        register(op, "reshape", reshape)
    for op in REDUCTIONS:
        register(op, "reduce", reduce)
    for op in ("ArgMax", "ArgMin"):
        register(op, "reduce", arg_reduce)
    for op in ("ai.onnx.ml.ZipMap", "ai.onnx.ml.ArrayFeatureExtractor"):
        register(op, "reduce", keyed_by_position)
    for op in ("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"):
        register(op, "same-space", pool)
    for op in ("Resize", "Upsample"):
        register(op, "same-space", same_size_axes)
    register("Pad", "concat", pad)
    register("DepthToSpace", "reshape", depth_to_space)
    register("SpaceToDepth", "reshape", space_to_depth)
    for op in ("Shape", "Size", "Range"):
        register(op, "no-channels", no_channels)
    register("ConstantOfShape", "no-channels", uniform)
    return rows


RULES: dict[str, Rule] = _build()
