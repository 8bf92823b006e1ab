"""DQ: Dataset Quantization (Zhou et al., ICCV 2023), a one-shot selection of real images.

Per class: embed every image with an extractor trained briefly on the source, split the class into
``bins`` non-overlapping bins by greedy GraphCut (:mod:`builders.graphcut`), and sample the same share of
every bin uniformly at random. Optionally (``patch_drop`` > 0) keep only each chosen image's most salient
patches (Grad-CAM of the extractor); the set then stores the kept patches and a mask, and a pretrained MAE
can refill the rest at load (:mod:`condensed_datasets.mae_refill`).
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from builders.errors import RecipeError
from builders.evaluate import TrainSettings, train_network
from builders.extractor import build_extractor, check_extractor, embeddings, gradcam
from builders.graphcut import CosineSimilarity, bin_sizes, graphcut_bins
from builders.methods.base import Method, SetContents, draw_seed
from builders.recipe import check_at_least, check_choice
from builders.registry import register
from condensed_datasets.pixel_storage import expand_mask, patch_grid

EMBEDDINGS = ("gradient", "feature")


def round_half_up(value: Fraction) -> int:
    """Nearest integer, halves rounded up (never to even: 12.5% must stay 12.5%)."""
    return math.floor(value + Fraction(1, 2))


def ipc_from_fraction(fraction: float, num_images: int, num_classes: int) -> int:
    """Images per class that keep ``fraction`` of a split of ``num_images`` images in ``num_classes`` classes."""
    return round_half_up(Fraction(str(fraction)) * num_images / num_classes)


def per_bin_counts(sizes: list[int], total: int) -> list[int]:
    """Split ``total`` picks over bins of ``sizes`` in proportion to their sizes (the same share of each):
    floors of the exact quotas, the rest one each to the largest remainders (earlier bins on ties)."""
    n = sum(sizes)
    if total > n:
        raise ValueError(f"cannot sample {total} of {n} images")
    quotas = [Fraction(total * s, n) for s in sizes]
    counts = [math.floor(q) for q in quotas]
    order = sorted(range(len(sizes)), key=lambda b: (-(quotas[b] - counts[b]), b))
    for b in order[: total - sum(counts)]:
        counts[b] += 1
    return counts


def sample_bins(bins: list[torch.Tensor], total: int, generator: torch.Generator) -> torch.Tensor:
    """``total`` rows drawn uniformly without replacement, the same share from every bin, in bin order."""
    counts = per_bin_counts([len(b) for b in bins], total)
    return torch.cat([b[torch.randperm(len(b), generator=generator)[:k]] for b, k in zip(bins, counts)])


def auto_patch_size(height: int, width: int) -> int:
    """The largest patch size dividing both sides with at least 14 patches a side (an MAE's 14x14 grid at
    28 pixels; 2 at 32, 4 at 64), or 1."""
    for p in range(min(height, width) // 14, 0, -1):
        if height % p == 0 and width % p == 0:
            return p
    return 1


def kept_patches(num_patches: int, drop: float) -> int:
    """Patches kept when ``drop`` of ``num_patches`` are dropped: ``floor(L * (1 - drop))``, as the reference."""
    return math.floor(num_patches * (1 - Fraction(str(drop))))


def top_patch_mask(saliency: torch.Tensor, patch_size: int, keep: int) -> torch.Tensor:
    """bool [N, rows, cols]: each image's ``keep`` patches of highest mean saliency (earlier patches on ties)."""
    scores = F.avg_pool2d(saliency.unsqueeze(1), patch_size).flatten(1)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :keep]
    mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, order, True)
    rows, cols = saliency.shape[1] // patch_size, saliency.shape[2] // patch_size
    return mask.view(-1, rows, cols)


