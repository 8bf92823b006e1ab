"""The condensed-set file format: round trip, reproducible bytes, and every refusal of a bad file."""

from __future__ import annotations

import json
import os
import pathlib
import pickle

import pytest
import torch
from safetensors.torch import save as st_save

import condensed_datasets._atomic as atomic
from condensed_datasets.format import METADATA_KEY, CondensedSet, CondensedSetError


def _set(soft: bool = True, ipc: int = 2, seed: int = 0) -> CondensedSet:
    g = torch.Generator().manual_seed(seed)
    n = 10 * ipc
    return CondensedSet(
        torch.randn(n, 1, 28, 28, generator=g),
        torch.arange(10).repeat_interleave(ipc),
        source="fashionmnist",
        method="dm",
        ipc=ipc,
        soft_labels=torch.randn(n, 10, generator=g) if soft else None,
        lr=torch.tensor([0.01, 0.02]),
        indices=torch.arange(n) * 7,
        metadata={"seed": 3, "evaluation": {"accuracy_mean": 82.3, "accuracy_std": 0.4, "runs": 5}},
    )


def _parts(cset: CondensedSet) -> tuple[dict[str, torch.Tensor], dict]:
    """A valid set's tensors and metadata, to break one thing at a time."""
    return {k: v.clone() for k, v in cset.tensors().items()}, json.loads(json.dumps(cset.metadata))


def _write(path: pathlib.Path, tensors: dict[str, torch.Tensor], meta: dict) -> pathlib.Path:
    path.write_bytes(st_save(tensors, metadata={METADATA_KEY: json.dumps(meta)}))
    return path


def test_round_trip_keeps_every_tensor_and_the_metadata(tmp_path: pathlib.Path) -> None:
    cset = _set()
    back = CondensedSet.load(cset.save(tmp_path / "a.safetensors"))
    assert set(back.tensors()) == {"images", "labels", "soft_labels", "lr", "indices"}
    for name, tensor in cset.tensors().items():
        loaded = back.tensors()[name]
        assert loaded.dtype == tensor.dtype and torch.equal(loaded, tensor), name
    assert back.metadata == cset.metadata
    assert back.metadata["evaluation"]["accuracy_mean"] == 82.3
    assert back.metadata["normalization"] == {"mean": [0.2861], "std": [0.3530]}
    assert (back.source, back.method, back.ipc, len(back)) == ("fashionmnist", "dm", 2, 20)


def test_same_set_saved_twice_gives_identical_bytes(tmp_path: pathlib.Path) -> None:
    a = _set().save(tmp_path / "a.safetensors")
    b = _set().save(tmp_path / "b.safetensors")  # built again from scratch
    assert a.read_bytes() == b.read_bytes()
    assert _set(seed=1).to_bytes() != a.read_bytes()


