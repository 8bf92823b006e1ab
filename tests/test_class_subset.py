"""Sets of a class subset: the format's class_subset, the recipe key classes, real data of those classes only."""

import pytest
import torch

from builders.build import recipe_from_dict
from builders.data import RealData
from builders.recipe import RecipeError
from condensed_datasets.format import CondensedSet, CondensedSetError
from condensed_datasets.paths import subset_set_path
from condensed_datasets.sources import load_split


def _subset_set(subset, ipc=2, **meta):
    k = len(subset)
    return CondensedSet(torch.zeros(k * ipc, 1, 28, 28), torch.arange(k).repeat_interleave(ipc),
                        source="fashionmnist", method="random", ipc=ipc, metadata={"class_subset": subset, **meta})


def test_a_subset_set_is_named_by_its_source_classes_and_round_trips():
    cset = _subset_set([7, 3])
    assert cset.classes == ["Sneaker", "Dress"]
    assert cset.source_classes == [7, 3]
    again = CondensedSet.from_bytes(cset.to_bytes())
    assert again.metadata["class_subset"] == [7, 3] and again.classes == ["Sneaker", "Dress"]


def test_a_whole_source_set_has_every_class_as_its_source_classes(make_set, tmp_path):
    cset = CondensedSet.load(make_set(tmp_path, "fashionmnist"))
    assert "class_subset" not in cset.metadata
    assert cset.source_classes == list(range(10))


@pytest.mark.parametrize("subset, classes, message", [
    ([3, 3], None, "lists a class twice"),
    ([3, 10], None, "has index 10"),
    ([3, 7], ["Dress", "Shirt"], "not the names of the source classes"),
    ([3], ["Dress", "Sneaker"], "has 1 classes but 'classes' names 2"),
    ("3,7", ["Dress", "Sneaker"], "must be a non-empty list"),
])
def test_a_bad_class_subset_is_refused(subset, classes, message):
    meta = {"class_subset": subset, **({"classes": classes} if classes else {})}
    with pytest.raises(CondensedSetError, match=message):
        CondensedSet(torch.zeros(4, 1, 28, 28), torch.tensor([0, 0, 1, 1]), source="fashionmnist",
                     method="random", ipc=2, metadata=meta)


def test_the_recipe_key_classes_is_checked_and_recorded_only_when_set():
    base = {"source": "fashionmnist", "method": "random", "ipc": 1}
    assert "classes" not in recipe_from_dict(base).to_dict()
    assert recipe_from_dict({**base, "classes": [4, 1]}).to_dict()["classes"] == [4, 1]
    for bad in ([], [1, 1], [10], ["a"], 3, [True]):
        with pytest.raises(RecipeError, match="classes"):
            recipe_from_dict({**base, "classes": bad})


def test_subset_paths_encode_the_classes_in_label_order(tmp_path):
    path = subset_set_path(tmp_path, "FashionMNIST", "dm", 10, [7, 3])
    assert path == tmp_path / "condensed" / "fashionmnist" / "classes" / "dm_ipc10_c7-3.safetensors"
    for bad in ([], [3, 3], [10], [-1]):
        with pytest.raises(ValueError, match="classes"):
            subset_set_path(tmp_path, "fashionmnist", "dm", 10, bad, num_classes=10)
    with pytest.raises(ValueError, match="method"):
        subset_set_path(tmp_path, "fashionmnist", "../dm", 10, [1])


def test_real_data_of_a_class_subset_holds_only_those_classes_relabelled(fashion_mnist_root):
    real = RealData.from_source("fashionmnist", fashion_mnist_root, train=False, classes=[7, 3], per_class=5)
    _, source_labels = load_split("fashionmnist", fashion_mnist_root, train=False)
    assert real.num_classes == 2 and list(real.info.classes) == ["Sneaker", "Dress"]
    held = source_labels[real.source_rows]
    assert sorted(held.tolist()) == [3] * 5 + [7] * 5
    assert torch.equal(real.labels, (held == 3).to(torch.int64))  # Sneaker -> 0, Dress -> 1
