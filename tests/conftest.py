"""Shared fixtures: the Fashion-MNIST system copy under a temporary root, and small random condensed sets."""

from __future__ import annotations

import gzip
import os
import random
import struct
import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch

# The suite is many tiny tensor ops: one thread is several times faster than two on a 2-core machine.
torch.set_num_threads(1)

from builders.build import build, recipe_from_dict
from condensed_datasets.datasets import set_path
from condensed_datasets.format import CondensedSet
from condensed_datasets.sources import get_source, install_system_fashion_mnist, system_fashion_mnist_dir

_FMNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
# Where the Makefile says Fashion-MNIST tests look when there is no system copy: ./data, as torchvision lays it out.
REPO_DATA = Path(__file__).resolve().parent.parent / "data"


def _system_copy() -> Path | None:
    folder = system_fashion_mnist_dir()
    return folder if all((folder / f"{f}.gz").is_file() for f in _FMNIST_FILES) else None


def _repo_copy() -> Path | None:
    raw = REPO_DATA / "FashionMNIST" / "raw"
    return raw if all((raw / f).is_file() for f in _FMNIST_FILES) else None


_SKIP_REASON = (
    f"no Fashion-MNIST: neither a system copy in {system_fashion_mnist_dir()} (install the Debian package "
    "dataset-fashion-mnist, or point CONDENSED_FASHION_MNIST_DIR at the gzipped IDX files) nor "
    f"{REPO_DATA / 'FashionMNIST' / 'raw'}"
)


def _missing_fashion_mnist(reason: str) -> None:
    """Skip a test that needs Fashion-MNIST, or fail it under CI (``CI=true``), where the data must be there."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true and {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def fashion_mnist_system_dir() -> Path:
    """The folder of the system copy's gzipped Fashion-MNIST IDX files (skips when absent; fails under CI)."""
    folder = _system_copy()
    if folder is None:
        _missing_fashion_mnist(
            f"needs the system copy of Fashion-MNIST in {system_fashion_mnist_dir()} (Debian package "
            "dataset-fashion-mnist, or CONDENSED_FASHION_MNIST_DIR pointing at the gzipped IDX files)"
        )
    return folder


@pytest.fixture(scope="session")
def fashion_mnist_files() -> dict[str, Path]:
    """The four Fashion-MNIST IDX files by name (``train-images-idx3-ubyte`` ...), gzipped or not."""
    system, repo = _system_copy(), _repo_copy()
    if system is not None:
        return {f: system / f"{f}.gz" for f in _FMNIST_FILES}
    if repo is not None:
        return {f: repo / f for f in _FMNIST_FILES}
    _missing_fashion_mnist(_SKIP_REASON)


@pytest.fixture(scope="session")
def fashion_mnist_root(tmp_path_factory: pytest.TempPathFactory, fashion_mnist_files: dict[str, Path]) -> Path:
    """A temporary data root (shared by the session: do not write sets into it) where
    ``load_split('fashionmnist', root, ...)`` works: ``{root}/FashionMNIST/raw`` is filled from the system
    copy, or linked to ``./data/FashionMNIST`` when only that holds the files."""
    root = tmp_path_factory.mktemp("fmnist_root")
    if _system_copy() is None:
        (root / "FashionMNIST").symlink_to(REPO_DATA / "FashionMNIST", target_is_directory=True)
    else:
        install_system_fashion_mnist(root)
    return root


