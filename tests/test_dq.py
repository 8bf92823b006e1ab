"""DQ (Dataset Quantization): GraphCut gains and bins, per-bin sampling, ipc/fraction arithmetic, Grad-CAM patch
choice, the torchvision extractor's loading path, and a tiny build through the CLI loaded by the Dataset class."""

import pytest
import torch
from click.testing import CliRunner

from builders.build import recipe_from_dict
from builders.cli import build_command
from builders.extractor import build_extractor
from builders.graphcut import CosineSimilarity, bin_sizes, graphcut_bins
from builders.methods.dq import (
    auto_patch_size,
    ipc_from_fraction,
    kept_patches,
    per_bin_counts,
    sample_bins,
    top_patch_mask,
)
from builders.recipe import RecipeError
from condensed_datasets import CondensedFashionMNIST
from condensed_datasets.format import CondensedSet
from condensed_datasets.sources import get_source

# Five 2-D points: a and b the same direction, c, d, e at 90, 180, 270 degrees from a.
FIVE = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -3.0]])
# 0.5 + 0.5 cos, by hand
FIVE_SIM = torch.tensor([
    [1.0, 1.0, 0.5, 0.0, 0.5],
    [1.0, 1.0, 0.5, 0.0, 0.5],
    [0.5, 0.5, 1.0, 0.5, 0.0],
    [0.0, 0.0, 0.5, 1.0, 0.5],
    [0.5, 0.5, 0.0, 0.5, 1.0],
], dtype=torch.float64)


def naive_gains(sim: torch.Tensor, pool: list[int], chosen: list[int], lam: float) -> dict[int, float]:
    """The GraphCut gain of every candidate, straight from the formula."""
    return {x: lam * sum(float(sim[i, x]) for i in pool) - 2 * sum(float(sim[s, x]) for s in chosen)
            for x in pool if x not in chosen}


def naive_bins(sim: torch.Tensor, bins: int, lam: float) -> list[list[int]]:
    """Bins one after another: each pick the largest naive gain (first on ties); the last bin the remainder."""
    n = sim.shape[0]
    pool, out = list(range(n)), []
    for size in bin_sizes(n, bins)[:-1]:
        chosen: list[int] = []
        for _ in range(size):
            gains = naive_gains(sim, pool, chosen, lam)
            best = max(gains.values())
            chosen.append(min(x for x, g in gains.items() if g == best))
        out.append(chosen)
        pool = [x for x in pool if x not in chosen]
    return out + [pool]


def test_similarity_is_half_plus_half_cosine_by_hand():
    sim = CosineSimilarity(FIVE)
    assert torch.allclose(sim.block(slice(None), slice(None)).double(), FIVE_SIM, atol=1e-6)


def test_graphcut_gains_by_hand_on_five_points():
    # empty bin: gains are the column sums over the pool, 3, 3, 2.5, 2, 2.5 -> a (first of the tie a, b)
    assert naive_gains(FIVE_SIM, [0, 1, 2, 3, 4], [], 1.0) == {0: 3.0, 1: 3.0, 2: 2.5, 3: 2.0, 4: 2.5}
    # after a: 3 - 2*1, 2.5 - 2*0.5, 2 - 2*0, 2.5 - 2*0.5 -> d
    assert naive_gains(FIVE_SIM, [0, 1, 2, 3, 4], [0], 1.0) == {1: 1.0, 2: 1.5, 3: 2.0, 4: 1.5}
    sim = CosineSimilarity(FIVE)
    assert [b.tolist() for b in graphcut_bins(sim, 2)] == [[0, 3], [1, 2, 4]]
    # three bins of 1, 1, 3: a; then the pool {b, c, d, e} has column sums 2, 2, 2, 2 -> b; the rest
    assert [b.tolist() for b in graphcut_bins(sim, 3)] == [[0], [1], [2, 3, 4]]


@pytest.mark.parametrize("lam", [1.0, 0.7])
@pytest.mark.parametrize("memory_bytes", [1 << 30, 0], ids=["dense", "chunked"])
def test_fast_greedy_picks_what_the_naive_formula_picks(lam, memory_bytes):
    feats = torch.randn(37, 6, generator=torch.Generator().manual_seed(3))
    sim = CosineSimilarity(feats)
    matrix = sim.block(slice(None), slice(None)).double()
    fast = [b.tolist() for b in graphcut_bins(sim, 4, lam=lam, memory_bytes=memory_bytes)]
    assert fast == naive_bins(matrix, 4, lam)


