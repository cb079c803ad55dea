"""Recipes: a merge written as a YAML file that ``onnxmerge run`` re-runs (docs/recipe.md,
schema docs/recipe.schema.json).

Every merge records its recipe: in the merged model's metadata (``onnxmerge.recipe``, file
names and sha256 only) and, for inputs that are files, in ``<output>.recipe.yaml`` beside the
model, with paths relative to that file's folder. Running that file merges the same files with
the same options into the same bytes. A hand-written recipe may leave out anything that has a
default; the sha256 entries, when present, must match the files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

from . import __version__
from . import choices
from .choices import PARAMETERS as METHOD_PARAMETERS
from .errors import RecipeError
from .limits import check_options
from .options import MergeOptions, merge_options, recorded

_HEADER = "# onnxmerge recipe: re-run with `onnxmerge run FILE`; paths are relative to this file's folder\n"
PARAMETERS = (*METHOD_PARAMETERS, "width", "zip_layers", "max_loss")
"""Options written under ``parameters``: the methods' (choices.PARAMETERS), the zip width and the
partial-zipping cut's."""
TOP_LEVEL = ("method", "heads", "repair", "align")
"""Options written as top-level keys; every other option goes under ``options``."""
_KEYS = ("onnxmerge", "base", "models", "calibration", "stats", *TOP_LEVEL, "parameters", "options", "output", "report")


@dataclass(frozen=True)
class Entry:
    """One input file of a recipe.

    Attributes:
        path: the file (as given, or resolved against the recipe's folder), None when the
            input was given in memory.
        name: the file name, or the in-memory input's name (``model 0``, ``arrays``).
        sha256: hex sha256 of the file or the in-memory input; None when a hand-written
            recipe gives none.
    """

    path: str | None
    name: str
    sha256: str | None

    def to_dict(self, folder: str | None) -> dict:
        path = self.name if folder is None or self.path is None else os.path.relpath(self.path, folder)
        return {"path": path, "sha256": self.sha256}


@dataclass(frozen=True)
class Recipe:
    """What a merge read and how it was set: enough to run it again.

    Attributes:
        models: the models, model 0 first.
        base: the base model of a same-base merge (``--base``), or None.
        calibration: the calibration data: its files in sample order, or the arrays given in
            memory; none without.
        stats: statistics files.
        options: every merge option (the method resolved: never None).
        output, report: where ``onnxmerge run`` writes the model and the JSON report (None:
            no report); None for a recipe not read from a file.
    """

    models: tuple[Entry, ...]
    calibration: tuple[Entry, ...]
    stats: tuple[Entry, ...]
    options: MergeOptions
    base: Entry | None = None
    output: str | None = None
    report: str | None = None

    @classmethod
    def of(cls, sources, data, stats: list[str], options: MergeOptions, base=None) -> "Recipe":
        """The recipe of a merge of ``sources`` (sources.Source) on ``data`` (sources.Data or
        None), with ``base`` (a Source) for a same-base merge."""
        from .io import model_sha256  # only a merge builds recipes; keeps start-up light

        def entry(source) -> Entry:
            return Entry(source.path and os.path.abspath(source.path), source.file_name, source.sha256)

        def file(path: str) -> Entry:
            return Entry(os.path.abspath(path), os.path.basename(path), model_sha256(path))

        models = tuple(entry(s) for s in sources)
        calibration = ()
        if data is not None:
            calibration = tuple(map(file, data.paths)) or (Entry(None, data.name, data.arrays_sha256()),)
        return cls(models, calibration, tuple(map(file, stats)), options, None if base is None else entry(base))

    @property
    def runnable(self) -> bool:
        """Whether every input is a file (a model or data given in memory cannot be re-read)."""
        return all(entry.path is not None for entry in self.entries())

    def entries(self) -> list[Entry]:
        return [*([self.base] if self.base else []), *self.models, *self.calibration, *self.stats]

    def input_paths(self) -> list[str]:
        return [entry.path for entry in self.entries() if entry.path is not None]

    def to_yaml(self, folder: str | None = None, output: str | None = None, report: str | None = None) -> str:
        """The recipe as YAML: with ``folder``, paths relative to it and the outputs (the file
        beside the model); without, file names only (the model's metadata)."""
        import yaml  # PyYAML: only recipes need it

        values = recorded(self.options)  # where it ran (ray) is not recorded: the same merge anywhere
        document = {"onnxmerge": __version__}
        if self.base is not None:
            document["base"] = self.base.to_dict(folder)
        document["models"] = [m.to_dict(folder) for m in self.models]
        if self.calibration:  # one file as before several were read: a mapping, several a list
            calibration = [c.to_dict(folder) for c in self.calibration]
            document["calibration"] = calibration[0] if len(calibration) == 1 else calibration
        if self.stats:
            document["stats"] = [s.to_dict(folder) for s in self.stats]
        document.update({key: values.pop(key) for key in TOP_LEVEL})
        document["parameters"] = {key: values.pop(key) for key in PARAMETERS}
        values["input_layout"] = [f"{model}={layout}" for model, layout in values["input_layout"]]
        if document["parameters"]["weights"] is not None:
            document["parameters"]["weights"] = list(document["parameters"]["weights"])
        document["options"] = values
        if folder is not None:
            document["output"] = os.path.relpath(output, folder) if output else None
            document["report"] = os.path.relpath(report, folder) if report else None
        return _HEADER + yaml.safe_dump(document, sort_keys=False, default_flow_style=False)