@register
class DatasetQuantization(Method):
    """Dataset Quantization: GraphCut bins per class, the same share sampled from each, optional patch drop."""

    name: ClassVar[str] = "dq"
    iterative: ClassVar[bool] = False
    defaults: ClassVar[dict[str, Any]] = {
        "embedding": "gradient",  # "gradient": [dl/dz, e (x) dl/dz] (the reference); "feature": e
        "extractor": "ResNet18BN",  # one of ours, or "torchvision:<model>" (with extractor_weights)
        "extractor_weights": "",  # torchvision weights enum, e.g. "ResNet18_Weights.IMAGENET1K_V1"
        "extractor_resize": 0,  # torchvision extractors: input size; 0: the weights' own transforms
        "extractor_epochs": 10,  # trained this many epochs on the real split first (the paper: 10)
        "extractor_lr": 0.1,
        "extractor_batch": 128,
        "bins": 10,
        "fraction": 0.0,  # share of the train split to keep; 0: derived from ipc
        "lam": 1.0,  # GraphCut's lambda
        "patch_drop": 0.0,  # share of each image's patches to drop (0: no patch stage)
        "patch_size": 0,  # 0: auto (14+ patches a side)
        "similarity_memory_mb": 1024,  # dense n x n similarities up to this size, chunked beyond
    }

    @classmethod
    def check_recipe(cls, recipe) -> None:
        p = recipe.params
        check_choice("embedding", p["embedding"], EMBEDDINGS)
        check_extractor(p["extractor"], p["extractor_weights"])
        check_at_least(p, ("bins", "extractor_batch", "similarity_memory_mb"), 1)
        check_at_least(p, ("extractor_epochs", "extractor_resize", "patch_size"), 0)
        check_at_least(p, ("lam",), 0.0, strict=True)
        check_at_least(p, ("extractor_lr",), 0.0)
        if not 0.0 <= p["fraction"] <= 1.0:
            raise RecipeError(f"params.fraction: must be in [0, 1] (0: derived from ipc), got {p['fraction']}")
        if not 0.0 <= p["patch_drop"] <= 0.9:
            raise RecipeError(f"params.patch_drop: must be in [0, 0.9], got {p['patch_drop']}")

    # -- the stages ------------------------------------------------------------------------------
    def _extractor(self):
        ctx, p = self.ctx, self.params
        c, h, w = ctx.real.image_shape
        net = build_extractor(p["extractor"], p["extractor_weights"], p["extractor_resize"], c, ctx.num_classes,
                              (h, w), ctx.real.info.mean, ctx.real.info.std, draw_seed(ctx.generator)).to(ctx.device)
        if p["extractor_epochs"] > 0:
            settings = TrainSettings(epochs=p["extractor_epochs"], lr=p["extractor_lr"], batch=p["extractor_batch"])
            everything = torch.arange(len(ctx.real))
            train_network(net, ctx.real.rows(everything), ctx.real.labels, settings, ctx.generator)
        return net.eval()

    def _similarity(self, net, positions: torch.Tensor) -> CosineSimilarity:
        feats, grads = embeddings(net, self.ctx.real.rows, positions, self.ctx.real.labels)
        if self.params["embedding"] == "gradient":
            return CosineSimilarity.gradient_embedding(grads, feats)
        return CosineSimilarity(feats)

    def _ipc(self) -> tuple[int, float]:
        """The set's ipc and the share of the train split it keeps; checks ``fraction`` against ipc."""
        ctx, fraction = self.ctx, self.params["fraction"]
        n, k = len(ctx.real), ctx.num_classes
        if fraction > 0:
            derived = ipc_from_fraction(fraction, n, k)
            if derived < 1:
                raise RecipeError(f"params.fraction {fraction} of {n} {ctx.real.info.name} train images keeps less "
                                  f"than one image per class ({k} classes); raise it, or set params.fraction: 0 to "
                                  "derive it from ipc")
            if derived != ctx.ipc:
                raise RecipeError(
                    f"params.fraction {fraction} of {n} {ctx.real.info.name} train images is ipc {derived} "
                    f"({k} classes), but the recipe says ipc {ctx.ipc}; set ipc: {derived}, or params.fraction: 0 "
                    "to derive the fraction from ipc")
        return ctx.ipc, ctx.ipc * k / n

    def select(self) -> SetContents:
        ctx, p = self.ctx, self.params
        ipc, fraction = self._ipc()
        net = self._extractor()
        memory = p["similarity_memory_mb"] * (1 << 20)
        picks, sizes_by_class = [], []
        for c in range(ctx.num_classes):
            pool = ctx.real.class_indices[c]
            if len(pool) < ipc:
                raise RecipeError(f"class {c} has {len(pool)} real images, fewer than ipc {ipc}")
            try:
                bin_sizes(len(pool), p["bins"])  # a clear error before any work when the class is too small
            except ValueError as exc:
                raise RecipeError(f"params.bins: {exc} (class {c}); lower params.bins") from None
            sim = self._similarity(net, pool)
            bins = graphcut_bins(sim, p["bins"], lam=p["lam"], memory_bytes=memory)
            sizes_by_class.append([len(b) for b in bins])
            picks.append(pool[sample_bins(bins, ipc, ctx.generator)])
        positions = torch.cat(picks)
        images = ctx.real.rows(positions).cpu()
        metadata: dict[str, Any] = {
            "embedding": p["embedding"],
            "extractor": self._describe_extractor(),
            "bins": p["bins"],
            "lam": p["lam"],
            "bin_sizes": sizes_by_class,
            "per_bin_samples": [per_bin_counts(s, ipc) for s in sizes_by_class],
            "ipc": ipc,
            "fraction": fraction,
            "fraction_requested": p["fraction"] or None,
        }
        storage: dict[str, Any] = {"images": "uint8"}
        mask = None
        if p["patch_drop"] > 0:
            images, mask, storage = self._drop_patches(net, images, positions)
            metadata["patch_drop"] = {"drop": p["patch_drop"], **{k: v for k, v in storage.items() if k != "images"},
                                      "saliency": "Grad-CAM of the extractor at its last spatial map, own label",
                                      "dropped_fill": "0 (the normalisation mean); refill with an MAE at load"}
        return SetContents(images=images, indices=ctx.real.source_rows[positions.cpu()], metadata=metadata,
                           storage=storage, patch_mask=mask)

    def _drop_patches(self, net, images: torch.Tensor, positions: torch.Tensor):
        """Zero each image's least salient patches; returns the images, the kept-patch mask, the storage."""
        ctx, p = self.ctx, self.params
        _, h, w = ctx.real.image_shape
        size = p["patch_size"] or auto_patch_size(h, w)
        try:
            rows, cols = patch_grid((1, h, w), size)
        except ValueError as exc:
            raise RecipeError(f"params.patch_size: {exc}") from exc
        keep = kept_patches(rows * cols, p["patch_drop"])
        if keep < 1:
            raise RecipeError(f"params.patch_drop {p['patch_drop']} keeps no patch of {rows * cols}")
        saliency = gradcam(net, images.to(ctx.device), ctx.real.labels[positions.to(ctx.device)]).cpu()
        mask = top_patch_mask(saliency, size, keep)
        images = torch.where(expand_mask(mask, size).unsqueeze(1), images, 0.0)
        return images, mask, {"images": "patches", "patch_size": size, "kept": keep}

    def _describe_extractor(self) -> str:
        p = self.params
        weights = f" with {p['extractor_weights']}" if p["extractor_weights"] else ""
        return (f"{p['extractor']}{weights}, trained {p['extractor_epochs']} epochs on the real split "
                f"(SGD lr {p['extractor_lr']}, batch {p['extractor_batch']})")
