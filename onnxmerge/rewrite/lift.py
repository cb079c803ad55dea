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
import onnx_graphsurgeon as gs

from ..errors import UnsupportedGraphError
from ..graph.blocks import Block, BlockStructure, Unit
from ..graph.canonical import export_like
from ..graph.facts import op_facts
from ..graph.ir import import_graph
from ..graph.layout import Atom
from ..graph.surgery import constant, drop_shapes, producer, replace_input
from ..graph.spaces import SpaceGraph
from .resize import resize_constants

Arrays = dict[str, np.ndarray]

def non_negative(tensor: gs.Tensor) -> bool:
    """Whether ``tensor`` is non-negative for every input, from the ops that produce it."""
    seen: set[str] = set()

    def check(tensor: gs.Tensor) -> bool:
        node = producer(tensor)
        if node is None or tensor.name in seen:
            return False
        seen.add(tensor.name)
        facts = op_facts(node.op)
        if facts.sign == "non-negative":
            return True
        if facts.sign == "bounded":
            low = constant(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1].name else node.attrs.get("min")
            return low is not None and float(np.min(low)) >= 0
        if facts.sign == "keeps":
            dynamic = [x for x in node.inputs if isinstance(x, gs.Variable) and x.name]
            return bool(dynamic) and all(check(x) for x in (dynamic if facts.joins else dynamic[:1]))
        return False

    return check(tensor)


def _names(tensors: list[gs.Tensor]) -> list[str]:
    return [t.name for t in tensors]


