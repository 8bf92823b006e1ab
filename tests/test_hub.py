"""Hub download, catalogue and embedded sets, against a real HTTP server on loopback (tests/hubserver.py)."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from conftest import run_in_threads
from hubserver import HubServer, go_offline, point_huggingface_hub_at

from condensed_datasets import CondensedCIFAR10, CondensedFashionMNIST, catalogue, hub
from condensed_datasets.datasets import set_path
from condensed_datasets.format import CondensedSet

REPO = "org/condensed-fashionmnist"
SET_GET = "/resolve/main/dm_ipc"


def make_cset(ipc: int = 1, method: str = "dm", seed: int = 0, accuracy: float = 80.0) -> CondensedSet:
    """A small random Fashion-MNIST set with an evaluation block."""
    g = torch.Generator().manual_seed(seed)
    return CondensedSet(
        torch.randn(10 * ipc, 1, 28, 28, generator=g), torch.arange(10).repeat_interleave(ipc),
        source="fashionmnist", method=method, ipc=ipc,
        metadata={"evaluation": {"model": "ConvNet", "runs": 2, "epochs": 300, "accuracy_mean": accuracy,
                                 "accuracy_std": 0.5, "random_accuracy_mean": accuracy - 10,
                                 "improvement_over_random": 10.0},
                  "recipe": {"model": "ConvNet", "iterations": 200, "seed": seed}, "seed": seed},
    )


def put_repo(server: HubServer, repo_id: str, *sets: CondensedSet, index: bool = True) -> dict[str, bytes]:
    """Lay ``sets`` out in the server's folder for ``repo_id`` (with an index.json); return name -> bytes."""
    folder = server.repo_dir(repo_id)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for cset in sets:
        data = cset.to_bytes()
        name = catalogue.set_filename(cset.method, cset.ipc)
        (folder / name).write_bytes(data)
        out[name] = data
    if index:
        entries = {name: catalogue.index_entry(CondensedSet.from_bytes(d).metadata,
                                               sha256=hashlib.sha256(d).hexdigest(), size=len(d))
                   for name, d in out.items()}
        (folder / "index.json").write_bytes(catalogue.index_to_bytes(catalogue.make_index(entries)))
    return out


@pytest.fixture
def served(server: HubServer) -> dict[str, bytes]:
    """The repository org/condensed-fashionmnist with dm ipc 1 and ipc 10."""
    return put_repo(server, REPO, make_cset(1), make_cset(10, seed=1, accuracy=85.0))


def flip_last_float(path: Path) -> None:
    """Change the low byte of the last float in the file: still a valid set, different bytes."""
    data = bytearray(path.read_bytes())
    data[-4] ^= 0x01
    path.write_bytes(bytes(data))


