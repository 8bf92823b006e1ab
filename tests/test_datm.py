"""DATM: the start-epoch window, soft-label initialisation, correct-image init and a tiny build."""

import json

import pytest
import torch
from conftest import assert_resume_is_identical

from builders.build import recipe_from_dict
from builders.engine import Engine
from builders.experts import ExpertStoreError
from builders.methods.datm import (
    DifficultyAlignedTrajectoryMatching,
    average_correct_logits,
    pick_correct,
    start_epoch_window,
)
from builders.recipe import RecipeError
from condensed_datasets import CondensedFashionMNIST
from condensed_datasets.format import CondensedSet

# -- pure pieces -----------------------------------------------------------------------------------


def window(it, sequential=True):
    return start_epoch_window(it, min_start_epoch=2, max_start_epoch=20, current_max_start_epoch=10,
                              expansion_end_epoch=1000, sequential_generation=sequential)


def test_window_rises_linearly_to_max_start_epoch_with_sequential_generation():
    assert window(0) == (2, 10)
    assert window(499) == (2, 14)  # 10 + floor(10 * 499 / 1000)
    assert window(500) == (2, 15)
    assert window(999) == (2, 19)
    assert window(1000) == (2, 20)
    assert window(5000) == (2, 20)  # never beyond max_start_epoch
    assert [window(it)[1] for it in range(0, 1001, 100)] == list(range(10, 21))
    assert window(0, sequential=False) == window(700, sequential=False) == (2, 20)


def test_soft_labels_average_the_logits_of_the_experts_that_are_right():
    logits = torch.tensor([
        [[3.0, 0.0], [0.0, 1.0], [5.0, 0.0]],  # expert 0: predicts 0, 1, 0
        [[1.0, 2.0], [0.0, 3.0], [4.0, 1.0]],  # expert 1: predicts 1, 1, 0
        [[2.0, 1.0], [2.0, 0.0], [6.0, 2.0]],  # expert 2: predicts 0, 0, 0
    ])
    labels = torch.tensor([0, 1, 1])
    out = average_correct_logits(logits, labels)
    torch.testing.assert_close(out[0], torch.tensor([2.5, 0.5]))  # experts 0 and 2
    torch.testing.assert_close(out[1], torch.tensor([0.0, 2.0]))  # experts 0 and 1
    torch.testing.assert_close(out[2], torch.tensor([5.0, 1.0]))  # nobody right: mean of all
    with pytest.raises(ValueError, match="expected logits"):
        average_correct_logits(logits[0], labels)


def test_pick_correct_keeps_order_and_skips_taken_ones():
    order = torch.tensor([7, 3, 9, 1, 4])
    correct = torch.tensor([True, False, True, True, True])
    assert pick_correct(order, correct, 2, set()) == [7, 9]
    assert pick_correct(order, correct, 3, {9}) == [7, 1, 4]


def test_recipe_checks_the_window():
    base = {"source": "fashionmnist", "method": "datm", "ipc": 1}
    with pytest.raises(RecipeError, match="current_max_start_epoch"):
        recipe_from_dict({**base, "params": {"current_max_start_epoch": 30, "max_start_epoch": 20}})
    with pytest.raises(RecipeError, match="min_start_epoch"):
        recipe_from_dict({**base, "params": {"min_start_epoch": 20, "max_start_epoch": 20}})
    with pytest.raises(RecipeError, match="params.init"):
        recipe_from_dict({**base, "params": {"init": "best"}})
    recipe_from_dict({**base, "params": {"sequential_generation": False, "min_start_epoch": 5, "max_start_epoch": 9,
                                         "current_max_start_epoch": 0}})


# -- builds ----------------------------------------------------------------------------------------

DATM = {
    "source": "fashionmnist", "method": "datm", "ipc": 2, "model": "ConvNetW32", "seed": 4,
    "real_per_class": 10, "iterations": 3, "augment": "color_crop_cutout_flip_scale_rotate",
    "params": {"syn_steps": 3, "expert_epochs": 1, "min_start_epoch": 0, "current_max_start_epoch": 1,
               "max_start_epoch": 2, "expansion_end_epoch": 2, "batch_syn": 10, "lr_img": 10.0, "lr_lr": 1e-6,
               "lr_y": 2.0, "expert_optimizer": "sgd"},  # the shared test store holds SGD experts
    "eval": {"runs": 1, "epochs": 2, "test_per_class": 10},
}


def datm_engine(root, out, store, **params):
    recipe = recipe_from_dict({**DATM, "params": {**DATM["params"], "expert_dir": str(store.path), **params}})
    return Engine(recipe, out_root=out, data_root=root, device="cpu", progress=False, evaluate=False)