class _Identity:
    """Sets one block's parameters (in ``arrays``) so that it returns its input."""

    def __init__(self, nodes: list[gs.Node], source: str, output: str, arrays: Arrays,
                 non_negative_input: bool, where: str, input_shape: tuple | None = None):
        self.nodes, self.source, self.output = nodes, source, output
        self.arrays, self.non_negative, self.where = arrays, non_negative_input, where
        self.input_shape = input_shape  # when known, a plain block is resized to keep this width

    def fail(self, node: gs.Node | None, why: str,
             advice: str = "choose other positions or an alignment with fewer unaligned blocks") -> UnsupportedGraphError:
        at = f" at {node.op} {node.name!r}" if node is not None else ""
        return UnsupportedGraphError(f"{self.where}: no exact identity for this block{at}: {why}; {advice}")

    def build(self) -> None:
        residual = next((k for k, n in enumerate(self.nodes) if op_facts(n.op).adds and self.source in _names(n.inputs)
                         and any(x != self.source and x not in self.arrays for x in _names(n.inputs))), None)
        if residual is None:
            equal = self._pass_through(self.nodes, {self.source})
        else:
            add = self.nodes[residual]
            zeros = self._zero_branch(self.nodes[:residual])
            branch = next(x for x in _names(add.inputs) if x != self.source)
            if branch not in zeros:
                raise self.fail(add, "its residual branch cannot be proved zero")
            equal = self._pass_through(self.nodes[residual + 1:], {self.source, add.outputs[0].name})
        if self.output not in equal:
            raise self.fail(None, "its output does not reduce to its input")

    # --- residual blocks: zero the branch and prove it -------------------------------------
    def _zero_branch(self, nodes: list[gs.Node]) -> set[str]:
        zeros: set[str] = set()
        for node in nodes:
            inputs = _names(node.inputs)
            consts = [x for x in inputs if x in self.arrays]
            dynamic = [x for x in inputs if x and x not in self.arrays]
            facts = op_facts(node.op)
            if facts.layout is not None and consts:
                self._set(consts, 0.0)
                zero = True
            elif facts.norm:
                self._set(inputs[1:3], 0.0)  # scale and bias
                if facts.norm == "running":
                    self._set(inputs[3:4], 0.0)
                    self._set(inputs[4:5], 1.0)
                zero = True
            elif facts.zero == "additive":
                zero = all(x in zeros for x in dynamic)
                if zero:
                    self._set(consts, 0.0)
            elif facts.zero == "product":
                zero = any(x in zeros for x in dynamic)
            elif facts.zero == "quotient":
                zero = inputs[0] in zeros and inputs[1] in self.arrays and np.all(self.arrays[inputs[1]] != 0)
            elif facts.zero == "preserves":
                zero = bool(dynamic) and all(x in zeros for x in (dynamic if facts.joins else dynamic[:1]))
            else:
                zero = False
            if zero:
                zeros.update(o for o in _names(node.outputs) if o)
        return zeros

    # --- plain blocks: identity parameters, values pass through ------------------------------
    def _pass_through(self, nodes: list[gs.Node], equal: set[str]) -> set[str]:
        channels = self._width(1) or 0
        for node in nodes:
            inputs = _names(node.inputs)
            if not inputs or inputs[0] not in equal:
                raise self.fail(node, "an op outside the path from the block's input")
            facts = op_facts(node.op)
            if facts.identity == "kernel":
                self._identity_conv(node)
                channels = self.arrays[inputs[1]].shape[0]
            elif facts.identity == "matrix" and inputs[1] in self.arrays:
                self._identity_matrix(node, inputs[1])
                channels = self.arrays[inputs[1]].shape[0]
                self._resize(inputs[2:3], channels)
                self._set(inputs[2:3], 0.0)
            elif facts.adds and len(inputs) == 2 and inputs[1] in self.arrays:
                self._resize(inputs[1:], channels)
                self._set(inputs[1:], 0.0)
            elif facts.norm == "running":
                epsilon = node.attrs.get("epsilon", 1e-5)
                self._resize(inputs[1:5], channels)
                self._set(inputs[1:2], math.sqrt(1.0 + epsilon))
                self._set(inputs[2:4], 0.0)
                self._set(inputs[4:5], 1.0)
            elif facts.identity in ("rectifier", "bounded") and not self.non_negative:
                raise self.fail(node, "its input may be negative")
            elif facts.norm == "sample":  # in every layer of a post-norm model: no alignment avoids it
                raise self.fail(node, f"{node.op} has no identity setting: it normalises each sample on the "
                                      "block's main path (a post-norm layer, as BERT's, after its residual join)",
                                "such blocks cannot be inserted to lift a model to another depth: merge models of "
                                "equal depth, or pre-norm ones (normalisation inside the residual branch)")
            elif facts.identity not in ("rectifier", "bounded", "pass"):
                raise self.fail(node, f"{node.op} has no identity setting")
            if facts.identity == "bounded" and not self._clip_keeps(node):
                raise self.fail(node, "the clip range cuts non-negative values")
            equal.add(node.outputs[0].name)
        return equal

    def _clip_keeps(self, node: gs.Node) -> bool:
        inputs = _names(node.inputs)
        high = self.arrays.get(inputs[2]) if len(inputs) > 2 and inputs[2] else node.attrs.get("max")
        return high is None or float(np.max(high)) == float("inf")

    def _width(self, axis: int) -> int | None:
        shape = self.input_shape
        return shape[axis] if shape and isinstance(shape[axis], int) else None

    def _identity_conv(self, node: gs.Node) -> None:
        inputs = _names(node.inputs)
        weight = self.arrays[inputs[1]]
        kernel = weight.shape[2:]
        group = node.attrs.get("group", 1)
        depthwise = group > 1 and weight.shape[1] == 1
        channels = self._width(1) or weight.shape[0]
        if depthwise or group == 1:  # resize to the input's width, keeping the kind of conv
            weight = np.zeros((channels, 1 if depthwise else channels, *kernel), weight.dtype)
            group = channels if depthwise else 1
            if group != 1 or "group" in node.attrs:
                node.attrs["group"] = group
        centred = all(k % 2 == 1 for k in kernel) and all(s == 1 for s in node.attrs.get("strides", [1] * len(kernel)))
        pads = node.attrs.get("pads", [0] * 2 * len(kernel))
        same = node.attrs.get("auto_pad", "NOTSET") in ("SAME_UPPER", "SAME_LOWER") or \
            list(pads) == [k // 2 for k in kernel] * 2
        if not (centred and same and weight.shape[1] * group == weight.shape[0]):
            raise self.fail(node, f"the kernel {weight.shape} with group {group} cannot map channels to themselves")
        identity = np.zeros_like(weight)
        centre = tuple(k // 2 for k in kernel)
        for c in range(weight.shape[0]):
            identity[(c, 0 if depthwise else c) + centre] = 1
        self.arrays[inputs[1]] = identity
        self._resize(inputs[2:3], weight.shape[0])
        self._set(inputs[2:3], 0.0)

    def _identity_matrix(self, node: gs.Node, name: str) -> None:
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


def make_identity(graph: gs.Graph, nodes: list[gs.Node], block: Block, arrays: Arrays,
                  where: str, input_shape: tuple | None = None) -> None:
    """Set ``arrays`` (the block's initializers by name) so that the block returns its input;
    given the input's shape, a plain block is resized to keep that width."""
    positive = non_negative(graph.tensors()[block.input])
    _Identity(nodes, block.input, block.output, arrays, positive, where, input_shape).build()


def _arrays(graph: gs.Graph) -> Arrays:
    return {t.name: t.values for t in graph.tensors().values() if isinstance(t, gs.Constant)}


def unit_identity(graph: gs.Graph, unit: Unit, arrays: Arrays, where: str,
                  input_shape: tuple | None = None) -> None:
    """Identity parameters for every block of ``unit`` (in ``arrays``); an identity keeps the
    shape, so every block sees ``input_shape``."""
    for k, block in enumerate(unit.blocks):
        nodes = [graph.nodes[i] for i in block.nodes]
        make_identity(graph, nodes, block, arrays, f"{where} block {k}", input_shape)


def lift(shallow: onnx.ModelProto, shallow_blocks: BlockStructure, deep: onnx.ModelProto,
         deep_blocks: BlockStructure, deep_graph: SpaceGraph, mapping: list[int | None],
         name: str) -> onnx.ModelProto:
    """``shallow`` rewritten into ``deep``'s topology: deep unit l carries shallow unit
    ``mapping[l]``'s parameters, or identity parameters where ``mapping[l]`` is None.

    Widths stay the shallow model's wherever its parameters decide them; the inner spaces of
    identity units keep the deep model's widths (their weights are zero or identity anyway)."""
    lifted = import_graph(deep)
    mine, theirs = _arrays(lifted), _arrays(import_graph(shallow))
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
    resize_constants(lifted, deep_graph, lambda s: widths.get(s, deep_graph.table.widths[s]))
    _rename_io(lifted, shallow)
    return export_like(lifted, deep)


def _store(graph: gs.Graph, arrays: Arrays) -> None:
    """The constants of ``graph`` take the values of ``arrays``, each in its own type (shallow
    parameters may be of another); value_info is dropped: shapes are re-inferred."""
    for tensor in graph.tensors().values():
        if tensor.name in arrays:
            tensor.values = arrays[tensor.name].astype(tensor.dtype, copy=False)
    drop_shapes(graph)


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


def _rename_io(graph: gs.Graph, like: onnx.ModelProto) -> None:
    """Give ``graph`` the graph input and output names of ``like``."""
    for tensor, info in zip(graph.inputs, like.graph.input):
        tensor.name = info.name
    for tensor, info in zip(graph.outputs, like.graph.output):
        tensor.name = info.name


def insert_identities(model: onnx.ModelProto, blocks: BlockStructure, positions: list[tuple[int, int]],
                      name: str) -> onnx.ModelProto:
    """A copy of ``model`` with an identity unit after each (stage, unit-in-stage) position: a copy of
    the stage's body unit with identity parameters, wired in after that unit."""
    graph = import_graph(model)
    original = [(node, list(node.inputs)) for node in graph.nodes]  # what the units' indices name, unrewired
    arrays = _arrays(graph)
    ranges = blocks.stage_ranges()
    outputs = {o.name for o in model.graph.output}
    tails: dict[str, gs.Tensor] = {}  # a unit's output -> the output of the identities inserted after it
    for stage, after in sorted(positions):
        start, stop = ranges[stage]
        if stop - start < 2:
            raise UnsupportedGraphError(f"{name}: stage {stage} has no repeated block to copy as an identity")
        anchor = blocks.units[start + after].output
        tail = tails[anchor] if anchor in tails else graph.tensors()[anchor]
        if tail.name in outputs:
            raise UnsupportedGraphError(f"{name}: stage {stage} ends at a graph output; cannot deepen there")
        copies, unit, result = _copy_unit(original, blocks.units[start + 1], tail, arrays, _fresh_tag(graph, arrays),
                                          offset=len(graph.nodes))
        graph.nodes.extend(copies)  # at the end while the unit's indices name them
        unit_identity(graph, unit, arrays, f"{name}: stage {stage}", graph.tensors()[anchor].shape)
        del graph.nodes[-len(copies):]
        at = next((i for i, n in enumerate(graph.nodes) if any(t is tail for t in n.inputs)), len(graph.nodes))
        for node in graph.nodes[at:]:
            replace_input(node, tail, result)
        graph.nodes[at:at] = copies
        tails[anchor] = result
    _store(graph, arrays)
    return export_like(graph, model)


def _fresh_tag(graph: gs.Graph, arrays: Arrays) -> str:
    """A suffix no tensor name carries yet (a deepened model can be deepened again)."""
    names = set(arrays) | {t.name for n in graph.nodes for t in n.outputs}
    count = 0
    while any(name.endswith(f"_deepen{count}") for name in names):
        count += 1
    return f"deepen{count}"


def _copy_unit(nodes: list[tuple[gs.Node, list[gs.Tensor]]], unit: Unit, source: gs.Tensor, arrays: Arrays, tag: str,
               offset: int) -> tuple[list[gs.Node], Unit, gs.Tensor]:
    """Copies of ``unit``'s ``nodes`` (each with the inputs it had in the model) reading ``source``, with fresh tensor and initializer names
    (the initializers' values added to ``arrays``), the copy's unit as if its nodes were
    appended at index ``offset``, and its output."""
    rename: dict[str, gs.Tensor] = {unit.input: source}
    copies = []
    for index in unit.nodes:
        node, reads = nodes[index]
        inputs = []
        for tensor in reads:
            if tensor.name in arrays:
                copy = gs.Constant(f"{tensor.name}_{tag}", arrays[tensor.name].copy())
                arrays[copy.name] = copy.values
                inputs.append(copy)
            else:
                inputs.append(rename.get(tensor.name, tensor))
        outputs = []
        for tensor in node.outputs:
            if tensor.name:
                rename[tensor.name] = gs.Variable(f"{tensor.name}_{tag}")
            outputs.append(rename.get(tensor.name) if tensor.name else gs.Variable.empty())
        copies.append(gs.Node(node.op, name=f"{node.name or node.op}_{tag}", attrs=dict(node.attrs),
                              inputs=inputs, outputs=outputs, domain=node.domain))
    position = {index: offset + k for k, index in enumerate(unit.nodes)}
    blocks = tuple(Block(tuple(position[i] for i in b.nodes), rename[b.input].name, rename[b.output].name, b.signature)
                   for b in unit.blocks)
    return copies, Unit(blocks), rename[unit.output]
