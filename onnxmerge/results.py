"""What a merge gives back: the merged model with its report and recipe (``MergeResult``), how
it is saved, and what is recorded in the model's metadata."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import onnx

from . import __version__
from .io import check_writable, save_model
from .options import recorded
from .recipe import Recipe
from .report import write_json, write_text
from .sources import Source


@dataclass
class MergeResult:
    """A merged model with what describes it.

    Attributes:
        model: the merged ``onnx.ModelProto`` (checked with ``onnx.checker``; its
            metadata_props hold the onnxmerge version, the inputs' file names and sha256, the
            options and the recipe).
        report: the JSON-ready report (docs/report-json.md).
        recipe: what reproduces the merge (``onnxmerge run``); ``recipe.runnable`` is False
            when a model or the calibration data was given in memory.
    """

    model: onnx.ModelProto
    report: dict = field(default_factory=dict)
    recipe: Recipe | None = None

    def save(self, path: str | os.PathLike, *, report: str | os.PathLike | None = None,
             recipe: bool = True) -> list[str]:
        """Write the model to ``path`` (atomically, external data over 2 GB), its recipe to
        ``<path>.recipe.yaml`` when it is runnable and ``recipe`` is true, and the report as
        JSON to ``report`` when given; returns the paths written.

        Raises:
            OnnxMergeError: a path is not writable, or names an input or another output.
        """
        path = os.fspath(path)
        inputs = [] if self.recipe is None else self.recipe.input_paths()
        targets = check_outputs(path, report, recipe and self.recipe is not None and self.recipe.runnable, inputs)
        save_model(self.model, path)
        if "recipe" in targets:
            write_text(self.recipe.to_yaml(folder=os.path.dirname(os.path.abspath(path)), output=path,
                                           report=targets.get("report")), targets["recipe"], "recipe")
        if report is not None:
            write_json(self.report, targets["report"])
        return list(targets.values())


def check_outputs(path: str | os.PathLike, report: str | os.PathLike | None, recipe: bool,
                  inputs: list) -> dict[str, str]:
    """The files a merge writes (merged model, recipe when ``recipe``, report when given), by
    what they are, each checked writable and none an input or another of them.

    Raises:
        OnnxMergeError: the first output that is not writable or would overwrite a file read or written.
    """
    targets = {"merged model": os.fspath(path)}
    if recipe:
        targets["recipe"] = recipe_path(path)
    if report is not None:
        targets["report"] = os.fspath(report)
    written = list(targets.values())
    for index, (what, target) in enumerate(targets.items()):
        check_writable(target, what, [*inputs, *written[:index]])
    return targets


def recipe_path(output: str | os.PathLike) -> str:
    """Where a merge writes its recipe: ``<output>.recipe.yaml`` beside the model."""
    return f"{os.fspath(output)}.recipe.yaml"


def record(model: onnx.ModelProto, sources: list[Source], recipe: Recipe) -> None:
    """Store what produced the merged model in its metadata: file names and sha256 only,
    never folders."""
    entries = {"onnxmerge.version": __version__, "onnxmerge.method": recipe.options.method,
               "onnxmerge.options": json.dumps(recorded(recipe.options), sort_keys=True)}
    for index, source in enumerate(sources):
        entries[f"onnxmerge.input{index}.sha256"] = source.sha256
        entries[f"onnxmerge.input{index}.name"] = source.file_name
    entries["onnxmerge.recipe"] = recipe.to_yaml()
    for key, value in entries.items():
        model.metadata_props.add(key=key, value=value)
