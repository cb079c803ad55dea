"""Depth alignment of models with different numbers of blocks (method.md §5): block structure,
CKA between block outputs, per-stage alignment onto the deepest model, and lifting."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from .calib.capture import collect_cka
from .choices import ALIGNMENTS
from .errors import CalibrationError, RecipeError
from .graph.shapes import infer_shapes
from .graph.blocks import BlockStructure, check_stages
from .graph.spaces import find_spaces
from .match.align import align_stages
from .rewrite.lift import lift

_NEEDS_DATA = {"sma", "lma"}  # the aligners that read the CKA matrix


@dataclass
class DepthAlignment:
    """Where each model's units sit in the deepest model's topology."""

    method: str
    names: list[str]
    structures: list[BlockStructure]
    deep: int  # index of the deepest model
    maps: dict[int, list[int | None]] = field(default_factory=dict)  # model -> per deep unit: its unit
    objectives: dict[int, list[float]] = field(default_factory=dict)  # model -> per stage
    cka: np.ndarray | None = None  # over all models' units, model 0's first
    provider: str = "none"

    def offsets(self) -> list[int]:
        sizes = [len(s.units) for s in self.structures]
        return [int(sum(sizes[:i])) for i in range(len(sizes))]

    def cross(self, i: int, j: int) -> np.ndarray | None:
        """CKA between model i's units (rows) and model j's (columns)."""
        if self.cka is None:
            return None
        offsets, sizes = self.offsets(), [len(s.units) for s in self.structures]
        return self.cka[offsets[i]:offsets[i] + sizes[i], offsets[j]:offsets[j] + sizes[j]]


def needs_alignment(structures: list[BlockStructure], method: str) -> bool:
    """Whether ``method`` asks for lifting: any method but none, auto only when the models'
    block structures have different depths."""
    if method not in ALIGNMENTS:
        raise RecipeError(f"--align {method!r} is not one of {', '.join(ALIGNMENTS)}")
    if method == "none":
        return False
    if method != "auto":
        return True
    return len({len(s.units) for s in structures}) > 1


def align_depths(named: list[tuple[str, onnx.ModelProto]], structures: list[BlockStructure], method: str,
                 batches, provider: str) -> DepthAlignment:
    """Align every model onto the deepest (the first of the deepest on ties).

    Args:
        named: (file name, canonical model) pairs.
        structures: each model's ``find_blocks``.
        method: one of ALIGNMENTS; auto is sma.
        batches: calibration batches (one feed per model per step); needed for sma and lma.
    """
    method = "sma" if method == "auto" else method
    sizes = [len(s.units) for s in structures]
    deep = int(np.argmax(sizes))
    names = [name for name, _ in named]
    for i, structure in enumerate(structures):
        if i != deep:
            check_stages(structures[deep], structure, names[deep], names[i])
    result = DepthAlignment(method, names, structures, deep)
    if method in _NEEDS_DATA:
        if batches is None:
            raise RecipeError(f"the {method} alignment compares block outputs and needs --calib DATA; without data "
                              "use the uniform or head-tail alignment (merge --align uniform, align --method uniform)")
        tensors = [[u.output for u in s.units] for s in structures]
        stats, result.provider = collect_cka([m for _, m in named], tensors, batches, provider)
        result.cka = stats.cka()
        _check_defined(result, method)
    for i, structure in enumerate(structures):
        if i == deep:
            result.maps[i] = list(range(sizes[deep]))
            continue
        similarity = result.cross(deep, i) if result.cka is not None else np.zeros((sizes[deep], sizes[i]))
        placed, result.objectives[i] = align_stages(similarity, structures[deep].stage_ranges(),
                                                    structure.stage_ranges(), method)
        mapping: list[int | None] = [None] * sizes[deep]
        for k, l in enumerate(placed):
            mapping[l] = k
        result.maps[i] = mapping
    return result


def _check_defined(alignment: DepthAlignment, method: str) -> None:
    """Refuse to align on undefined CKA (NaN: a block output that does not vary over the samples)."""
    undefined = np.isnan(np.diag(alignment.cka))
    if not undefined.any():
        return
    offsets, found = alignment.offsets(), []
    for i, (name, structure) in enumerate(zip(alignment.names, alignment.structures)):
        blocks = [k for k in range(len(structure.units)) if undefined[offsets[i] + k]]
        if blocks:
            found.append(f"{name} block{'s' if len(blocks) > 1 else ''} {', '.join(map(str, blocks))}")
    raise CalibrationError(f"CKA is undefined for {'; '.join(found)}: their outputs do not vary over the calibration "
                           f"samples, so {method} cannot compare blocks; give varied calibration data, or align "
                           "without data: --align uniform (merge) or --method uniform (align)")


def lift_models(named: list[tuple[str, onnx.ModelProto]], alignment: DepthAlignment) -> list[onnx.ModelProto]:
    """Every model rewritten into the deepest model's topology (the deepest as it is)."""
    deep_name, deep_model = named[alignment.deep]
    deep_graph = find_spaces(deep_model)
    lifted = []
    for i, (name, model) in enumerate(named):
        if i == alignment.deep:
            lifted.append(model)
            continue
        lifted.append(infer_shapes(lift(model, alignment.structures[i], deep_model,
                                        alignment.structures[alignment.deep], deep_graph, alignment.maps[i], name)))
    return lifted


def describe(alignment: DepthAlignment) -> dict:
    """The JSON-ready alignment report: per model and stage, which deep unit each unit maps to."""
    deep = alignment.structures[alignment.deep]
    report = {"method": alignment.method, "deep": alignment.names[alignment.deep],
              "units": {n: len(s.units) for n, s in zip(alignment.names, alignment.structures)},
              "stages": {n: [len(st.units) for st in s.stages] for n, s in zip(alignment.names, alignment.structures)},
              "maps": {}, "provider": alignment.provider}
    for i, mapping in alignment.maps.items():
        if i == alignment.deep:
            continue
        stages = []
        for s, (start, stop) in enumerate(deep.stage_ranges()):
            stages.append({"stage": s, "deep_units": list(range(start, stop)),
                           "map": [mapping[l] for l in range(start, stop)],
                           "objective": alignment.objectives.get(i, [None] * len(deep.stages))[s]})
        report["maps"][alignment.names[i]] = stages
    if alignment.cka is not None:
        # undefined CKA (NaN: a block output that does not vary) is null in the JSON report
        report["cka"] = {alignment.names[i]: [[None if np.isnan(v) else v for v in row]
                                              for row in np.round(alignment.cross(alignment.deep, i), 4).tolist()]
                         for i in range(len(alignment.names)) if i != alignment.deep}
    return report
