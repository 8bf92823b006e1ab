"""Feature extractors for selection: one of our networks or a pretrained torchvision model, their
embeddings (penultimate feature, last-layer loss gradient) and Grad-CAM saliency maps."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import get_model, get_model_weights, list_models

from builders.errors import RecipeError
from builders.networks import available_networks, build_network

TORCHVISION_PREFIX = "torchvision:"


def extractor_names() -> str:
    """What ``params.extractor`` accepts, for error messages."""
    return f"{', '.join(available_networks())}, or {TORCHVISION_PREFIX}<torchvision model name>"


def check_extractor(name: str, weights: str) -> None:
    """RecipeError unless ``name`` (and ``weights``, for a torchvision model) can be built; loads nothing."""
    if name.startswith(TORCHVISION_PREFIX):
        _torchvision_weights(name.removeprefix(TORCHVISION_PREFIX), weights)
    elif name not in available_networks():
        raise RecipeError(f"params.extractor: unknown {name!r}; valid: {extractor_names()}")
    elif weights:
        raise RecipeError(f"params.extractor_weights: {weights!r} applies to torchvision extractors "
                          f"({TORCHVISION_PREFIX}<name>), not to {name!r}; leave it empty")


def _torchvision_weights(model: str, weights: str):
    """The torchvision weights enum member named ``weights`` for ``model`` (None for no weights)."""
    if model not in list_models():
        raise RecipeError(f"params.extractor: torchvision has no model {model!r}; see torchvision.models.list_models()")
    if not weights:
        return None
    enum = get_model_weights(model)
    prefix, _, member = weights.rpartition(".")
    if prefix not in ("", enum.__name__) or member not in enum.__members__:
        raise RecipeError(f"params.extractor_weights: {weights!r} is not a weights enum of {model}; valid: "
                          f"{', '.join(f'{enum.__name__}.{m}' for m in enum.__members__)}")
    return enum[member]


class TorchvisionExtractor(nn.Module):
    """A torchvision classifier as an extractor: set-space images in, its penultimate feature out.

    Images are mapped back to [0, 1] pixels (grey images repeated to RGB), resized, and normalised as
    the weights expect; the model's last linear layer is replaced by a fresh one for our classes.
    """

    def __init__(self, body: nn.Module, in_features: int, num_classes: int, set_mean: torch.Tensor,
                 set_std: torch.Tensor, preprocess: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.body = body
        self.feature_dim = in_features
        self.classifier = nn.Linear(in_features, num_classes)
        self.register_buffer("set_mean", set_mean.view(1, -1, 1, 1).float())
        self.register_buffer("set_std", set_std.view(1, -1, 1, 1).float())
        self.preprocess = preprocess

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        pixels = x * self.set_std + self.set_mean
        if pixels.shape[1] == 1:
            pixels = pixels.expand(-1, 3, -1, -1)
        return self.body(self.preprocess(pixels)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


def _replace_last_linear(model: nn.Module) -> int:
    """Swap the model's last nn.Linear for an identity (so the model outputs its penultimate feature)."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise RecipeError("params.extractor: this torchvision model has no final linear layer to replace")
    parent_name, _, child = names[-1].rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    in_features = getattr(parent, child).in_features
    setattr(parent, child, nn.Identity())
    return in_features


