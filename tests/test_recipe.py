"""Recipes: every merge writes <output>.recipe.yaml, `onnxmerge run` reproduces the model byte for
byte, and a wrong recipe gives one line naming the file, line and key."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml

from onnxmerge import cli

DIGITS = Path(__file__).resolve().parent.parent / "samples" / "digits"


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Copies of the digits pair and 64 calibration samples in a folder of their own."""
    root = tmp_path_factory.mktemp("recipe")
    (root / "models").mkdir()
    for name in ("resnet_a.onnx", "resnet_b.onnx"):
        (root / "models" / name).write_bytes((DIGITS / name).read_bytes())
    np.savez(root / "calib.npz", input=np.load(DIGITS / "calib.npz")["input"][:64])
    return root


@pytest.fixture(scope="module")
def merged(folder) -> Path:
    out = folder / "out"
    out.mkdir()
    code = cli.main(["merge", str(folder / "models/resnet_a.onnx"), str(folder / "models/resnet_b.onnx"),
                     "--calib", str(folder / "calib.npz"), "--width", "1.5x", "--alpha", "0.4",
                     "-o", str(out / "m.onnx"), "--report", str(out / "m.json")])
    assert code == 0
    return out / "m.onnx"


def test_merge_writes_its_recipe_with_relative_paths(merged):
    recipe = yaml.safe_load(Path(f"{merged}.recipe.yaml").read_text())
    assert [m["path"] for m in recipe["models"]] == ["../models/resnet_a.onnx", "../models/resnet_b.onnx"]
    assert recipe["models"][0]["sha256"] == _sha(merged.parent.parent / "models/resnet_a.onnx")
    assert recipe["calibration"]["path"] == "../calib.npz"
    assert recipe["method"] == "zip" and recipe["parameters"]["width"] == 1.5 and recipe["parameters"]["alpha"] == 0.4
    assert recipe["output"] == "m.onnx" and recipe["report"] == "m.json"
    metadata = {p.key: p.value for p in onnx.load(merged).metadata_props}
    stored = yaml.safe_load(metadata["onnxmerge.recipe"])
    assert [m["path"] for m in stored["models"]] == ["resnet_a.onnx", "resnet_b.onnx"]  # no folders
    assert "output" not in stored


def test_run_reproduces_the_model_byte_for_byte_from_any_folder(merged, monkeypatch, capsys):
    expected = _sha(merged)
    report = json.loads(merged.with_suffix(".json").read_text())
    merged.unlink()
    recipe = Path(f"{merged}.recipe.yaml")
    before = recipe.read_bytes()
    monkeypatch.chdir(merged.parent.parent / "models")
    assert cli.main(["run", str(recipe)]) == 0
    assert _sha(merged) == expected
    assert recipe.read_bytes() == before  # the recipe being run is an input: never rewritten
    assert json.loads(merged.with_suffix(".json").read_text())["spaces"] == report["spaces"]
    assert "wrote" in capsys.readouterr().out


def test_a_hand_written_recipe_runs_and_records_its_own(folder, capsys):
    (folder / "mine.yaml").write_text("models: [models/resnet_a.onnx, models/resnet_b.onnx]\n"
                                      "calibration: calib.npz\nmethod: permute\noutput: mine.onnx\n")
    assert cli.main(["run", str(folder / "mine.yaml")]) == 0
    written = yaml.safe_load((folder / "mine.onnx.recipe.yaml").read_text())
    assert written["method"] == "permute" and written["output"] == "mine.onnx"
    first = _sha(folder / "mine.onnx")
    assert cli.main(["run", str(folder / "mine.onnx.recipe.yaml")]) == 0
    assert _sha(folder / "mine.onnx") == first


@pytest.mark.parametrize("text, words", [
    ("models: [models/resnet_a.onnx, models/resnet_b.onnx]\noutput: x.onnx\nmethd: zip\n", ":3: methd: unknown key"),
    ("models: [models/resnet_a.onnx, models/resnet_b.onnx]\noutput: x.onnx\nparameters:\n  alpha: fast\n",
     ":4: parameters.alpha: 'fast' is not a number"),
    ("models: [models/resnet_a.onnx, models/resnet_b.onnx]\noutput: x.onnx\nheads: many\n",
     ":3: heads: 'many' is not one of separate, shared"),
    ("models: [models/resnet_a.onnx, models/resnet_b.onnx]\noutput: x.onnx\noptions:\n  seed: 1.5\n",
     ":4: options.seed: 1.5 is not an integer"),
    ("models: models/resnet_a.onnx\noutput: x.onnx\n", ":1: models: list two or more model files"),
    ("models: [models/resnet_a.onnx, models/resnet_b.onnx]\n", "no output"),
    ("models: [models/resnet_a.onnx, {path: models/resnet_b.onnx, sha256: " + "ab" * 32 + "}]\noutput: x.onnx\n",
     "is not the file the recipe was written for"),
    ("models: [a.onnx\n", "not valid YAML"),
    ("- a\n- b\n", ":1: a recipe is a YAML mapping"),
])
def test_wrong_recipes_give_one_line_naming_line_and_key(folder, capsys, text, words):
    path = folder / "bad.yaml"
    path.write_text(text)
    assert cli.main(["run", str(path)]) == 1
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1, err
    assert not (folder / "x.onnx").exists()


