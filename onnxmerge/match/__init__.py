"""Merge-method registry: every method --method accepts, its parameters and capabilities."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

from ..errors import OnnxMergeError
from .permute import NoParams, average, permute
from .weight import WeightParams, match_weights
from .zip import ZipParams, zip_features


@dataclass(frozen=True)
class MatchMethod:
    """One entry of the registry."""

    name: str
    summary: str
    reference: str
    params: type
    needs_calibration: bool
    unequal_widths: bool
    function: Callable
    graph_level: bool = False  # function(members, spaces, params) -> {space: Matching}

    def make_params(self, **values):
        """The method's parameter dataclass from the options it knows."""
        known = {f.name for f in fields(self.params)}
        return self.params(**{k: v for k, v in values.items() if k in known})


METHODS: tuple[MatchMethod, ...] = (
    MatchMethod("zip", "elastic zipping of correlated features, within and across models",
                "Stoica et al. 2023 (ZipIt!); Xu et al. 2024", ZipParams, True, True, zip_features),
    MatchMethod("permute", "one-to-one activation matching (Hungarian on correlation)",
                "Ainsworth et al. 2022 (Git Re-Basin, activation matching)", NoParams, True, False, permute),
    MatchMethod("weight", "data-free weight matching by coordinate descent (used without --calib)",
                "Ainsworth et al. 2022 (Git Re-Basin, weight matching)", WeightParams, False, False, match_weights,
                graph_level=True),
    MatchMethod("average", "plain weight averaging, no matching", "Wortsman et al. 2022", NoParams, False, False, average),
)


def get_method(name: str) -> MatchMethod:
    """The registered method ``name``; raises OnnxMergeError listing the valid names."""
    for method in METHODS:
        if method.name == name:
            return method
    raise OnnxMergeError(f"unknown merge method {name!r}; available: {', '.join(m.name for m in METHODS)}")
