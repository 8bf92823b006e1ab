"""NAS proxies: the search space as data, rank correlations by hand, a 3-architecture run end to end."""

import json
import math

import pytest
import torch

from builders import nas
from builders.build import recipe_from_dict
from builders.data import RealData
from builders.engine import Engine
from builders.nas import NASProtocol, check_spec, run_nas, train_architectures
from builders.recipe import RECIPES_DIR, RecipeError, available_run_specs
from builders.runspec import load_spec
from condensed_datasets.format import CondensedSet
from condensed_datasets.nas import ArchitectureResult, SearchSpace, kendall, rank_report, ranks, spearman
from condensed_datasets.sources import get_source


def test_the_default_space_is_the_dc_papers_720_convnets():
    space = SearchSpace()
    archs = space.architectures()
    assert len(space) == len(archs) == 720
    assert len({a.name for a in archs}) == 720
    assert archs[0].name == "ConvNet-d1-w32-sigmoid-none-none"


def test_a_sub_grid_keeps_its_axes_and_refuses_unknown_values():
    space = SearchSpace.from_dict({"depth": [2, 3], "norm": ["instancenorm"]})
    assert len(space) == 2 * 4 * 3 * 1 * 3
    assert space.to_dict()["depth"] == [2, 3]
    with pytest.raises(ValueError, match="width"):
        SearchSpace(width=(48,))
    with pytest.raises(ValueError, match="unknown axes"):
        SearchSpace.from_dict({"kernel": [3]})


def test_ranks_share_the_mean_rank_on_ties():
    assert ranks([10, 30, 20, 30]) == [1.0, 3.5, 2.0, 3.5]


def test_spearman_and_kendall_by_hand_without_ties():
    # d = [0, 1, -1, 0]: rho = 1 - 6*2/(4*15) = 0.8; pairs: 5 concordant, 1 discordant -> tau = 4/6.
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert kendall([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)


def test_spearman_and_kendall_by_hand_with_ties():
    x, y = [1, 2, 3, 4, 5], [5, 6, 7, 8, 7]
    # ranks of y: [1, 2, 3.5, 5, 3.5]; centred: [-2,-1,.5,2,.5] vs [-2,-1,0,1,2]: cov 8, var 10 and 9.5.
    assert spearman(x, y) == pytest.approx(8 / math.sqrt(10 * 9.5))
    # 8 concordant, 1 discordant (4,5), 1 tied in y only (3,5): tau-b = 7 / sqrt(9 * 10).
    assert kendall(x, y) == pytest.approx(7 / math.sqrt(90))


def test_correlations_are_nan_when_a_side_is_constant():
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    assert math.isnan(kendall([1, 2, 3], [4, 4, 4]))


def _table(accs):
    return [ArchitectureResult(f"a{i}", acc, 1.0 + i) for i, acc in enumerate(accs)]


def test_rank_report_by_hand():
    proxy = _table([50.0, 40.0, 30.0, 20.0])  # proxy ranking: a0, a1, a2, a3
    truth = _table([80.0, 90.0, 70.0, 60.0])  # truth ranking: a1, a0, a2, a3
    report = rank_report(proxy, truth, tops=(2, 3, 5))
    assert report["spearman"] == pytest.approx(0.8)  # d = [1, -1, 0, 0]
    assert report["kendall"] == pytest.approx(4 / 6)
    assert report["top"]["2"]["spearman"] == pytest.approx(-1.0)  # among a0, a1 the order is reversed
    assert report["top"]["3"]["kendall"] == pytest.approx(1 / 3)  # a0>a1 D, a0>a2 C, a1>a2 C
    assert "5" not in report["top"]  # larger than the table
    assert (report["picked"], report["picked_truth_accuracy"], report["picked_truth_rank"]) == ("a0", 80.0, 2)
    assert (report["best"], report["best_truth_accuracy"]) == ("a1", 90.0)
    assert report["proxy_time_s"] == report["truth_time_s"] == 1.0 + 2.0 + 3.0 + 4.0


def test_rank_report_ties_for_the_best_rank_first_and_agree_on_the_best():
    truth = _table([90.0, 90.0, 50.0])  # a0 and a1 tie for the best
    second = rank_report(_table([20.0, 30.0, 10.0]), truth)  # the proxy picks a1
    assert (second["picked"], second["picked_truth_rank"]) == ("a1", 1)  # nothing on real beats it
    first = rank_report(_table([30.0, 20.0, 10.0]), truth)  # the proxy picks a0
    assert (first["picked"], first["picked_truth_rank"], first["best"]) == ("a0", 1, "a0")
    assert second["best"] == first["best"] and second["best_truth_accuracy"] == 90.0


def test_rank_report_needs_the_same_architectures():
    with pytest.raises(ValueError, match="same architectures"):
        rank_report(_table([1.0, 2.0]), _table([1.0, 2.0, 3.0]))


def test_training_is_the_same_for_the_same_seed_and_recorded_per_architecture():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 1, 8, 8, generator=g), torch.arange(2).repeat(10)
    train = torch.utils.data.TensorDataset(x, y)
    space = SearchSpace(depth=(1,), width=(32,), act=("relu",), norm=("none", "batchnorm"), pooling=("avgpooling",))
    run = [train_architectures(space, train, train, protocol=NASProtocol(epochs=2, batch=8), num_classes=2)
           for _ in range(2)]
    assert [r.architecture for r in run[0]] == [a.name for a in space.architectures()]
    assert [r.accuracy for r in run[0]] == [r.accuracy for r in run[1]]


