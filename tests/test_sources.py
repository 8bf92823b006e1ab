"""Real sources: facts, Fashion-MNIST from the system copy, Tiny-ImageNet's layout, errors."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import condensed_datasets.sources as sources
from condensed_datasets.errors import SourceDataError
from condensed_datasets.sources import SOURCES, get_source, load_split

# -- facts ------------------------------------------------------------------------------------------


def test_get_source_accepts_spellings_and_refuses_unknown_names() -> None:
    assert get_source("CIFAR-10").name == "cifar10"
    assert get_source("Fashion_MNIST").name == "fashionmnist"
    assert get_source("tiny-imagenet") is SOURCES["tinyimagenet"]
    with pytest.raises(ValueError, match="unknown source 'imagenet'; valid sources: mnist, fashionmnist, svhn"):
        get_source("imagenet")
    with pytest.raises(ValueError, match="unknown source"):
        load_split("stl10", "/nonexistent")


def test_tinyimagenet_facts() -> None:
    info = get_source("tinyimagenet")
    assert info.image_shape == (3, 64, 64) and info.num_classes == 200
    assert list(info.classes) == sorted(set(info.classes))
    assert all(len(w) == 9 and w[0] == "n" and w[1:].isdigit() for w in info.classes)
    assert info.classes[:3] == ("n01443537", "n01629819", "n01641577")
    assert info.classes[-1] == "n12267677"
    assert info.mean == (0.485, 0.456, 0.406) and info.std == (0.229, 0.224, 0.225)


# -- Fashion-MNIST ------------------------------------------------------------------------------------


def test_fashion_mnist_from_the_system_copy(fashion_mnist_root: Path, fashion_mnist_files: dict, idx_reader) -> None:
    x, y = load_split("fashionmnist", fashion_mnist_root, train=True)
    assert x.shape == (60000, 1, 28, 28) and x.dtype == torch.uint8
    assert y.shape == (60000,) and y.dtype == torch.int64
    assert torch.equal(torch.bincount(y), torch.full((10,), 6000))
    # the first image and label, read from the IDX files by hand
    dims, pixels = idx_reader(fashion_mnist_files["train-images-idx3-ubyte"])
    assert dims == (60000, 28, 28)
    first = torch.tensor(list(pixels[: 28 * 28]), dtype=torch.uint8).view(1, 28, 28)
    assert torch.equal(x[0], first)
    _, labels = idx_reader(fashion_mnist_files["train-labels-idx1-ubyte"])
    assert int(y[0]) == labels[0] == 9  # the first training image is an ankle boot
    assert int(x[0, 0, 14, 14]) == pixels[14 * 28 + 14]

    xt, yt = load_split("fashionmnist", fashion_mnist_root, train=False)
    assert xt.shape == (10000, 1, 28, 28) and int(yt.min()) == 0 and int(yt.max()) == 9
    raw = fashion_mnist_root / "FashionMNIST" / "raw"
    assert all((raw / f).is_file() for f in sources._MNIST_FILES)


def _write_idx_gz(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_system_folder_is_overridable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "fake_system"
    fake.mkdir()
    train = np.arange(3 * 28 * 28).reshape(3, 28, 28) % 251
    test = np.full((2, 28, 28), 7)
    _write_idx_gz(fake / "train-images-idx3-ubyte.gz", train)
    _write_idx_gz(fake / "train-labels-idx1-ubyte.gz", np.array([4, 0, 9]))
    _write_idx_gz(fake / "t10k-images-idx3-ubyte.gz", test)
    _write_idx_gz(fake / "t10k-labels-idx1-ubyte.gz", np.array([1, 2]))
    monkeypatch.setenv("CONDENSED_FASHION_MNIST_DIR", str(fake))

    x, y = load_split("fashionmnist", tmp_path / "root")
    assert x.shape == (3, 1, 28, 28) and y.tolist() == [4, 0, 9]
    assert int(x[1, 0, 0, 0]) == 784 % 251 and int(x[2, 0, 27, 27]) == (3 * 784 - 1) % 251
    xt, yt = load_split("fashionmnist", tmp_path / "root", train=False)
    assert xt.unique().tolist() == [7] and yt.tolist() == [1, 2]
    assert (tmp_path / "root" / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").is_file()


def test_fashion_mnist_download_failure_falls_back_to_the_system_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fashion_mnist_system_dir: Path
) -> None:
    from torchvision.datasets import FashionMNIST

    calls = []

    def offline(self) -> None:
        calls.append(self.raw_folder)
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: no network")

    monkeypatch.setattr(FashionMNIST, "download", offline)
    x, y = load_split("fashionmnist", tmp_path, train=False, download=True)
    assert calls, "download=True must try torchvision's download first"
    assert x.shape == (10000, 1, 28, 28) and y.shape == (10000,)


def test_missing_data_names_the_path_and_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONDENSED_FASHION_MNIST_DIR", str(tmp_path / "no_system_copy"))
    with pytest.raises(RuntimeError, match="download=True") as err:
        load_split("fashionmnist", tmp_path / "r")
    assert str(tmp_path / "r" / "FashionMNIST" / "raw") in str(err.value)
    with pytest.raises(RuntimeError, match="download=True") as err:
        load_split("cifar10", tmp_path / "r", train=False)
    assert str(tmp_path / "r" / "cifar-10-batches-py") in str(err.value)
    with pytest.raises(RuntimeError, match="download=True") as err:
        load_split("mnist", tmp_path / "r")
    assert str(tmp_path / "r" / "MNIST" / "raw") in str(err.value)


def test_missing_data_names_the_command_line_flag_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same error reaches condensed-build users, whose switch is --download, not download=True."""
    monkeypatch.setenv("CONDENSED_FASHION_MNIST_DIR", str(tmp_path / "no_system_copy"))
    for source in ("fashionmnist", "cifar10", "tinyimagenet"):
        with pytest.raises(SourceDataError, match="condensed-build --download"):
            load_split(source, tmp_path / "r", train=False)


