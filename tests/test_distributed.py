"""Scale-out with torchrun (CPU, gloo, loopback): the split of work, and real 2-process builds equal to 1-process ones.

Bit-identical where the split is by class (DM, DC/DSA) or by expert (expert trajectories), and for evaluation
(runs split across ranks, accuracies gathered). MTT/DATM/TESLA split each student step's batch and sum the
ranks' gradients (all-reduce), which adds the same terms in another order: equal within 1e-5, not bit for bit.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml
from conftest import TINY_EXPERTS
from distributed_build_worker import builds_worker, on_demand_worker, refused_save_worker
from distributed_worker import collectives_worker

import builders.recipe
from builders import distributed
from builders.build import build, recipe_from_dict
from builders.distributed import BatchShard, World
from builders.engine import _log_iteration
from builders.errors import BuildError
from condensed_datasets import CondensedFashionMNIST
from condensed_datasets.format import CondensedSet

REPO = Path(__file__).resolve().parent.parent
CLI = Path(sys.executable).parent / "condensed-build"

DM = {
    "source": "fashionmnist", "method": "dm", "ipc": 2, "model": "ConvNetW32", "seed": 3,
    "iterations": 6, "checkpoint_every": 2, "augment": "color_crop_cutout_flip_scale_rotate",
    "real_per_class": 12, "params": {"batch_real": 8},
    "eval": {"runs": 3, "epochs": 2, "test_per_class": 5},
}
EXPERTS = {
    "source": "fashionmnist", "method": "experts", "ipc": 1, "model": "ConvNetW32", "seed": 5,
    "real_per_class": 10, "augment": "color_crop_cutout_flip_scale_rotate",
    "params": {"num_experts": 3, "epochs": 2, "batch": 32}, "eval": {"test_per_class": 10},
}


# -- the split, by hand --------------------------------------------------------------------------


def test_blocks_are_contiguous_in_rank_order_and_cover_every_item_once():
    assert distributed.blocks(10, 2) == [range(0, 5), range(5, 10)]
    assert distributed.blocks(10, 3) == [range(0, 3), range(3, 6), range(6, 10)]
    assert distributed.blocks(3, 4) == [range(0, 0), range(0, 1), range(1, 2), range(2, 3)]
    for count in range(0, 12):
        for n in range(1, 5):
            flat = [i for b in distributed.blocks(count, n) for i in b]
            assert flat == list(range(count))
            assert max(map(len, distributed.blocks(count, n))) - min(map(len, distributed.blocks(count, n))) <= 1


def test_owned_items_and_the_one_process_world():
    assert distributed.owned_items("abcde", World(rank=1, world_size=2)) == ["c", "d", "e"]
    assert distributed.current() == distributed.SINGLE and distributed.SINGLE.is_main
    assert distributed.SINGLE.describe() == {"world_size": 1, "backend": "none"}
    assert distributed.map_items([1, 2, 3], lambda x: x * 10) == [10, 20, 30]
    assert distributed.backend_for(torch.device("cpu")) == "gloo"
    assert distributed.backend_for(torch.device("cuda", 0)) == "nccl"


def test_a_batch_too_small_to_split_is_refused_on_every_rank():
    for rank in (0, 1):
        assert BatchShard(World(rank, 2)).share(2) == range(rank, rank + 1)
        with pytest.raises(BuildError, match="batch of 1 samples cannot be split across 2 processes"):
            BatchShard(World(rank, 2)).share(1)


def test_collectives_on_two_gloo_processes(tmp_path):
    mp.spawn(collectives_worker, args=(str(tmp_path / "rendezvous"),), nprocs=2, join=True)


# -- real 2-process runs -------------------------------------------------------------------------


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "SOURCE_DATE_EPOCH": "1700000000"}


def _torchrun(args: list[str], *launcher: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *launcher, *args]


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def _write_recipe(tmp_path: Path, recipe: dict, name: str) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(recipe))  # JSON is YAML
    return path


def _cli_args(recipe: Path, out: Path, data_root: Path, *extra: str) -> list[str]:
    if not CLI.is_file():
        pytest.skip(f"no condensed-build entry point beside {sys.executable} (pip install -e .)")
    return [str(CLI), str(recipe), "--out", str(out), "--data-root", str(data_root), "--device", "cpu", "--quiet", *extra]


def _one_process_set(recipe: dict, data_root: Path, out: Path, evaluate: bool) -> CondensedSet:
    return build(recipe_from_dict(recipe), out_root=out, data_root=data_root, device="cpu", evaluate=evaluate,
                 progress=False)


def _dm_set(out: Path) -> CondensedSet:
    return CondensedSet.load(out / "condensed" / "fashionmnist" / "dm_ipc2.safetensors")


@pytest.mark.slow
def test_two_process_dm_build_and_evaluation_equal_one_process(fashion_mnist_root, tmp_path, monkeypatch):
    """DM split by class: bit-identical images. Evaluation split by run: the same per-run accuracies."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    one = _one_process_set(DM, fashion_mnist_root, tmp_path / "one", evaluate=True)
    recipe = _write_recipe(tmp_path, DM, "dm.yaml")
    _run(_torchrun(_cli_args(recipe, tmp_path / "two", fashion_mnist_root), "--standalone", "--nproc_per_node", "2"),
         tmp_path)
    two = _dm_set(tmp_path / "two")
    assert torch.equal(two.images, one.images)
    assert two.metadata["evaluation"] == one.metadata["evaluation"]
    assert two.metadata["build"]["world_size"] == 2 and two.metadata["build"]["backend"] == "gloo"
    assert two.metadata["build"]["split"] == "classes"
    assert one.metadata["build"]["world_size"] == 1 and one.metadata["build"]["backend"] == "none"
    # Refusing to replace the set ends the job with that error: rank 0's disk decides and every rank raises
    # it, so torchrun's root cause carries it whichever rank it names first (it once named a rank whose
    # collective had broken when rank 0 alone raised).
    again = subprocess.run(_torchrun(_cli_args(recipe, tmp_path / "two", fashion_mnist_root), "--standalone",
                                     "--nproc_per_node", "2"), cwd=tmp_path, env=_env(), capture_output=True,
                           text=True, timeout=300)
    assert again.returncode != 0
    assert "already exists; pass --overwrite" in again.stderr.split("Root Cause")[1]


