"""ZCA whitening: the maths on toy data, the file format's ZCA tensors, and the set -> real test split path."""

import pytest
import torch

from builders.data import RealData
from builders.experts import fit_split_zca
from condensed_datasets import CondensedFashionMNIST
from condensed_datasets.datasets import SetSpace, set_path
from condensed_datasets.format import CondensedSet, CondensedSetError
from condensed_datasets.sources import get_source, load_split
from condensed_datasets.zca import fit_zca


def _correlated_images(n=400, seed=0):
    """Toy 'images' [n, 1, 2, 3] with strongly correlated, unequal-variance pixels."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(6, 6, generator=g, dtype=torch.float64) * torch.tensor([3.0, 2.0, 1.0, 0.5, 0.2, 0.1],
                                                                              dtype=torch.float64)
    z = torch.randn(n, 6, generator=g, dtype=torch.float64)
    return (z @ mix.T + 5.0).reshape(n, 1, 2, 3)


def _cov(x):
    flat = x.reshape(x.shape[0], -1).to(torch.float64)
    centred = flat - flat.mean(0)
    return centred.T @ centred / (flat.shape[0] - 1)


def test_whitened_toy_set_has_identity_covariance_up_to_eps():
    images = _correlated_images()
    zca = fit_zca(images, eps=1e-9)
    white = zca(images.float()).double()
    torch.testing.assert_close(_cov(white), torch.eye(6, dtype=torch.float64), atol=2e-4, rtol=0)
    assert white.reshape(len(white), -1).mean(0).abs().max() < 1e-4


def test_regularised_whitening_shrinks_each_direction_by_s_over_s_plus_eps():
    images = _correlated_images()
    eps = 0.1
    zca = fit_zca(images, eps=eps)
    eigvals, eigvecs = torch.linalg.eigh(_cov(images))
    expected = (eigvecs * (eigvals / (eigvals + eps))) @ eigvecs.T
    torch.testing.assert_close(_cov(zca(images.float())), expected, atol=1e-4, rtol=1e-4)
    # The transform is symmetric, U diag(1/sqrt(S+eps)) U^T.
    by_hand = (eigvecs * (eigvals + eps).rsqrt()) @ eigvecs.T
    torch.testing.assert_close(zca.transform.double(), by_hand, atol=1e-5, rtol=1e-5)


def test_fit_in_chunks_equals_fit_at_once_and_invert_restores():
    images = _correlated_images()
    whole = fit_zca(images, eps=0.1)
    chunked = fit_zca(iter(images.split(37)), eps=0.1)
    torch.testing.assert_close(whole.mean, chunked.mean)
    torch.testing.assert_close(whole.transform, chunked.transform, atol=1e-5, rtol=1e-5)
    x = images[:5].float()
    torch.testing.assert_close(whole.invert(whole(x)), x, atol=1e-3, rtol=1e-4)
    assert whole(x[0]).shape == (1, 2, 3)  # a single [C,H,W] image works too
    with pytest.raises(ValueError, match="at least 2"):
        fit_zca(images[:1])
    with pytest.raises(ValueError, match="> 0"):
        fit_zca(images, eps=0.0)


def _zca_for(source, seed=0):
    info = get_source(source)
    d = info.channels * info.image_size**2
    images = torch.randn(64, *info.image_shape, generator=torch.Generator().manual_seed(seed))
    return fit_zca(images, eps=0.1), d


def test_format_round_trips_zca_tensors_and_validates_them():
    zca, d = _zca_for("fashionmnist")
    images = torch.randn(10, 1, 28, 28)
    cset = CondensedSet(images, torch.arange(10), source="fashionmnist", method="mtt", ipc=1, lr=0.01, zca=zca)
    back = CondensedSet.from_bytes(cset.to_bytes())
    assert back.metadata["zca"]["eps"] == 0.1
    assert back.zca_transform.shape == (d, d) and back.zca_mean.dtype == torch.float32
    torch.testing.assert_close(back.zca.transform, zca.transform)
    assert back.with_metadata(notes="x").zca is not None
    plain = CondensedSet(images, torch.arange(10), source="fashionmnist", method="mtt", ipc=1)
    assert plain.zca is None and "zca" not in plain.metadata

    tensors = cset.tensors()
    from safetensors.torch import save

    def broken(**changes):
        t = {**tensors, **changes}
        t = {k: v for k, v in t.items() if v is not None}
        return save(t, metadata={"condensed_datasets": __import__("json").dumps(cset.metadata)})

    with pytest.raises(CondensedSetError, match="come together"):
        CondensedSet.from_bytes(broken(zca_transform=None))
    with pytest.raises(CondensedSetError, match=r"zca_mean must be \[D\]"):
        CondensedSet.from_bytes(broken(zca_mean=torch.zeros(5)))
    with pytest.raises(CondensedSetError, match="zca_transform must be"):
        CondensedSet.from_bytes(broken(zca_transform=torch.zeros(d, 3)))
    with pytest.raises(CondensedSetError, match="tensors zca_mean / zca_transform are missing"):
        CondensedSet.from_bytes(broken(zca_mean=None, zca_transform=None))
    with pytest.raises(CondensedSetError, match="dtype"):
        CondensedSet.from_bytes(broken(zca_mean=tensors["zca_mean"].double()))


def test_split_zca_is_the_whitening_of_raw_pixels_by_its_definition():
    """As MTT/DATM fit kornia's ZCA (eps 0.1) on ToTensor() images: raw [0, 1] pixels, not normalised."""
    g = torch.Generator().manual_seed(3)
    base = torch.randint(0, 256, (300, 1, 1, 1), generator=g).expand(300, 3, 4, 4)
    noise = torch.randint(-40, 41, (300, 3, 4, 4), generator=g)
    images = (base + noise).clamp(0, 255).to(torch.uint8)
    real = RealData(images, torch.arange(300) % 10, get_source("cifar10"))
    zca = fit_split_zca(real)
    # The definition, on raw pixels: mu, unbiased covariance, U diag((S + eps)^-1/2) U^T.
    x = images.reshape(300, -1).to(torch.float64) / 255.0
    mu = x.mean(0)
    cov = (x - mu).T @ (x - mu) / 299
    s, u = torch.linalg.eigh(cov)
    w = u @ torch.diag((s + 0.1).rsqrt()) @ u.T
    torch.testing.assert_close(zca.mean.double(), mu, atol=1e-5, rtol=0)
    torch.testing.assert_close(zca.transform.double(), w, atol=1e-5, rtol=0)
    real.set_zca(zca)
    torch.testing.assert_close(real.rows(torch.arange(5)).double(), ((x[:5] - mu) @ w).reshape(5, 3, 4, 4),
                               atol=1e-5, rtol=0)
    assert real.space_normalization() == {"mean": [0.0] * 3, "std": [1.0] * 3}