# -- Tiny-ImageNet ------------------------------------------------------------------------------------

_WNIDS = ["n03000000", "n01000000", "n02000000"]  # wnids.txt order; sorted: n01 -> 0, n02 -> 1, n03 -> 2
_COLOR = {"n01000000": (200, 10, 10), "n02000000": (10, 200, 10), "n03000000": (10, 10, 200)}


def _save(path: Path, color: tuple[int, int, int], *, mode: str = "RGB", size: int = 64) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", (size, size), color)
    if mode == "L":
        img = img.convert("L")
    img.save(path)


def _mini_tiny_imagenet(root: Path) -> Path:
    """A miniature tiny-imagenet-200: 3 classes, 2 train images each, 4 val images."""
    base = root / "tiny-imagenet-200"
    base.mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(_WNIDS) + "\n")
    for wnid in _WNIDS:
        # PNG everywhere except one JPEG per class (lossy: checked with a tolerance)
        _save(base / "train" / wnid / "images" / f"{wnid}_1.png", _COLOR[wnid])
        _save(base / "train" / wnid / "images" / f"{wnid}_0.JPEG", _COLOR[wnid])
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text("")  # not an image: ignored
    val = [("val_0.png", "n03000000"), ("val_1.png", "n01000000"), ("val_2.png", "n03000000"), ("val_3.png", "n02000000")]
    for name, wnid in val:
        _save(base / "val" / "images" / name, _COLOR[wnid], mode="L" if name == "val_2.png" else "RGB")
    (base / "val" / "val_annotations.txt").write_text("".join(f"{n}\t{w}\t0\t0\t63\t63\n" for n, w in val))
    return base


def test_tinyimagenet_miniature_layout(tmp_path: Path) -> None:
    _mini_tiny_imagenet(tmp_path)
    x, y = load_split("tinyimagenet", tmp_path, train=True)
    assert x.shape == (6, 3, 64, 64) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert y.tolist() == [0, 0, 1, 1, 2, 2]  # by sorted wnid, then file name
    for i, wnid in enumerate(sorted(_WNIDS)):
        color = torch.tensor(_COLOR[wnid], dtype=torch.int16).view(3, 1, 1)
        jpeg, png = x[2 * i].to(torch.int16), x[2 * i + 1].to(torch.int16)  # "_0.JPEG" sorts before "_1.png"
        assert torch.equal(png, color.expand(3, 64, 64))
        assert (jpeg - color).abs().max() <= 3

    xv, yv = load_split("tinyimagenet", tmp_path, train=False)
    assert xv.shape == (4, 3, 64, 64)
    # val ordered by class then file name: val_1 (n01), val_3 (n02), val_0, val_2 (n03)
    assert yv.tolist() == [0, 1, 2, 2]
    assert torch.equal(xv[0, :, 5, 5], torch.tensor([200, 10, 10], dtype=torch.uint8))
    gray = round(0.299 * 10 + 0.587 * 10 + 0.114 * 200)  # PIL's L conversion of (10, 10, 200), back to RGB
    assert xv[3, :, 0, 0].tolist() == [gray] * 3


def test_tinyimagenet_decode_is_cached_as_safetensors(tmp_path: Path) -> None:
    base = _mini_tiny_imagenet(tmp_path)
    x, y = load_split("tinyimagenet", tmp_path, train=True)
    cache = base / "train_uint8.safetensors"
    with safe_open(str(cache), framework="pt") as handle:  # a safetensors file, not a pickle
        assert set(handle.keys()) == {"images", "targets"}
    for img in (base / "train").rglob("*.png"):
        img.unlink()  # from now on only the cache can answer
    x2, y2 = load_split("tinyimagenet", tmp_path, train=True)
    assert torch.equal(x, x2) and torch.equal(y, y2)


def test_tinyimagenet_refuses_bad_images_and_missing_layout(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="download=True") as err:
        load_split("tinyimagenet", tmp_path)
    assert str(tmp_path / "tiny-imagenet-200") in str(err.value)
    base = _mini_tiny_imagenet(tmp_path)
    _save(base / "train" / "n01000000" / "images" / "odd.png", (1, 2, 3), size=32)
    with pytest.raises(RuntimeError, match="odd.png is 32x32, expected 64x64"):
        load_split("tinyimagenet", tmp_path)


def test_tinyimagenet_download_uses_the_official_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_download(url: str, download_root: str, md5: str | None = None, **kwargs) -> None:
        calls.append((url, download_root, md5))
        _mini_tiny_imagenet(Path(download_root))

    monkeypatch.setattr(sources, "download_and_extract_archive", fake_download)  # no network in tests
    x, y = load_split("tinyimagenet", tmp_path, train=False, download=True)
    assert calls == [("http://cs231n.stanford.edu/tiny-imagenet-200.zip", str(tmp_path), "90528d7ca1a48142e341f4ef8d21d0de")]
    assert y.tolist() == [0, 1, 2, 2]