@pytest.mark.slow
def test_two_process_experts_write_the_same_store(fashion_mnist_root, tmp_path):
    """Experts split in rounds (3 experts on 2 ranks): the same files, byte for byte."""
    _one_process_set(EXPERTS, fashion_mnist_root, tmp_path / "one", evaluate=False)
    recipe = _write_recipe(tmp_path, EXPERTS, "experts.yaml")
    _run(_torchrun(_cli_args(recipe, tmp_path / "two", fashion_mnist_root), "--standalone", "--nproc_per_node", "2"),
         tmp_path)
    store_one = tmp_path / "one" / "experts" / "fashionmnist" / "ConvNetW32" / "plain"
    store_two = tmp_path / "two" / "experts" / "fashionmnist" / "ConvNetW32" / "plain"
    names = sorted(p.name for p in store_one.iterdir() if not p.name.startswith("."))  # not the index lock
    assert names == ["expert_0000.safetensors", "expert_0001.safetensors", "expert_0002.safetensors", "index.json"]
    assert sorted(p.name for p in store_two.iterdir() if not p.name.startswith(".")) == names
    for name in names:
        assert (store_two / name).read_bytes() == (store_one / name).read_bytes(), name


@pytest.mark.slow
def test_a_killed_rank_restarts_and_the_build_resumes_to_the_same_set(fashion_mnist_root, tmp_path, monkeypatch):
    """Rank 1 is killed after iteration 3 (checkpoint at 2); torchrun --max-restarts 1 restarts the job,
    which resumes from the checkpoint and ends with the uninterrupted build's images."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    recipe = {**DM, "eval": {**DM["eval"], "runs": 1}}
    one = _one_process_set(recipe, fashion_mnist_root, tmp_path / "one", evaluate=False)
    path = _write_recipe(tmp_path, recipe, "dm.json")
    out = tmp_path / "two"
    out.mkdir()
    script = REPO / "tests" / "torchrun_kill_build.py"
    _run(_torchrun([str(script), str(path), str(fashion_mnist_root), str(out), "3"],
                   "--standalone", "--nproc_per_node", "2", "--max-restarts", "1", "--monitor-interval", "0.2"),
         tmp_path)
    assert (out / "killed-rank-1").read_text() == "3"
    two = _dm_set(out)
    assert torch.equal(two.images, one.images)
    log = [json.loads(line) for line in (out / "condensed" / "fashionmnist" / "dm_ipc2.log.jsonl").read_text().splitlines()]
    assert [e["iteration"] for e in log] == [1, 2, 3, 4, 5, 6]  # resumed at 2: the rewritten tail, once


def _mtt_recipes(store: Path) -> dict[str, dict]:
    mtt = {"source": "fashionmnist", "method": "mtt", "ipc": 1, "model": TINY_EXPERTS["model"], "seed": 2,
           "real_per_class": 10, "iterations": 3, "augment": "color_crop_cutout_flip_scale_rotate",
           "params": {"syn_steps": 3, "expert_epochs": 1, "max_start_epoch": 1, "batch_syn": 0, "lr_img": 10.0,
                      "lr_lr": 1e-4, "expert_dir": str(store)}}
    return {
        "mtt": mtt,  # unrolled; every step takes the 10 images: 5 on each rank
        "tesla": {**mtt, "params": {**mtt["params"], "memory": "constant", "teacher_label": True, "batch_syn": 7}},
        "datm": {**mtt, "method": "datm", "params": {**mtt["params"], "max_start_epoch": 2, "current_max_start_epoch": 1,
                                                     "expansion_end_epoch": 2, "expert_optimizer": "sgd"}},
        "dsa": {"source": "fashionmnist", "method": "dsa", "ipc": 1, "model": "ConvNetW32", "seed": 4,
                "real_per_class": 10, "iterations": 2, "classes": [0, 1, 2], "augment": "color_crop_cutout_flip_scale_rotate",
                "params": {"batch_real": 8, "outer_loop": 2, "inner_loop": 1}},
    }


def _only_set(out: Path) -> CondensedSet:
    (path,) = (out / "condensed").rglob("*.safetensors")
    return CondensedSet.load(path)


@pytest.mark.slow
def test_two_process_gradient_splits_equal_one_process(fashion_mnist_root, tmp_path, expert_store):
    """MTT, TESLA (memory: constant, teacher labels) and DATM split each student step's batch across the ranks
    and all-reduce (sum) the images', step size's and soft labels' gradients: the sums add the same terms in
    another order, so the sets agree within 1e-5, not bit for bit. DSA splits the classes' matching terms and
    sums the image gradients: each row's gradient is one rank's plus exact zeros, so its images are identical."""
    recipes = _mtt_recipes(expert_store.path)
    mp.spawn(builds_worker, args=(str(tmp_path / "rendezvous"), recipes, str(fashion_mnist_root), str(tmp_path / "two")),
             nprocs=2, join=True)
    for name, recipe in recipes.items():
        one = _one_process_set(recipe, fashion_mnist_root, tmp_path / "one" / name, evaluate=False)
        two = _only_set(tmp_path / "two" / name)
        assert two.metadata["build"]["world_size"] == 2
        assert two.metadata["build"]["split"] == ("classes" if name == "dsa" else "batches")
        if name == "dsa":
            assert torch.equal(two.images, one.images)
            continue
        torch.testing.assert_close(two.images, one.images, rtol=0, atol=1e-5)
        torch.testing.assert_close(two.lr, one.lr, rtol=1e-5, atol=0)
        assert abs(one.lr.item() - recipe["params"].get("lr_teacher", 0.01)) > 1e-6  # the step size was learned
        if name != "mtt":
            torch.testing.assert_close(two.soft_labels, one.soft_labels, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_build_on_demand_in_a_process_group_builds_once_across_the_ranks(fashion_mnist_root, tmp_path, monkeypatch):
    """Both ranks of a running group ask for a missing set (build=True; ipc 2 is not embedded in the package): they build it together (DM's class
    split), rank 0 writes it, and each rank reads the set a 1-process build-on-demand makes, bit for bit."""
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    tiny = {**DM, "iterations": 2, "checkpoint_every": 0, "eval": {"runs": 1, "epochs": 1, "test_per_class": 2}}
    (recipes / "dm_fashionmnist.yaml").write_text(yaml.safe_dump(tiny))
    roots = [tmp_path / "two", tmp_path / "one"]
    for root in roots:
        root.mkdir()
        (root / "FashionMNIST").symlink_to(fashion_mnist_root / "FashionMNIST", target_is_directory=True)
    mp.spawn(on_demand_worker, args=(str(tmp_path / "rendezvous"), str(recipes), str(roots[0])), nprocs=2, join=True)
    monkeypatch.setattr(builders.recipe, "RECIPES_DIR", recipes)
    one = CondensedFashionMNIST(roots[1], method="dm", ipc=2, build=True)
    seen = [json.loads((roots[0] / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert seen[0] == seen[1]
    assert seen[0]["build"]["world_size"] == 2 and seen[0]["build"]["split"] == "classes"
    written = sorted(p.name for p in (roots[0] / "condensed" / "fashionmnist").iterdir())
    assert written == [".dm_ipc2.safetensors.build.lock", "dm_ipc2.log.jsonl", "dm_ipc2.png", "dm_ipc2.safetensors"]
    two = CondensedFashionMNIST(roots[0], method="dm", ipc=2)
    assert torch.equal(two.data, one.data) and one.metadata["build"]["world_size"] == 1


@pytest.mark.slow
def test_a_refused_final_save_stops_every_rank_with_the_same_error(fashion_mnist_root, tmp_path):
    """A set appears at the path while the ranks build: rank 0 refuses to replace it, and the other rank raises
    the same BuildError instead of waiting for rank 0 forever."""
    tiny = {**DM, "ipc": 1, "iterations": 2, "checkpoint_every": 0, "augment": "none", "real_per_class": 8}
    out = tmp_path / "out"
    out.mkdir()
    workers = mp.spawn(refused_save_worker, args=(str(tmp_path / "rendezvous"), tiny, str(fashion_mnist_root),
                                                  str(out)), nprocs=2, join=False)
    try:
        finished = False
        for _ in range(240):  # at most four minutes; each try waits at most one second
            if workers.join(timeout=1):
                finished = True
                break
        assert finished, "a rank still waits after rank 0's save was refused"
    finally:
        for process in workers.processes:
            if process.is_alive():
                process.kill()
    ended = [(out / f"rank{rank}.txt").read_text() for rank in (0, 1)]
    assert ended[0] == ended[1]
    assert ended[0].startswith("BuildError: ") and "appeared while this build ran" in ended[0]
    assert CondensedSet.load(out / "condensed" / "fashionmnist" / "dm_ipc1.safetensors").images.abs().sum() == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_on_loopback_build_the_same_set(fashion_mnist_root, tmp_path, monkeypatch):
    """Two torchrun launchers (--nnodes 2, one process each) meet at a c10d rendezvous on loopback, as two
    machines would at --rdzv-endpoint; the set equals the 1-process build."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    recipe = {**DM, "iterations": 3, "checkpoint_every": 0}
    one = _one_process_set(recipe, fashion_mnist_root, tmp_path / "one", evaluate=False)
    path = _write_recipe(tmp_path, recipe, "dm.yaml")
    endpoint = f"127.0.0.1:{_free_port()}"
    args = _cli_args(path, tmp_path / "two", fashion_mnist_root, "--no-eval")
    nodes = [subprocess.Popen(_torchrun(args, "--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d",
                                        "--rdzv-endpoint", endpoint, "--rdzv-id", "test-two-nodes",
                                        "--rdzv-conf", f"is_host={host}"),
                              cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for host in (1, 0)]
    results = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], results
    two = _dm_set(tmp_path / "two")
    assert torch.equal(two.images, one.images) and two.metadata["build"]["world_size"] == 2


def test_a_log_line_cut_short_by_a_killed_process_is_dropped_on_resume():
    assert _log_iteration('{"iteration": 3, "loss": 1.0}') == 3
    assert _log_iteration('{"iteration": 4, "lo') == float("inf")
