"""Stage 3 of a merge: a matching (merge and unmerge matrices) for every merged feature space,
keyed by model 0's space ids (docs/method.md §3). Spaces are matched unit by unit from their
statistics with the chosen method; block spaces (heads, groups) one to one whatever the method;
spaces no statistics reach from the weights."""

from __future__ import annotations

import logging
from dataclasses import asdict, replace
from typing import Sequence

import numpy as np

from ..calib.capture import CaptureUnit, space_groups
from ..calib.stats import SpaceStats, pooled_similarity
from ..errors import RecipeError, UnsupportedGraphError
from ..match import MatchMethod, get_method
from ..match.permute import permute as permute_features
from ..match.permute import require_equal_widths
from ..match.grid import assignments_of, match_grid
from ..match.matching import Matching
from ..match.weight import WeightParams, match_weights
from ..options import MergeOptions
from ..progress import progress
from ..rewrite.merge import Member


log = logging.getLogger(__name__)


def matching_method(method: MatchMethod, options: MergeOptions, data: bool) -> MatchMethod:
    """The method whose matchings the merge uses: ``method`` itself, except for a same-base
    method with ``align_first``, which first aligns the models by activation matching (with
    data) or weight matching (Git Re-Basin, Ainsworth et al. 2022)."""
    if method.same_base and options.align_first:
        return get_method("permute" if data else "weight")
    return method


def match_spaces(members: list[Member], split, units: list[CaptureUnit], stats: list, method, options: MergeOptions):
    """Matchings keyed by model 0's space ids, and the per-space report rows."""
    reference = members[0]
    params = method.make_params(**asdict(options))
    run = _space_matcher(method, params, options.width)
    _check_widths(members, split.zipped, method)
    if method.same_base:  # fine-tunes of one base: aligned already, their parameters combine as they are
        return {}, [_row(members, space, None, []) for space in sorted(split.zipped)]
    matchings: dict[int, Matching] = {}
    if method.graph_level:
        matchings.update(method.function(members, sorted(split.zipped), params))
    elif not method.needs_calibration:  # average: no statistics, but the same width checks
        for space in sorted(split.zipped):
            widths = [m.graph.table.widths[m.space_of(space)] for m in members]
            matchings[space] = method.function(None, widths, params, space=reference.graph.space(space).name)
    tensors, blocks = {}, reference.graph.block_spaces()
    groups = space_groups(units) if len(stats) else []  # no statistics: spaces matched from the weights
    for indices in progress(groups, "matching", len(groups), "unit"):
        for space, matching in _match_group(reference, units, stats, indices, run, matchings, blocks).items():
            matchings.setdefault(space, matching)
            tensors.setdefault(space, [units[k].tensor for k in indices])
    matchings.update(_match_from_weights(members, sorted(set(split.zipped) - set(matchings)), matchings, options))
    rows = [_row(members, space, matching, tensors.get(space, [])) for space, matching in sorted(matchings.items())]
    for row in rows:
        log.debug("space %s (%s): widths %s -> %d, mean correlation %s", row["space"], row["tensor"] or "weights",
                  row["widths"], row["merged_width"], row["mean_correlation"])
    return matchings, rows


def _match_group(reference: Member, units: list[CaptureUnit], stats: list, indices: list[int], run, known: dict,
                 blocks: set[int]) -> dict:
    """``match_unit`` of one space's chosen unit (``indices[0]``) and its companions. Their
    statistics are read here, a space at a time (grouped statistics are computed a pass at a
    time), and consumed: their X^T X become the similarity matched on (one (n, n) matrix, not
    two), so none is read again."""
    companions = [(units[k], stats[k]) for k in indices[1:]]
    return match_unit(reference, units[indices[0]], stats[indices[0]], run, known, blocks, companions, consume=True)


def _row(members: list[Member], space: int, matching: Matching | None, tensors: list[str]) -> dict:
    """The report row of model 0's ``space``: the tensors matched on (the chosen one first), widths,
    merged width and match quality."""
    widths = [m.graph.table.widths[m.space_of(space)] for m in members]
    quality = float("nan") if matching is None else matching.mean_correlation
    return {"space": members[0].graph.space(space).name, "tensor": tensors[0] if tensors else None,
            "tensors": tensors, "widths": widths,
            "merged_width": widths[0] if matching is None else matching.width,
            "mean_correlation": None if np.isnan(quality) else quality,
            "within_model_merges": [0] * len(members) if matching is None else list(matching.within_model_merges)}