def test_bins_are_disjoint_and_cover_the_class():
    feats = torch.randn(103, 5, generator=torch.Generator().manual_seed(1))
    bins = graphcut_bins(CosineSimilarity(feats), 10)
    assert [len(b) for b in bins] == [10] * 9 + [13]
    assert sorted(torch.cat(bins).tolist()) == list(range(103))


def test_gradient_kernel_equals_the_materialised_gradient_embedding():
    g = torch.Generator().manual_seed(0)
    b, e = torch.randn(9, 4, generator=g), torch.randn(9, 7, generator=g)
    full = torch.cat([b, (b.unsqueeze(2) * e.unsqueeze(1)).flatten(1)], dim=1)  # [dl/db, dl/dW]
    unit = full / full.norm(dim=1, keepdim=True)
    expected = 0.5 + 0.5 * unit @ unit.T
    got = CosineSimilarity.gradient_embedding(b, e).block(slice(None), slice(None))
    assert torch.allclose(got, expected, atol=1e-5)


def test_per_bin_counts_take_the_same_share_of_every_bin():
    assert per_bin_counts([600] * 10, 10) == [1] * 10
    assert per_bin_counts([600] * 10, 50) == [5] * 10
    # quotas 1.5, 1.5, 2: floors 1, 1, 2, the one left to the first of the tied remainders
    assert per_bin_counts([3, 3, 4], 5) == [2, 1, 2]
    with pytest.raises(ValueError, match="cannot sample 11 of 10"):
        per_bin_counts([5, 5], 11)


def test_sampling_draws_the_counts_from_each_bin_without_repeats():
    bins = [torch.arange(0, 30), torch.arange(30, 60), torch.arange(60, 95)]
    picked = sample_bins(bins, 19, torch.Generator().manual_seed(0))
    counts = [int(((picked >= b[0]) & (picked <= b[-1])).sum()) for b in bins]
    assert counts == per_bin_counts([30, 30, 35], 19) and len(set(picked.tolist())) == 19


def test_fraction_and_ipc_round_half_up():
    assert ipc_from_fraction(0.125, 50000, 10) == 625  # 12.5% of CIFAR-10 stays 12.5%
    assert ipc_from_fraction(0.125, 20, 1) == 3  # 2.5 -> 3, where banker's rounding gives 2
    assert ipc_from_fraction(0.1, 60000, 10) == 600


def test_a_fraction_that_disagrees_with_ipc_names_the_ipc_to_set():
    from builders.data import RealData
    from builders.methods.base import BuildContext
    from builders.methods.dq import DatasetQuantization

    real = RealData(torch.zeros(200, 1, 28, 28, dtype=torch.uint8), torch.arange(10).repeat_interleave(20),
                    get_source("fashionmnist"))
    recipe = recipe_from_dict({"source": "fashionmnist", "method": "dq", "ipc": 2, "params": {"fraction": 0.125}})
    method = DatasetQuantization(BuildContext(recipe, real, torch.device("cpu"), torch.Generator()))
    with pytest.raises(RecipeError, match="is ipc 3 .* set ipc: 3"):  # 12.5% of 20 per class = 2.5 -> 3
        method.select()


def test_patch_choice_keeps_the_most_salient_patches():
    assert auto_patch_size(28, 28) == 2 and auto_patch_size(32, 32) == 2 and auto_patch_size(64, 64) == 4
    assert kept_patches(196, 0.2) == 156  # floor(196 * 0.8) = floor(156.8)
    saliency = torch.zeros(1, 4, 4)
    saliency[0, :2, 2:] = 5.0  # top-right patch
    saliency[0, 2:, :2] = 1.0  # bottom-left patch
    mask = top_patch_mask(saliency, 2, 2)
    assert mask.tolist() == [[[False, True], [True, False]]]


def test_recipe_checks_name_the_key():
    base = {"source": "fashionmnist", "method": "dq", "ipc": 1}
    for params, key in [({"embedding": "pixels"}, "params.embedding"), ({"patch_drop": 0.95}, "params.patch_drop"),
                        ({"extractor": "NoNet"}, "params.extractor"), ({"fraction": 2.0}, "params.fraction"),
                        ({"extractor": "torchvision:resnet18", "extractor_weights": "Nope"},
                         "params.extractor_weights")]:
        with pytest.raises(RecipeError, match=key):
            recipe_from_dict({**base, "params": params})


