"""Networks trained together follow the trajectories they follow trained alone."""

import copy

import pytest
import torch

from builders.augment import Augmenter
from builders.ensemble import train_together, use_together
from builders.evaluate import TrainSettings, label_loss, train_network
from builders.networks import build_network


def _data(n=16, size=12):
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 1, size, size, generator=g), torch.arange(n) % 10


@pytest.mark.parametrize("model, augment", [("ConvNetW32", "color_crop_cutout_flip_scale_rotate"), ("MLP", "none")])
def test_a_network_trained_together_follows_its_trajectory_alone(model, augment):
    images, targets = _data()
    settings = TrainSettings(epochs=3, lr=0.01, batch=8,
                             augmenter=Augmenter(augment) if augment != "none" else None)
    seeds = [11, 12, 13]
    nets = [build_network(model, 1, 10, (12, 12), seed=s) for s in seeds]
    alone = [copy.deepcopy(n) for n in nets]
    train_together(nets, images, targets, settings, [torch.Generator().manual_seed(s) for s in seeds], label_loss)
    for net, single, s in zip(nets, alone, seeds):
        before = copy.deepcopy(single.state_dict())
        train_network(single, images, targets, settings, torch.Generator().manual_seed(s))
        moved = max((single.state_dict()[k] - before[k]).abs().max().item() for k in before)
        assert moved > 1e-3  # 6 steps changed the weights: the comparison below is not vacuous
        for (name, got), want in zip(net.state_dict().items(), single.state_dict().values()):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)


def test_batchnorm_networks_are_refused():
    images, targets = _data()
    nets = [build_network("ConvNetBN", 1, 10, (12, 12), seed=s) for s in (1, 2)]
    with pytest.raises(ValueError, match="BatchNorm"):
        train_together(nets, images, targets, TrainSettings(epochs=1), [torch.Generator() for _ in nets], label_loss)


def test_together_is_the_default_on_cuda_only():
    assert use_together(torch.device("cuda"), 5) and not use_together(torch.device("cpu"), 5)
    assert not use_together(torch.device("cuda"), 1)



def test_evaluation_trained_together_gives_the_accuracies_of_one_by_one():
    from builders.data import RealData
    from builders.evaluate import evaluate_images
    from condensed_datasets.sources import get_source

    g = torch.Generator().manual_seed(5)
    test = RealData(torch.randint(0, 256, (30, 1, 12, 12), generator=g, dtype=torch.uint8),
                    torch.arange(30) % 10, get_source("fashionmnist"))
    images, targets = _data()
    settings = TrainSettings(epochs=2, batch=8)
    args = {"model": "ConvNetW32", "settings": settings, "test": test, "seeds": [1, 2]}
    assert evaluate_images(images, targets, together=True, **args) == evaluate_images(images, targets,
                                                                                      together=False, **args)
