"""Build on demand: a missing set is built with the shipped recipe and read where the class looks."""

import os

import pytest

import builders.recipe
from condensed_datasets import CondensedFashionMNIST
from condensed_datasets.datasets import set_path

TINY_RANDOM = """\
source: fashionmnist
method: random
ipc: 10
model: ConvNetW32
real_per_class: 12
augment: none
eval: {runs: 1, epochs: 1, test_per_class: 2}
"""


@pytest.fixture
def root_with_fashion_mnist(fashion_mnist_root, tmp_path):
    os.symlink(fashion_mnist_root / "FashionMNIST", tmp_path / "FashionMNIST")
    return tmp_path


def test_build_true_builds_the_missing_set_with_the_shipped_recipe(root_with_fashion_mnist, tmp_path, monkeypatch):
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "random_fashionmnist.yaml").write_text(TINY_RANDOM)
    monkeypatch.setattr(builders.recipe, "RECIPES_DIR", recipes)
    root = root_with_fashion_mnist
    with pytest.raises(RuntimeError, match="build=True"):
        CondensedFashionMNIST(root, method="random", ipc=2)
    ds = CondensedFashionMNIST(root, method="random", ipc=2, build=True)
    assert set_path(root, "fashionmnist", "random", 2).is_file()
    assert len(ds) == 20 and ds.metadata["recipe"]["ipc"] == 2 and ds.metadata["evaluation"]["runs"] == 1
    again = CondensedFashionMNIST(root, method="random", ipc=2)  # now a plain local read
    assert again.targets == ds.targets


def test_build_true_without_a_shipped_recipe_names_the_shipped_ones(root_with_fashion_mnist, tmp_path, monkeypatch):
    monkeypatch.setattr(builders.recipe, "RECIPES_DIR", tmp_path / "empty")
    with pytest.raises(ValueError, match="no shipped recipe for method 'dm' on 'fashionmnist'"):
        CondensedFashionMNIST(root_with_fashion_mnist, method="dm", ipc=3, build=True)