def test_progress_is_quiet_off_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    """progress=True shows a bar on a terminal only, as README says (the test's captured stderr is not one)."""
    x, y = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(2).repeat(4)
    train = torch.utils.data.TensorDataset(x, y)
    space = SearchSpace(depth=(1,), width=(32,), act=("relu",), norm=("none",), pooling=("avgpooling",))
    train_architectures(space, train, train, protocol=NASProtocol(epochs=1, batch=8), num_classes=2, progress=True)
    assert capsys.readouterr().err == ""


def _tiny_spec(root, out, proxy_path):
    return {
        "source": "fashionmnist", "root": str(root), "out": str(out), "device": "cpu",
        "space": {"depth": [1], "width": [32], "act": ["sigmoid", "relu", "leakyrelu"], "norm": ["none"],
                  "pooling": ["avgpooling"]},
        "truth": {"per_class": 5, "epochs": 1, "batch": 10},
        "validation": {"per_class": 3},
        "proxy_protocol": {"epochs": 2, "batch": 10},
        "proxies": [{"name": "random_ipc1", "path": str(proxy_path)}],
        "tops": [2, 3],
    }


@pytest.mark.slow
def test_a_three_architecture_nas_run_end_to_end(fashion_mnist_root, tmp_path):
    recipe = recipe_from_dict({"source": "fashionmnist", "method": "random", "ipc": 1, "real_per_class": 100})
    proxy = Engine(recipe, out_root=tmp_path, data_root=fashion_mnist_root, device="cpu", evaluate=False,
                   progress=False)
    proxy.run()
    lines = []
    spec = _tiny_spec(fashion_mnist_root, tmp_path / "out", proxy.paths.set)
    truth_only = run_nas(spec, progress=False, echo=lines.append, only="truth")  # another process's share
    result = run_nas(spec, progress=False, echo=lines.append)
    assert any(line.startswith("reusing") and line.endswith("truth.json") for line in lines)
    assert result["truth"] == truth_only["truth"]
    written = json.loads((tmp_path / "out" / "nas.json").read_text())
    assert (tmp_path / "out" / "nas.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = written["proxies"]["random_ipc1"]["report"]
    assert report == result["proxies"]["random_ipc1"]["report"]
    assert report["architectures"] == 3 and set(report["top"]) == {"2", "3"}
    assert len(written["truth"]) == 3 and all(0 <= r["accuracy"] <= 100 for r in written["truth"])
    assert written["proxies"]["random_ipc1"]["validation_overlap"] == 0  # its rows are the first 100 per class
    assert any("Spearman" in line for line in lines)


@pytest.mark.parametrize("key", ["mean", "std"])
def test_a_proxy_set_in_another_normalisation_is_refused(key):
    info = get_source("fashionmnist")
    real = RealData(torch.zeros(10, 1, 28, 28, dtype=torch.uint8), torch.arange(10), info)
    norm = {"mean": list(info.mean), "std": list(info.std)}
    cset = CondensedSet(torch.zeros(10, 1, 28, 28), torch.arange(10), source="fashionmnist", method="dm", ipc=1,
                        metadata={"normalization": norm})
    assert len(nas._proxy_dataset(cset, real)) == 10  # the source's own normalisation is taken
    norm[key] = [norm[key][0] * 2]
    cset = CondensedSet(cset.images, cset.labels, source="fashionmnist", method="dm", ipc=1,
                        metadata={"normalization": norm})
    with pytest.raises(RecipeError, match="another normalisation"):
        nas._proxy_dataset(cset, real)


def test_a_nas_spec_with_a_mistyped_key_names_it(tmp_path):
    spec = _tiny_spec(tmp_path, tmp_path, tmp_path / "x.safetensors")
    spec["truth"]["epoch"] = 1
    with pytest.raises(RecipeError, match="did you mean 'epochs'"):
        run_nas(spec)


@pytest.mark.parametrize("name", [n for n in available_run_specs() if n.startswith("nas_")])
def test_every_shipped_nas_spec_is_valid(name):
    spec = check_spec(load_spec(RECIPES_DIR / name))
    assert spec["source"] in name and len(spec["space"]) >= 24
