"""ZCA whitening: the maths on toy data, the file format's ZCA tensors, and the set -> real test split path."""

import pytest
import torch

from builders.data import RealData
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


def test_set_space_and_real_test_set_apply_the_sets_zca(fashion_mnist_root, tmp_path):
    (tmp_path / "FashionMNIST").symlink_to(fashion_mnist_root / "FashionMNIST", target_is_directory=True)
    real, _ = load_split("fashionmnist", tmp_path, train=True)
    info = get_source("fashionmnist")
    mean, std = torch.tensor(info.mean).view(1, -1, 1, 1), torch.tensor(info.std).view(1, -1, 1, 1)
    zca = fit_zca((real[:500].float() / 255 - mean) / std, eps=0.1)
    images = torch.randn(10, 1, 28, 28)
    CondensedSet(images, torch.arange(10), source="fashionmnist", method="mtt", ipc=1, lr=0.01,
                 zca=zca).save(set_path(tmp_path, "fashionmnist", "mtt", 1))

    ds = CondensedFashionMNIST(tmp_path, method="mtt", ipc=1)
    assert ds.zca is not None and ds.set_space.zca is not None
    test_images, test_labels = load_split("fashionmnist", tmp_path, train=False)
    x, y = ds.real_test_set()[3]
    expected = zca((test_images[3:4].float() / 255 - mean) / std)[0]
    torch.testing.assert_close(x, expected, atol=1e-4, rtol=1e-4)
    assert y == int(test_labels[3])
    # RealData whitens the same way once it has the set's ZCA.
    split = RealData(test_images, test_labels, info)
    split.set_zca(ds.zca)
    torch.testing.assert_close(split.rows(torch.tensor([3])), expected.unsqueeze(0), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(split.denormalize(split.rows(torch.tensor([3]))),
                               test_images[3:4].float() / 255, atol=1e-3, rtol=1e-3)
    with pytest.raises(ValueError, match="ZCA"):
        SetSpace(ds.metadata)  # metadata names a whitening; its tensors are required
