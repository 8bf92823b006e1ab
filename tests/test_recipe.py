"""Recipe validation: every mistake names the key and the valid choices."""

import pytest

from builders.build import load_recipe, recipe_from_dict
from builders.recipe import RECIPES_DIR, RecipeError, available_recipes, parse_overrides

BASE = {"source": "fashionmnist", "method": "dm", "ipc": 10}


def build(**changes):
    return recipe_from_dict({**BASE, **changes})


def test_defaults_are_filled_from_the_method():
    r = build()
    assert r.params == {"lr_img": 1.0, "momentum": 0.5, "batch_real": 256, "init": "real", "precision": "fp32",
                        "compile": "auto"}
    assert r.eval.runs == 5 and r.eval.epochs == 1000 and r.eval_model == "ConvNet"


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"iteratons": 5}, "unknown key in the recipe: 'iteratons' (did you mean 'iterations'?)"),
        ({"params": {"lr_im": 1.0}}, "did you mean 'lr_img'"),
        ({"params": {"lr_img": "big"}}, "params.lr_img: expected a number"),
        ({"eval": {"runz": 1}}, "unknown key in eval"),
        ({"eval": {"runs": 0}}, "eval.runs: must be >= 1"),
        ({"eval": {"compile": "yes"}}, "eval.compile: unknown 'yes'; valid: true, false, auto"),
        ({"eval": {"compile": 1}}, "eval.compile: expected a string, got 1"),
        ({"source": "imagenet"}, "source: unknown 'imagenet'; valid: mnist, fashionmnist"),
        ({"method": "magic"}, "method: unknown 'magic'; buildable methods:"),
        ({"model": "ConvNetX"}, "model: unknown network 'ConvNetX'; valid:"),
        ({"augment": "color_blur"}, "augment:"),
        ({"ipc": 0}, "ipc: must be >= 1"),
        ({"ipc": "ten"}, "ipc: expected an integer"),
        ({"real_per_class": 3}, "real_per_class: expected an integer >= ipc (10)"),
        ({"params": {"init": "zeros"}}, "params.init: unknown 'zeros'; valid: real, noise"),
        ({"seed": -1}, "seed: must be >= 0"),
        ({"seed": 2 ** 63 // 1000}, "seed: must be below 9223372036854775 (its evaluation's run seeds"),
    ],
)
def test_bad_values_name_the_key(changes, message):
    with pytest.raises(RecipeError) as err:
        build(**changes)
    assert message in str(err.value)


def test_missing_required_key():
    with pytest.raises(RecipeError, match="missing key 'ipc'"):
        recipe_from_dict({"source": "fashionmnist", "method": "dm"})


def test_ipc_overrides_apply_to_their_ipc_only():
    data = {**BASE, "iterations": 10, "ipc_overrides": {1: {"iterations": 99, "params": {"lr_img": 5.0}}}}
    assert recipe_from_dict({**data, "ipc": 1}).iterations == 99
    assert recipe_from_dict({**data, "ipc": 1}).params["lr_img"] == 5.0
    assert recipe_from_dict({**data, "ipc": 1}).params["batch_real"] == 256
    assert recipe_from_dict(data).iterations == 10


def test_dotted_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("source: fashionmnist\nmethod: dm\nipc: 10\n")
    r = load_recipe(path, parse_overrides(["eval.runs=1", "params.lr_img=10", "ipc=1"]))
    assert (r.eval.runs, r.params["lr_img"], r.ipc) == (1, 10.0, 1)
    with pytest.raises(RecipeError, match="expected KEY=VALUE"):
        parse_overrides(["eval.runs"])


def test_not_a_mapping_and_missing_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("- a list\n")
    with pytest.raises(RecipeError, match="a recipe is a YAML mapping"):
        load_recipe(path)
    with pytest.raises(RecipeError, match="no recipe at"):
        load_recipe(tmp_path / "missing.yaml")


@pytest.mark.parametrize("name", available_recipes())
def test_every_shipped_recipe_is_valid(name):
    r = load_recipe(RECIPES_DIR / name)
    assert name.startswith(r.method) or name == "quickstart.yaml"


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    # YAML 1.1 (PyYAML) reads 1e-5 as a string; a recipe or --set must still get the number.
    path = tmp_path / "r.yaml"
    path.write_text("source: fashionmnist\nmethod: dm\nipc: 10\nparams: {lr_img: 1e3}\n")
    r = load_recipe(path, parse_overrides(["params.momentum=5E-1"]))
    assert r.params["lr_img"] == 1000.0 and r.params["momentum"] == 0.5


def test_command_line_values_win_over_the_files_ipc_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("source: fashionmnist\nmethod: dm\nipc: 10\niterations: 10\n"
                    "ipc_overrides:\n  2:\n    iterations: 99\n    params:\n      lr_img: 5.0\n      momentum: 0.9\n")
    r = load_recipe(path, parse_overrides(["ipc=2", "params.lr_img=7", "iterations=3"]))
    assert (r.ipc, r.params["lr_img"], r.iterations) == (2, 7.0, 3)
    assert r.params["momentum"] == 0.9  # the file's override still applies where the command line is silent
    assert load_recipe(path, parse_overrides(["ipc=2"])).params["lr_img"] == 5.0


@pytest.mark.parametrize("value", [True, False, "auto"])
def test_eval_compile_takes_true_false_or_auto(value):
    assert build(eval={"compile": value}).eval.compile == value
    assert build().eval.compile == "auto"