def test_merge_refuses_a_recipe_path_that_is_an_input(folder, capsys):
    target = folder / "guarded.onnx.recipe.yaml"
    os.symlink(folder / "calib.npz", target)
    before = _sha(folder / "calib.npz")
    code = cli.main(["merge", str(folder / "models/resnet_a.onnx"), str(folder / "models/resnet_b.onnx"),
                     "--calib", str(folder / "calib.npz"), "-o", str(folder / "guarded.onnx")])
    assert code == 1 and "recipe" in capsys.readouterr().err
    assert _sha(folder / "calib.npz") == before and not (folder / "guarded.onnx").exists()


def test_the_json_schema_lists_the_keys_and_choices_the_reader_takes():
    from onnxmerge import recipe

    schema = json.loads((Path(__file__).resolve().parent.parent / "docs" / "recipe.schema.json").read_text())
    properties = schema["properties"]
    assert set(properties) == set(recipe._KEYS)
    assert set(properties["parameters"]["properties"]) == set(recipe.PARAMETERS)
    assert set(properties["options"]["properties"]) == set(recipe._OPTIONS)
    choices = recipe._choices()
    for name in ("heads", "repair", "align"):
        assert properties[name]["enum"] == list(choices[name])
    assert [m for m in properties["method"]["enum"] if m] == list(choices["method"])
    for name in ("bn", "provider"):
        assert properties["options"]["properties"][name]["enum"] == list(choices[name])


def test_a_same_base_merge_records_its_base_and_runs_again(folder, tmp_path):
    out = folder / "ta.onnx"
    a = str(folder / "models/resnet_a.onnx")
    assert cli.main(["merge", a, a, "--base", a, "--method", "ties", "--density", "0.5", "-o", str(out)]) == 0
    recipe = yaml.safe_load(Path(f"{out}.recipe.yaml").read_text())
    assert recipe["base"]["path"] == "models/resnet_a.onnx" and recipe["method"] == "ties"
    assert recipe["parameters"]["density"] == 0.5
    expected = _sha(out)
    out.unlink()
    assert cli.main(["run", f"{out}.recipe.yaml"]) == 0
    assert _sha(out) == expected


def test_an_out_of_range_value_names_the_recipe_line_and_key(folder, capsys):
    path = folder / "range.yaml"
    path.write_text("models: [models/resnet_a.onnx, models/resnet_b.onnx]\noutput: x.onnx\noptions:\n"
                    "  batch_size: -3\n")
    assert cli.main(["run", str(path)]) == 1
    err = capsys.readouterr().err
    assert ":4: options.batch_size: --batch-size -3 is out of range" in err and err.count("\n") == 1, err


def test_shard_files_merge_as_their_concatenation_and_their_recipe_reruns(folder, merged):
    """Three files holding the 64 samples of calib.npz: the same merged model as calib.npz gives
    (only the recipe, which names the files, differs), and a recipe listing them that re-runs."""
    samples = np.load(folder / "calib.npz")["input"]
    shards = [folder / f"shard{i}.npz" for i in range(3)]
    for path, part in zip(shards, np.split(samples, [20, 44])):
        np.savez(path, input=part)
    out = folder / "sharded"
    out.mkdir()
    assert cli.main(["merge", str(folder / "models/resnet_a.onnx"), str(folder / "models/resnet_b.onnx"),
                     "--calib", *map(str, shards), "--width", "1.5x", "--alpha", "0.4", "-o", str(out / "m.onnx")]) == 0
    mine, theirs = onnx.load(out / "m.onnx"), onnx.load(merged)
    assert mine.graph.SerializeToString() == theirs.graph.SerializeToString()
    metadata = [{p.key: p.value for p in model.metadata_props} for model in (mine, theirs)]
    assert [key for key in metadata[0] if metadata[0][key] != metadata[1].get(key)] == ["onnxmerge.recipe"]
    recipe = yaml.safe_load(Path(f"{out / 'm.onnx'}.recipe.yaml").read_text())
    assert recipe["calibration"] == [{"path": f"../{p.name}", "sha256": _sha(p)} for p in shards]
    expected = _sha(out / "m.onnx")
    (out / "m.onnx").unlink()
    assert cli.main(["run", f"{out / 'm.onnx'}.recipe.yaml"]) == 0
    assert _sha(out / "m.onnx") == expected
