"""The Dataset classes: reading sets, items, transforms, targets, repr, the real test split, errors."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision.transforms import v2

import condensed_datasets as cd
from condensed_datasets import (
    CondensedCIFAR10,
    CondensedCIFAR100,
    CondensedFashionMNIST,
    CondensedMNIST,
    CondensedSet,
    CondensedSVHN,
    CondensedTinyImageNet,
    CondensedVisionDataset,
    set_path,
)

CLASSES = [
    (CondensedMNIST, "mnist", (1, 28, 28), 10),
    (CondensedFashionMNIST, "fashionmnist", (1, 28, 28), 10),
    (CondensedSVHN, "svhn", (3, 32, 32), 10),
    (CondensedCIFAR10, "cifar10", (3, 32, 32), 10),
    (CondensedCIFAR100, "cifar100", (3, 32, 32), 100),
    (CondensedTinyImageNet, "tinyimagenet", (3, 64, 64), 200),
]


def test_set_path_layout(tmp_path: Path) -> None:
    assert set_path(tmp_path, "CIFAR-10", "dm", 10) == tmp_path / "condensed" / "cifar10" / "dm_ipc10.safetensors"
    assert set_path("data", "fashion_mnist", "dsa", 1) == Path("data/condensed/fashionmnist/dsa_ipc1.safetensors")


@pytest.mark.parametrize("cls,source,shape,k", CLASSES, ids=[c[1] for c in CLASSES])
def test_each_class_reads_its_file(tmp_path: Path, make_set, cls, source, shape, k) -> None:
    path = make_set(tmp_path, source, "dsa", 1, lr=0.05)
    stored = CondensedSet.load(path)
    ds = cls(tmp_path, "dsa", 1)
    assert isinstance(ds, CondensedVisionDataset) and ds.source == source
    assert len(ds) == k and ds.data.shape == (k, *shape) and ds.data.dtype == torch.float32
    assert torch.equal(ds.data, stored.images)
    assert ds.targets == list(range(k)) and all(type(t) is int for t in ds.targets)
    assert ds.classes == list(cd.get_source(source).classes)
    assert ds.class_to_idx[ds.classes[-1]] == k - 1
    assert (ds.method, ds.ipc, ds.soft_targets) == ("dsa", 1, None)
    assert ds.lr is not None and float(ds.lr) == pytest.approx(0.05)
    assert ds.metadata["source"] == source
    image, target = ds[k - 1]
    assert image.dtype == torch.float32 and image.shape == shape and type(target) is int and target == k - 1
    assert torch.equal(image, stored.images[k - 1])


def test_items_are_copies(tmp_path: Path, make_set) -> None:
    make_set(tmp_path, "cifar10", "dm", 2)
    ds = CondensedCIFAR10(tmp_path, "dm", 2)
    before = ds.data[3].clone()
    image, target = ds[3]
    image.mul_(0)
    assert torch.equal(ds.data[3], before) and target == 1


def test_transforms_v2_and_target_transform(tmp_path: Path, make_set) -> None:
    make_set(tmp_path, "cifar10", "dm", 1)
    plain = CondensedCIFAR10(tmp_path, "dm", 1)
    ds = CondensedCIFAR10(
        tmp_path, "dm", 1,
        transform=v2.Compose([v2.RandomHorizontalFlip(p=1.0), v2.Normalize(mean=[1.0, 1.0, 1.0], std=[2.0, 2.0, 2.0])]),
        target_transform=lambda t: t + 100,
    )
    image, target = ds[4]
    assert torch.allclose(image, (plain.data[4].flip(-1) - 1.0) / 2.0)
    assert target == 104
    cropped = CondensedCIFAR10(tmp_path, "dm", 1, transform=v2.RandomResizedCrop(16, antialias=True))
    assert cropped[0][0].shape == (3, 16, 16)
    assert "RandomHorizontalFlip" in repr(ds)


def test_soft_targets_default_hard_and_soft(tmp_path: Path, make_set) -> None:
    path = make_set(tmp_path, "fashionmnist", "datm", 2, soft=True)
    logits = CondensedSet.load(path).soft_labels
    ds = CondensedFashionMNIST(tmp_path, "datm", 2)  # auto -> soft when the set has soft labels
    image, target = ds[5]
    assert target.shape == (10,) and target.dtype == torch.float32
    manual = torch.exp(logits[5]) / torch.exp(logits[5]).sum()
    assert torch.allclose(target, manual, atol=1e-6) and float(target.sum()) == pytest.approx(1.0)
    assert torch.allclose(ds.soft_targets, torch.softmax(logits, 1))
    assert ds.targets[5] == 2
    assert torch.equal(CondensedFashionMNIST(tmp_path, "datm", 2, target_type="soft")[5][1], target)
    hard = CondensedFashionMNIST(tmp_path, "datm", 2, target_type="hard")
    assert hard[5][1] == 2 and type(hard[5][1]) is int
    assert hard.soft_targets is not None  # still available as an attribute

    make_set(tmp_path, "fashionmnist", "dm", 2)
    assert type(CondensedFashionMNIST(tmp_path, "dm", 2)[0][1]) is int
    with pytest.raises(ValueError, match="no soft labels"):
        CondensedFashionMNIST(tmp_path, "dm", 2, target_type="soft")
    with pytest.raises(ValueError, match="valid: auto, hard, soft"):
        CondensedFashionMNIST(tmp_path, "dm", 2, target_type="probabilities")


def test_repr_shows_source_method_ipc_and_accuracy(tmp_path: Path, make_set) -> None:
    evaluation = {"accuracy_mean": 82.3, "accuracy_std": 0.4, "model": "convnet3", "runs": 5}
    make_set(tmp_path, "fashionmnist", "dc", 10, evaluation=evaluation)
    text = repr(CondensedFashionMNIST(tmp_path, "dc", 10))
    assert text.startswith("Dataset CondensedFashionMNIST")
    for part in ("Number of datapoints: 100", "Source: fashionmnist", "Method: dc", "IPC: 10",
                 "Recorded accuracy: 82.30 ± 0.40 % (convnet3, 5 runs)"):
        assert part in text
    make_set(tmp_path, "fashionmnist", "dc", 1)
    assert "accuracy" not in repr(CondensedFashionMNIST(tmp_path, "dc", 1))


def test_real_test_set_uses_the_sets_normalisation(
    fashion_mnist_root: Path, fashion_mnist_files: dict, make_set, idx_reader, tmp_path: Path
) -> None:
    # a root of this test's own (the session root is shared), seeing the same real data
    (tmp_path / "FashionMNIST").symlink_to(fashion_mnist_root / "FashionMNIST", target_is_directory=True)
    make_set(tmp_path, "fashionmnist", "dc", 1, metadata={"normalization": {"mean": [0.5], "std": [0.25]}})
    ds = CondensedFashionMNIST(tmp_path, "dc", 1)
    test = ds.real_test_set()
    assert len(test) == 10000
    _, pixels = idx_reader(fashion_mnist_files["t10k-images-idx3-ubyte"])
    _, labels = idx_reader(fashion_mnist_files["t10k-labels-idx1-ubyte"])
    image, label = test[1]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    assert type(label) is int and label == labels[1]
    for r, c in ((0, 0), (14, 14), (20, 9)):
        p = pixels[28 * 28 + r * 28 + c]
        assert float(image[0, r, c]) == pytest.approx((p / 255 - 0.5) / 0.25, abs=1e-6)
    assert float(image.max()) > 0  # not an all-background image
    raw = torch.tensor(list(pixels[: 2 * 784]), dtype=torch.uint8).view(2, 1, 28, 28)
    assert torch.allclose(ds.real_to_set_space(raw)[1], image)


def test_missing_set_error_says_how_to_get_it(tmp_path: Path, make_set) -> None:
    with pytest.raises(RuntimeError) as err:
        CondensedCIFAR10(tmp_path, "dm", 10)
    text = str(err.value)
    assert str(tmp_path / "condensed" / "cifar10" / "dm_ipc10.safetensors") in text
    assert "build=True" in text and f"condensed-build recipes/dm_cifar10.yaml --out {tmp_path}" in text
    assert "Sets present for cifar10: none" in text
    make_set(tmp_path, "cifar10", "herding", 1)
    make_set(tmp_path, "cifar10", "herding", 3)
    with pytest.raises(RuntimeError, match="Sets present for cifar10: herding ipc 1, 3"):
        CondensedCIFAR10(tmp_path, "dm", 10)


def test_value_errors(tmp_path: Path, make_set) -> None:
    make_set(tmp_path, "mnist", "dm", 1)
    make_set(tmp_path, "mnist", "dm", 3)
    with pytest.raises(ValueError, match="unknown method 'gm'; valid methods: random, herding, kcenter, dd, dc"):
        CondensedMNIST(tmp_path, "gm", 1)
    for bad in (0, -1, 1.5, True, "10"):
        with pytest.raises(ValueError, match="ipc must be a positive int"):
            CondensedMNIST(tmp_path, "dm", bad)
    for bad in (np.bool_(True), np.int64(0), np.float64(3.0), torch.tensor(3)):
        with pytest.raises(ValueError, match="ipc must be a positive int"):
            CondensedMNIST(tmp_path, "dm", bad)
    for ipc in (np.int64(3), np.uint8(3)):  # an ipc read from a NumPy array or config, as torchvision users pass them
        ds = CondensedMNIST(tmp_path, "dm", ipc)
        assert ds.ipc == 3 and type(ds.ipc) is int and len(ds) == 30
    with pytest.raises(ValueError, match="available ipcs for dm: 1, 3"):
        CondensedMNIST(tmp_path, "dm", 50)


def test_unavailable_ipc_counts_the_embedded_sets(tmp_path: Path, make_set, monkeypatch: pytest.MonkeyPatch) -> None:
    """With only embedded sets (a fresh user's case), another ipc is the ValueError listing them, never 'none'."""
    from condensed_datasets import catalogue

    embedded = tmp_path / "embedded"
    make_set(tmp_path, "mnist", "dm", 1, path=embedded / "mnist" / "dm_ipc1.safetensors")
    monkeypatch.delenv("CONDENSED_DATASETS_EMBEDDED_DIR", raising=False)
    monkeypatch.setattr(catalogue, "EMBEDDED_DIR", embedded)
    root = tmp_path / "root"
    assert len(CondensedMNIST(root, "dm", 1)) == 10
    with pytest.raises(ValueError, match="or embedded in the package; available ipcs for dm: 1"):
        CondensedMNIST(root, "dm", 7)
    with pytest.raises(RuntimeError, match="Sets present for mnist: dm ipc 1"):
        CondensedMNIST(root, "dc", 1)


def test_file_that_disagrees_with_its_name_is_refused(tmp_path: Path, make_set) -> None:
    wrong_method = make_set(tmp_path, "svhn", "dc", 1, path=set_path(tmp_path, "svhn", "dm", 1))
    with pytest.raises(RuntimeError, match="method='dc'") as err:
        CondensedSVHN(tmp_path, "dm", 1)
    assert str(wrong_method) in str(err.value)
    make_set(tmp_path, "cifar10", "dsa", 1, path=set_path(tmp_path, "svhn", "dsa", 1))  # same shape, other source
    with pytest.raises(RuntimeError, match="source='cifar10'"):
        CondensedSVHN(tmp_path, "dsa", 1)


def test_a_set_of_some_classes_at_a_whole_sets_path_is_refused(tmp_path: Path) -> None:
    subset = CondensedSet(torch.zeros(2, 1, 28, 28), torch.arange(2), source="fashionmnist", method="dm", ipc=1,
                          metadata={"class_subset": [7, 3]})
    path = subset.save(set_path(tmp_path, "fashionmnist", "dm", 1))
    with pytest.raises(RuntimeError, match=r"classes \[7, 3\] only") as err:  # was a 2-class set, labels 0..1 for
        CondensedFashionMNIST(tmp_path, "dm", 1)  # Sneaker and Dress, beside a real test split labelled 0..9
    assert str(path) in str(err.value)


def test_build_on_demand_calls_builders_lazily(tmp_path: Path, make_set, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def build_set(source, method, ipc, root):
        calls.append((source, method, ipc, root))
        return make_set(Path(root), source, method, ipc, seed=7)

    fake = types.ModuleType("builders.build")
    fake.build_set = build_set
    monkeypatch.setitem(sys.modules, "builders.build", fake)
    ds = CondensedMNIST(tmp_path, "kcenter", 2, build=True)
    assert [c[:3] for c in calls] == [("mnist", "kcenter", 2)] and Path(calls[0][3]) == tmp_path
    assert len(ds) == 20 and torch.equal(ds.data, CondensedSet.load(set_path(tmp_path, "mnist", "kcenter", 2)).images)
    CondensedMNIST(tmp_path, "kcenter", 2, build=True)  # present now: not built again
    assert len(calls) == 1


def test_importing_the_package_does_not_import_builders() -> None:
    code = "import sys, condensed_datasets; print(sorted(m for m in sys.modules if m.split('.')[0] == 'builders'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_dataloader_with_two_workers(tmp_path: Path, make_set) -> None:
    make_set(tmp_path, "cifar10", "dm", 3, soft=True)
    ds = CondensedCIFAR10(tmp_path, "dm", 3)
    loader = DataLoader(ds, batch_size=8, shuffle=False, num_workers=2)
    images, targets = zip(*loader)
    assert torch.equal(torch.cat(images), ds.data)
    assert torch.allclose(torch.cat(targets), ds.soft_targets)


def test_a_tiny_model_trains_on_a_set(tmp_path: Path, make_set) -> None:
    make_set(tmp_path, "fashionmnist", "dm", 2)
    loader = DataLoader(CondensedFashionMNIST(tmp_path, "dm", 2), batch_size=10, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = torch.nn.Linear(784, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    losses = []
    for _ in range(5):
        for x, y in loader:
            loss = F.cross_entropy(model(x.flatten(1)), y)
            opt.zero_grad(); loss.backward(); opt.step()  # noqa: E702
            losses.append(loss.item())
    assert sum(losses[-2:]) < 0.5 * sum(losses[:2])


def test_package_exports() -> None:
    assert cd.__version__ == "0.1.0"
    for name in ("CondensedSet", "CondensedSetError", "CondensedVisionDataset", "get_source", "load_split",
                 "SOURCES", "set_path", "CondensedTinyImageNet"):
        assert hasattr(cd, name), name
    with pytest.raises(TypeError, match="base class"):
        CondensedVisionDataset("data", "dm", 1)