def test_set_space_and_real_test_set_apply_the_sets_zca(fashion_mnist_root, tmp_path):
    (tmp_path / "FashionMNIST").symlink_to(fashion_mnist_root / "FashionMNIST", target_is_directory=True)
    real, _ = load_split("fashionmnist", tmp_path, train=True)
    info = get_source("fashionmnist")
    zca = fit_zca(real[:500].float() / 255, eps=0.1)  # raw pixels, as the builders fit it
    train = RealData(real[:20], torch.arange(20) % 10, info)
    train.set_zca(zca)
    images = torch.randn(10, 1, 28, 28)
    # The engine records the space's normalisation: the identity in ZCA space.
    CondensedSet(images, torch.arange(10), source="fashionmnist", method="mtt", ipc=1, lr=0.01,
                 metadata={"normalization": train.space_normalization()},
                 zca=zca).save(set_path(tmp_path, "fashionmnist", "mtt", 1))

    ds = CondensedFashionMNIST(tmp_path, method="mtt", ipc=1)
    assert ds.zca is not None and ds.set_space.zca is not None
    test_images, test_labels = load_split("fashionmnist", tmp_path, train=False)
    x, y = ds.real_test_set()[3]
    expected = zca(test_images[3:4].float() / 255)[0]
    torch.testing.assert_close(x, expected, atol=1e-4, rtol=1e-4)
    assert y == int(test_labels[3])
    # RealData (experts, builds, evaluation) whitens the same way once it has the set's ZCA.
    split = RealData(test_images, test_labels, info)
    split.set_zca(ds.zca)
    torch.testing.assert_close(split.rows(torch.tensor([3])), expected.unsqueeze(0), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(split.denormalize(split.rows(torch.tensor([3]))),
                               test_images[3:4].float() / 255, atol=1e-3, rtol=1e-3)
    with pytest.raises(ValueError, match="ZCA"):
        SetSpace(ds.metadata)  # metadata names a whitening; its tensors are required


def test_a_set_whitened_after_normalisation_keeps_its_recorded_space(fashion_mnist_root, tmp_path):
    """Sets written before ZCA moved to raw pixels record the source's normalisation: still honoured."""
    (tmp_path / "FashionMNIST").symlink_to(fashion_mnist_root / "FashionMNIST", target_is_directory=True)
    real, _ = load_split("fashionmnist", tmp_path, train=True)
    info = get_source("fashionmnist")
    mean, std = torch.tensor(info.mean).view(1, -1, 1, 1), torch.tensor(info.std).view(1, -1, 1, 1)
    zca = fit_zca((real[:500].float() / 255 - mean) / std, eps=0.1)
    CondensedSet(torch.randn(10, 1, 28, 28), torch.arange(10), source="fashionmnist", method="mtt", ipc=1,
                 lr=0.01, zca=zca).save(set_path(tmp_path, "fashionmnist", "mtt", 1))
    ds = CondensedFashionMNIST(tmp_path, method="mtt", ipc=1)
    test_images, test_labels = load_split("fashionmnist", tmp_path, train=False)
    expected = zca((test_images[3:4].float() / 255 - mean) / std)[0]
    torch.testing.assert_close(ds.real_test_set()[3][0], expected, atol=1e-4, rtol=1e-4)
    split = RealData(test_images, test_labels, info)
    split.set_zca(ds.zca, ds.metadata["normalization"])
    torch.testing.assert_close(split.rows(torch.tensor([3])), expected.unsqueeze(0), atol=1e-4, rtol=1e-4)
