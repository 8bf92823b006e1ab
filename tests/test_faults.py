"""Processes racing and dying: nothing a user built is ever lost, replaced or half-written.

The interleavings are forced (a hook runs the other writer at a chosen point), never raced on timing.
"""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hubserver import HubServer

import condensed_datasets._atomic as atomic
from builders import publish
from builders.build import build, recipe_from_dict
from builders.engine import BuildError, Engine
from builders.errors import PublishError
from builders.experts import ExpertStore
from builders.publish import publish_to_dir
from condensed_datasets import CondensedFashionMNIST, catalogue, hub
from condensed_datasets.datasets import set_path
from condensed_datasets.errors import HubError
from condensed_datasets.format import CondensedSet

REPO_ROOT = Path(__file__).resolve().parent.parent
REPO = "org/condensed-fashionmnist"
TINY = {
    "source": "fashionmnist", "method": "dm", "ipc": 1, "model": "ConvNetW32", "seed": 3,
    "iterations": 3, "checkpoint_every": 1, "augment": "none", "real_per_class": 8,
    "params": {"batch_real": 8}, "eval": {"runs": 1, "epochs": 1, "test_per_class": 2},
}
# Another process saving a set of its own at a path (what a concurrent condensed-build or build=True does).
WRITE_A_SET = """
import sys, torch
from condensed_datasets.format import CondensedSet
g = torch.Generator().manual_seed(int(sys.argv[2]))
CondensedSet(torch.randn(10, 1, 28, 28, generator=g), torch.arange(10), source="fashionmnist", method="dm",
             ipc=1).save(sys.argv[1])
"""


def engine(root: Path, out: Path, **options) -> Engine:
    return Engine(recipe_from_dict(TINY), out_root=out, data_root=root, device="cpu", evaluate=False,
                  progress=False, **options)


def write_in_another_process(path: Path, seed: int) -> bytes:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    subprocess.run([sys.executable, "-c", WRITE_A_SET, str(path), str(seed)], check=True, env=env, timeout=120)
    return path.read_bytes()


def make_cset(seed: int = 0) -> CondensedSet:
    g = torch.Generator().manual_seed(seed)
    return CondensedSet(torch.randn(10, 1, 28, 28, generator=g), torch.arange(10), source="fashionmnist",
                        method="dm", ipc=1)


