"""Class-incremental buffers: class orders, per-step memories of that step's classes only, the runner."""

import io
import json
import sys

import numpy as np
import pytest
import torch

import builders.data
import builders.engine
from builders.continual import _seen_test, check_spec, net_seed, run_continual
from builders.errors import BuildError
from builders.recipe import RECIPES_DIR, available_run_specs
from builders.runspec import load_spec
from condensed_datasets.continual import ClassIncrementalBuffer, class_order, split_steps
from condensed_datasets.errors import UnknownNameError
from condensed_datasets.format import CondensedSet
from condensed_datasets.sources import get_source, load_split
from condensed_datasets.zca import ZCA


def test_class_orders_are_cl_dm_pys_numpy_permutations():
    # CL_DM.py: np.random.seed(0); np.random.permutation(10)
    assert class_order(10, 0) == [2, 8, 4, 9, 1, 6, 7, 3, 0, 5]
    assert class_order(100, 3) == np.random.RandomState(3).permutation(100).tolist()


@pytest.mark.parametrize("seed", [-1, 2 ** 32, 1.5, True])
def test_an_order_seed_numpy_cannot_take_is_the_packages_error(seed):
    with pytest.raises(UnknownNameError, match="order_seed"):
        ClassIncrementalBuffer("fashionmnist", "dm", 10, 5, order_seed=seed, root="unused")


def test_steps_split_the_order_evenly():
    assert split_steps([2, 8, 4, 9, 1, 6], 3) == [[2, 8], [4, 9], [1, 6]]
    with pytest.raises(ValueError, match="equal steps"):
        split_steps(list(range(10)), 3)


def _fake_builder(calls, soft=False):
    """A build callable that records what it was asked for and writes a valid set of those classes."""

    def build(source, method, ipc, classes, root):
        calls.append(list(classes))
        k = len(classes)
        images = torch.full((k * ipc, 1, 28, 28), float(len(calls)))
        soft_labels = torch.eye(k).repeat_interleave(ipc, 0) * 5 if soft else None
        cset = CondensedSet(images, torch.arange(k).repeat_interleave(ipc), source=source, method=method, ipc=ipc,
                            soft_labels=soft_labels, metadata={"class_subset": list(classes)})
        from condensed_datasets.paths import subset_set_path

        return cset.save(subset_set_path(root, source, method, ipc, list(classes)))

    return build


def test_each_step_is_built_with_its_own_classes_only_and_datasets_grow(tmp_path):
    calls = []
    buffer = ClassIncrementalBuffer("fashionmnist", "dm", 3, steps=5, order_seed=0, root=tmp_path,
                                    build=_fake_builder(calls))
    assert [buffer.classes(t) for t in range(5)] == [[2, 8], [4, 9], [1, 6], [7, 3], [0, 5]]
    ds = buffer.dataset(2)
    assert calls == [[2, 8], [4, 9], [1, 6]]  # step 2's union never asked for a later step's classes
    assert len(ds) == 3 * 2 * 3 and ds.seen == [2, 8, 4, 9, 1, 6]
    assert ds.targets == [c for c in [2, 8, 4, 9, 1, 6] for _ in range(3)]
    image, target = ds[6]
    assert target == 4 and image.shape == (1, 28, 28) and float(image[0, 0, 0]) == 2.0  # step 1's set
    assert ds.soft_targets is None and ds.target_type == "hard"
    buffer.dataset(4)
    assert calls == [[2, 8], [4, 9], [1, 6], [7, 3], [0, 5]]  # each step built once
    with pytest.raises(IndexError, match="steps 0..4"):
        buffer.classes(5)


def test_soft_labels_are_spread_over_the_source_classes(tmp_path):
    buffer = ClassIncrementalBuffer("fashionmnist", "datm", 1, steps=5, order_seed=0, root=tmp_path,
                                    build=_fake_builder([], soft=True))
    ds = buffer.dataset(1)
    assert ds.target_type == "soft" and ds.soft_targets.shape == (4, 10)
    _, target = ds[2]  # step 1's first image: source class 4
    assert int(target.argmax()) == 4 and float(target.sum()) == pytest.approx(1.0)
    assert float(target[[2, 8, 9]].sum()) < float(target[4])
    assert buffer.dataset(1, target_type="hard")[2][1] == 4