# -- download --------------------------------------------------------------------------------------------------
def test_fresh_download_lands_under_root_checked(tmp_path: Path, server: HubServer, served: dict[str, bytes],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONDENSED_DATASETS_ORG", "org")  # the default repository is {org}/condensed-{source}
    assert catalogue.default_repo_id("fashionmnist") == REPO
    ds = CondensedFashionMNIST(tmp_path / "data", method="dm", ipc=1, download=True)
    path = set_path(tmp_path / "data", "fashionmnist", "dm", 1)
    assert ds.path == path and path.read_bytes() == served["dm_ipc1.safetensors"]
    assert torch.equal(ds.data, make_cset(1).images) and len(ds) == 10
    record = hub.read_record(path)
    assert record["repo_id"] == REPO and record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert record["commit"] == server.commit_id(REPO)
    assert server.count("GET", SET_GET) == 1
    assert sorted(p.name for p in path.parent.iterdir()) == [
        ".dm_ipc1.safetensors.hub.json", ".dm_ipc1.safetensors.lock", "dm_ipc1.safetensors"]


def test_default_org(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CONDENSED_DATASETS_ORG", raising=False)
    assert catalogue.default_repo_id("CIFAR10") == "condensed-datasets/condensed-cifar10"
    monkeypatch.setenv("CONDENSED_DATASETS_ORG", "me")
    assert catalogue.default_repo_id("cifar10") == "me/condensed-cifar10"


def test_cache_hit_downloads_the_body_once(tmp_path: Path, server: HubServer, served: dict[str, bytes]) -> None:
    CondensedFashionMNIST(tmp_path / "a", "dm", 10, download=True, repo_id=REPO)
    server.reset()
    again = CondensedFashionMNIST(tmp_path / "a", "dm", 10, download=True, repo_id=REPO)  # checked, not fetched
    assert server.count("GET", SET_GET) == 0 and server.count("HEAD", SET_GET) == 1
    other = CondensedFashionMNIST(tmp_path / "b", "dm", 10, download=True, repo_id=REPO)  # from the HF cache
    assert server.count("GET", SET_GET) == 0
    assert other.path.read_bytes() == again.path.read_bytes() == served["dm_ipc10.safetensors"]
    server.reset()
    CondensedFashionMNIST(tmp_path / "a", "dm", 10, repo_id=REPO)  # download=False: the local file, no request
    assert server.requests == []


def test_offline_uses_local_file_or_cache(tmp_path: Path, server: HubServer, served: dict[str, bytes],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    first = CondensedFashionMNIST(tmp_path / "a", "dm", 1, download=True, repo_id=REPO)
    go_offline(monkeypatch)
    server.reset()
    assert CondensedFashionMNIST(tmp_path / "a", "dm", 1, download=True, repo_id=REPO).path == first.path
    fresh = CondensedFashionMNIST(tmp_path / "b", "dm", 1, download=True, repo_id=REPO)  # restored from the cache
    assert fresh.path.read_bytes() == served["dm_ipc1.safetensors"]
    assert server.requests == []


def test_offline_without_cache_says_how_to_get_it(tmp_path: Path, server: HubServer, served: dict[str, bytes],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    go_offline(monkeypatch)
    with pytest.raises(RuntimeError) as err:
        CondensedFashionMNIST(tmp_path, "dm", 1, download=True, repo_id=REPO)
    text = str(err.value)
    assert isinstance(err.value, hub.HubOfflineError)
    assert "HF_HUB_OFFLINE is set" in text and "not in the Hugging Face cache" in text
    assert "Unset HF_HUB_OFFLINE" in text and "build=True" in text
    assert f"condensed-build recipes/dm_fashionmnist.yaml --out {tmp_path} --set ipc=1" in text
    assert server.requests == [] and not set_path(tmp_path, "fashionmnist", "dm", 1).exists()


def test_unreachable_hub_falls_back_to_the_cache(tmp_path: Path, server: HubServer, served: dict[str, bytes]) -> None:
    CondensedFashionMNIST(tmp_path / "a", "dm", 1, download=True, repo_id=REPO)
    server.stop()  # connection refused from now on
    ds = CondensedFashionMNIST(tmp_path / "b", "dm", 1, download=True, repo_id=REPO)
    assert ds.path.read_bytes() == served["dm_ipc1.safetensors"]
    with pytest.raises(hub.HubOfflineError, match="could not be reached"):
        CondensedFashionMNIST(tmp_path / "c", "dm", 10, download=True, repo_id=REPO)


def test_damaged_local_copy_is_replaced_never_used(tmp_path: Path, server: HubServer, served: dict[str, bytes],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    good = served["dm_ipc1.safetensors"]
    path = CondensedFashionMNIST(tmp_path, "dm", 1, download=True, repo_id=REPO).path
    path.write_bytes(good[:100])  # truncated: replaced
    ds = CondensedFashionMNIST(tmp_path, "dm", 1, download=True, repo_id=REPO)
    assert path.read_bytes() == good and torch.equal(ds.data, make_cset(1).images)
    # offline: the damaged copy is restored from the Hugging Face cache...
    go_offline(monkeypatch)
    path.write_bytes(good[:100])
    CondensedFashionMNIST(tmp_path, "dm", 1, download=True, repo_id=REPO)
    assert path.read_bytes() == good
    # ... and refused when the cache cannot help
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_home"))
    path.write_bytes(good[:100])
    with pytest.raises(hub.HubOfflineError, match="is not a valid set"):
        CondensedFashionMNIST(tmp_path, "dm", 1, download=True, repo_id=REPO)


def test_a_changed_download_is_the_users_and_kept(tmp_path: Path, server: HubServer, served: dict[str, bytes]) -> None:
    path = CondensedFashionMNIST(tmp_path, "dm", 1, download=True, repo_id=REPO).path
    flip_last_float(path)  # still a valid set, no longer the recorded bytes: the user's own from now on
    changed = path.read_bytes()
    assert not hub.is_hub_copy(path)
    CondensedFashionMNIST(tmp_path, "dm", 1, download=True, repo_id=REPO)
    assert path.read_bytes() == changed


def test_broken_file_without_record_is_replaced(tmp_path: Path, server: HubServer, served: dict[str, bytes]) -> None:
    path = set_path(tmp_path, "fashionmnist", "dm", 1)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x00" * 64)
    ds = CondensedFashionMNIST(tmp_path, "dm", 1, download=True, repo_id=REPO)
    assert ds.path.read_bytes() == served["dm_ipc1.safetensors"]


def test_a_local_build_is_kept_as_it_is(tmp_path: Path, server: HubServer, served: dict[str, bytes]) -> None:
    mine = make_cset(1, seed=42).save(set_path(tmp_path, "fashionmnist", "dm", 1))
    before = mine.read_bytes()
    ds = CondensedFashionMNIST(tmp_path, "dm", 1, download=True, repo_id=REPO)
    assert ds.path == mine and mine.read_bytes() == before and server.requests == []


def test_missing_file_lists_what_the_repository_has(tmp_path: Path, server: HubServer,
                                                    served: dict[str, bytes]) -> None:
    with pytest.raises(hub.HubNotFoundError) as err:
        CondensedFashionMNIST(tmp_path, "dm", 50, download=True, repo_id=REPO)
    text = str(err.value)
    assert err.value.kind == "file" and isinstance(err.value, RuntimeError)
    assert "has no dm_ipc50.safetensors; it has: dm ipc 1, 10." in text and "build=True" in text
    (server.repo_dir(REPO) / "index.json").unlink()  # no index: the repository's file list
    with pytest.raises(hub.HubNotFoundError, match="it has: dm ipc 1, 10"):
        CondensedFashionMNIST(tmp_path, "dsa", 1, download=True, repo_id=REPO)
    assert server.count("GET", f"/api/datasets/{REPO}/tree/main") == 1
    assert not set_path(tmp_path, "fashionmnist", "dm", 50).exists()


def test_missing_repository_or_revision(tmp_path: Path, server: HubServer, served: dict[str, bytes]) -> None:
    with pytest.raises(hub.HubNotFoundError) as err:
        CondensedCIFAR10(tmp_path, "dm", 1, download=True, repo_id="org/nope")
    assert err.value.kind == "repository" and "no dataset repository 'org/nope'" in str(err.value)
    with pytest.raises(hub.HubNotFoundError) as err:
        CondensedFashionMNIST(tmp_path, "dm", 1, download=True, repo_id=REPO, revision="v9")
    assert err.value.kind == "revision"
    assert "has no revision 'v9'; its branches and tags: main" in str(err.value)


def test_not_on_hub_with_build_builds(tmp_path: Path, server: HubServer, served: dict[str, bytes],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import builders.build

    def fake_build(source: str, method: str, ipc: int, root: Any) -> Path:
        return make_cset(ipc, method=method, seed=7).save(set_path(root, source, method, ipc))

    monkeypatch.setattr(builders.build, "build_set", fake_build)
    ds = CondensedFashionMNIST(tmp_path, "dsa", 2, download=True, build=True, repo_id=REPO)
    assert torch.equal(ds.data, make_cset(2, method="dsa", seed=7).images)


def test_concurrent_downloads_end_with_one_good_file(tmp_path: Path, server: HubServer,
                                                     served: dict[str, bytes]) -> None:
    barrier = threading.Barrier(4)

    def worker() -> Path:
        barrier.wait()
        return hub.download_set(tmp_path / "data", "fashionmnist", "dm", 10, repo_id=REPO)

    results, errors = run_in_threads(worker, 4, timeout=60)
    assert not errors and len(results) == 4 and len(set(results)) == 1
    assert results[0].read_bytes() == served["dm_ipc10.safetensors"]
    assert sorted(p.name for p in results[0].parent.iterdir()) == [
        ".dm_ipc10.safetensors.hub.json", ".dm_ipc10.safetensors.lock", "dm_ipc10.safetensors"]
    assert server.count("GET", SET_GET) == 1  # one download; the others found the good file


def test_sha256_from_index_when_the_server_gives_no_lfs_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    srv = HubServer(tmp_path / "hub", lfs_hashes=False).start()
    try:
        point_huggingface_hub_at(srv, monkeypatch, tmp_path / "hf_home")
        files = put_repo(srv, REPO, make_cset(1))
        assert hub.remote_file(REPO, "dm_ipc1.safetensors").sha256 is None
        path = hub.download_set(tmp_path / "a", "fashionmnist", "dm", 1, repo_id=REPO)
        assert path.read_bytes() == files["dm_ipc1.safetensors"]
        index_file = srv.repo_dir(REPO) / "index.json"
        index = json.loads(index_file.read_text())
        index["files"]["dm_ipc1.safetensors"]["sha256"] = "0" * 64
        index_file.write_text(json.dumps(index))
        with pytest.raises(hub.HubIntegrityError, match="nothing was written"):
            hub.download_set(tmp_path / "b", "fashionmnist", "dm", 1, repo_id=REPO)
        index_file.unlink()
        with pytest.raises(hub.HubIntegrityError, match="cannot be checked"):
            hub.download_set(tmp_path / "c", "fashionmnist", "dm", 1, repo_id=REPO)
        assert not (tmp_path / "b" / "condensed" / "fashionmnist" / "dm_ipc1.safetensors").exists()
    finally:
        srv.stop()


# -- embedded sets and the catalogue ------------------------------------------------------------------------------
def test_embedded_set_needs_no_network_and_no_local_file(tmp_path: Path, server: HubServer, served: dict[str, bytes],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    embedded = tmp_path / "embedded"
    shipped = make_cset(1, seed=3).save(embedded / "fashionmnist" / "dm_ipc1.safetensors")
    monkeypatch.setenv("CONDENSED_DATASETS_EMBEDDED_DIR", str(embedded))
    ds = CondensedFashionMNIST(tmp_path / "data", method="dm", ipc=1)
    assert ds.path == shipped and torch.equal(ds.data, make_cset(1, seed=3).images)
    assert CondensedFashionMNIST(tmp_path / "data", "dm", 1, download=True).path == shipped
    assert server.requests == []
    # a repository or revision asked for: the embedded set does not answer it
    assert CondensedFashionMNIST(tmp_path / "data", "dm", 1, download=True, repo_id=REPO).path != shipped
    with pytest.raises(ValueError, match="available ipcs for dm: 1"):  # the embedded ipc counts (README)
        CondensedFashionMNIST(tmp_path / "other", "dm", 10)
    monkeypatch.delenv("CONDENSED_DATASETS_EMBEDDED_DIR")
    monkeypatch.setattr(catalogue, "EMBEDDED_DIR", embedded)  # the module attribute works as well
    assert catalogue.embedded_path("fashionmnist", "dm", 1) == shipped


def test_package_embedded_folder_layout() -> None:
    folder = Path(catalogue.__file__).parent / "embedded"
    assert (folder / "README.md").is_file()
    for path in folder.glob("*/*.safetensors"):  # the lead's built files, when present, are valid sets
        cset = CondensedSet.load(path)
        assert (cset.source, catalogue.set_filename(cset.method, cset.ipc)) == (path.parent.name, path.name)


def test_available_lists_local_embedded_and_hub(tmp_path: Path, server: HubServer, served: dict[str, bytes],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(catalogue, "EMBEDDED_DIR", tmp_path / "embedded")
    make_cset(1, seed=3).save(tmp_path / "embedded" / "fashionmnist" / "dm_ipc1.safetensors")
    make_cset(2, method="herding").save(set_path(tmp_path / "data", "fashionmnist", "herding", 2))
    rows = CondensedFashionMNIST.available(root=tmp_path / "data")
    assert [(r["where"], r["method"], r["ipc"]) for r in rows] == [("local", "herding", 2), ("embedded", "dm", 1)]
    assert server.requests == []
    rows = CondensedFashionMNIST.available(root=tmp_path / "data", repo_id=REPO, download=True)
    hub_rows = [r for r in rows if r["where"] == "hub"]
    assert [(r["method"], r["ipc"]) for r in hub_rows] == [("dm", 1), ("dm", 10)]
    assert hub_rows[1]["accuracy_mean"] == 85.0 and hub_rows[1]["improvement_over_random"] == 10.0
    assert hub_rows[1]["sha256"] == hashlib.sha256(served["dm_ipc10.safetensors"]).hexdigest()
    assert all(r["location"] == REPO for r in hub_rows)


def test_condensed_list_command(tmp_path: Path, server: HubServer, served: dict[str, bytes]) -> None:
    from builders.cli import list_command

    make_cset(2, method="herding").save(set_path(tmp_path / "data", "fashionmnist", "herding", 2))
    runner = CliRunner()
    out = runner.invoke(list_command, ["fashionmnist", "--repo", REPO])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert lines[0].split()[:5] == ["where", "location", "source", "method", "ipc"]
    assert "85.00 ± 0.50" in lines[2] and "+10.00" in lines[2] and " 10 " in lines[2]
    out = runner.invoke(list_command, ["--root", str(tmp_path / "data"), "--json"])
    rows = json.loads(out.output)
    assert [(r["where"], r["method"], r["ipc"], r["accuracy_mean"]) for r in rows] == [("local", "herding", 2, 80.0)]
    out = runner.invoke(list_command, ["--dir", str(server.repo_dir(REPO))])
    assert out.exit_code == 0 and out.output.count("folder") == 2
    out = runner.invoke(list_command, ["--repo", "org/nope"])
    assert out.exit_code == 1 and "no dataset repository 'org/nope'" in out.output
