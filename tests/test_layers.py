"""Source checks: the package layers import downwards only (docs/architecture.md): graph <
calib < match < rewrite < stages; and only the op table names op types."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "onnxmerge"
ORDER = ["graph", "calib", "match", "rewrite", "stages"]
IMPORT = re.compile(r"^\s*from \.\.(\w+)", re.M)


def test_layers_import_downwards_only():
    upward = []
    for rank, layer in enumerate(ORDER):
        for path in (PACKAGE / layer).glob("*.py"):
            for target in IMPORT.findall(path.read_text()):
                if target in ORDER and ORDER.index(target) > rank:
                    upward.append(f"{layer}/{path.name} imports {target}")
    assert upward == []


# The op table: only these modules name op types (channel flow, and every other per-op fact).
TABLE = {"graph/rules.py", "graph/facts.py"}
# Canonical passes that pattern-match exporter idioms by op type, and why each may.
IDIOM_PASSES = {
    "graph/canonical.py": "no-op nodes (Cast, Dropout, Identity), shape arithmetic folded, BatchNormalization "
                          "folded into its conv",
    "graph/layers.py": "MatMul + Add as Gemm, explicit conv biases, affine ops folded, reductions as global pools, "
                       "flattening reshapes, default attributes",
    "graph/transposes.py": "Transpose and Reshape chains composed, moved or dropped",
    "graph/norms.py": "LayerNormalization spelt as ReduceMean, Sub, Pow, Sqrt and Div",
    "graph/quantized.py": "the QDQ and QOperator formats: QuantizeLinear/DequantizeLinear pairs, integer ops",
    "graph/merged_axes.py": "torch MultiheadAttention's Reshape-Transpose-Reshape heads and Gemm on merged rows",
}


def _is_op(node: ast.AST, aliases: set[str]) -> bool:
    """An op type: ``x.op_type``, ``x.op`` (graphsurgeon) or a name bound to one."""
    return (isinstance(node, ast.Attribute) and node.attr in ("op_type", "op")) or \
        (isinstance(node, ast.Name) and node.id in aliases)


def _op_name_constants(tree: ast.Module, known: set[str]) -> dict[str, int]:
    """Module-level names bound to values that spell op types (a set of op names, say), by line."""
    found = {}
    for statement in tree.body:
        if isinstance(statement, ast.Assign | ast.AnnAssign) and statement.value is not None and any(
                isinstance(c, ast.Constant) and isinstance(c.value, str) and set(c.value.split()) & known
                for c in ast.walk(statement.value)):
            targets = statement.targets if isinstance(statement, ast.Assign) else [statement.target]
            found.update({t.id: statement.lineno for target in targets for t in ast.walk(target)
                          if isinstance(t, ast.Name)})
    return found


def op_name_tests(tree: ast.Module, known: set[str], shared: set[str]) -> list[int]:
    """Lines that test an op type by name: an op type compared with anything but another op
    type or matched by prefix, a module constant of op names defined, or one imported."""
    aliases = {t.id for n in ast.walk(tree) if isinstance(n, ast.Assign) and _is_op(n.value, set())
               for t in n.targets if isinstance(t, ast.Name)}
    lines = list(_op_name_constants(tree, known).values())
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if any(_is_op(o, aliases) for o in operands) and not all(_is_op(o, aliases) for o in operands):
                lines.append(node.lineno)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                node.func.attr in ("startswith", "endswith") and _is_op(node.func.value, aliases):
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and any(a.name in shared for a in node.names):
            lines.append(node.lineno)
    return sorted(set(lines))


def op_name_tests_outside_table(package: Path) -> list[str]:
    """``path:line`` of every op-name test outside the op table and the idiom passes."""
    from onnxmerge.graph.facts import FACTS
    from onnxmerge.graph.rules import RULES

    known = set(RULES) | set(FACTS)
    trees = {p.relative_to(package).as_posix(): ast.parse(p.read_text()) for p in package.rglob("*.py")}
    shared = {name for tree in trees.values() for name in _op_name_constants(tree, known)}
    return [f"{path}:{line}" for path, tree in sorted(trees.items()) if path not in TABLE | set(IDIOM_PASSES)
            for line in op_name_tests(tree, known, shared)]


def test_only_the_op_table_names_ops():
    """lift, blocks, merge, repair, correspondence and the methods ask the op table (rules.py,
    facts.py) what an op does, never test its name: a new op is then one table entry."""
    assert op_name_tests_outside_table(PACKAGE) == []


def test_op_name_scan_finds_each_form():
    source = '''
from .blocks import WEIGHTS
SIGNS = {"Relu", "Abs"}
def f(node, other):
    op = node.op_type
    a = node.op == "Conv"
    b = op in ("Add", "Sub")
    c = node.op_type.startswith("QLinear")
    d = node.op_type != other.op_type
'''
    lines = op_name_tests(ast.parse(source), {"Relu", "Abs", "Conv", "Add", "Sub"}, {"WEIGHTS"})
    assert lines == [2, 3, 6, 7, 8]


# Where initializer values and graphsurgeon graphs cross the ModelProto boundary: weights that
# stay in their files (onnxmerge/weights.py) are read and written there only, so that nothing
# reads a mapped tensor as onnx would (it refuses their absolute locations) or copies it whole.
BOUNDARY = {"to_array(": {"weights.py", "io.py"}, "gs.import_onnx(": {"graph/ir.py"},
            "gs.export_onnx(": {"graph/ir.py"}}


def test_weights_and_graphs_cross_the_boundary_in_one_place():
    outside = [f"{path.relative_to(PACKAGE)}: {call}" for path in PACKAGE.rglob("*.py")
               for call, allowed in BOUNDARY.items()
               if call in path.read_text() and str(path.relative_to(PACKAGE)) not in allowed]
    assert outside == []


# Graph edits are made on graphsurgeon graphs (issue 15): only the ModelProto boundary builds or
# copies protos by hand; elsewhere a line that must (a value-info type or dimension, which a gs
# graph cannot express) says why in a comment on that line.
PROTO_EDIT = re.compile(r"make_node\(|CopyFrom\(|ModelProto\(\)")
PROTO_BOUNDARY = {"io.py", "weights.py", "graph/ir.py"}


def test_graph_edits_are_made_on_graphsurgeon_graphs():
    outside = [f"{path.relative_to(PACKAGE)}:{number}" for path in PACKAGE.rglob("*.py")
               if str(path.relative_to(PACKAGE)) not in PROTO_BOUNDARY
               for number, line in enumerate(path.read_text().splitlines(), 1)
               if PROTO_EDIT.search(line) and "#" not in line]
    assert outside == []
