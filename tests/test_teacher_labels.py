"""TESLA's teacher labels (its --teacher_label): each iteration's soft labels are the target expert's."""

import pytest
import torch
from conftest import assert_resume_is_identical
from test_mtt import mtt_engine
from torch.func import functional_call

from builders.build import recipe_from_dict
from builders.methods import mtt as mtt_module
from builders.methods.mtt import TrajectoryMatching
from builders.recipe import RecipeError
from condensed_datasets.format import CondensedSet


def test_each_iteration_trains_on_the_target_experts_logits(fashion_mnist_root, tmp_path, expert_store, monkeypatch):
    e = mtt_engine(fashion_mnist_root, tmp_path, expert_store, teacher_label=True, memory="constant")
    seen = []
    real_loss = mtt_module.matching_loss

    def spy(traj, images, lr, labels, memory="unrolled"):
        net, params = traj.net, traj.layout.unflatten(traj.target)
        net.eval()
        expected = functional_call(net, params, (images.detach(),))  # the reference's label_net, eval mode
        net.train()
        seen.append((labels.clone(), expected.detach()))
        return real_loss(traj, images, lr, labels, memory)

    monkeypatch.setattr(mtt_module, "matching_loss", spy)
    e.run()
    assert len(seen) == 4
    for labels, expected in seen:
        assert labels.dtype == torch.float32 and labels.shape == (20, 10)
        torch.testing.assert_close(labels, expected)
    loaded = CondensedSet.load(e.paths.set)
    torch.testing.assert_close(loaded.soft_labels, seen[-1][0])  # evaluated with the last iteration's labels
    assert "TESLA" in loaded.metadata["build"]["method"]["soft_labels"]


def test_a_killed_teacher_label_build_resumes_to_the_same_bytes(fashion_mnist_root, tmp_path, expert_store, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    assert_resume_is_identical(lambda out: mtt_engine(fashion_mnist_root, out, expert_store, teacher_label=True),
                               tmp_path, 3)


def test_teacher_labels_are_for_mtt_only():
    assert TrajectoryMatching.defaults["teacher_label"] is False
    with pytest.raises(RecipeError, match="DATM learns its own soft labels"):
        recipe_from_dict({"source": "fashionmnist", "method": "datm", "ipc": 1, "params": {"teacher_label": True}})
