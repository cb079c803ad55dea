"""Blocks and stages of a canonical graph (method.md §5.1).

A *cut* is a tensor every input-to-output path passes through (a dominator of the outputs).
Consecutive cuts bound *segments*; a segment with a weight layer is a *block*, and parameter-free
segments join a neighbour (activations the block before, pooling and reshapes the block after,
so a downsampling step opens the next stage). A *unit* is the repeating element of a stage:
usually one block, two for a transformer layer (attention block, MLP block). A *stage* is an
opening unit followed by a run of units of one signature; stages are what layer alignment maps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx

from ..errors import UnsupportedGraphError
from .facts import op_facts

_MAX_PERIOD = 3


@dataclass(frozen=True)
class Block:
    """Nodes (indices into the graph's node list, in order) between the cut ``input`` and ``output``."""

    nodes: tuple[int, ...]
    input: str
    output: str
    signature: tuple


@dataclass(frozen=True)
class Unit:
    """One alignable position: consecutive blocks repeated together."""

    blocks: tuple[Block, ...]

    @property
    def input(self) -> str:
        return self.blocks[0].input

    @property
    def output(self) -> str:
        return self.blocks[-1].output

    @property
    def nodes(self) -> tuple[int, ...]:
        return tuple(n for b in self.blocks for n in b.nodes)

    @property
    def signature(self) -> tuple:
        return tuple(b.signature for b in self.blocks)


@dataclass(frozen=True)
class Stage:
    """An opening unit and the run of same-signature units after it."""

    units: tuple[Unit, ...]

    @property
    def body_signature(self) -> tuple | None:
        return self.units[1].signature if len(self.units) > 1 else None


@dataclass
class BlockStructure:
    cuts: list[str]
    blocks: list[Block]
    stages: list[Stage]
    units: list[Unit] = field(init=False)

    def __post_init__(self) -> None:
        self.units = [u for s in self.stages for u in s.units]

    def stage_ranges(self) -> list[tuple[int, int]]:
        """Each stage as a [start, stop) range of unit indices."""
        ranges, start = [], 0
        for stage in self.stages:
            ranges.append((start, start + len(stage.units)))
            start += len(stage.units)
        return ranges


def find_blocks(model: onnx.ModelProto) -> BlockStructure:
    """Cuts, blocks, units and stages of a canonical, topologically sorted model."""
    graph = model.graph
    ranks = {i.name: len(i.dims) for i in graph.initializer}  # the constants, with their ranks
    dynamic = _dynamic_tensors(graph, set(ranks))
    cuts = _cuts(graph, dynamic)
    segments = _segments(graph, dynamic, cuts)
    blocks = [Block(tuple(nodes), start, end, _signature(graph, nodes, start, ranks))
              for nodes, start, end in _group(graph, segments, set(ranks))]
    return BlockStructure(cuts, blocks, _stages(blocks))


def _dynamic_tensors(graph: onnx.GraphProto, constants: set[str]) -> set[str]:
    """Tensors that depend on a graph input."""
    dynamic = {i.name for i in graph.input if i.name not in constants}
    for node in graph.node:
        if any(x in dynamic for x in node.input):
            dynamic.update(o for o in node.output if o)
    return dynamic


def _cuts(graph: onnx.GraphProto, dynamic: set[str]) -> list[str]:
    """The dominators of the outputs, from the inputs on: immediate dominators over tensors,
    computed in topological order as the nearest common dominator of a tensor's sources."""
    source, sink = "", None
    idom: dict[str, str] = {}
    depth = {source: 0}

    def common(a: str, b: str) -> str:
        while a != b:
            if depth[a] < depth[b]:
                a, b = b, a
            a = idom[a]
        return a

    def settle(tensor, preds: list[str]) -> None:
        dom = preds[0]
        for p in preds[1:]:
            dom = common(dom, p)
        idom[tensor], depth[tensor] = dom, depth[dom] + 1

    for inp in graph.input:
        if inp.name in dynamic:
            settle(inp.name, [source])
    for node in graph.node:
        preds = [x for x in node.input if x in dynamic and x in idom]
        for out in node.output:
            if out and out in dynamic and preds:
                settle(out, preds)
    settle(sink, [o.name for o in graph.output if o.name in idom])
    chain, tensor = [], idom[sink]
    while tensor != source:
        chain.append(tensor)
        tensor = idom[tensor]
    return chain[::-1]


def _segments(graph: onnx.GraphProto, dynamic: set[str], cuts: list[str]) -> list[tuple[list[int], str, str]]:
    """Node indices between consecutive cuts, with the cuts bounding them."""
    position = {c: i for i, c in enumerate(cuts)}
    after: dict[str, int] = dict(position)
    members: list[list[int]] = [[] for _ in cuts]
    for index, node in enumerate(graph.node):
        sources = [after[x] for x in node.input if x in dynamic and x in after]
        if not sources:
            continue
        segment = max(sources)
        members[segment].append(index)
        for out in node.output:
            if out in dynamic:
                after[out] = position.get(out, segment)
    ends = cuts[1:] + [graph.output[0].name]
    return [(nodes, cuts[i], ends[i]) for i, nodes in enumerate(members) if nodes]


def _has_weight(graph: onnx.GraphProto, nodes: list[int], constants: set[str]) -> bool:
    return any(op_facts(graph.node[i].op_type).weight and any(x in constants for x in graph.node[i].input)
               for i in nodes)


def _group(graph, segments, constants) -> list[tuple[list[int], str, str]]:
    """Join each run of parameter-free segments to its neighbours: the leading segments of only
    trailing ops (activations, the norms that follow a conv) to the weighted block before, the
    rest (pooling, reshapes, a final LayerNorm) to the weighted block after."""
    groups: list[list] = []  # [nodes, input cut, output cut]
    run: list[tuple] = []
    for segment in segments:
        if not _has_weight(graph, segment[0], constants):
            run.append(segment)
            continue
        while groups and run and all(op_facts(graph.node[i].op_type).trailing for i in run[0][0]):
            groups[-1][0] += run[0][0]
            groups[-1][2] = run.pop(0)[2]
        start = run[0][1] if run else segment[1]
        groups.append([[i for s in run for i in s[0]] + list(segment[0]), start, segment[2]])
        run = []
    if run and groups:
        groups[-1][0] += [i for s in run for i in s[0]]
        groups[-1][2] = run[-1][2]
    elif run:
        groups.append([[i for s in run for i in s[0]], run[0][1], run[-1][2]])
    return [(sorted(g[0]), g[1], g[2]) for g in groups]


def _signature(graph: onnx.GraphProto, nodes: list[int], start: str, ranks: dict[str, int]) -> tuple:
    """Ops, attributes and wiring of a block, with widths abstracted (parameters by rank only)."""
    local: dict[str, tuple] = {start: ("in",)}
    parts = []
    for position, index in enumerate(nodes):
        node = graph.node[index]
        refs = tuple(local.get(x, ("param", ranks[x]) if x in ranks else ("outer",)) for x in node.input)
        attrs = tuple(sorted((a.name, repr(onnx.helper.get_attribute_value(a))) for a in node.attribute
                             if a.name != "group"))
        parts.append((node.op_type, attrs, refs))
        for k, out in enumerate(node.output):
            local[out] = ("node", position, k)
    return tuple(parts)


def _stages(blocks: list[Block]) -> list[Stage]:
    """Units by the shortest repeating period, then stages: an opening unit and its run."""
    runs: list[list[Unit]] = []
    i = 0
    while i < len(blocks):
        period, reps = _period(blocks, i)
        units = [Unit(tuple(blocks[i + r * period:i + (r + 1) * period])) for r in range(reps)]
        runs.append(units)
        i += period * reps
    stages: list[Stage] = []
    bodies: set[tuple] = set()
    k = 0
    while k < len(runs):
        run = runs[k]
        follows = runs[k + 1] if k + 1 < len(runs) else None
        # a lone unit opens the next run when that run repeats, or is a kind of unit seen repeating
        if len(run) == 1 and follows and (len(follows) > 1 or follows[0].signature in bodies):
            run = run + follows
            k += 1
        stages.append(Stage(tuple(run)))
        if len(run) > 1:
            bodies.add(run[1].signature)
        k += 1
    return stages


def _period(blocks: list[Block], start: int) -> tuple[int, int]:
    """(period, repetitions) covering the most blocks from ``start``; 1 block when nothing repeats."""
    best = (1, 1)
    for period in range(1, _MAX_PERIOD + 1):
        pattern = [b.signature for b in blocks[start:start + period]]
        if len(pattern) < period:
            break
        reps = 1
        while [b.signature for b in blocks[start + reps * period:start + (reps + 1) * period]] == pattern:
            reps += 1
        if reps >= 2 and reps * period > best[0] * best[1]:
            best = (period, reps)
    return best


def regroup_like(reference: BlockStructure, other: BlockStructure) -> BlockStructure | None:
    """``other``'s blocks cut into ``reference``'s stage pattern (each stage: its opening unit,
    then any number of its repeated unit), or None when they do not fit.

    A model with one unit of a kind shows no repetition of its own: a one-layer transformer's
    attention and MLP blocks come out as separate stages, while the deeper model groups them
    into a repeated layer. The deeper model's pattern says how to read the shallower one.
    """
    signatures = [b.signature for b in other.blocks]

    def fit(stage: int, start: int) -> list[Stage] | None:
        if stage == len(reference.stages):
            return [] if start == len(signatures) else None
        opening, body = reference.stages[stage].units[0].signature, reference.stages[stage].body_signature
        if tuple(signatures[start:start + len(opening)]) != opening:
            return None
        units = [Unit(tuple(other.blocks[start:start + len(opening)]))]
        position = start + len(opening)
        candidates = [(list(units), position)]
        while body is not None and tuple(signatures[position:position + len(body)]) == body:
            units.append(Unit(tuple(other.blocks[position:position + len(body)])))
            position += len(body)
            candidates.append((list(units), position))
        for units, position in reversed(candidates):  # longest run first
            rest = fit(stage + 1, position)
            if rest is not None:
                return [Stage(tuple(units))] + rest
        return None

    stages = fit(0, 0)
    return None if stages is None else BlockStructure(other.cuts, other.blocks, stages)


def lines_up(deep: BlockStructure, shallow: BlockStructure) -> bool:
    """Whether ``shallow``'s stages correspond to ``deep``'s (``check_stages`` passes)."""
    try:
        check_stages(deep, shallow, "", "")
    except UnsupportedGraphError:
        return False
    return True


def check_stages(deep: BlockStructure, shallow: BlockStructure, deep_name: str, shallow_name: str) -> None:
    """Raise unless the stages correspond one to one and ``shallow`` is nowhere deeper."""
    def differ(what: str) -> UnsupportedGraphError:
        return UnsupportedGraphError(f"{shallow_name}: {what} (compared with {deep_name}); depth alignment maps "
                                     "stage to stage: see the stages with onnxmerge inspect")

    if len(deep.stages) != len(shallow.stages):
        raise differ(f"{len(shallow.stages)} stages instead of {len(deep.stages)}")
    for index, (a, b) in enumerate(zip(deep.stages, shallow.stages)):
        if a.units[0].signature != b.units[0].signature:
            raise differ(f"stage {index} opens with a different block")
        if b.body_signature is not None and b.body_signature != a.body_signature:
            raise differ(f"stage {index} repeats a different block")
        if len(b.units) > len(a.units):
            raise differ(f"stage {index} has {len(b.units)} blocks, more than {len(a.units)}; "
                         "give the deepest model first or use --align none")