def build_extractor(name: str, weights: str, resize: int, channels: int, num_classes: int, image_size: tuple[int, int],
                    mean: tuple[float, ...], std: tuple[float, ...], seed: int) -> nn.Module:
    """The extractor ``name``: one of ours (fresh, seeded), or ``torchvision:<model>`` with ``weights``
    loaded through torchvision (downloaded once into the torch hub cache, hash-checked) and a fresh,
    seeded classifier for ``num_classes``. ``resize`` > 0 resizes inputs to that square size; 0 uses the
    weights' own transforms (224-pixel crops for ImageNet weights)."""
    if not name.startswith(TORCHVISION_PREFIX):
        return build_network(name, channels, num_classes, image_size, seed=seed)

    model_name = name.removeprefix(TORCHVISION_PREFIX)
    enum = _torchvision_weights(model_name, weights)
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.default_generator.manual_seed(int(seed))
        try:
            body = get_model(model_name, weights=enum)
        except (OSError, RuntimeError) as exc:  # no network, or a broken download (hash mismatch)
            url = getattr(enum, "url", "?")
            raise RecipeError(
                f"params.extractor_weights: could not load {enum} ({exc}). torchvision downloads them from {url} "
                "into the torch hub cache ($TORCH_HOME/hub/checkpoints); download that file there on a machine "
                "with network access, or leave extractor_weights empty"
            ) from exc
        in_features = _replace_last_linear(body)
        net = TorchvisionExtractor(body, in_features, num_classes, torch.tensor(mean), torch.tensor(std),
                                   _preprocess(enum, resize))
    return net


def _preprocess(enum, resize: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """[0, 1] RGB pixels -> the model's input: the weights' transforms, or a resize to ``resize`` pixels."""
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    if enum is not None and resize == 0:
        return enum.transforms()
    transform = enum.transforms() if enum is not None else None
    mean = torch.tensor(transform.mean if transform is not None else imagenet[0]).view(1, 3, 1, 1)
    std = torch.tensor(transform.std if transform is not None else imagenet[1]).view(1, 3, 1, 1)
    size = resize or 224

    def prepare(pixels: torch.Tensor) -> torch.Tensor:
        pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return (pixels - mean.to(pixels.device)) / std.to(pixels.device)

    return prepare


# -- what an extractor gives --------------------------------------------------------------------------


def embeddings(net: nn.Module, rows: Callable[[torch.Tensor], torch.Tensor], positions: torch.Tensor,
               labels: torch.Tensor, batch: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate features ``e`` [n, D] and cross-entropy logit gradients ``dl/dz = softmax(z) - onehot(y)``
    [n, K] (the loss taken on the logits themselves) of the images at ``positions``."""
    net.eval()
    feats, grads = [], []
    with torch.no_grad():
        for chunk in positions.split(batch):
            e = net.embed(rows(chunk))
            z = net.classifier(e)
            y = labels[chunk.to(labels.device)]
            grads.append(torch.softmax(z, dim=1) - F.one_hot(y, z.shape[1]).to(z.dtype))
            feats.append(e)
    return torch.cat(feats), torch.cat(grads)


def gradcam(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Grad-CAM maps [N, H, W] for each image's own label, upsampled to the image size.

    The target layer is the last spatial (4-D, more than 1x1) activation the network computes.
    """
    net.eval()
    maps = []
    for start in range(0, images.shape[0], batch):
        x, y = images[start : start + batch], labels[start : start + batch]
        captured: list[torch.Tensor] = []

        def keep(_module, _inputs, output):
            if isinstance(output, torch.Tensor) and output.dim() == 4 and output.shape[2] * output.shape[3] > 1:
                captured.append(output)

        handles = [m.register_forward_hook(keep) for m in net.modules() if m is not net]
        try:
            with torch.enable_grad():
                x = x.detach().requires_grad_(True)  # so the activations carry grad even with frozen weights
                logits = net(x)
                if not captured:
                    raise RecipeError("params.patch_drop: the extractor computes no spatial map for Grad-CAM")
                act = captured[-1]
                (grad,) = torch.autograd.grad(logits.gather(1, y.view(-1, 1)).sum(), act)
        finally:
            for h in handles:
                h.remove()
        cam = F.relu((grad.mean(dim=(2, 3), keepdim=True) * act).sum(1, keepdim=True)).detach()
        maps.append(F.interpolate(cam, size=images.shape[2:], mode="bilinear", align_corners=False).squeeze(1))
    return torch.cat(maps)
