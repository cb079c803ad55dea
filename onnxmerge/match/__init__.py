"""Merge-method registry: every method ``--method`` accepts, its parameters and capabilities.

``METHODS`` is the one explicit list; recipe validation and the tests read it. Its names and
summaries come from ``choices.METHODS``, which the CLI reads without importing the methods.
Adding a method = one function, one parameter dataclass, one entry here and its name and
summary there.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

from ..choices import METHODS as SUMMARIES
from ..errors import OnnxMergeError
from .permute import NoParams, average, permute
from .regmean import RegMeanParams
from .taskvec import (DareParams, LinearParams, SlerpParams, TaskArithmeticParams, TiesParams, dare, linear, slerp,
                      task_arithmetic, ties)
from .weight import WeightParams, match_weights
from .zip import ZipParams, zip_clusters


@dataclass(frozen=True)
class MatchMethod:
    """One merge method.

    Attributes:
        name: the ``--method`` value.
        summary: one line for ``--help`` and reports.
        reference: the paper the method comes from.
        params: frozen dataclass of the method's parameters, every field with a default.
        needs_calibration: the function reads a feature correlation (else it gets none).
        unequal_widths: the method accepts models of different widths at a space.
        function: ``function(corr, widths, params, space="", overwrite_corr=False) -> Matching``
            for one space (``overwrite_corr``: it may work in ``corr``'s memory), or
            with ``graph_level``, ``function(members, spaces, params) -> {space: Matching}``.
        graph_level: see ``function``.
        combine: same-base methods (fine-tunes of one base, matched one to one):
            ``combine(base, tuned, params, rng) -> merged`` per parameter tensor (taskvec.py);
            None for the aligned methods, whose merged parameters are the averages of the
            matched ones.
        needs_base: the method reads the base model (``--base``).
        needs_grams: the method reads each weight layer's input Gram matrices on the
            calibration data (RegMean).
        elementwise: ``combine`` computes each entry from the same entry of every tensor
            alone, so it may be given a band of rows at a time (memory: a band, not a tensor).
    """

    name: str
    summary: str
    reference: str
    params: type
    needs_calibration: bool
    unequal_widths: bool
    function: Callable
    graph_level: bool = False
    combine: Callable | None = None
    needs_base: bool = False
    needs_grams: bool = False
    elementwise: bool = False

    @property
    def same_base(self) -> bool:
        """Fine-tunes of one base: identical graphs, parameters combined tensor by tensor."""
        return self.combine is not None or self.needs_grams

    def make_params(self, **values):
        """The method's parameter dataclass from the options it knows (others are ignored)."""
        known = {f.name for f in fields(self.params)}
        return self.params(**{k: v for k, v in values.items() if k in known})


METHODS: tuple[MatchMethod, ...] = (
    MatchMethod("zip", SUMMARIES["zip"],
                "Stoica et al. 2023 (ZipIt!); Xu et al. 2024 (Training-free Heterogeneous Model Merging)",
                ZipParams, needs_calibration=True, unequal_widths=True, function=zip_clusters),
    MatchMethod("permute", SUMMARIES["permute"],
                "Ainsworth et al. 2022 (Git Re-Basin, activation matching)",
                NoParams, needs_calibration=True, unequal_widths=False, function=permute),
    MatchMethod("weight", SUMMARIES["weight"],
                "Ainsworth et al. 2022 (Git Re-Basin, weight matching)",
                WeightParams, needs_calibration=False, unequal_widths=False, function=match_weights, graph_level=True),
    MatchMethod("average", SUMMARIES["average"], "Wortsman et al. 2022",
                NoParams, needs_calibration=False, unequal_widths=False, function=average),
    MatchMethod("task-arithmetic", SUMMARIES["task-arithmetic"],
                "Ilharco et al. 2023 (Editing models with task arithmetic)",
                TaskArithmeticParams, needs_calibration=False, unequal_widths=False, function=average,
                combine=task_arithmetic, needs_base=True, elementwise=True),
    MatchMethod("ties", SUMMARIES["ties"],
                "Yadav et al. 2023 (TIES-Merging)",
                TiesParams, needs_calibration=False, unequal_widths=False, function=average,
                combine=ties, needs_base=True),
    MatchMethod("dare", SUMMARIES["dare"], "Yu et al. 2024 (Language models are Super Mario)",
                DareParams, needs_calibration=False, unequal_widths=False, function=average,
                combine=dare, needs_base=True),
    MatchMethod("slerp", SUMMARIES["slerp"],
                "Shoemake 1985; White 2016 (Sampling generative networks)",
                SlerpParams, needs_calibration=False, unequal_widths=False, function=average, combine=slerp),
    MatchMethod("linear", SUMMARIES["linear"], "Wortsman et al. 2022",
                LinearParams, needs_calibration=False, unequal_widths=False, function=average, combine=linear,
                elementwise=True),
    MatchMethod("regmean", SUMMARIES["regmean"], "Jin et al. 2023 (Dataless knowledge fusion, RegMean)",
                RegMeanParams, needs_calibration=False, unequal_widths=False, function=average, needs_grams=True),
)


def get_method(name: str) -> MatchMethod:
    """The registered method ``name``.

    Raises:
        OnnxMergeError: unknown name; the message lists the valid names.
    """
    for method in METHODS:
        if method.name == name:
            return method
    raise OnnxMergeError(f"unknown merge method {name!r}; available: {', '.join(m.name for m in METHODS)}")
