"""Same-base merging (task arithmetic, TIES, DARE, SLERP, linear, RegMean): fine-tunes of one
pre-trained model, whose graphs are identical and whose features are already aligned, combined
tensor by tensor (match/taskvec.py, match/regmean.py). This module checks that the models are
such fine-tunes and builds the per-tensor combination the merge applies to the trunk."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx

from .calib.capture import expose
from .calib.sessions import open_session
from .errors import RecipeError, UnsupportedGraphError
from .match import MatchMethod
from .match.regmean import gram_matrices, merged_weight, regmean_layers
from .match.taskvec import check_params
from .rewrite.merge import Member
from . import weights

DRIFT_LIMIT = 1.0
"""A fine-tune's weight tensors differ from its base's by a small share of their norm (a few
tens of percent at most); independently trained models of one architecture differ by about
sqrt(2) of it (uncorrelated tensors of equal norm). When the median over weight tensors (two
or more axes: norms' scales stay near 1 whatever the training) exceeds this share, the models
are refused as fine-tunes of one base."""


def check_same_graph(named: list[tuple[str, onnx.ModelProto]], heads: frozenset[int] = frozenset()) -> None:
    """Refuse canonical models whose graphs differ from the first's (ops, attributes, weight
    shapes; at the ``heads`` node indices, kept per model, weight shapes may differ), naming the
    first node that differs.

    Raises:
        UnsupportedGraphError: the first difference, and the aligned methods to use instead.
    """
    first_name, first = named[0]
    for name, model in named[1:]:
        problem = _difference(first, model, heads)
        if problem:
            raise UnsupportedGraphError(
                f"{name} and {first_name} have different graphs: {problem}; the same-base methods merge fine-tunes "
                "of one base with the same graph: merge models that only share an architecture with --method zip, "
                "permute or weight")


def _difference(a: onnx.ModelProto, b: onnx.ModelProto, heads: frozenset[int]) -> str | None:
    """The first difference of ``b`` from ``a``, naming ``b``'s node, or None."""
    shapes_a = {i.name: tuple(i.dims) for i in a.graph.initializer}
    shapes_b = {i.name: tuple(i.dims) for i in b.graph.initializer}
    for index, (x, y) in enumerate(zip(a.graph.node, b.graph.node)):
        label = f"node {index} {y.name or y.op_type!r}"
        if x.op_type != y.op_type:
            return f"{label} is a {y.op_type}, not a {x.op_type}"
        if [(t.name, onnx.helper.get_attribute_value(t)) for t in x.attribute] != [
                (t.name, onnx.helper.get_attribute_value(t)) for t in y.attribute]:
            return f"{label} ({y.op_type}) has other attributes"
        for position, (p, q) in enumerate(zip(x.input, y.input)):
            if (p in shapes_a) != (q in shapes_b) or index not in heads and shapes_a.get(p) != shapes_b.get(q):
                return f"{label} ({y.op_type}) input {position} has shape {shapes_b.get(q)}, not {shapes_a.get(p)}"
    if len(a.graph.node) != len(b.graph.node):
        shorter = min(len(a.graph.node), len(b.graph.node))
        return f"one graph ends after node {shorter - 1}, the other has {abs(len(a.graph.node) - len(b.graph.node))} more"
    return None


def _weight(member: Member, inits: dict[str, onnx.TensorProto], name: str) -> np.ndarray | None:
    """``member``'s tensor (of its ``inits`` by name) at the reference's ``name`` when it is a
    float weight (two or more axes), else None."""
    array = weights.read(inits[member.correspondence.params[name]])
    return array if array.dtype.kind == "f" and array.ndim >= 2 else None