def test_a_file_of_other_classes_is_refused(tmp_path):
    buffer = ClassIncrementalBuffer("fashionmnist", "dm", 1, steps=5, order_seed=0, root=tmp_path)
    wrong = _fake_builder([])("fashionmnist", "dm", 1, [8, 2], tmp_path)  # step 0's classes, other order
    wrong.rename(buffer.path(0))
    with pytest.raises(ValueError, match="that step's classes only"):
        buffer.memory(0)


def test_a_missing_step_without_build_says_how_to_get_it(tmp_path):
    buffer = ClassIncrementalBuffer("fashionmnist", "dm", 1, steps=5, order_seed=0, root=tmp_path)
    with pytest.raises(RuntimeError, match="classes="):
        buffer.dataset(0)


def test_add_step_takes_a_users_own_stream(tmp_path):
    buffer = ClassIncrementalBuffer("fashionmnist", "dm", 2, steps=0, root=tmp_path)
    assert buffer.num_steps == 0
    own = CondensedSet.load(_fake_builder([])("fashionmnist", "dm", 2, [5, 1], tmp_path / "mine"))
    assert buffer.add_step([5, 1], own) == 0
    with pytest.raises(ValueError, match="already arrived"):
        buffer.add_step([1, 7])
    with pytest.raises(ValueError, match="that step's classes only"):
        buffer.add_step([7, 0], own)
    assert buffer.num_steps == 1  # a refused step is not added
    buffer.add_step([7, 0], _fake_builder([])("fashionmnist", "dm", 2, [7, 0], tmp_path / "mine"))
    assert buffer.dataset(1).targets == [5, 5, 1, 1, 7, 7, 0, 0]


@pytest.mark.slow
def test_a_real_step_build_never_loads_future_classes(fashion_mnist_root, tmp_path, monkeypatch):
    """Build-on-demand through the shipped recipe: the engine's real data holds the step's classes only."""
    _, source_labels = load_split("fashionmnist", fashion_mnist_root, train=True)
    seen_labels = []
    original = builders.data.RealData.from_source.__func__

    def spy(cls, source, root, **kwargs):
        real = original(cls, source, root, **kwargs)
        if kwargs.get("train", True):
            seen_labels.append(sorted(set(source_labels[real.source_rows].tolist())))
        return real

    monkeypatch.setattr(builders.data.RealData, "from_source", classmethod(spy))
    buffer = ClassIncrementalBuffer("fashionmnist", "random", 2, steps=5, order_seed=1, root=tmp_path, build=True)
    (tmp_path / "FashionMNIST").symlink_to(fashion_mnist_root / "FashionMNIST", target_is_directory=True)
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "0")
    with monkeypatch.context() as m:  # the shipped recipe evaluates at paper scale: keep the build only
        m.setattr(builders.engine.Engine, "_evaluation", lambda self, contents, ctx: {})
        ds = buffer.dataset(1)
    assert seen_labels == [sorted(buffer.classes(0)), sorted(buffer.classes(1))]
    for step in (0, 1):
        cset = buffer.memory(step)
        assert cset.metadata["class_subset"] == buffer.classes(step)
        assert source_labels[cset.indices].tolist() == [c for c in buffer.classes(step) for _ in range(2)]
    assert ds.targets == [c for c in buffer.seen_classes(1) for _ in range(2)]