def test_missing_file_is_refused(tmp_path: pathlib.Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        CondensedSet.load(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("keep", [0, 5, 100, -1])
def test_truncated_file_is_refused(tmp_path: pathlib.Path, keep: int) -> None:
    data = _set().to_bytes()
    path = tmp_path / "t.safetensors"
    path.write_bytes(data[:keep] if keep >= 0 else data[:-1])
    with pytest.raises(CondensedSetError, match="truncated|not a safetensors"):
        CondensedSet.load(path)


def test_text_file_is_refused(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "x.safetensors"
    path.write_text("images, labels\n" * 20)
    with pytest.raises(CondensedSetError, match="not a safetensors"):
        CondensedSet.load(path)


class _Touch:
    """Unpickling this calls Path.touch(target): it would create a file."""

    def __init__(self, target: pathlib.Path) -> None:
        self.target = target

    def __reduce__(self):
        return (pathlib.Path.touch, (self.target,))


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_pickle_is_refused_and_never_run(tmp_path: pathlib.Path, writer: str) -> None:
    # the payload is live: unpickling it really creates a file
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Touch(probe)))
    assert probe.exists()

    target = tmp_path / "pwned"
    path = tmp_path / "evil.safetensors"
    if writer == "pickle":
        path.write_bytes(pickle.dumps({"images": _Touch(target)}))
    else:
        torch.save({"images": _Touch(target)}, path)
    with pytest.raises(CondensedSetError, match="not a safetensors|never pickles"):
        CondensedSet.load(path)
    assert not target.exists()


def test_safetensors_file_without_our_metadata_is_refused(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "plain.safetensors"
    path.write_bytes(st_save({"images": torch.zeros(1, 1, 2, 2)}))
    with pytest.raises(CondensedSetError, match="not a condensed set"):
        CondensedSet.load(path)


@pytest.mark.parametrize("name", ["images", "labels"])
def test_missing_tensor_is_refused(tmp_path: pathlib.Path, name: str) -> None:
    tensors, meta = _parts(_set())
    del tensors[name]
    with pytest.raises(CondensedSetError, match=f"missing tensor '{name}'"):
        CondensedSet.load(_write(tmp_path / "m.safetensors", tensors, meta))


@pytest.mark.parametrize(
    "name,dtype", [("images", torch.float64), ("images", torch.float16), ("labels", torch.int32), ("soft_labels", torch.float64)]
)
def test_wrong_dtype_is_refused(tmp_path: pathlib.Path, name: str, dtype: torch.dtype) -> None:
    tensors, meta = _parts(_set())
    tensors[name] = tensors[name].to(dtype)
    with pytest.raises(CondensedSetError, match=f"'{name}' has dtype {dtype}"):
        CondensedSet.load(_write(tmp_path / "d.safetensors", tensors, meta))


def test_count_not_classes_times_ipc_is_refused(tmp_path: pathlib.Path) -> None:
    tensors, meta = _parts(_set(soft=False))
    meta["ipc"] = 3  # 20 images, 10 classes x 3 = 30
    with pytest.raises(CondensedSetError, match="20 images, but 10 classes x ipc 3 = 30"):
        CondensedSet.load(_write(tmp_path / "n.safetensors", tensors, meta))


def test_a_whole_set_whose_class_names_are_not_its_sources_is_refused(tmp_path: pathlib.Path) -> None:
    """class_to_idx and real_test_set() follow the source's label order, so a whole set must name its classes so."""
    tensors, meta = _parts(_set(soft=False))
    assert meta["source"] == "fashionmnist"
    meta["classes"][1], meta["classes"][2] = meta["classes"][2], meta["classes"][1]
    with pytest.raises(CondensedSetError, match="fashionmnist's class names in its label order; class 1 is named 'Pullover', "
                                                 "not 'Trouser'"):
        CondensedSet.load(_write(tmp_path / "c.safetensors", tensors, meta))


def test_labels_out_of_range_are_refused(tmp_path: pathlib.Path) -> None:
    tensors, meta = _parts(_set(soft=False))
    tensors["labels"][-1] = 10
    with pytest.raises(CondensedSetError, match=r"labels out of range \[0, 10\)"):
        CondensedSet.load(_write(tmp_path / "r.safetensors", tensors, meta))


def test_labels_not_class_contiguous_are_refused(tmp_path: pathlib.Path) -> None:
    tensors, meta = _parts(_set(soft=False))
    tensors["labels"] = torch.arange(10).repeat(2)  # 0..9, 0..9: right counts, wrong order
    with pytest.raises(CondensedSetError, match="not class-contiguous"):
        CondensedSet.load(_write(tmp_path / "c.safetensors", tensors, meta))


def test_soft_labels_of_wrong_width_are_refused(tmp_path: pathlib.Path) -> None:
    tensors, meta = _parts(_set())
    tensors["soft_labels"] = torch.zeros(20, 11)
    with pytest.raises(CondensedSetError, match=r"soft_labels must be \[N, K\] = \[20, 10\]"):
        CondensedSet.load(_write(tmp_path / "s.safetensors", tensors, meta))


def test_unknown_format_version_is_refused(tmp_path: pathlib.Path) -> None:
    tensors, meta = _parts(_set())
    meta["format_version"] = 99
    with pytest.raises(CondensedSetError, match="unknown format_version 99"):
        CondensedSet.load(_write(tmp_path / "v.safetensors", tensors, meta))


def test_missing_format_version_is_refused(tmp_path: pathlib.Path) -> None:
    tensors, meta = _parts(_set())
    del meta["format_version"]
    with pytest.raises(CondensedSetError, match="no format_version"):
        CondensedSet.load(_write(tmp_path / "v.safetensors", tensors, meta))


def test_the_crafting_helper_writes_loadable_files(tmp_path: pathlib.Path) -> None:
    # the refusals above come from the one broken thing, not from the helper
    tensors, meta = _parts(_set())
    assert CondensedSet.load(_write(tmp_path / "ok.safetensors", tensors, meta)).metadata == meta


@pytest.mark.parametrize("fail", ["os.replace", "os.fsync"])
def test_failed_save_keeps_the_old_file_and_leaves_no_temp(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, fail: str
) -> None:
    path = tmp_path / "set.safetensors"
    old = _set(seed=0).save(path).read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, fail.split(".")[1], boom)
    with pytest.raises(OSError, match="disk full"):
        _set(seed=1).save(path)
    monkeypatch.undo()
    assert path.read_bytes() == old
    assert sorted(os.listdir(tmp_path)) == ["set.safetensors"]
    assert torch.equal(CondensedSet.load(path).images, _set(seed=0).images)