def check_fine_tunes(members: list[Member], base: Member | None, names: list[str], labels: list[str]) -> None:
    """Refuse models whose weights are too far from the base's (or, without a base, from model
    0's) to be fine-tunes of one base (``DRIFT_LIMIT``). Tensor by tensor and a band of rows
    at a time (``weights.row_bands``), in float64: no whole tensor of any model is copied.

    Raises:
        UnsupportedGraphError: names the model and its relative distance.
    """
    reference_member = base or members[0]
    inits = [{i.name: i for i in m.model.graph.initializer} for m in [reference_member, *members]]
    drifts: list[list[float]] = [[] for _ in members]
    for name in names:
        reference = _weight(reference_member, inits[0], name)
        if reference is None:
            continue
        tuned = [_weight(member, member_inits, name) for member, member_inits in zip(members, inits[1:])]
        squares = np.zeros(1 + len(members))  # |reference|^2, then each |weight - reference|^2
        for rows in weights.row_bands(reference.shape):
            part = weights.transient(reference)[rows].astype(np.float64)
            squares[0] += np.vdot(part, part)
            for k, weight in enumerate(tuned):
                if weight is not None:
                    difference = weights.transient(weight)[rows].astype(np.float64) - part
                    squares[k + 1] += np.vdot(difference, difference)
        scale = np.sqrt(squares[0]) or 1.0
        for k, (member_drifts, weight) in enumerate(zip(drifts, tuned)):
            if weight is not None:
                member_drifts.append(np.sqrt(squares[k + 1]) / scale)
    if not any(drifts):
        return
    for member_drifts, label in zip(drifts, labels):
        drift = float(np.median(member_drifts))
        if drift > DRIFT_LIMIT:
            against = "the base" if base is not None else "model 0"
            raise UnsupportedGraphError(
                f"{label}: its weight tensors differ from {against}'s by a median {drift:.0%} of their norm, so it "
                f"is no fine-tune of {against} (fine-tunes stay well under {DRIFT_LIMIT:.0%}); merge models trained "
                "apart with --method zip, permute or weight, or pass --align-first to align them first")


def combiner(method: MatchMethod, params, members: list[Member], base: Member | None, trunk_nodes: list[int],
             batches: Callable | None, provider: str, seed: int) -> Callable[..., np.ndarray]:
    """The per-tensor combination of ``method`` for ``rewrite.merge.merged_trunk_parameters``:
    ``combine(name, values, rows=...)``, ``rows`` the slice of axis 0 that ``values`` hold.

    Args:
        params: the method's parameter dataclass.
        base: the base model (``--base``), lined up with model 0; None when not given.
        trunk_nodes: indices of model 0's trunk nodes (RegMean merges their weight layers).
        batches: ``batches(what)`` -> per step, one feed per model (RegMean only).
        seed: DARE's random drops.

    Raises:
        RecipeError: a base is needed and missing, or calibration data for RegMean.
    """
    if method.needs_base and base is None:
        raise RecipeError(f"--method {method.name} adds task vectors to the base model: pass --base BASE.onnx")
    if method.needs_grams:
        if batches is None:
            raise RecipeError("--method regmean measures each layer's inputs: pass --calib DATA")
        return _regmean(params, members, trunk_nodes, batches, provider)
    check_params(method.name, params, len(members))
    inits = {} if base is None else {i.name: i for i in base.model.graph.initializer}
    rng = np.random.default_rng(seed)

    def combine(name: str, values: list[np.ndarray], rows=...) -> np.ndarray:
        base_value = None
        if base is not None:
            base_value = weights.read(inits[base.correspondence.params[name]])[rows].astype(np.float64)
        return method.combine(base_value, values, params, rng)

    return combine


def _regmean(params, members: list[Member], trunk_nodes: list[int], batches: Callable, provider: str):
    if not 0 <= params.alpha <= 1:
        raise RecipeError(f"--alpha {params.alpha}: RegMean scales the Gram matrices' off-diagonal by alpha in [0, 1]")
    layers = regmean_layers(members[0].model, trunk_nodes)
    inputs = [[m.correspondence.tensors[layer.input] for layer in layers] for m in members]
    sessions = [open_session(expose(m.model, names), provider)[0] for m, names in zip(members, inputs)]
    grams = gram_matrices(sessions, inputs, layers, batches("Gram matrices")) if layers else []
    by_weight = {layer.weight: (layer, [g[k] for g in grams]) for k, layer in enumerate(layers)}

    def combine(name: str, values: list[np.ndarray], rows=...) -> np.ndarray:  # never given rows: not elementwise
        if name not in by_weight:
            return sum(values) / len(values)
        layer, layer_grams = by_weight[name]
        return merged_weight(values, layer_grams, layer, params.alpha)

    return combine