def test_test_images_are_put_into_the_memorys_space():
    """The networks train on the memory, so the test images go into its space: its normalisation, its ZCA."""
    info = get_source("fashionmnist")
    g = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (20, 1, 28, 28), generator=g, dtype=torch.uint8)
    test = builders.data.RealData(raw, torch.arange(10).repeat(2), info)
    x = raw.float() / 255

    def memory(classes, zca=None, **metadata):
        return CondensedSet(torch.zeros(len(classes), 1, 28, 28), torch.arange(len(classes)), source="fashionmnist",
                            method="dm", ipc=1, metadata={"class_subset": classes, **metadata}, zca=zca)

    plain, labels = _seen_test(test, [memory([3, 7])], [3, 7], None)
    rows = [3, 13, 7, 17]  # class 3's images, then class 7's
    assert labels.tolist() == [3, 3, 7, 7]
    assert torch.allclose(plain, (x[rows] - info.mean[0]) / info.std[0])
    zca = ZCA(torch.rand(784, generator=g), torch.randn(784, 784, generator=g) / 28, 0.1)
    identity = {"mean": [0.0], "std": [1.0]}
    whitened, _ = _seen_test(test, [memory([3, 7], zca, normalization=identity)], [3, 7], None)
    expected = (x[rows].reshape(4, -1) - zca.mean) @ zca.transform
    assert torch.allclose(whitened.reshape(4, -1), expected, atol=1e-4)
    with pytest.raises(BuildError, match="different normalisations"):
        _seen_test(test, [memory([3]), memory([7], normalization=identity)], [3, 7], None)


