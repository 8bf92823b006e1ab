"""Real-image sets stored as uint8 pixels or as kept patches + mask: the loader gives the same float images."""

import pytest
import torch

from condensed_datasets.format import CondensedSet, CondensedSetError
from condensed_datasets.pixel_storage import pack_mask, patchify, unpack_mask, unpatchify
from condensed_datasets.sources import get_source

INFO = get_source("fashionmnist")
NORM = {"mean": list(INFO.mean), "std": list(INFO.std)}


def real_images(n: int, seed: int = 0) -> torch.Tensor:
    """Random uint8 pixels normalised exactly as the builders normalise real images."""
    pixels = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    mean, std = torch.tensor(INFO.mean).view(1, -1, 1, 1), torch.tensor(INFO.std).view(1, -1, 1, 1)
    return (pixels.to(torch.float32) / 255.0 - mean) / std


def make(images, **kwargs) -> CondensedSet:
    return CondensedSet(images, torch.arange(10).repeat_interleave(2), source="fashionmnist", method="dq", ipc=2,
                        **kwargs)


def test_uint8_storage_round_trips_bit_for_bit_in_a_quarter_of_the_bytes():
    images = real_images(20)
    plain, packed = make(images), make(images, storage={"images": "uint8"})
    loaded = CondensedSet.from_bytes(packed.to_bytes())
    assert torch.equal(loaded.images, images) and loaded.metadata["storage"] == {"images": "uint8"}
    assert packed.tensors()["images"].dtype == torch.uint8
    assert len(packed.to_bytes()) < 0.3 * len(plain.to_bytes())
    assert plain.metadata["format_version"] == 1 and loaded.metadata["format_version"] == 2


def test_images_that_are_not_pixels_are_refused_not_rounded():
    with pytest.raises(CondensedSetError, match="not exactly uint8 pixels"):
        make(real_images(20) + 1e-3, storage={"images": "uint8"})


def test_mask_packing_round_trips():
    mask = torch.rand(7, 196, generator=torch.Generator().manual_seed(0)) > 0.3
    bits = pack_mask(mask)
    assert bits.shape == (7, 25) and bits.dtype == torch.uint8
    assert torch.equal(unpack_mask(bits, 196), mask)
    assert pack_mask(torch.tensor([[True, False, True] + [False] * 6])).tolist() == [[5, 0]]  # bits 0 and 2


def test_patchify_is_raster_order_and_inverts():
    images = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    patches = patchify(images, 2)
    assert patches[0, 1].flatten().tolist() == [2.0, 3.0, 6.0, 7.0]  # top-right patch
    assert torch.equal(unpatchify(patches, (2, 2)), images)


def test_patch_storage_keeps_only_kept_patches_and_round_trips_with_its_mask():
    g = torch.Generator().manual_seed(1)
    mask = torch.zeros(20, 196, dtype=torch.bool)
    for row in mask:
        row[torch.randperm(196, generator=g)[:156]] = True
    mask = mask.view(20, 14, 14)
    pixel_mask = mask.repeat_interleave(2, 1).repeat_interleave(2, 2).unsqueeze(1)
    images = torch.where(pixel_mask, real_images(20), 0.0)
    storage = {"images": "patches", "patch_size": 2, "kept": 156}
    cset = make(images, storage=storage, patch_mask=mask)
    stored = cset.tensors()
    assert set(stored) == {"labels", "patches", "patch_mask"} and stored["patches"].shape == (20, 156, 1, 2, 2)
    loaded = CondensedSet.from_bytes(cset.to_bytes())
    assert torch.equal(loaded.images, images) and torch.equal(loaded.patch_mask, mask)
    assert torch.equal(CondensedSet.from_bytes(loaded.to_bytes()).images, images)
    with pytest.raises(CondensedSetError, match="dropped patches must be 0"):
        make(real_images(20), storage=storage, patch_mask=mask)


def test_float32_files_are_unchanged_and_keep_loading():
    images = real_images(20)
    cset = make(images)
    assert "storage" not in cset.metadata and set(cset.tensors()) == {"images", "labels"}
    assert torch.equal(CondensedSet.from_bytes(cset.to_bytes()).images, images)