def read_recipe(path: str | os.PathLike) -> Recipe:
    """A recipe file, checked: every key known, every value of the right kind, paths resolved
    against the file's folder.

    Raises:
        RecipeError: unreadable file, YAML syntax, an unknown key or a wrong value; the message
            names the file, the line and the key.
    """
    import yaml

    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        document = yaml.safe_load(text)
    except OSError as error:
        raise RecipeError(f"{path}: cannot read the recipe ({error.strerror}); check the path") from error
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise RecipeError(f"{path}: not valid YAML ({' '.join(str(error).split())}); fix the recipe") from error
    return _Reader(path, _lines(root)).recipe(document)


def _lines(node, prefix: tuple = ()) -> dict[tuple, int]:
    """Line (1-based) of every mapping key and sequence item of a composed YAML document."""
    import yaml

    lines = {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            lines[(*prefix, key.value)] = key.start_mark.line + 1
            lines.update(_lines(value, (*prefix, key.value)))
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines[(*prefix, index)] = item.start_mark.line + 1
            lines.update(_lines(item, (*prefix, index)))
    return lines


class _Reader:
    """Checks one recipe document; errors name the file, line and key."""

    def __init__(self, path: str, lines: dict[tuple, int]):
        self.path, self.lines = path, lines
        self.folder = os.path.dirname(os.path.abspath(path))

    def fail(self, key: tuple, message: str) -> RecipeError:
        line = next((self.lines[key[:n]] for n in range(len(key), 0, -1) if key[:n] in self.lines), 1)
        return RecipeError(f"{self.path}:{line}: {'.'.join(map(str, key))}: {message}")

    def recipe(self, document) -> Recipe:
        if not isinstance(document, dict):
            raise RecipeError(f"{self.path}:1: a recipe is a YAML mapping with models, calibration, method, ...; "
                              "see docs/recipe.md")
        self.known(document, (), _KEYS)
        models = document.get("models")
        if not isinstance(models, list) or len(models) < 2:
            raise self.fail(("models",), "list two or more model files")
        calibration = document.get("calibration")
        stats = document.get("stats") or []
        if not isinstance(stats, list):
            raise self.fail(("stats",), "list statistics files")
        settings = {key: document[key] for key in TOP_LEVEL if key in document}
        for group, names in (("parameters", PARAMETERS), ("options", _OPTIONS)):
            values = document.get(group) or {}
            if not isinstance(values, dict):
                raise self.fail((group,), f"a mapping of {', '.join(names)}")
            self.known(values, (group,), names)
            settings.update(values)
        checked = {key: self.value(key, value) for key, value in settings.items()}
        try:
            options = merge_options(**checked)
        except RecipeError as error:
            raise self.fail(("options", "input_layout"), str(error)) from None
        try:
            check_options(options)
        except RecipeError as error:  # "--batch-size -3 is out of range ...": name the key it came from
            name = str(error).split()[0].lstrip("-").replace("-", "_")
            raise self.fail((_group(name), name) if _group(name) else (name,), str(error)) from None
        base = document.get("base")
        return Recipe(tuple(self.entry(("models", i), m) for i, m in enumerate(models)),
                      self.calibration(calibration),
                      tuple(self.entry(("stats", i), s) for i, s in enumerate(stats)), options,
                      None if base is None else self.entry(("base",), base),
                      self.output("output", document.get("output")), self.output("report", document.get("report")))

    def known(self, mapping: dict, key: tuple, allowed: tuple[str, ...]) -> None:
        for name in mapping:
            if name not in allowed:
                raise self.fail((*key, name), f"unknown key; use {', '.join(allowed)}")

    def calibration(self, value) -> tuple[Entry, ...]:
        """The calibration files: one entry, or a list of them (shards read in order)."""
        if value is None:
            return ()
        if value == []:
            raise self.fail(("calibration",), "list one or more calibration files, or leave calibration out")
        if isinstance(value, list):
            return tuple(self.entry(("calibration", i), v) for i, v in enumerate(value))
        return (self.entry(("calibration",), value),)

    def entry(self, key: tuple, value) -> Entry:
        """A file entry: a path, or ``{path, sha256}``; the path relative to the recipe's folder."""
        if isinstance(value, str):
            value = {"path": value}
        if not isinstance(value, dict) or not isinstance(value.get("path"), str):
            raise self.fail(key, "give a file path, or path and sha256")
        self.known(value, key, ("path", "sha256"))
        sha256 = value.get("sha256")
        if sha256 is not None and not (isinstance(sha256, str) and len(sha256) == 64):
            raise self.fail((*key, "sha256"), "a sha256 is 64 hex digits; remove it to accept any file")
        return Entry(os.path.normpath(os.path.join(self.folder, value["path"])), os.path.basename(value["path"]),
                     sha256)

    def output(self, key: str, value) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise self.fail((key,), "give a file path")
        return os.path.normpath(os.path.join(self.folder, value))

    def value(self, name: str, value):
        """One option's value, checked against its type and choices (ranges are checked by
        the merge itself, as for the CLI and the API)."""
        key = (_group(name), name) if _group(name) else (name,)
        if value is None and name in _OPTIONAL or value in _WORDS.get(name, ()) or name == "input_layout":
            return value  # input_layout is checked by merge_options
        if name == "weights" and isinstance(value, list) and all(
                isinstance(w, (int, float)) and not isinstance(w, bool) for w in value):
            return [float(w) for w in value]
        if name == "width" and isinstance(value, str) and value.endswith("x"):  # 1.5x as on the command line
            value = _number(value[:-1])
        kind, choices = _TYPES.get(name, str), _choices().get(name, ())
        numeric = kind is float and isinstance(value, int)
        if (isinstance(value, kind) or numeric) and not (kind is not bool and isinstance(value, bool)) and (
                not choices or value in choices):
            return float(value) if kind is float else value
        words = [*choices, *_WORDS.get(name, ())]
        expected = f"one of {', '.join(words)}" if choices else _EXPECTED[kind] + (
            f" or {', '.join(words)}" if words else "")
        raise self.fail(key, f"{value!r} is not {expected}")


def _number(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


_OPTIONS = tuple(f.name for f in fields(MergeOptions) if f.name not in (*PARAMETERS, *TOP_LEVEL))
_OPTIONAL = ("method", "width", "zip_layers", "max_samples", "repair_samples", "weights", "ray", "ray_shards")
_WORDS = {"width": ("min",), "zip_layers": ("auto",)}
_EXPECTED = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
_TYPES = {**{f.name: type(f.default) for f in fields(MergeOptions) if f.default not in (None, ())},
          "width": float, "zip_layers": int, "max_samples": int, "repair_samples": int, "weights": list,
          "ray_shards": int}
"""The type of each option's value: its default's, or the one given where the default is None."""


def _choices() -> dict[str, tuple[str, ...]]:
    """The allowed values of the options that are names."""
    return {"method": tuple(choices.METHODS), "heads": choices.HEADS, "repair": choices.REPAIRS,
            "align": choices.ALIGNMENTS, "bn": choices.BN_MODES, "provider": choices.PROVIDERS,
            "dare_then": choices.DARE_THEN}


def _group(name: str) -> str | None:
    return "parameters" if name in PARAMETERS else "options" if name in _OPTIONS else None