@pytest.mark.slow
class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_tiny_continual_run_end_to_end(fashion_mnist_root, tmp_path, monkeypatch):
    spec = {"source": "fashionmnist", "root": str(fashion_mnist_root), "sets_root": str(tmp_path / "sets"),
            "out": str(tmp_path / "out"), "device": "cpu", "steps": 2, "ipc": 1, "orders": [0, 1], "runs": 2,
            "model": "ConvNetW32", "epochs": 1, "batch": 10, "augment": "none", "test_per_class": 5,
            "methods": {"random": {"recipe": "random_fashionmnist.yaml", "set": {"real_per_class": 20}},
                        "dm": {"recipe": "dm_fashionmnist.yaml",
                               "set": {"real_per_class": 20, "model": "ConvNetW32", "iterations": 1,
                                       "checkpoint_every": 0, "params.batch_real": 4}}}}
    lines, terminal = [], _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)  # progress bars show on a terminal
    result = run_continual(spec, progress=True, echo=lines.append)
    # one bar over every network's epochs: 2 methods x 2 orders x 2 steps x 2 runs x 1 epoch
    assert "continual: training" in terminal.getvalue() and "16/16" in terminal.getvalue()
    written = json.loads((tmp_path / "out" / "continual.json").read_text())
    assert (tmp_path / "out" / "continual.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert written["summary"] == result["summary"]
    assert set(written["summary"]) == {"random", "dm"}
    assert [r["n"] for r in written["summary"]["dm"]] == [4, 4]  # 2 orders x 2 networks per step
    assert len(written["runs"]) == 2 * 2 * 2 * 2
    seeds = [r["seed"] for r in written["runs"] if r["method"] == "dm" and r["order"] == 1 and r["step"] == 0]
    assert seeds == [net_seed(0, 1, 0, 0), net_seed(0, 1, 0, 1)]  # recorded: one per run, from the spec
    step1 = [r for r in written["runs"] if r["step"] == 1]
    assert all(r["memory_size"] == 10 and r["test_images"] == 50 for r in step1)
    assert any(line.strip().startswith("dm:") for line in lines)


@pytest.mark.parametrize("name", [n for n in available_run_specs() if n.startswith("continual_")])
def test_every_shipped_continual_spec_is_valid(name):
    spec = check_spec(load_spec(RECIPES_DIR / name))
    assert spec["source"] in name and spec["methods"]


def test_a_missing_step_is_downloaded_from_the_hub_and_checked(server, tmp_path):
    repo = "someone/condensed-fashionmnist"
    folder = server.repo_dir(repo) / "classes"
    folder.mkdir(parents=True)
    published = _fake_builder([])("fashionmnist", "dm", 1, [2, 8], tmp_path / "published")
    published.rename(folder / "dm_ipc1_c2-8.safetensors")
    buffer = ClassIncrementalBuffer("fashionmnist", "dm", 1, steps=5, order_seed=0, root=tmp_path / "data",
                                    download=True, repo_id=repo)
    assert buffer.dataset(0).targets == [2, 8]
    assert buffer.path(0).is_file()  # kept where the buffer reads it
    with pytest.raises(RuntimeError, match="could not download step 1"):
        buffer.dataset(1)


def _publish_step(server, repo, tmp_path, classes, name):
    """Serve a valid step memory of ``classes`` as ``classes/{name}`` of ``repo``; returns its bytes."""
    folder = server.repo_dir(repo) / "classes"
    folder.mkdir(parents=True, exist_ok=True)
    published = _fake_builder([])("fashionmnist", "dm", 1, classes, tmp_path / "published")
    data = published.read_bytes()
    (folder / name).write_bytes(data)
    return data


def test_a_step_download_is_checked_against_the_hubs_sha256(server, tmp_path, monkeypatch):
    from condensed_datasets import hub

    repo = "someone/condensed-fashionmnist"
    _publish_step(server, repo, tmp_path, [2, 8], "dm_ipc1_c2-8.safetensors")
    asked = hub.remote_file

    def then_change(*args, **kwargs):  # the hub answers for one file, then serves another (a damaged copy)
        answer = asked(*args, **kwargs)
        _publish_step(server, repo, tmp_path / "other", [2, 8], "dm_ipc1_c2-8.safetensors")
        served = server.repo_dir(repo) / "classes" / "dm_ipc1_c2-8.safetensors"
        served.write_bytes(served.read_bytes()[:-1] + b" ")  # same size, other SHA-256
        return answer

    monkeypatch.setattr(hub, "remote_file", then_change)
    buffer = ClassIncrementalBuffer("fashionmnist", "dm", 1, steps=5, order_seed=0, root=tmp_path / "data",
                                    download=True, repo_id=repo)
    with pytest.raises(RuntimeError, match="could not download step 0.*SHA-256"):  # was written unchecked
        buffer.memory(0)
    assert not buffer.path(0).exists()


def test_a_step_download_that_loops_is_the_packages_error(server, tmp_path):
    repo = "someone/condensed-fashionmnist"
    _publish_step(server, repo, tmp_path, [2, 8], "dm_ipc1_c2-8.safetensors")
    loop = f"/datasets/{repo}/resolve/main/classes/dm_ipc1_c2-8.safetensors"
    server.redirect = {loop: loop}
    buffer = ClassIncrementalBuffer("fashionmnist", "dm", 1, steps=5, order_seed=0, root=tmp_path / "data",
                                    download=True, repo_id=repo)
    with pytest.raises(RuntimeError, match="could not download step 0.*TooManyRedirects"):  # was httpx's own error
        buffer.memory(0)
    assert not buffer.path(0).exists()


def test_offline_a_step_comes_from_the_cache(server, tmp_path, monkeypatch):
    repo = "someone/condensed-fashionmnist"
    data = _publish_step(server, repo, tmp_path, [2, 8], "dm_ipc1_c2-8.safetensors")
    buffer = ClassIncrementalBuffer("fashionmnist", "dm", 1, steps=5, order_seed=0, root=tmp_path / "data",
                                    download=True, repo_id=repo)
    buffer.memory(0)
    buffer.path(0).unlink()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    buffer = ClassIncrementalBuffer("fashionmnist", "dm", 1, steps=5, order_seed=0, root=tmp_path / "data",
                                    download=True, repo_id=repo)  # a new process: nothing held in memory
    assert buffer.memory(0).ipc == 1 and buffer.path(0).read_bytes() == data
    with pytest.raises(RuntimeError, match="could not download step 1.*HF_HUB_OFFLINE is set"):
        buffer.memory(1)
