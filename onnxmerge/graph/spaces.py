"""Feature-space discovery: walk a canonical graph through the op-rule table and collect the
spaces (sets of tensor axes transformed together) with their producers and consumers."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from .layout import Atom, Concat, Grid, Layout, LayoutConflict, SpaceTable, StackBody, Stacked, leaves, nested
from ..errors import InvalidModelError
from ..io import default_opset
from .rules import RULES
from .. import weights

Dim = int | str | None
SplitKey = tuple[str, int]  # a node and the count of reshape splits it made before


@dataclass(frozen=True)
class ParamUse:
    """An initializer axis that indexes (producer) or is contracted with (consumer) spaces."""

    name: str
    axis: int
    layout: Layout
    role: str
    node: str


@dataclass(frozen=True)
class Barrier:
    """A node whose channel behaviour is unknown: the spaces it touches are fixed."""

    node: str
    op: str
    reason: str


@dataclass
class Space:
    """One feature space: its width, whether it may be transformed and who touches it."""

    id: int
    name: str
    width: int
    fixed_reasons: list[str] = field(default_factory=list)
    producers: list[ParamUse] = field(default_factory=list)
    consumers: list[ParamUse] = field(default_factory=list)
    tensors: list[tuple[str, int]] = field(default_factory=list)

    @property
    def fixed(self) -> bool:
        return bool(self.fixed_reasons)


@dataclass
class SpaceGraph:
    """The result of ``find_spaces``; layouts refer to ``Space.id``."""

    table: SpaceTable
    spaces: list[Space]
    barriers: list[Barrier]
    params: list[ParamUse]
    layouts: dict[str, dict[int, Layout]]
    mixed: dict[int, str] = field(default_factory=dict)  # spaces whose features ops combine
    kept: dict[int, str] = field(default_factory=dict)  # spaces whose width an op fixes -> that node
    outputs: frozenset[int] = frozenset()  # spaces fixed only because a graph output shows them

    @property
    def free_spaces(self) -> list[Space]:
        return [s for s in self.spaces if not s.fixed]

    def block_spaces(self) -> set[int]:
        """Spaces whose width is part of the architecture: blocks of a grid (attention heads,
        conv groups) and blocks a Pad writes. They are permuted, never widened or zipped."""
        return set(self.block_layers())

    def block_layers(self) -> dict[int, str]:
        """Each block space with the name of a node whose parameters group by it (or that pads it)."""
        blocks: dict[int, str] = dict(self.kept)
        for use in self.params:
            if isinstance(use.layout, Grid):
                atoms = [f for f in use.layout.factors if isinstance(f, Atom)]
                for space in (s for atom in atoms[:-1] for s in leaves(atom)):
                    blocks.setdefault(space, use.node)
        return blocks

    def axis_grids(self) -> set[tuple[int, int]]:
        """(block, within-block) pairs that two adjacent axes of a tensor hold as atoms: the
        heads and head_dim of [N, T, H, Dh] in an Einsum attention, or of [N, heads, kd, L]
        split from a reshaped projection. Read together they are a grid like a flattened one."""
        blocks = self.block_spaces()
        return {(axes[k].space, axes[k + 1].space) for axes in self.layouts.values() for k in axes
                if k + 1 in axes and isinstance(axes[k], Atom) and isinstance(axes[k + 1], Atom)
                and axes[k].space in blocks and axes[k + 1].space not in blocks}

    def space(self, space_id: int) -> Space:
        return self._by_id[space_id]

    def __post_init__(self) -> None:
        self._by_id = {s.id: s for s in self.spaces}


def tensor_shapes(model: onnx.ModelProto) -> dict[str, tuple[Dim, ...]]:
    """Shapes known from graph inputs, outputs, value_info and initializers."""
    shapes: dict[str, tuple[Dim, ...]] = {}
    graph = model.graph
    for info in list(graph.input) + list(graph.value_info) + list(graph.output):
        kind = info.type.WhichOneof("value")
        if kind != "tensor_type" or not info.type.tensor_type.HasField("shape"):
            continue
        shapes[info.name] = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in info.type.tensor_type.shape.dim
        )
    for init in graph.initializer:
        shapes[init.name] = tuple(init.dims)
    return shapes


def node_label(node: onnx.NodeProto, index: int) -> str:
    return node.name or f"{node.op_type}_{index}"


class _Walk:
    """The Context the rules see, for one graph walk."""

    def __init__(self, model: onnx.ModelProto, selectors: frozenset[SplitKey]):
        self.table = SpaceTable()
        self.selectors = selectors
        self.selected: set[SplitKey] = set()  # splits this walk found picked from
        self._outer: dict[int, SplitKey] = {}  # outer factors of reshape splits -> their split
        self.splits = 0
        self.shapes = tensor_shapes(model)
        self.initializers = {init.name: init for init in model.graph.initializer}
        self._arrays: dict[str, np.ndarray] = {}
        self.layouts: dict[str, dict[int, Layout]] = {}
        self.params: list[ParamUse] = []
        self.barriers: list[Barrier] = []
        self._opset = default_opset(model)
        self.node = ""
        self.touched: list[Layout] = []
        self.uniform: set[str] = set()
        self._expanded: dict[str, str] = {}
        self.mixed: list[tuple[Layout, str]] = []
        self.kept: list[tuple[Layout, str]] = []

    # --- queries --------------------------------------------------------------------------
    def layouts_of(self, name: str) -> dict[int, Layout]:
        return self.layouts.get(name, {})

    def shape(self, name: str) -> tuple:
        if name not in self.shapes:
            raise LayoutConflict(f"shape of tensor {name!r} unknown")
        return self.shapes[name]

    def const(self, name: str) -> np.ndarray | None:
        if name not in self.initializers:
            return None
        if name not in self._arrays:
            self._arrays[name] = weights.read(self.initializers[name])
        return self._arrays[name]

    def opset(self) -> int:
        return self._opset

    def fix(self, layout: Layout, reason: str) -> None:
        self.table.fix(layout, f"{reason} at {self.node}")

    def mark_mixed(self, layout: Layout | None, reason: str) -> None:
        """Record that an op combines the features of these spaces (normalisation statistics,
        reductions, contractions between activations): duplicating a feature changes them."""
        if layout is not None:
            self.mixed.append((layout, f"{reason} at {self.node}"))

    def keep_width(self, layout: Layout) -> None:
        """Record that this node fixes the width of these spaces (the blocks a Pad writes)."""
        self.kept.append((layout, self.node))

    def is_uniform(self, name: str) -> bool:
        return name in self.uniform

    def mark_uniform(self, name: str) -> None:
        self.uniform.add(name)

    def expanded(self, name: str) -> str | None:
        return self._expanded.get(name)

    def mark_expanded(self, name: str, source: str) -> None:
        self._expanded[name] = source

    def width(self, layout) -> int:
        return self.table.width(layout)

    # --- actions --------------------------------------------------------------------------
    def set_output(self, name: str, layouts: dict[int, Layout | None]) -> None:
        kept = {k: v for k, v in layouts.items() if v is not None}
        self.touched.extend(kept.values())
        self.layouts[name] = kept

    def new_space(self, width: int) -> Layout:
        atom = self.table.new(width, self.node)
        self.touched.append(atom)
        return atom

    def untracked_as_fixed(self, layout: Layout | None, width: int, reason: str) -> Layout:
        if layout is not None:
            return layout
        atom = self.new_space(width)
        self.table.fix(atom, f"{reason} at {self.node}")
        return atom

    def unify(self, a: Layout | None, b: Layout | None) -> None:
        if a is None and b is None:
            return
        self.table.unify(a, b)

    def param(self, name: str, axis: int, layout: Layout | None, role: str) -> None:
        if layout is None:
            return
        if name not in self.initializers:
            raise LayoutConflict(f"parameter {name!r} is not a constant")
        if any(isinstance(v, Stacked | StackBody) for v in nested(self.table.resolve(layout))):
            raise LayoutConflict(f"parameter {name!r} varies along a stacked axis")
        dims = self.initializers[name].dims
        if axis >= len(dims) or dims[axis] != self.table.width(layout):
            # onnx's checks let a weight that does not fit its input through; onnxruntime fails on it
            size = dims[axis] if axis < len(dims) else "no"
            raise InvalidModelError(
                f"node {self.node}: parameter {name!r} has {size} entries on axis {axis} where the tensor it "
                f"meets has {self.table.width(layout)} channels, so onnxruntime cannot run the model; fix the "
                "model's weight shapes (re-export it)")
        self.touched.append(layout)
        self.params.append(ParamUse(name, axis, layout, role, self.node))

    def split(self, layout: Layout | None, width: int, groups: int):
        if layout is None:
            return None, None
        return self.table.split_factor(layout, groups)

    def split_factor(self, factor: Layout | int, size: int) -> tuple[Layout | int, Layout | int]:
        """A reshape splits ``factor`` into an outer axis of ``size`` and the rest: a grid, or
        for a split picked from on an earlier walk (``selectors``) a stack of equal parts, a
        concat whose parts keep their width (the reshape holds one width for all of them)."""
        key, factor = (self.node, self.splits), self.table.resolve(factor)
        self.splits += 1
        if key in self.selectors and isinstance(factor, Atom):
            parts = Concat(tuple(self.table.cut(factor, [self.width(factor) // size] * size)))
            self.keep_width(parts)
            return self.table.split_factor(parts, size)
        outer, inner = self.table.split_factor(factor, size)
        if isinstance(factor, Atom):
            self._outer[outer.space] = key
        return outer, inner

    def select(self, layout: Layout) -> None:
        """Constant picks along an axis of this layout. The outer factor of a reshape's split
        (q, k, v of a packed projection) is a selector, not a space: the split is redone as a
        stack of parts on the next walk, and this one raises."""
        resolved = self.table.resolve(layout)
        splits = {self.table.find(space): key for space, key in self._outer.items()}
        if isinstance(resolved, Atom) and resolved.space in splits:
            self.selected.add(splits[resolved.space])
            raise LayoutConflict("picks along the outer factor of a reshape (a selector; the next walk stacks it)")

    def cut(self, layout: Layout | None, sizes: list[int]):
        return self.table.cut(layout, sizes)

    def barrier(self, node: onnx.NodeProto, reason: str) -> None:
        self.barriers.append(Barrier(self.node, node.op_type, reason))
        why = f"barrier at {self.node} ({node.op_type}): {reason}"
        for name in node.input:
            for layout in self.layouts_of(name).values():
                self.table.fix(layout, why)
        for layout in self.touched:
            self.table.fix(layout, why)


class _RuleContext:
    """Adapter giving rules the ``Context`` names (``layouts`` is a method there)."""

    def __init__(self, walk: _Walk):
        self._walk = walk

    def __getattr__(self, name: str):
        return getattr(self._walk, name)

    def layouts(self, name: str) -> dict[int, Layout]:
        return self._walk.layouts_of(name)


def find_spaces(model: onnx.ModelProto) -> SpaceGraph:
    """Find every feature space of a canonical, shape-inferred model.

    Args:
        model: a model from ``canonicalize`` (topologically sorted, each initializer used by
            one node input, shapes inferred). It is not modified.

    Returns:
        The spaces, barriers and parameter uses. Graph outputs are fixed spaces; those fixed
        for no other reason are listed in ``SpaceGraph.outputs``.
    """
    selectors: frozenset[SplitKey] = frozenset()
    while True:  # each walk that meets new selectors is redone knowing them
        walk = _walk(model, selectors)
        if walk.selected <= selectors:
            return _assemble(walk, {_output_reason(output.name) for output in model.graph.output})
        selectors |= walk.selected


def _walk(model: onnx.ModelProto, selectors: frozenset[SplitKey]) -> _Walk:
    walk = _Walk(model, selectors)
    ctx = _RuleContext(walk)
    for index, node in enumerate(model.graph.node):
        walk.node, walk.touched, walk.splits = node_label(node, index), [], 0
        op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        rule = RULES.get(op)
        if rule is None:
            if any(walk.layouts_of(name) for name in node.input):
                walk.barrier(node, f"no rule for op {op}")
            for name in node.output:
                walk.layouts[name] = {}
            continue
        try:
            rule.handler(node, ctx)
        except LayoutConflict as conflict:
            walk.barrier(node, str(conflict))
    for output in model.graph.output:
        for layout in walk.layouts_of(output.name).values():
            walk.table.fix(layout, _output_reason(output.name))
    return walk


def _output_reason(name: str) -> str:
    return f"graph output {name}"


def _assemble(walk: _Walk, output_reasons: set[str]) -> SpaceGraph:
    table = walk.table
    params = [ParamUse(p.name, p.axis, table.resolve(p.layout), p.role, p.node) for p in walk.params]
    layouts = {t: {k: table.resolve(v) for k, v in axes.items()} for t, axes in walk.layouts.items()}
    used = {s for p in params for s in leaves(p.layout)}
    used |= {s for axes in layouts.values() for v in axes.values() for s in leaves(v)}
    spaces = {}
    for index, space_id in enumerate(sorted(used)):
        spaces[space_id] = Space(space_id, f"S{index}", table.widths[space_id],
                                 list(table.fixed.get(space_id, [])))
    for p in params:
        for s in leaves(p.layout):
            (spaces[s].producers if p.role == "producer" else spaces[s].consumers).append(p)
    for tensor, axes in layouts.items():
        for axis, layout in axes.items():
            if isinstance(layout, Atom):
                spaces[layout.space].tensors.append((tensor, axis))
    mixed = {s: reason for layout, reason in walk.mixed for s in leaves(table.resolve(layout))}
    kept = {s: node for layout, node in walk.kept for s in leaves(table.resolve(layout))}
    outputs = frozenset(s.id for s in spaces.values() if s.fixed and set(s.fixed_reasons) <= output_reasons)
    return SpaceGraph(table, list(spaces.values()), walk.barriers, params, layouts, mixed, kept, outputs)