def test_torchvision_extractor_loads_weights_through_torchvision(tmp_path, monkeypatch):
    """A weights enum name goes through torchvision's own loading code (torch hub cache). The weights are
    made here (a seeded resnet18) and placed in a temporary hub cache under the enum's file name."""
    from torchvision.models import ResNet18_Weights, resnet18

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    source = resnet18(num_classes=1000)
    with torch.no_grad():
        source.conv1.weight.fill_(0.25)
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(source.state_dict(), cache / ResNet18_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[1])
    info = get_source("fashionmnist")
    net = build_extractor("torchvision:resnet18", "ResNet18_Weights.IMAGENET1K_V1", 32, 1, 10, (28, 28),
                          info.mean, info.std, seed=0)
    assert torch.equal(net.body.conv1.weight, source.conv1.weight)
    x = torch.randn(2, 1, 28, 28)
    assert net.embed(x).shape == (2, 512) and net(x).shape == (2, 10)


TINY = """\
source: fashionmnist
method: dq
ipc: 3
model: ConvNetW32
real_per_class: 24
params: {{extractor: ConvNetD1, extractor_epochs: 1, bins: 3, patch_drop: {drop}}}
eval: {{runs: 1, epochs: 1, test_per_class: 3, random_baseline: false}}
"""


def _build(tmp_path, root, drop: float, out: str = "out"):
    recipe = tmp_path / "dq.yaml"
    recipe.write_text(TINY.format(drop=drop))
    result = CliRunner().invoke(build_command, [str(recipe), "--out", str(tmp_path / out), "--data-root",
                                                str(root), "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    return tmp_path / out


@pytest.mark.slow
def test_dq_builds_through_the_cli_and_loads_as_uint8_pixels(fashion_mnist_root, tmp_path, monkeypatch):
    from builders.data import RealData

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    out = _build(tmp_path, fashion_mnist_root, 0.0)
    ds = CondensedFashionMNIST(out, method="dq", ipc=3)
    assert ds.data.shape == (30, 1, 28, 28) and ds.targets == [c for c in range(10) for _ in range(3)]
    cset = CondensedSet.load(ds.path)
    assert cset.tensors()["images"].dtype == torch.uint8 and cset.metadata["format_version"] == 2
    real = RealData.from_source("fashionmnist", fashion_mnist_root, train=True)
    assert torch.equal(ds.data, real.rows(cset.indices))  # the real rows, bit for bit
    assert real.labels[cset.indices].tolist() == ds.targets
    method = ds.metadata["build"]["method"]
    assert method["bin_sizes"][0] == [8, 8, 8] and method["per_bin_samples"][0] == [1, 1, 1]
    assert method["fraction"] == pytest.approx(3 / 24)
    again = _build(tmp_path, fashion_mnist_root, 0.0, out="again")  # same recipe and seed: same bytes
    assert (again / ds.path.relative_to(out)).read_bytes() == ds.path.read_bytes()


@pytest.mark.slow
def test_dq_patch_drop_stores_kept_patches_and_refills_with_a_tiny_random_mae(fashion_mnist_root, tmp_path):
    """The refill path runs a tiny, randomly initialised ViTMAEForPreTraining (transformers' architecture,
    not pretrained weights): what is checked is the plumbing, not the picture."""
    transformers = pytest.importorskip("transformers")
    out = _build(tmp_path, fashion_mnist_root, 0.2)
    ds = CondensedFashionMNIST(out, method="dq", ipc=3)
    mask = ds.patch_mask
    assert mask.shape == (30, 14, 14) and (mask.flatten(1).sum(1) == 156).all()
    pixel_mask = mask.repeat_interleave(2, 1).repeat_interleave(2, 2).unsqueeze(1)
    assert (ds.data[~pixel_mask.expand_as(ds.data)] == 0).all()
    stored = CondensedSet.load(ds.path).tensors()
    assert "images" not in stored and stored["patches"].shape == (30, 156, 1, 2, 2)

    config = transformers.ViTMAEConfig(image_size=56, patch_size=4, num_channels=3, hidden_size=16,
                                       num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                       decoder_hidden_size=16, decoder_num_hidden_layers=1,
                                       decoder_num_attention_heads=2, decoder_intermediate_size=32)
    torch.manual_seed(0)  # the tiny model's random initialisation
    transformers.ViTMAEForPreTraining(config).save_pretrained(tmp_path / "tiny-mae")
    refilled = CondensedFashionMNIST(out, method="dq", ipc=3, refill=tmp_path / "tiny-mae")
    keep = pixel_mask.expand_as(ds.data)
    assert torch.equal(refilled.data[keep], ds.data[keep])
    assert (refilled.data[~keep] != 0).float().mean() > 0.9 and torch.isfinite(refilled.data).all()


def test_refill_without_weights_names_them_and_how_to_get_them(tmp_path):
    pytest.importorskip("transformers")
    from condensed_datasets.mae_refill import load_mae

    with pytest.raises(RuntimeError, match=r"facebook/vit-mae-large.*download"):
        load_mae(tmp_path / "no-such-mae")
