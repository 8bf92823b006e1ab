"""Every recipe keeps the values docs/fidelity.yaml records as the paper's or the reference code's."""

from pathlib import Path
from typing import Any

import pytest
import yaml

from builders.build import load_recipe
from builders.recipe import RECIPES_DIR, Recipe, available_recipes, load_recipe_data

FIDELITY = Path(__file__).resolve().parents[1] / "docs" / "fidelity.yaml"
TABLE = yaml.safe_load(FIDELITY.read_text())["recipes"]
RECIPES = available_recipes()  # build recipes; the runners' specs (continual_*, nas_*) are not recipes


def value(recipe: Recipe, dotted: str) -> Any:
    """A recipe's effective value for a dotted key (eval.model / eval.augment as the build resolves them)."""
    head, _, rest = dotted.partition(".")
    if head == "params":
        return recipe.params[rest]
    if dotted == "eval.model":
        return recipe.eval_model
    if dotted == "eval.augment":
        return recipe.eval_augment
    if head == "eval":
        return getattr(recipe.eval, rest)
    return getattr(recipe, dotted)


def ipcs_of(path: Path) -> list[int]:
    data = load_recipe_data(path)
    return sorted({int(data.get("ipc", 1)), *(int(k) for k in (data.get("ipc_overrides") or {}))})


def test_every_recipe_has_an_entry_and_every_entry_a_recipe():
    assert sorted(TABLE) == RECIPES
    for name, entry in TABLE.items():
        assert ("source" in entry) != ("chosen_here" in entry), f"{name}: say either its source or that it is chosen here"
        assert entry.get("all") or entry.get("ipc"), f"{name}: no value to check"


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_keeps_the_papers_values(name):
    entry = TABLE[name]
    path = RECIPES_DIR / name
    defined = ipcs_of(path)
    per_ipc = {int(k): v for k, v in (entry.get("ipc") or {}).items()}
    assert set(per_ipc) <= set(defined), f"{name}: fidelity.yaml names ipcs {sorted(per_ipc)}, the recipe defines {defined}"
    wrong = []
    for ipc in defined:
        recipe = load_recipe(path, [("ipc", ipc)])
        for key, expected in {**(entry.get("all") or {}), **per_ipc.get(ipc, {})}.items():
            got = value(recipe, key)
            if got != expected:
                wrong.append(f"ipc {ipc} {key}: recipe {got!r}, paper/reference {expected!r}")
    assert not wrong, f"{name} departs from docs/fidelity.yaml:\n" + "\n".join(wrong)