def serve(server: HubServer, cset: CondensedSet) -> bytes:
    folder = server.repo_dir(REPO)
    folder.mkdir(parents=True, exist_ok=True)
    data = cset.to_bytes()
    (folder / "dm_ipc1.safetensors").write_bytes(data)
    entry = catalogue.index_entry(cset.metadata, sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    (folder / "index.json").write_bytes(catalogue.index_to_bytes(catalogue.make_index({"dm_ipc1.safetensors": entry})))
    return data


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# -- two writers of one set ------------------------------------------------------------------------------------------
def test_a_set_another_process_writes_during_a_build_is_never_replaced(fashion_mnist_root: Path,
                                                                      tmp_path: Path) -> None:
    """Both builds found no set when they started; the one finishing second must not replace the first's."""
    e = engine(fashion_mnist_root, tmp_path)
    theirs: list[bytes] = []

    def other_build_finishes(done: int, loss: float) -> None:
        if done == 1:
            theirs.append(write_in_another_process(e.paths.set, seed=11))

    with pytest.raises(BuildError, match=r"appeared while this build ran.*--overwrite"):
        e.run(on_iteration=other_build_finishes)
    assert e.paths.set.read_bytes() == theirs[0]
    assert leftovers(e.paths.set.parent) == []
    # the refused build's result is kept in its checkpoint: --resume --overwrite writes it in the other's place
    again = engine(fashion_mnist_root, tmp_path, resume=True, overwrite=True)
    assert again.run().images.shape == (10, 1, 28, 28) and e.paths.set.read_bytes() != theirs[0]


def test_overwrite_still_replaces_a_set_that_appeared_during_the_build(fashion_mnist_root: Path,
                                                                      tmp_path: Path) -> None:
    e = engine(fashion_mnist_root, tmp_path, overwrite=True)
    e.run(on_iteration=lambda done, loss: make_cset(5).save(e.paths.set) if done == 1 else None)
    assert CondensedSet.load(e.paths.set).metadata["recipe"]["seed"] == 3


def test_a_set_built_during_a_download_is_never_replaced(tmp_path: Path, server: HubServer,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The download found no file and fetched; a build of the same name finished meanwhile: the build's set stays."""
    serve(server, make_cset(0))
    dest = set_path(tmp_path, "fashionmnist", "dm", 1)
    check = hub._check_content
    mine: list[bytes] = []

    def build_finishes_meanwhile(*args, **kwargs):
        check(*args, **kwargs)
        make_cset(9).save(dest)
        mine.append(dest.read_bytes())

    monkeypatch.setattr(hub, "_check_content", build_finishes_meanwhile)
    with pytest.raises(HubError, match=r"appeared while it was downloading.*never replaces it"):
        CondensedFashionMNIST(tmp_path, "dm", 1, download=True, repo_id=REPO)
    assert dest.read_bytes() == mine[0] and hub.read_record(dest) is None
    assert leftovers(dest.parent) == []


def test_two_expert_runs_into_one_store_lose_no_expert(tmp_path: Path) -> None:
    """Two runs extend one store (2 and 3 experts); each adds experts from its own view of the index: the index
    lists every expert written, whichever run writes last."""
    header = {"format_version": 1, "kind": "expert_trajectories", "source": "fashionmnist", "model": "ConvNetW32",
              "zca": False, "epochs": 2, "parameter_count": 6, "training": {}}
    first = ExpertStore.create_or_extend(tmp_path, header)
    second = ExpertStore.create_or_extend(tmp_path, header)  # started before the first wrote any expert
    trajectory = torch.zeros(3, 6)
    first.add(0, trajectory, {"test_accuracy": 50.0})
    for expert in (0, 1, 2):
        second.add(expert, trajectory, {"test_accuracy": 50.0})
    first.add(1, trajectory, {"test_accuracy": 50.0})  # the first run's view still lacks expert 2
    assert [e["index"] for e in ExpertStore.open(tmp_path).experts] == [0, 1, 2]
    assert ExpertStore.open(tmp_path).num_experts == 3


# -- a full disk -------------------------------------------------------------------------------------------------------
def disk_full_at_fsync(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """``os.fsync`` of a temporary file for ``name`` fails as on a full disk (ENOSPC)."""
    fsync = os.fsync

    def full(fd: int) -> None:
        if Path(os.readlink(f"/proc/self/fd/{fd}")).name.startswith(f".{name}."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fsync(fd)

    monkeypatch.setattr(atomic.os, "fsync", full)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd")
def test_a_full_disk_during_a_set_or_checkpoint_write_keeps_the_earlier_files(fashion_mnist_root: Path,
                                                                             tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    first = engine(fashion_mnist_root, tmp_path)
    first.run()
    set_bytes, ckpt_bytes = first.paths.set.read_bytes(), first.paths.checkpoint.read_bytes()
    for name in (first.paths.checkpoint.name, first.paths.set.name):
        with monkeypatch.context() as m:
            disk_full_at_fsync(m, name)
            with pytest.raises(OSError, match="No space left"):
                engine(fashion_mnist_root, tmp_path, overwrite=True).run()
        assert first.paths.set.read_bytes() == set_bytes
        assert leftovers(tmp_path / "condensed" / "fashionmnist") == []
        if name == first.paths.checkpoint.name:
            assert first.paths.checkpoint.read_bytes() == ckpt_bytes


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd")
def test_a_full_disk_during_a_publish_leaves_a_folder_the_next_publish_completes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    make_cset(1).save(first)
    CondensedSet(make_cset(2).images.repeat(2, 1, 1, 1), torch.arange(10).repeat_interleave(2),
                 source="fashionmnist", method="dm", ipc=2).save(second)
    folder = tmp_path / "mirror"
    publish_to_dir(first, folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    with monkeypatch.context() as m:
        disk_full_at_fsync(m, "index.json")  # the set is written, its index entry is not
        with pytest.raises(PublishError, match="No space left.*1 of 3 files were written: make room"):
            publish_to_dir(second, folder)
    assert (folder / "index.json").read_bytes() == before["index.json"] and leftovers(folder) == []
    assert publish_to_dir(second, folder).plan.status == "index"  # the next run completes the index
    assert set(catalogue.parse_index((folder / "index.json").read_bytes())["files"]) == {
        "dm_ipc1.safetensors", "dm_ipc2.safetensors"}


# -- a lock held by a stuck process ---------------------------------------------------------------------------------
HOLD_A_LOCK = """
import sys
from filelock import FileLock
with FileLock(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()  # until the test closes the pipe
"""


def test_a_publish_waiting_on_a_stuck_publisher_stops_and_names_the_lock(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "mirror"
    folder.mkdir()
    make_cset(1).save(tmp_path / "a.safetensors")
    lock = folder / ".publish.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_A_LOCK, str(lock)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"  # the other publisher is inside its lock
        monkeypatch.setattr(publish, "LOCK_TIMEOUT_S", 0.2)
        with pytest.raises(PublishError, match=f"{lock}.*delete the lock file"):
            publish_to_dir(tmp_path / "a.safetensors", folder)
        assert sorted(p.name for p in folder.iterdir()) == [".publish.lock"]
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert publish_to_dir(tmp_path / "a.safetensors", folder).plan.status == "new"


def test_a_build_of_a_set_another_process_is_building_is_refused_and_touches_nothing(fashion_mnist_root: Path,
                                                                                   tmp_path: Path) -> None:
    """condensed-build while build=True (or another condensed-build) builds the same set: its log, checkpoint
    and set are the other process's; this one stops at once naming the lock."""
    e = engine(fashion_mnist_root, tmp_path)
    folder = e.paths.set.parent
    folder.mkdir(parents=True)
    e.paths.log.write_text('{"iteration": 1, "loss": 1.0, "time_s": 0.1}\\n')  # the other build's progress
    lock = folder / f".{e.paths.set.name}.build.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_A_LOCK, str(lock)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(BuildError, match=f"another process is building {e.paths.set}.*{lock}"):
            build(recipe_from_dict(TINY), out_root=tmp_path, data_root=fashion_mnist_root, device="cpu",
                  evaluate=False, progress=False, overwrite=True)
        assert e.paths.log.read_text().count("\\n") == 1 and not e.paths.set.exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