def read_idx(path: Path) -> tuple[tuple[int, ...], bytes]:
    """Parse an IDX file (gzipped or not) by hand: its dimensions and raw uint8 payload."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    assert zero == 0 and dtype == 0x08, "expected an unsigned-byte IDX file"
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return dims, data[4 + 4 * ndim :]


@pytest.fixture(scope="session")
def idx_reader() -> Callable[[Path], tuple[tuple[int, ...], bytes]]:
    """The hand-written IDX parser, for tests that check loaders against the raw files."""
    return read_idx


MakeSet = Callable[..., Path]


@pytest.fixture
def make_set() -> MakeSet:
    """Factory: write a small random, valid condensed set under ``root`` where the Dataset classes look.

    ``make_set(root, source, method="dm", ipc=1, soft=False, lr=None, evaluation=None, metadata=None, seed=0)``
    returns the file's path.
    """

    def _make(
        root: Path,
        source: str,
        method: str = "dm",
        ipc: int = 1,
        *,
        soft: bool = False,
        lr: float | None = None,
        evaluation: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        seed: int = 0,
        path: Path | None = None,
    ) -> Path:
        info = get_source(source)
        g = torch.Generator().manual_seed(seed)
        n = info.num_classes * ipc
        images = torch.randn((n, *info.image_shape), generator=g)
        labels = torch.arange(info.num_classes).repeat_interleave(ipc)
        soft_labels = torch.randn((n, info.num_classes), generator=g) * 2 if soft else None
        meta = dict(metadata or {})
        if evaluation is not None:
            meta["evaluation"] = evaluation
        cset = CondensedSet(
            images, labels, source=info.name, method=method, ipc=ipc, soft_labels=soft_labels, lr=lr, metadata=meta
        )
        return cset.save(path or set_path(root, info.name, method, ipc))

    return _make


TINY_EXPERTS = {
    "source": "fashionmnist", "method": "experts", "model": "ConvNetW32", "seed": 1,
    "real_per_class": 10, "augment": "color_crop_cutout_flip_scale_rotate",
    "params": {"num_experts": 2, "epochs": 3, "batch": 25}, "eval": {"test_per_class": 10},
}


@pytest.fixture(scope="session")
def expert_store(fashion_mnist_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A tiny trajectory store (2 ConvNetW32 experts x 3 epochs on a Fashion-MNIST subset) for MTT/DATM."""
    out = tmp_path_factory.mktemp("experts_out")
    return build(recipe_from_dict(TINY_EXPERTS), out_root=out, data_root=fashion_mnist_root, device="cpu",
                 progress=False)


@pytest.fixture(autouse=True)
def _same_global_rng_states_for_every_test() -> None:
    """Every test starts from the same global RNG states (torch, numpy, random), whatever ran before it and
    whatever pytest-randomly's seed is: a test that draws from a global RNG gets the same numbers in every
    order and every run (a test that passes or fails by chance is a defect)."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)


def run_in_threads(task: Callable[[], Any], count: int, timeout: float = 120.0) -> tuple[list[Any], list[BaseException]]:
    """Run ``task`` in ``count`` threads at once; its results and the exceptions it raised, in completion order."""
    results: list[Any] = []
    errors: list[BaseException] = []

    def guarded() -> None:
        try:
            results.append(task())
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            errors.append(exc)

    threads = [threading.Thread(target=guarded) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return results, errors


class _Killed(Exception):
    """Stands in for a build killed mid-way."""


def assert_resume_is_identical(make_engine: Callable[[Path], Any], tmp: Path, kill_after: int) -> None:
    """A build killed after ``kill_after`` iterations and resumed gives the bytes of an uninterrupted one.

    ``make_engine(out)`` returns a fresh Engine writing under ``out``; set SOURCE_DATE_EPOCH first so the
    metadata's timestamps agree.
    """
    whole = make_engine(tmp / "whole")
    whole.run()

    def kill(iteration: int, loss: float) -> None:
        if iteration == kill_after:
            raise _Killed

    part = make_engine(tmp / "part")
    with pytest.raises(_Killed):
        part.run(on_iteration=kill)
    assert not part.paths.set.exists()
    resumed = make_engine(tmp / "part")
    resumed.resume = True
    resumed.run()
    assert resumed.paths.set.read_bytes() == whole.paths.set.read_bytes()


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A loopback hub (tests/hubserver.py) that huggingface_hub talks to; no embedded sets in the way."""
    from hubserver import HubServer, point_huggingface_hub_at

    from condensed_datasets import catalogue

    srv = HubServer(tmp_path / "hub").start()
    point_huggingface_hub_at(srv, monkeypatch, tmp_path / "hf_home")
    monkeypatch.setattr(catalogue, "EMBEDDED_DIR", tmp_path / "no_embedded")
    yield srv
    srv.stop()


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """Print the random test order's seed (pytest-randomly) even under -q, so a failure can be replayed."""
    seed = getattr(config.option, "randomly_seed", None)
    if seed is not None and config.pluginmanager.has_plugin("randomly"):
        terminalreporter.write_line(f"test order: pytest-randomly seed {seed} (replay: pytest --randomly-seed={seed})")