def _match_from_weights(members: list[Member], spaces: list[int], matchings: dict[int, Matching],
                        options: MergeOptions) -> dict[int, Matching]:
    """Spaces no statistics matched (no capturable tensor shows them) are matched from the
    weights, every other space's matching fixed: never left as the identity, which would
    merge unrelated features."""
    for space in spaces:
        widths = [m.graph.table.widths[m.space_of(space)] for m in members]
        if len(set(widths)) > 1:
            raise UnsupportedGraphError(
                f"space {members[0].graph.space(space).name} appears in no tensor the calibration can read, so it "
                f"is matched from the weights, which needs equal widths, and the models have {widths}; merge "
                "models of equal widths there")
    return match_weights(members, spaces, WeightParams(seed=options.seed), fixed=matchings) if spaces else {}


def _check_widths(members: list[Member], spaces, method) -> None:
    """Refuse, before any matching, widths that differ where they must agree: at a block space
    (conv groups, attention heads: matched one to one whatever the method) and, for methods
    that keep the width, everywhere."""
    reference = members[0]
    blocks = reference.graph.block_layers()
    for space in sorted(spaces):
        widths = [m.graph.table.widths[m.space_of(space)] for m in members]
        name = reference.graph.space(space).name
        if space in blocks and len(set(widths)) > 1:
            raise RecipeError(
                f"space {name}: the models have {widths} groups (or attention heads, or padded channels) at node "
                f"{blocks[space]!r}; groups, heads and padded channels are matched one to one whatever --method, so "
                "their counts must agree; merge models of equal widths there (a depthwise conv with a channel "
                "multiplier has one group per input channel)")
        if not method.unequal_widths:
            require_equal_widths(widths, method.name, name)


def _space_matcher(method, params, width: float | str | None):
    """The method on one space's correlation, which it may overwrite (every caller's is a
    fresh array), with ``--width`` (a multiple of the widest model's width, or ``min``: the
    narrowest model's) turned into that space's target width."""
    def run(corr: np.ndarray, widths: list[int]) -> Matching:
        if width is None or not method.unequal_widths:
            return method.function(corr, widths, params, overwrite_corr=True)
        target = min(widths) if width == "min" else min(sum(widths), max(1, round(width * max(widths))))
        if max(widths) == 1:  # a one-channel axis may broadcast against wider ones: it stays one
            target = 1
        return method.function(corr, widths, replace(params, width=target), overwrite_corr=True)
    return run


def match_unit(reference: Member, unit: CaptureUnit, unit_stats, run, known: dict, blocks: set[int],
               companions: Sequence[tuple[CaptureUnit, SpaceStats]] = (), *, consume: bool = False) -> dict:
    """Matchings of the spaces of one capture unit, on the similarity pooled over the unit and
    those of its ``companions`` where every model's features vary (``pooled_similarity``;
    ``consume``: computed in their statistics' memory, which are unusable after).
    Models with no features there (channels constant, as inside a lifted identity block:
    ``SpaceStats.models_vary``) are matched among the others only, on the unit alone
    (method.md §5.5)."""
    widths = list(unit_stats.widths)
    bounds = np.cumsum([0, *widths])
    live = [int(i) for i in np.flatnonzero(unit_stats.models_vary())]
    if not live or len(live) == len(widths):
        shown = [s for _, s in companions if s.models_vary().all()]
        corr = pooled_similarity([unit_stats, *shown], consume=consume)
        return _match_features(reference, unit, corr, widths, run, known, blocks)
    corr = unit_stats.similarity(consume=consume)
    keep = np.concatenate([np.arange(bounds[i], bounds[i + 1]) for i in live])
    matched = _match_features(reference, unit, corr[np.ix_(keep, keep)], [widths[i] for i in live], run,
                              {}, blocks)
    per_space = {unit.spaces[0]: widths}
    if len(unit.spaces) == 2:  # a grid: block counts agree, blocks are w / count wide
        count = reference.graph.table.widths[unit.spaces[0]]
        per_space = {unit.spaces[0]: [count] * len(widths), unit.spaces[1]: [w // count for w in widths]}
    return {space: matching.spread(per_space[space], live) for space, matching in matched.items()}


def _match_features(reference: Member, unit: CaptureUnit, corr: np.ndarray, widths: list[int], run, known: dict,
                    blocks: set[int]) -> dict:
    """Block spaces (heads, groups) keep their count: they are assigned one to one whatever the method."""
    if len(unit.spaces) == 2:
        outer, inner = unit.spaces
        count = reference.graph.table.widths[outer]
        assignments = assignments_of(known[outer]) if outer in known else None
        block, within = match_grid(corr, count, [w // count for w in widths], run, assignments)
        return {outer: block, inner: within}
    (space,) = unit.spaces
    if space in blocks:
        return {space: permute_features(corr, widths, space=reference.graph.space(space).name, overwrite_corr=True)}
    return {space: run(corr, widths)}
