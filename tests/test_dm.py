"""DM's loss: the hand computation, the gradient path, and a real iteration."""

import torch
from torch import nn

from builders.build import recipe_from_dict
from builders.data import RealData
from builders.methods.base import BuildContext
from builders.methods.dm import DistributionMatching, mean_embedding_loss
from condensed_datasets.sources import get_source


def test_mean_embedding_loss_by_hand():
    real = torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.0, 0.0], [2.0, 2.0]])
    syn = torch.tensor([[1.0, 1.0], [0.0, 2.0]])
    # class means: real (2,3) and (1,1); synthetic (1,1) and (0,2); squared gaps 1+4 and 1+1.
    assert mean_embedding_loss(real, [2, 2], syn, [1, 1]).item() == 7.0


class LinearEmbed(nn.Module):
    """A tiny 'network' whose embedding is a fixed linear map of the pixels."""

    def __init__(self, weight):
        super().__init__()
        self.weight = nn.Parameter(weight)

    def embed(self, x):
        return x.flatten(1) @ self.weight

    def forward(self, x):
        return self.embed(x)


def _tiny_context(ipc=2, per_class=3, augment="none"):
    info = get_source("fashionmnist")
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (10 * per_class, 1, 8, 8), generator=g, dtype=torch.uint8)
    labels = torch.arange(10).repeat_interleave(per_class)
    real = RealData(images, labels, info)
    recipe = recipe_from_dict({"source": "fashionmnist", "method": "dm", "ipc": ipc, "augment": augment,
                               "params": {"batch_real": 256}})
    return BuildContext(recipe, real, torch.device("cpu"), torch.Generator().manual_seed(1)), real


def test_dm_iteration_loss_equals_hand_computation_on_a_linear_net():
    ctx, real = _tiny_context()
    weight = torch.randn(64, 3, generator=torch.Generator().manual_seed(2))
    ctx.new_network = lambda name=None: LinearEmbed(weight.clone())
    method = DistributionMatching(ctx)
    state = method.initial_state()
    loss = next(iter(method.losses(state, 0)))
    # batch_real 256 > 3 images per class: every real image of a class is in its batch.
    expected = torch.zeros(())
    for c in range(10):
        real_mean = (real.rows(real.class_indices[c]).flatten(1) @ weight).mean(0)
        syn_mean = (state["images"][2 * c : 2 * c + 2].detach().flatten(1) @ weight).mean(0)
        expected = expected + ((real_mean - syn_mean) ** 2).sum()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert state["images"].grad is not None and state["images"].grad.abs().sum() > 0
    assert weight.grad is None  # the real side and the net take no gradient


def test_dm_with_a_convnet_and_dsa_gives_gradients_to_every_image():
    ctx, _ = _tiny_context(augment="color_crop_cutout_flip_scale_rotate")
    ctx.recipe.model = "ConvNetW32"
    method = DistributionMatching(ctx)
    state = method.initial_state()
    loss = next(iter(method.losses(state, 0)))
    loss.backward()
    grad = state["images"].grad
    assert torch.isfinite(loss) and loss.item() > 0
    assert (grad.flatten(1).abs().sum(1) > 0).all()


def test_dm_initial_images_are_real_images_of_their_class():
    ctx, real = _tiny_context()
    method = DistributionMatching(ctx)
    images = method.initial_state()["images"].detach()
    for c in range(10):
        pool = real.rows(real.class_indices[c])
        for img in images[2 * c : 2 * c + 2]:
            assert any(torch.equal(img, p) for p in pool)
