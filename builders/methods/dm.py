"""DM: Dataset Condensation with Distribution Matching (Zhao & Bilen, WACV 2023).

Each iteration samples a freshly initialised, frozen network and matches, class by class, the mean
embedding of a real batch with the mean embedding of the synthetic images, both passed through one
shared (siamese) DSA draw per class.
"""

from __future__ import annotations

from typing import Any, ClassVar, Iterator

import torch

from builders.compile_setting import COMPILE_CHOICES, CompileSetting
from builders.methods.base import BuildContext, Method, SetContents, check_init
from builders.networks import uses_batch_statistics
from builders.realbranch import PRECISIONS, class_mean_embeddings, embed_with_gradient, group_means
from builders.recipe import AUTO, check_at_least, check_choice
from builders.registry import register

#: The fewest iterations for which ``params.compile: auto`` compiles on a GPU (value chosen here). Compiled, an
#: iteration took 0.0116 s against 0.0183 uncompiled on an H200 (benchmarks/results/
#: dm_vs_reference_cuda_compile-true_2026-11-26_2.json, dm_vs_reference_cuda_2026-11-26_3.json), 0.0067 s saved;
#: the compilation, paid in every process, took about 6-12 s on an H100 (fresh processes 29.6-31.2 s wall
#: compiling against 19.4-23.9 s loading compiled code, compile_cache_cuda_2026-11-26.json): repaid after
#: about 900-1,800 iterations. The quickstart's 200 are far below; the papers' 20,000 far above.
AUTO_COMPILE_MIN_ITERATIONS = 2000

#: The same on a CPU (value chosen here). On the project's 2-core CPU, each child with an empty inductor cache,
#: two interleaved rounds (benchmarks/dm_compile.py ab --cold): recipes/dm_fashionmnist.yaml (batch_real 256) ran
#: 3.27 s/iteration compiled against 5.15 uncompiled (1.58x), its first iteration 41 s later: repaid after 22
#: iterations (dm_compile_ab_cpu_cold_2026-11-26.json); the quickstart (batch_real 64) 1.04 against 1.59 s, 43 s
#: later: repaid after 78 (dm_compile_ab_cpu_quickstart_cold_2026-11-26.json). 500 leaves a margin over both, and
#: keeps the 200-iteration quickstart (whose bar would sit still for most of a minute) and test-sized builds
#: uncompiled.
AUTO_COMPILE_MIN_ITERATIONS_CPU = 500


def auto_compiles(device: torch.device, iterations: int) -> bool:
    """Whether ``params.compile: auto`` compiles a build of ``iterations`` iterations on ``device``: on GPUs for
    builds of at least :data:`AUTO_COMPILE_MIN_ITERATIONS`, on CPUs for builds of at least
    :data:`AUTO_COMPILE_MIN_ITERATIONS_CPU` (a CPU without a working C++ compiler falls back, with a warning, to
    uncompiled code); never on other devices."""
    least = {"cuda": AUTO_COMPILE_MIN_ITERATIONS, "cpu": AUTO_COMPILE_MIN_ITERATIONS_CPU}.get(device.type)
    return least is not None and iterations >= least


def mean_embedding_loss(
    real_embeddings: torch.Tensor,
    real_sizes: list[int],
    syn_embeddings: torch.Tensor,
    syn_sizes: list[int],
) -> torch.Tensor:
    """Sum over classes of ||mean real embedding - mean synthetic embedding||^2.

    Rows are grouped by class, consecutive, with the given group sizes.
    """
    return class_means_distance(group_means(real_embeddings, real_sizes), group_means(syn_embeddings, syn_sizes))


def class_means_distance(real_means: torch.Tensor, syn_means: torch.Tensor) -> torch.Tensor:
    """Sum over classes of ||real mean - synthetic mean||^2 (one row per class)."""
    return ((real_means - syn_means) ** 2).sum()


@register
class DistributionMatching(Method):
    """DM: per-class mean-embedding matching under random frozen networks."""

    name: ClassVar[str] = "dm"
    splits_classes: ClassVar[bool] = True  # per-class losses: torchrun ranks may take blocks of classes
    defaults: ClassVar[dict[str, Any]] = {
        "lr_img": 1.0,
        "momentum": 0.5,
        "batch_real": 256,
        "init": "real",
        "precision": "fp32",  # or "bf16-real": the real branch under bfloat16 autocast (see README)
        # both branches through torch.compile (ConvNets without BatchNorm): true, false, or "auto": for builds of
        # AUTO_COMPILE_MIN_ITERATIONS or more on a GPU (1.6x faster per iteration there) and of
        # AUTO_COMPILE_MIN_ITERATIONS_CPU or more on a CPU (1.56x), falling back with a warning if compilation fails
        "compile": AUTO,
    }

    @classmethod
    def check_recipe(cls, recipe) -> None:
        check_init(recipe.params["init"])
        check_choice("precision", recipe.params["precision"], PRECISIONS)
        check_choice("compile", recipe.params["compile"], COMPILE_CHOICES)
        check_at_least(recipe.params, ("lr_img", "momentum"), 0)
        check_at_least(recipe.params, ("batch_real",), 1)

    def __init__(self, ctx: BuildContext) -> None:
        super().__init__(ctx)
        # "auto" decides on the recipe's iterations, so that a resumed build decides as the uninterrupted one
        self.compile = CompileSetting(self.params["compile"], auto_compiles(ctx.device, ctx.recipe.iterations),
                                      ctx.recipe.model, announce=ctx.status)

    def initial_state(self) -> dict[str, torch.Tensor]:
        images, self.init_rows = self.ctx.initial_images(self.params["init"])
        return {"images": images}

    def optimizers(self, state: dict[str, torch.Tensor]) -> dict[str, torch.optim.Optimizer]:
        return {"images": torch.optim.SGD([state["images"]], lr=self.params["lr_img"],
                                          momentum=self.params["momentum"])}

    def losses(self, state: dict[str, torch.Tensor], iteration: int) -> Iterator[torch.Tensor]:
        ctx = self.ctx
        net = ctx.new_network()
        net.train()
        for p in net.parameters():
            p.requires_grad_(False)
        images = state["images"]
        # torchrun class split: every rank draws the whole iteration's random numbers, in order; it computes only
        # its own classes' terms (all of them in one process)
        real_parts, syn_parts = ctx.class_batches(images, self.params["batch_real"])
        real_sizes, syn_sizes = [len(p) for p in real_parts], [len(p) for p in syn_parts]
        if uses_batch_statistics(net):
            self.compile.compiles(net)  # with params.compile: true, says once that this network runs uncompiled
            # BatchNorm mixes a batch's samples: the paper's one concatenated real forward pass.
            with torch.no_grad():
                real_emb = net.embed(torch.cat(real_parts))
            yield mean_embedding_loss(real_emb, real_sizes, net.embed(torch.cat(syn_parts)), syn_sizes)
            return
        # Per-sample norms: one real forward pass per class (a tenth of the memory, the same maths),
        # finished before the synthetic forward pass so that its graph is not alive meanwhile.
        def branches(compiled: bool) -> tuple[torch.Tensor, torch.Tensor]:
            return (class_mean_embeddings(net, real_parts, self.params["precision"], compiled=compiled),
                    embed_with_gradient(net, torch.cat(syn_parts), compiled))

        real_means, syn_emb = self.compile.run(net, branches)
        yield class_means_distance(real_means, group_means(syn_emb, syn_sizes))

    def finalize(self, state: dict[str, torch.Tensor]) -> SetContents:
        return SetContents(images=state["images"].detach(), metadata={"init": self.params["init"],
                                                                      **self.compile.describe()})
