"""The engine on real Fashion-MNIST at tiny scale: builds, resume, NaN guard, reproducibility."""

import json

import pytest
import torch
from conftest import assert_resume_is_identical

from builders.build import recipe_from_dict
from builders.checkpoint import load_checkpoint
from builders.engine import BuildError, BuildPaths, Engine
from builders.methods.dm import DistributionMatching
from condensed_datasets.format import CondensedSet
from condensed_datasets.sources import load_split

TINY = {
    "source": "fashionmnist", "method": "dm", "ipc": 2, "model": "ConvNetW32", "seed": 3,
    "iterations": 6, "checkpoint_every": 2, "augment": "color_crop_cutout_flip_scale_rotate",
    "real_per_class": 12, "params": {"batch_real": 8},
    "eval": {"runs": 1, "epochs": 2, "test_per_class": 5},
}


def engine(root, out, evaluate=False, **changes):
    return Engine(recipe_from_dict({**TINY, **changes}), out_root=out, data_root=root, device="cpu",
                  evaluate=evaluate, progress=False)


@pytest.fixture
def reproducible(monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")


def test_dm_build_writes_an_evaluated_set_a_grid_a_log_and_a_checkpoint(fashion_mnist_root, tmp_path):
    e = engine(fashion_mnist_root, tmp_path, evaluate=True)
    cset = e.run()
    assert e.paths.set == tmp_path / "condensed" / "fashionmnist" / "dm_ipc2.safetensors"
    loaded = CondensedSet.load(e.paths.set)
    assert loaded.images.shape == (20, 1, 28, 28) and loaded.labels.tolist() == [c for c in range(10) for _ in (0, 1)]
    ev = loaded.metadata["evaluation"]
    assert ev["runs"] == 1 and len(ev["accuracies"]) == 1 and "improvement_over_random" in ev
    assert loaded.metadata["recipe"]["params"]["batch_real"] == 8 and loaded.metadata["seed"] == 3
    assert loaded.metadata["build"]["iterations"] == 6 and "wall_time_s" in loaded.metadata["build"]
    assert {"torch", "condensed_datasets"} <= set(loaded.metadata["versions"])
    assert e.paths.grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = [json.loads(l) for l in e.paths.log.read_text().splitlines()]
    assert [l["iteration"] for l in lines] == [1, 2, 3, 4, 5, 6] and all("loss" in l for l in lines)
    meta, _ = load_checkpoint(e.paths.checkpoint)
    assert meta["iteration"] == 6
    assert torch.equal(cset.images, loaded.images)


def test_same_recipe_and_seed_give_the_same_bytes(fashion_mnist_root, tmp_path, reproducible):
    a = engine(fashion_mnist_root, tmp_path / "a")
    b = engine(fashion_mnist_root, tmp_path / "b")
    a.run(), b.run()
    assert a.paths.set.read_bytes() == b.paths.set.read_bytes()
    c = engine(fashion_mnist_root, tmp_path / "c", seed=4)
    c.run()
    assert not torch.equal(CondensedSet.load(a.paths.set).images, CondensedSet.load(c.paths.set).images)


def test_a_killed_build_resumes_to_the_same_bytes(fashion_mnist_root, tmp_path, reproducible):
    killed = tmp_path / "part"

    def make(out):
        return engine(fashion_mnist_root, out)

    assert_resume_is_identical(make, tmp_path, 5)  # after the checkpoint at 4, before the one at 6
    assert load_checkpoint(BuildPaths.for_recipe(make(killed).recipe, killed).checkpoint)[0]["iteration"] == 6
    log = BuildPaths.for_recipe(make(killed).recipe, killed).log
    assert [json.loads(l)["iteration"] for l in log.read_text().splitlines()] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("method, params, augment", [
    ("dc", {"batch_real": 8}, "none"),
    ("dsa", {"batch_real": 8}, "color_crop_cutout_flip_scale_rotate"),
    ("dd", {"batch_real": 16}, "none"),
])
def test_every_method_resumes_to_the_same_bytes(fashion_mnist_root, tmp_path, reproducible, method, params, augment):
    def make(out):
        return engine(fashion_mnist_root, out, method=method, params=params, augment=augment, iterations=4)

    assert_resume_is_identical(make, tmp_path, 3)


def test_resume_refuses_a_checkpoint_of_another_recipe(fashion_mnist_root, tmp_path):
    first = engine(fashion_mnist_root, tmp_path)
    first.run()
    first.paths.set.unlink()  # as after a killed build: only the checkpoint is left (--resume never replaces a set)
    other = engine(fashion_mnist_root, tmp_path, params={"batch_real": 8, "lr_img": 2.0})
    other.resume = True
    with pytest.raises(BuildError, match="different recipe.*params"):
        other.run()


def test_nan_stops_the_build_and_keeps_the_last_good_checkpoint(fashion_mnist_root, tmp_path, monkeypatch):
    original = DistributionMatching.losses

    def poisoned(self, state, iteration):
        for loss in original(self, state, iteration):
            yield loss * float("nan") if iteration == 4 else loss

    monkeypatch.setattr(DistributionMatching, "losses", poisoned)
    e = engine(fashion_mnist_root, tmp_path)
    with pytest.raises(BuildError, match="NaN or inf at iteration 5.*last good checkpoint"):
        e.run()
    assert not e.paths.set.exists()
    meta, tensors = load_checkpoint(e.paths.checkpoint)
    assert meta["iteration"] == 4 and torch.isfinite(tensors["state.images"]).all()


@pytest.mark.parametrize("method", ["random", "herding", "kcenter"])
def test_coresets_store_real_rows_and_their_indices(fashion_mnist_root, tmp_path, method):
    params = {} if method == "random" else {"features": "network", "feature_epochs": 0}
    e = engine(fashion_mnist_root, tmp_path, method=method, iterations=0, params=params)
    cset = e.run()
    assert cset.indices is not None and cset.indices.shape == (20,)
    images, labels = load_split("fashionmnist", fashion_mnist_root, train=True)
    assert labels[cset.indices].tolist() == cset.labels.tolist()
    mean, std = 0.2861, 0.3530
    torch.testing.assert_close(cset.images, (images[cset.indices].float() / 255 - mean) / std)


def test_a_damaged_checkpoint_is_a_clear_error(fashion_mnist_root, tmp_path):
    e = engine(fashion_mnist_root, tmp_path)
    e.paths.checkpoint.parent.mkdir(parents=True)
    e.paths.checkpoint.write_bytes(b"\x80\x04not a checkpoint")
    e.resume = True
    with pytest.raises(BuildError, match="not a readable checkpoint"):
        e.run()


def test_periodic_evaluation_is_logged_and_does_not_change_the_result(fashion_mnist_root, tmp_path, reproducible):
    plain = engine(fashion_mnist_root, tmp_path / "plain")
    plain.run()
    watched = engine(fashion_mnist_root, tmp_path / "watched", eval={"runs": 1, "epochs": 1, "every": 3,
                                                                      "test_per_class": 2, "random_baseline": False})
    watched.evaluate = True
    cset = watched.run()
    evals = [json.loads(l) for l in watched.paths.log.read_text().splitlines() if "eval" in l]
    assert [e["iteration"] for e in evals] == [3] and "accuracy_mean" in evals[0]["eval"]
    assert torch.equal(cset.images, CondensedSet.load(plain.paths.set).images)


def test_a_finished_set_or_an_unfinished_checkpoint_is_never_replaced_silently(fashion_mnist_root, tmp_path):
    first = engine(fashion_mnist_root, tmp_path)
    first.run()
    before = first.paths.set.read_bytes()
    with pytest.raises(BuildError, match="already exists; pass --overwrite"):
        engine(fashion_mnist_root, tmp_path).run()
    assert first.paths.set.read_bytes() == before
    first.paths.set.unlink()  # as after a killed build: only the checkpoint is left
    with pytest.raises(BuildError, match="left a checkpoint.*--resume.*--overwrite"):
        engine(fashion_mnist_root, tmp_path).run()
    again = engine(fashion_mnist_root, tmp_path)
    again.overwrite = True
    again.run()
    assert again.paths.set.exists()


def test_a_compiled_dm_build_gives_the_same_bytes_and_resumes_to_them(fashion_mnist_root, tmp_path, reproducible):
    """params.compile (which auto turns on for long CPU builds): the same recipe and seed twice, and a build killed
    after its checkpoint and resumed, give one set, byte for byte."""
    compiled = {"batch_real": 8, "compile": True}
    a = engine(fashion_mnist_root, tmp_path / "a", params=compiled, iterations=4)
    b = engine(fashion_mnist_root, tmp_path / "b", params=compiled, iterations=4)
    a.run(), b.run()
    assert a.paths.set.read_bytes() == b.paths.set.read_bytes()
    assert CondensedSet.load(a.paths.set).metadata["build"]["method"]["compiled"] is True
    assert_resume_is_identical(lambda out: engine(fashion_mnist_root, out, params=compiled, iterations=4),
                               tmp_path / "resumed", 3)
