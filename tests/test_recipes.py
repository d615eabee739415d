"""Condition recipes: every bundled recipe loads and builds; schema errors teach."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from difftune_control.extractors import available_extractors, available_recipes, build_extractor, load_recipe
from difftune_control.extractors.recipes import ConditionRecipe, recipe_dirs

REPO = Path(__file__).resolve().parents[1]
CONDITIONS = ["canny", "depth", "normal", "segmentation", "sketch"]


def test_every_condition_has_a_bundled_recipe():
    assert sorted(available_recipes()) == CONDITIONS
    assert set(CONDITIONS) <= set(available_extractors())


@pytest.mark.parametrize("name", CONDITIONS)
def test_bundled_recipe_loads_and_builds_real_and_toy_extractors(name):
    recipe = load_recipe(name)
    assert isinstance(recipe, ConditionRecipe) and recipe.name == name and recipe.description
    assert recipe.detector["threshold"] == 0.3 and recipe.detector["patience"] == 2
    assert recipe.metric["name"]
    assert recipe.backend in available_extractors()[name]
    assert recipe.toy_backend in available_extractors()[name]
    assert recipe.toy_hint_column == {
        "depth": "depth",
        "normal": "normal",
        "segmentation": "segmentation",
    }.get(name)
    real = build_extractor(recipe, resolution=64, device="cpu")
    toy = build_extractor(name, resolution=64, device="cpu", toy=True)
    assert (real.name, real.backend, real.resolution) == (name, recipe.backend, 64)
    assert (toy.name, toy.backend) == (name, recipe.toy_backend)
    for key, value in recipe.params.items():
        assert real.params[key] == value
    json.dumps(recipe.to_dict())  # goes into the run's config.json


def test_toy_params_apply_to_the_toy_backend_only():
    recipe = load_recipe("sketch")
    assert recipe.backend == recipe.toy_backend == "xdog"
    assert recipe.params["sigma"] != recipe.toy_params["sigma"]
    assert build_extractor(recipe).params["sigma"] == recipe.params["sigma"]
    assert build_extractor(recipe, toy=True).params["sigma"] == recipe.toy_params["sigma"]
    assert build_extractor(recipe, toy=True, sigma=2.5).params["sigma"] == 2.5


def test_backend_override_starts_from_that_backends_defaults():
    ext = build_extractor("sketch", backend="pidinet", model="/weights/Annotators")
    assert ext.backend == "pidinet" and ext.model_source == "/weights/Annotators"
    with pytest.raises(ValueError, match="available: xdog, hed, lineart, pidinet"):
        build_extractor("sketch", backend="charcoal")


def test_unknown_condition_lists_recipes_and_mentions_paths():
    with pytest.raises(
        ValueError, match=r"bundled recipes: canny, depth, normal, segmentation, sketch.*\.toml"
    ):
        load_recipe("dept")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_recipe("recipes/missing.toml")


def test_recipe_from_a_path_toml_and_yaml(tmp_path):
    toml = tmp_path / "soft_edges.toml"
    toml.write_text(
        'name = "sketch"\ndescription = "soft"\n[extractor]\nbackend = "xdog"\nparams = { sigma = 2.0 }\n'
        '[metric]\nname = "ssim"\n[detector]\nthreshold = 0.4\npatience = 3\n'
    )
    recipe = load_recipe(toml)
    assert recipe.path == str(toml) and recipe.detector["patience"] == 3
    assert build_extractor(recipe).params["sigma"] == 2.0
    yaml = tmp_path / "edges.yaml"
    yaml.write_text("name: canny\nextractor:\n  backend: opencv\nmetric:\n  name: edge_f1\n")
    assert load_recipe(str(yaml)).backend == "opencv"
    assert load_recipe(recipe) is recipe


def test_invalid_recipe_reports_every_problem_at_once(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(
        'name = "depth"\ncolour = "red"\ntoy_backend = "blender"\n[extractor]\nbackend = "dpt"\n'
        'params = { modle = "x" }\n[detector]\nthreshold = 1.5\npatience = 0\n'
    )
    with pytest.raises(ValueError) as err:
        load_recipe(bad)
    message = str(err.value)
    for expected in (
        "unknown key(s) ['colour']",
        "toy_backend: unknown backend 'blender'",
        "unknown parameter(s) ['modle']",
        "threshold must be a number in (0, 1)",
        "patience must be an int >= 1",
        "[metric] must be a table",
    ):
        assert expected in message, expected
    broken = tmp_path / "broken.toml"
    broken.write_text("name = \n")
    with pytest.raises(ValueError, match="cannot parse recipe"):
        load_recipe(broken)


def test_recipes_are_searched_where_the_wheel_puts_them():
    import tomllib

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    force_include = pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["force-include"]
    installed = REPO / force_include["conditions"]
    assert installed in recipe_dirs() and REPO / "conditions" in recipe_dirs()


def test_recipes_are_read_only_but_copy_and_serialise_like_dicts():
    import copy
    import dataclasses
    import pickle

    recipe = load_recipe("normal")
    with pytest.raises(TypeError, match="read-only"):
        recipe.params["a"] = 1
    with pytest.raises(TypeError, match="read-only"):
        recipe.params["depth_params"]["model"] = "elsewhere"
    assert copy.deepcopy(recipe) == recipe == pickle.loads(pickle.dumps(recipe))
    as_json = json.loads(json.dumps(dataclasses.asdict(recipe)))
    assert as_json["params"]["depth_params"] == {"model": "Intel/dpt-hybrid-midas"}
    assert as_json == json.loads(json.dumps(recipe.to_dict()))
