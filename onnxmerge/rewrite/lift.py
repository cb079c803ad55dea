"""Depth lifting (method.md §5.4): exact identity blocks, and models rewritten into a deeper
model's topology. (Long because identity parameters differ per op family; which op is of
which family is the op table's, graph/facts.py.)

An identity block is built from a block's own structure by choosing its parameters:
- a residual block ``x + f(x)`` gets every weight of ``f`` zeroed; that ``f`` then returns
  exactly 0 is *proved* by propagating zeros through its ops, never assumed;
- a plain block gets identity kernels, zero biases and identity normalisation, which is exact
  when every op then passes its input through (a ReLU only when the input is non-negative).
When neither proof goes through, the block is named in the error.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import UnsupportedGraphError
from ..graph.blocks import Block, BlockStructure, Unit
from ..graph.canonical import export_like
from ..graph.facts import op_facts
from ..graph.ir import import_graph
from ..graph.layout import Atom
from ..graph.rules import attr
from ..graph.spaces import SpaceGraph
from .resize import resize_constants
from .. import weights

Arrays = dict[str, np.ndarray]

def non_negative(model: onnx.ModelProto, tensor: str) -> bool:
    """Whether ``tensor`` is non-negative for every input, from the ops that produce it."""
    producers = {o: n for n in model.graph.node for o in n.output}
    inputs = {i.name for i in model.graph.input}
    seen: set[str] = set()

    def check(name: str) -> bool:
        node = producers.get(name)
        if node is None or name in seen:
            return False
        seen.add(name)
        facts = op_facts(node.op_type)
        if facts.sign == "non-negative":
            return True
        if facts.sign == "bounded":
            low = _constant(model, node.input[1]) if len(node.input) > 1 and node.input[1] else attr(node, "min")
            return low is not None and float(np.min(low)) >= 0
        if facts.sign == "keeps":
            dynamic = [x for x in node.input if x in producers or x in inputs]
            return bool(dynamic) and all(check(x) for x in (dynamic if facts.joins else dynamic[:1]))
        return False

    return check(tensor)


def _set_attr(node: onnx.NodeProto, name: str, value: int) -> None:
    for a in node.attribute:
        if a.name == name:
            a.i = value
            return
    if value != 1:
        node.attribute.append(onnx.helper.make_attribute(name, value))


def _constant(model: onnx.ModelProto, name: str):
    init = next((i for i in model.graph.initializer if i.name == name), None)
    return None if init is None else weights.read(init)


class _Identity:
    """Sets one block's parameters (in ``arrays``) so that it returns its input."""

    def __init__(self, nodes: list[onnx.NodeProto], source: str, output: str, arrays: Arrays,
                 non_negative_input: bool, where: str, input_shape: tuple | None = None):
        self.nodes, self.source, self.output = nodes, source, output
        self.arrays, self.non_negative, self.where = arrays, non_negative_input, where
        self.input_shape = input_shape  # when known, a plain block is resized to keep this width

    def fail(self, node: onnx.NodeProto | None, why: str,
             advice: str = "choose other positions or an alignment with fewer unaligned blocks") -> UnsupportedGraphError:
        at = f" at {node.op_type} {node.name!r}" if node is not None else ""
        return UnsupportedGraphError(f"{self.where}: no exact identity for this block{at}: {why}; {advice}")

    def build(self) -> None:
        residual = next((k for k, n in enumerate(self.nodes) if op_facts(n.op_type).adds and self.source in n.input
                         and any(x != self.source and x not in self.arrays for x in n.input)), None)
        if residual is None:
            equal = self._pass_through(self.nodes, {self.source})
        else:
            add = self.nodes[residual]
            zeros = self._zero_branch(self.nodes[:residual])
            branch = next(x for x in add.input if x != self.source)
            if branch not in zeros:
                raise self.fail(add, "its residual branch cannot be proved zero")
            equal = self._pass_through(self.nodes[residual + 1:], {self.source, add.output[0]})
        if self.output not in equal:
            raise self.fail(None, "its output does not reduce to its input")

    # --- residual blocks: zero the branch and prove it -------------------------------------
    def _zero_branch(self, nodes: list[onnx.NodeProto]) -> set[str]:
        zeros: set[str] = set()
        for node in nodes:
            consts = [x for x in node.input if x in self.arrays]
            dynamic = [x for x in node.input if x and x not in self.arrays]
            facts = op_facts(node.op_type)
            if facts.layout is not None and consts:
                self._set(consts, 0.0)
                zero = True
            elif facts.norm:
                self._set(node.input[1:3], 0.0)  # scale and bias
                if facts.norm == "running":
                    self._set(node.input[3:4], 0.0)
                    self._set(node.input[4:5], 1.0)
                zero = True
            elif facts.zero == "additive":
                zero = all(x in zeros for x in dynamic)
                if zero:
                    self._set(consts, 0.0)
            elif facts.zero == "product":
                zero = any(x in zeros for x in dynamic)
            elif facts.zero == "quotient":
                zero = node.input[0] in zeros and node.input[1] in self.arrays and np.all(self.arrays[node.input[1]] != 0)
            elif facts.zero == "preserves":
                zero = bool(dynamic) and all(x in zeros for x in (dynamic if facts.joins else dynamic[:1]))
            else:
                zero = False
            if zero:
                zeros.update(o for o in node.output if o)
        return zeros

    # --- plain blocks: identity parameters, values pass through ------------------------------
    def _pass_through(self, nodes: list[onnx.NodeProto], equal: set[str]) -> set[str]:
        channels = self._width(1) or 0
        for node in nodes:
            if not node.input or node.input[0] not in equal:
                raise self.fail(node, "an op outside the path from the block's input")
            facts = op_facts(node.op_type)
            if facts.identity == "kernel":
                self._identity_conv(node)
                channels = self.arrays[node.input[1]].shape[0]
            elif facts.identity == "matrix" and node.input[1] in self.arrays:
                self._identity_matrix(node, node.input[1])
                channels = self.arrays[node.input[1]].shape[0]
                self._resize(node.input[2:3], channels)
                self._set(node.input[2:3], 0.0)
            elif facts.adds and len(node.input) == 2 and node.input[1] in self.arrays:
                self._resize(node.input[1:], channels)
                self._set(node.input[1:], 0.0)
            elif facts.norm == "running":
                epsilon = attr(node, "epsilon", 1e-5)
                self._resize(node.input[1:5], channels)
                self._set(node.input[1:2], math.sqrt(1.0 + epsilon))
                self._set(node.input[2:4], 0.0)
                self._set(node.input[4:5], 1.0)
            elif facts.identity in ("rectifier", "bounded") and not self.non_negative:
                raise self.fail(node, "its input may be negative")
            elif facts.norm == "sample":  # in every layer of a post-norm model: no alignment avoids it
                raise self.fail(node, f"{node.op_type} has no identity setting: it normalises each sample on the "
                                      "block's main path (a post-norm layer, as BERT's, after its residual join)",
                                "such blocks cannot be inserted to lift a model to another depth: merge models of "
                                "equal depth, or pre-norm ones (normalisation inside the residual branch)")
            elif facts.identity not in ("rectifier", "bounded", "pass"):
                raise self.fail(node, f"{node.op_type} has no identity setting")
            if facts.identity == "bounded" and not self._clip_keeps(node):
                raise self.fail(node, "the clip range cuts non-negative values")
            equal.add(node.output[0])
        return equal

    def _clip_keeps(self, node: onnx.NodeProto) -> bool:
        high = self.arrays.get(node.input[2]) if len(node.input) > 2 and node.input[2] else attr(node, "max")
        return high is None or float(np.max(high)) == float("inf")

    def _width(self, axis: int) -> int | None:
        shape = self.input_shape
        return shape[axis] if shape and isinstance(shape[axis], int) else None

    def _identity_conv(self, node: onnx.NodeProto) -> None:
        weight = self.arrays[node.input[1]]
        kernel = weight.shape[2:]
        group = attr(node, "group", 1)
        depthwise = group > 1 and weight.shape[1] == 1
        channels = self._width(1) or weight.shape[0]
        if depthwise or group == 1:  # resize to the input's width, keeping the kind of conv
            weight = np.zeros((channels, 1 if depthwise else channels, *kernel), weight.dtype)
            group = channels if depthwise else 1
            _set_attr(node, "group", group)
        centred = all(k % 2 == 1 for k in kernel) and all(s == 1 for s in attr(node, "strides", [1] * len(kernel)))
        pads = attr(node, "pads", [0] * 2 * len(kernel))
        same = attr(node, "auto_pad", b"NOTSET") in (b"SAME_UPPER", b"SAME_LOWER") or \
            list(pads) == [k // 2 for k in kernel] * 2
        if not (centred and same and weight.shape[1] * group == weight.shape[0]):
            raise self.fail(node, f"the kernel {weight.shape} with group {group} cannot map channels to themselves")
        identity = np.zeros_like(weight)
        centre = tuple(k // 2 for k in kernel)
        for c in range(weight.shape[0]):
            identity[(c, 0 if depthwise else c) + centre] = 1
        self.arrays[node.input[1]] = identity
        self._resize(node.input[2:3], weight.shape[0])
        self._set(node.input[2:3], 0.0)

    def _identity_matrix(self, node: onnx.NodeProto, name: str) -> None:
        weight = self.arrays[name]
        size = self._width(-1) or weight.shape[0]
        if weight.ndim != 2 or (self.input_shape is None and weight.shape[0] != weight.shape[1]):
            raise self.fail(node, f"the weight {weight.shape} is not square")
        self.arrays[name] = np.eye(size, dtype=weight.dtype)

    def _resize(self, names, width: int) -> None:
        """Per-channel constants (biases, norm parameters) to ``width`` channels."""
        for name in names:
            if name in self.arrays and self.input_shape is not None:
                array = self.arrays[name]
                shape = [width if d != 1 else 1 for d in array.shape] if array.ndim > 1 else [width]
                self.arrays[name] = np.zeros(shape, array.dtype)

    def _set(self, names, value: float) -> None:
        for name in names:
            if name in self.arrays:
                self.arrays[name] = np.full_like(self.arrays[name], value)


def make_identity(model: onnx.ModelProto, nodes: list[onnx.NodeProto], block: Block, arrays: Arrays,
                  where: str, input_shape: tuple | None = None) -> None:
    """Set ``arrays`` (the block's initializers by name) so that the block returns its input;
    given the input's shape, a plain block is resized to keep that width."""
    _Identity(nodes, block.input, block.output, arrays, non_negative(model, block.input), where, input_shape).build()


def _shape(model: onnx.ModelProto, name: str) -> tuple | None:
    for value in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        if value.name == name and value.type.tensor_type.HasField("shape"):
            return tuple(d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim)
    return None


def _arrays(model: onnx.ModelProto) -> Arrays:
    return {i.name: weights.read(i) for i in model.graph.initializer}


def _store(model: onnx.ModelProto, arrays: Arrays) -> None:
    for init in model.graph.initializer:
        if init.name in arrays:
            init.CopyFrom(numpy_helper.from_array(arrays[init.name].astype(weights.read(init).dtype,
                                                                             copy=False), init.name))


def unit_identity(model: onnx.ModelProto, unit: Unit, arrays: Arrays, where: str,
                  input_shape: tuple | None = None) -> None:
    """Identity parameters for every block of ``unit`` (in ``arrays``); an identity keeps the
    shape, so every block sees ``input_shape``."""
    for k, block in enumerate(unit.blocks):
        nodes = [model.graph.node[i] for i in block.nodes]
        make_identity(model, nodes, block, arrays, f"{where} block {k}", input_shape)


def lift(shallow: onnx.ModelProto, shallow_blocks: BlockStructure, deep: onnx.ModelProto,
         deep_blocks: BlockStructure, deep_graph: SpaceGraph, mapping: list[int | None],
         name: str) -> onnx.ModelProto:
    """``shallow`` rewritten into ``deep``'s topology: deep unit l carries shallow unit
    ``mapping[l]``'s parameters, or identity parameters where ``mapping[l]`` is None.

    Widths stay the shallow model's wherever its parameters decide them; the inner spaces of
    identity units keep the deep model's widths (their weights are zero or identity anyway)."""
    lifted = onnx.ModelProto()
    lifted.CopyFrom(deep)
    del lifted.graph.value_info[:]
    mine, theirs = _arrays(lifted), _arrays(shallow)
    _check_covered(deep, deep_blocks, name)
    widths: dict[int, int] = {}
    uses = {}
    for use in deep_graph.params:
        uses.setdefault(use.name, []).append(use)
    for l, k in enumerate(mapping):
        if k is None:
            continue
        for a, b in zip(deep_blocks.units[l].nodes, shallow_blocks.units[k].nodes):
            for x, y in zip(deep.graph.node[a].input, shallow.graph.node[b].input):
                if x in mine:
                    mine[x] = theirs[y]
                    for use in uses.get(x, []):
                        if isinstance(use.layout, Atom):
                            widths[use.layout.space] = theirs[y].shape[use.axis]
    for l, k in enumerate(mapping):
        if k is None:
            unit = deep_blocks.units[l]
            for index in unit.nodes:
                for x in deep.graph.node[index].input:
                    if x in uses:  # parameters take the lifted widths; other constants stay
                        mine[x] = np.zeros(_lifted_shape(mine[x], uses[x], widths), mine[x].dtype)
            unit_identity(lifted, unit, mine, f"{name}: identity at unit {l} of {len(mapping)}")
    _store(lifted, mine)
    graph = import_graph(lifted)
    resize_constants(graph, deep_graph, lambda s: widths.get(s, deep_graph.table.widths[s]))
    lifted = export_like(graph, lifted)
    _rename_io(lifted, shallow)
    return lifted


def _lifted_shape(array: np.ndarray, uses: list, widths: dict[int, int]) -> tuple[int, ...]:
    shape = list(array.shape)
    for use in uses:
        if isinstance(use.layout, Atom) and use.layout.space in widths:
            shape[use.axis] = widths[use.layout.space]
    return tuple(shape)


def _check_covered(model: onnx.ModelProto, blocks: BlockStructure, name: str) -> None:
    covered = {i for u in blocks.units for i in u.nodes}
    consts = {i.name for i in model.graph.initializer}
    for index, node in enumerate(model.graph.node):
        if index not in covered and any(x in consts for x in node.input):
            raise UnsupportedGraphError(f"{name}: node {node.name or node.op_type} ({node.op_type}) has parameters "
                                        "but lies in no block; depth alignment needs every layer inside a block")


def _rename_io(model: onnx.ModelProto, like: onnx.ModelProto) -> None:
    """Give ``model`` the graph input and output names of ``like``."""
    names = {a.name: b.name for a, b in zip(model.graph.input, like.graph.input)}
    names.update({a.name: b.name for a, b in zip(model.graph.output, like.graph.output)})
    names = {a: b for a, b in names.items() if a != b}
    if not names:
        return
    for node in model.graph.node:
        node.input[:] = [names.get(x, x) for x in node.input]
        node.output[:] = [names.get(x, x) for x in node.output]
    for value in list(model.graph.input) + list(model.graph.output):
        value.name = names.get(value.name, value.name)


def insert_identities(model: onnx.ModelProto, blocks: BlockStructure, positions: list[tuple[int, int]],
                      name: str) -> onnx.ModelProto:
    """A copy of ``model`` with an identity unit after each (stage, unit-in-stage) position: a copy of
    the stage's body unit with identity parameters, wired in after that unit."""
    nodes = [_copy(node) for node in model.graph.node]  # rewired below; the input stays as it is
    arrays = _arrays(model)
    ranges = blocks.stage_ranges()
    outputs = {o.name for o in model.graph.output}
    tails: dict[str, str] = {}  # a unit's output -> the output of the identities inserted after it
    for stage, after in sorted(positions):
        start, stop = ranges[stage]
        if stop - start < 2:
            raise UnsupportedGraphError(f"{name}: stage {stage} has no repeated block to copy as an identity")
        anchor = blocks.units[start + after].output
        tail = tails.get(anchor, anchor)
        if tail in outputs:
            raise UnsupportedGraphError(f"{name}: stage {stage} ends at a graph output; cannot deepen there")
        probe = _model_with(model, nodes, arrays)
        copies, unit, new_arrays = _copy_unit(model, blocks.units[start + 1], tail, arrays,
                                              _fresh_tag(nodes, arrays), offset=len(nodes))
        probe.graph.node.extend(copies)
        unit_identity(probe, unit, new_arrays, f"{name}: stage {stage}", _shape(model, anchor))
        arrays.update(new_arrays)
        at = next((i for i, n in enumerate(nodes) if tail in n.input), len(nodes))
        for node in nodes[at:]:
            node.input[:] = [unit.output if x == tail else x for x in node.input]
        nodes[at:at] = copies
        tails[anchor] = unit.output
    return _model_with(model, nodes, arrays)


def _fresh_tag(nodes: list[onnx.NodeProto], arrays: Arrays) -> str:
    """A suffix no tensor name carries yet (a deepened model can be deepened again)."""
    names = set(arrays) | {x for n in nodes for x in n.output}
    count = 0
    while any(name.endswith(f"_deepen{count}") for name in names):
        count += 1
    return f"deepen{count}"


def _copy(node: onnx.NodeProto) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    return copy


def _model_with(model: onnx.ModelProto, nodes: list[onnx.NodeProto], arrays: Arrays) -> onnx.ModelProto:
    """``model`` with other nodes and initializers (value_info dropped: shapes are re-inferred)."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    del result.graph.value_info[:]
    del result.graph.node[:]
    result.graph.node.extend(nodes)
    del result.graph.initializer[:]
    result.graph.initializer.extend(numpy_helper.from_array(a, n) for n, a in arrays.items())
    return result


def _copy_unit(model: onnx.ModelProto, unit: Unit, source: str, arrays: Arrays, tag: str,
               offset: int) -> tuple[list[onnx.NodeProto], Unit, Arrays]:
    """Copies of ``unit``'s nodes reading ``source``, with fresh tensor and initializer names, and
    the copy's unit as if its nodes were appended at index ``offset``."""
    rename: dict[str, str] = {unit.input: source}
    new_arrays: Arrays = {}
    copies = []
    for index in unit.nodes:
        node = _copy(model.graph.node[index])
        node.name = f"{node.name or node.op_type}_{tag}"
        for k, x in enumerate(node.input):
            if x in arrays:
                new_arrays[f"{x}_{tag}"] = arrays[x].copy()
                node.input[k] = f"{x}_{tag}"
            else:
                node.input[k] = rename.get(x, x)
        for k, x in enumerate(node.output):
            if x:
                rename[x] = node.output[k] = f"{x}_{tag}"
        copies.append(node)
    position = {index: offset + k for k, index in enumerate(unit.nodes)}
    blocks = tuple(Block(tuple(position[i] for i in b.nodes), rename[b.input], rename[b.output], b.signature)
                   for b in unit.blocks)
    return copies, Unit(blocks), new_arrays