def test_a_killed_datm_build_resumes_to_the_same_bytes(fashion_mnist_root, tmp_path, expert_store, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    extra = {"iterations": 4, "checkpoint_every": 2}

    def make(out):
        recipe = recipe_from_dict({**DATM, **extra, "params": {**DATM["params"], "expert_dir": str(expert_store.path)}})
        return Engine(recipe, out_root=out, data_root=fashion_mnist_root, device="cpu", progress=False, evaluate=False)

    assert_resume_is_identical(make, tmp_path, 3)


def test_initial_images_are_ones_the_experts_classify_correctly(fashion_mnist_root, tmp_path, expert_store):
    e = datm_engine(fashion_mnist_root, tmp_path, expert_store)
    method = DifficultyAlignedTrajectoryMatching(e._context())
    state = method.initial_state()
    images, soft = state["images"].detach(), state["soft_labels"].detach()
    assert soft.shape == (20, 10) and state["soft_labels"].requires_grad
    assert method.filled_without_correct == 0  # these experts (~55 %) get 2 of 10 images per class right
    verdicts = torch.stack([method._logits(method._final_params(k), images).argmax(1) for k in range(2)])
    assert (verdicts == method.labels).any(0).all()  # each image: some expert gets it right
    assert (soft.argmax(1) == method.labels).all()  # so its soft label starts on its class
    # They are real images of their class.
    real = method.ctx.real
    for c in range(10):
        pool = real.rows(real.class_indices[c])
        for img in images[2 * c : 2 * c + 2]:
            assert any(torch.equal(img, p) for p in pool)


def test_datm_build_learns_soft_labels_and_a_step_size(fashion_mnist_root, tmp_path, expert_store):
    e = datm_engine(fashion_mnist_root, tmp_path, expert_store, memory="constant")
    start = DifficultyAlignedTrajectoryMatching(datm_engine(fashion_mnist_root, tmp_path / "x", expert_store)
                                                ._context()).initial_state()["soft_labels"].detach()
    cset = e.run()
    loaded = CondensedSet.load(e.paths.set)
    assert loaded.soft_labels.shape == (20, 10) and loaded.lr.shape == () and loaded.lr.item() > 0
    assert not torch.allclose(loaded.soft_labels, start)  # the labels were trained
    assert loaded.metadata["build"]["method"]["memory"] == "constant"
    losses = [json.loads(l)["loss"] for l in e.paths.log.read_text().splitlines()]
    assert len(losses) == 3 and all(v > 0 for v in losses)
    ds = CondensedFashionMNIST(tmp_path, method="datm", ipc=2)
    assert ds.target_type == "soft"
    torch.testing.assert_close(ds[0][1], torch.softmax(cset.soft_labels[0], 0))


def test_iterations_over_the_threshold_take_no_step(fashion_mnist_root, tmp_path, expert_store):
    e = datm_engine(fashion_mnist_root, tmp_path, expert_store, threshold=1e-9)
    method = DifficultyAlignedTrajectoryMatching(e._context())
    state = method.initial_state()
    assert list(method.losses(state, 0)) == []
    with pytest.raises(ExpertStoreError, match="reaches epoch 4"):
        datm_engine(fashion_mnist_root, tmp_path, expert_store, max_start_epoch=4).run()  # needs epoch 4 of 3


def test_labels_start_as_the_reference_pairs_them_with_the_initial_images(fashion_mnist_root, tmp_path, expert_store):
    """distill/DATM.py: pix_init samples_predicted_correctly -> averaged correct logits; pix_init real ->
    the logits of one expert's final parameters."""
    real_init = DifficultyAlignedTrajectoryMatching(datm_engine(fashion_mnist_root, tmp_path, expert_store,
                                                                init="real")._context())
    assert real_init.label_scheme() == "one_expert"
    state = real_init.initial_state()
    images = state["images"].detach()
    torch.testing.assert_close(state["soft_labels"].detach(),
                               real_init._logits(real_init._final_params(0), images).float())
    correct = DifficultyAlignedTrajectoryMatching(datm_engine(fashion_mnist_root, tmp_path / "c", expert_store)._context())
    assert correct.label_scheme() == "average_correct"
    forced = DifficultyAlignedTrajectoryMatching(datm_engine(fashion_mnist_root, tmp_path / "f", expert_store,
                                                             init="real", label_init="average_correct")._context())
    assert forced.label_scheme() == "average_correct"


def test_datm_needs_gsam_experts_by_default(fashion_mnist_root, tmp_path, expert_store):
    from builders.experts import ExpertStoreError

    engine = datm_engine(fashion_mnist_root, tmp_path, expert_store, expert_optimizer="gsam")
    with pytest.raises(ExpertStoreError, match="needs gsam.*params.optimizer=gsam"):
        DifficultyAlignedTrajectoryMatching(engine._context())
    assert recipe_from_dict({"source": "fashionmnist", "method": "datm", "ipc": 1}).params["expert_optimizer"] == "gsam"
