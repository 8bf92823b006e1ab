"""Publishing: the card and index a commit carries, --dry-run, --to-dir, no-op, --force, and round trips
through the loopback hub (tests/hubserver.py): folder -> served -> downloaded, and HfApi.create_commit."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from hubserver import HubServer

from builders.cli import list_command, publish_command
from builders.publish import PublishConflict, PublishError, build_card, commit_operations, plan_publish, publish_to_hub
from condensed_datasets import CondensedFashionMNIST, catalogue, hub
from condensed_datasets.datasets import set_path
from condensed_datasets.format import CondensedSet

REPO = "org/condensed-fashionmnist"


def make_cset(ipc: int = 1, method: str = "dm", seed: int = 0, accuracy: float | None = 80.0,
              source: str = "fashionmnist") -> CondensedSet:
    """A small random set; with an evaluation block unless ``accuracy`` is None."""
    g = torch.Generator().manual_seed(seed)
    shape = (1, 28, 28) if source in ("fashionmnist", "mnist") else (3, 32, 32)
    meta = {"recipe": {"model": "ConvNet", "iterations": 200, "seed": seed}, "seed": seed}
    if accuracy is not None:
        meta["evaluation"] = {"model": "ConvNet", "runs": 2, "epochs": 300, "accuracy_mean": accuracy,
                              "accuracy_std": 0.25, "random_accuracy_mean": accuracy - 7.5,
                              "improvement_over_random": 7.5}
    return CondensedSet(torch.randn(10 * ipc, *shape, generator=g), torch.arange(10).repeat_interleave(ipc),
                        source=source, method=method, ipc=ipc, metadata=meta)


def save(tmp_path: Path, cset: CondensedSet, name: str | None = None) -> Path:
    """Write ``cset`` under ``tmp_path/sets``; without a name, one derived from its bytes, so two different
    sets never share a file (a name from ``id()`` can repeat once the first object is freed)."""
    data = cset.to_bytes()
    name = name or f"{cset.method}_{cset.ipc}_{hashlib.sha256(data).hexdigest()[:16]}.safetensors"
    return cset.save(tmp_path / "sets" / name)


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


# -- the pure part ------------------------------------------------------------------------------------------------
def test_plan_carries_set_index_and_card() -> None:
    data = make_cset(10, accuracy=83.1).to_bytes()
    plan = plan_publish(data, None, repo_id=REPO)
    assert plan.status == "new" and list(plan.files) == ["dm_ipc10.safetensors", "index.json", "README.md"]
    ops = commit_operations(plan)
    assert [op.path_in_repo for op in ops] == list(plan.files)
    assert ops[0].upload_info.sha256.hex() == hashlib.sha256(data).hexdigest()

    index = json.loads(plan.files["index.json"])
    entry = index["files"]["dm_ipc10.safetensors"]
    assert index["index_version"] == 1
    assert {k: entry[k] for k in ("source", "method", "ipc", "sha256", "size", "format_version")} == {
        "source": "fashionmnist", "method": "dm", "ipc": 10, "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data), "format_version": 1}
    assert (entry["accuracy_mean"], entry["accuracy_std"], entry["improvement_over_random"]) == (83.1, 0.25, 7.5)
    assert plan.files["index.json"] == catalogue.index_to_bytes(index)  # sorted keys, stable bytes
    assert plan_publish(data, None, repo_id=REPO).files == plan.files

    card = plan.files["README.md"].decode()
    meta = front_matter(card)
    assert meta["task_categories"] == ["image-classification"] and meta["viewer"] is False
    assert {"dataset-distillation", "dataset-condensation"} <= set(meta["tags"])
    assert meta["source_datasets"] == ["extended|fashion_mnist"] and meta["license"] == "mit"
    assert meta["size_categories"] == ["n<1K"]
    row = next(line for line in card.splitlines() if line.startswith("| `dm_ipc10"))
    assert "| DM | 10 | 100 | 83.10 ± 0.25 | 75.60 | +7.50 | ConvNet, 2 runs × 300 epochs |" in row
    assert "ConvNet, 200 iterations, seed 0" in row
    assert 'repo_id="org/condensed-fashionmnist"' in card


def test_card_lists_every_set_in_order_and_missing_evaluations() -> None:
    index = None
    for cset in (make_cset(10, accuracy=83.0), make_cset(1, method="random", accuracy=None), make_cset(1)):
        index = plan_publish(cset.to_bytes(), index, repo_id=REPO).index
    assert list(index["files"]) == ["dm_ipc1.safetensors", "dm_ipc10.safetensors", "random_ipc1.safetensors"]
    card = build_card(index, REPO, license="cc-by-4.0")
    rows = [line.split("|")[1].strip() for line in card.splitlines() if line.startswith("| `")]
    assert rows == ["`random_ipc1.safetensors`", "`dm_ipc1.safetensors`", "`dm_ipc10.safetensors`"]
    assert "not evaluated" in card and front_matter(card)["license"] == "cc-by-4.0"
    assert front_matter(card)["size_categories"] == ["n<1K"]


def test_republish_rules() -> None:
    first = plan_publish(make_cset(1).to_bytes(), None, repo_id=REPO)
    same = plan_publish(make_cset(1).to_bytes(), first.index, repo_id=REPO)
    assert same.status == "unchanged" and same.files == {} and "nothing to do" in same.describe()
    other = make_cset(1, seed=5).to_bytes()
    with pytest.raises(PublishConflict, match="--force"):
        plan_publish(other, first.index, repo_id=REPO)
    forced = plan_publish(other, first.index, repo_id=REPO, force=True)
    assert forced.status == "replace" and forced.previous_sha256 == first.sha256
    assert forced.index["files"]["dm_ipc1.safetensors"]["sha256"] == hashlib.sha256(other).hexdigest()
    with pytest.raises(PublishError, match="one repository holds one source"):
        plan_publish(make_cset(1, source="cifar10").to_bytes(), first.index, repo_id=REPO)


# -- the command, --to-dir ------------------------------------------------------------------------------------------
def test_dry_run_changes_nothing(tmp_path: Path) -> None:
    set_file = save(tmp_path, make_cset(1))
    out = CliRunner().invoke(publish_command, [str(set_file), "--to-dir", str(tmp_path / "mirror"), "--dry-run"])
    assert out.exit_code == 0, out.output
    assert "dry run: nothing was changed" in out.output and "dm_ipc1.safetensors: new" in out.output
    assert "----- README.md -----" in out.output and "viewer: false" in out.output
    assert '"sha256": "' + hashlib.sha256(set_file.read_bytes()).hexdigest() in out.output
    assert not (tmp_path / "mirror").exists()


def test_to_dir_layout_noop_and_force(tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    runner = CliRunner()
    first = save(tmp_path, make_cset(1))
    out = runner.invoke(publish_command, [str(first), "--to-dir", str(mirror)])
    assert out.exit_code == 0, out.output
    assert sorted(p.name for p in mirror.iterdir()) == [".publish.lock", "README.md", "dm_ipc1.safetensors",
                                                         "index.json"]
    assert (mirror / "dm_ipc1.safetensors").read_bytes() == first.read_bytes()
    runner.invoke(publish_command, [str(save(tmp_path, make_cset(10))), "--to-dir", str(mirror)])
    index = catalogue.parse_index((mirror / "index.json").read_bytes())
    assert sorted(index["files"]) == ["dm_ipc1.safetensors", "dm_ipc10.safetensors"]
    assert "dm_ipc10.safetensors" in (mirror / "README.md").read_text()

    stamps = {p.name: p.stat().st_mtime_ns for p in mirror.iterdir()}
    out = runner.invoke(publish_command, [str(first), "--to-dir", str(mirror)])
    assert out.exit_code == 0 and "nothing to do" in out.output
    assert {p.name: p.stat().st_mtime_ns for p in mirror.iterdir()} == stamps

    changed = save(tmp_path, make_cset(1, seed=9, accuracy=70.0))
    out = runner.invoke(publish_command, [str(changed), "--to-dir", str(mirror)])
    assert out.exit_code == 1 and "--force" in out.output
    assert (mirror / "dm_ipc1.safetensors").read_bytes() == first.read_bytes()
    out = runner.invoke(publish_command, [str(changed), "--to-dir", str(mirror), "--force"])
    assert out.exit_code == 0 and "replace" in out.output
    assert (mirror / "dm_ipc1.safetensors").read_bytes() == changed.read_bytes()
    assert "70.00 ± 0.25" in (mirror / "README.md").read_text()
    out = runner.invoke(publish_command, [str(changed), "--to-dir", str(mirror), "--revision", "dev"])
    assert out.exit_code == 2 and "apply to the hub" in out.output


def test_round_trip_folder_served_downloaded(tmp_path: Path, server: HubServer) -> None:
    set_file = save(tmp_path, make_cset(10, seed=4))
    out = CliRunner().invoke(publish_command, [str(set_file), "--repo", REPO, "--to-dir", str(server.repo_dir(REPO))])
    assert out.exit_code == 0, out.output
    ds = CondensedFashionMNIST(tmp_path / "data", method="dm", ipc=10, download=True, repo_id=REPO)
    assert ds.path.read_bytes() == set_file.read_bytes()
    assert torch.equal(ds.data, make_cset(10, seed=4).images)
    rows = CondensedFashionMNIST.available(repo_id=REPO, download=True)
    assert [(r["where"], r["ipc"], r["accuracy_mean"]) for r in rows] == [("hub", 10, 80.0)]


# -- the hub, through HfApi.create_commit against the loopback server -------------------------------------------------
def test_publish_to_hub_one_commit_noop_force(tmp_path: Path, server: HubServer) -> None:
    runner = CliRunner()
    first = save(tmp_path, make_cset(1))
    out = runner.invoke(publish_command, [str(first), "--repo", REPO, "--dry-run"])
    assert out.exit_code == 0, out.output
    assert "dry run" in out.output and not server.repo_dir(REPO).exists() and server.commits == []

    out = runner.invoke(publish_command, [str(first), "--repo", REPO])
    assert out.exit_code == 0, out.output
    assert len(server.commits) == 1 and server.commits[0]["files"] == ["dm_ipc1.safetensors", "index.json",
                                                                        "README.md"]
    assert f"committed to {REPO}" in out.output
    second = save(tmp_path, make_cset(10))
    result = publish_to_hub(second, REPO)
    assert result.plan.status == "new" and len(server.commits) == 2
    assert server.commits[1]["parent"] == server.commits[0]["commit"]  # pinned to what was read
    files = server.files(REPO)
    index = catalogue.parse_index(files["index.json"])
    assert sorted(index["files"]) == ["dm_ipc1.safetensors", "dm_ipc10.safetensors"]
    assert files["README.md"].decode().count("| `dm_ipc") == 2

    out = runner.invoke(publish_command, [str(first), "--repo", REPO])
    assert out.exit_code == 0 and "nothing to do" in out.output and len(server.commits) == 2
    changed = save(tmp_path, make_cset(1, seed=3))
    out = runner.invoke(publish_command, [str(changed), "--repo", REPO])
    assert out.exit_code == 1 and "--force" in out.output and len(server.commits) == 2
    out = runner.invoke(publish_command, [str(changed), "--repo", REPO, "--force"])
    assert out.exit_code == 0 and len(server.commits) == 3
    assert server.commits[2]["summary"] == "Replace dm_ipc1.safetensors"

    ds = CondensedFashionMNIST(tmp_path / "data", "dm", 1, download=True, repo_id=REPO)
    assert ds.path.read_bytes() == changed.read_bytes() == set_path(tmp_path / "data", "fashionmnist", "dm",
                                                                    1).read_bytes()


def test_a_commit_the_hub_refuses_is_the_packages_error_saying_what_to_do(tmp_path: Path, server: HubServer,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Another publish landing between the read and the commit (HTTP 412) is a PublishConflict that says to run
    the publish again; a commit the hub refuses (no write access) is a PublishError naming the status and the
    token: never huggingface_hub's own error."""
    publish_to_hub(save(tmp_path, make_cset(1)), REPO)
    read = hub.fetch_index

    def racing(*args: object, **kwargs: object) -> object:
        index = read(*args, **kwargs)
        monkeypatch.setattr(hub, "fetch_index", read)
        publish_to_hub(save(tmp_path, make_cset(10)), REPO)  # another publisher commits meanwhile
        return index

    monkeypatch.setattr(hub, "fetch_index", racing)
    changed = save(tmp_path, make_cset(1, seed=3))
    with pytest.raises(PublishConflict, match="run the publish again"):
        publish_to_hub(changed, REPO, force=True)
    assert len(server.commits) == 2
    server.fail = {"/commit/": 403}
    with pytest.raises(PublishError, match=r"refused the commit .*HTTP 403.*HF_TOKEN"):
        publish_to_hub(changed, REPO, force=True)
    out = CliRunner().invoke(publish_command, [str(changed), "--repo", REPO, "--force"])
    assert out.exit_code == 1 and "HTTP 403" in out.output and "Traceback" not in out.output
    assert len(server.commits) == 2


@pytest.mark.parametrize("repo_id", ["org/x.git", "org/x-", "org/x.", "org./x", "org--a/x", "org/a--b"])
def test_repo_ids_the_hub_refuses_are_refused_before_any_request(tmp_path: Path, server: HubServer,
                                                                 repo_id: str) -> None:
    """An id huggingface_hub would refuse (a name ending in '.git', '-' or '.', or holding '--') is the package's
    one-line error naming the form, from condensed-publish and condensed-list, before any request."""
    set_file = save(tmp_path, make_cset(1))
    with pytest.raises(PublishError, match="ORG/NAME"):
        publish_to_hub(set_file, repo_id)
    for command, args in ((publish_command, [str(set_file), "--repo", repo_id]), (list_command, ["--repo", repo_id])):
        out = CliRunner().invoke(command, args)
        assert out.exit_code == 1 and "owner/name" in out.output and "Traceback" not in out.output, out.output
    assert server.requests == []


@pytest.mark.parametrize("in_the_way", ["index.json", "README.md", "dm_ipc1.safetensors", ".publish.lock"])
def test_a_folder_in_the_way_of_a_published_file_is_refused_before_anything_is_written(tmp_path: Path,
                                                                                       in_the_way: str) -> None:
    """A folder where the set, index.json, README.md or the lock goes is a one-line error naming it and the fix,
    found before anything is written (an index.json folder used to stop the publish after the set was written,
    leaving a set that no index lists)."""
    mirror = tmp_path / "mirror"
    (mirror / in_the_way).mkdir(parents=True)
    out = CliRunner().invoke(publish_command, [str(save(tmp_path, make_cset(1))), "--to-dir", str(mirror)])
    assert out.exit_code == 1 and "Traceback" not in out.output, out.output
    assert str(mirror / in_the_way) in out.output and "move it away" in out.output, out.output
    assert sorted(p.name for p in mirror.iterdir() if p.name != ".publish.lock") == sorted(
        {in_the_way} - {".publish.lock"})


def test_a_to_dir_below_a_file_names_the_folder_and_the_fix(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("mine\n")
    out = CliRunner().invoke(publish_command, [str(save(tmp_path, make_cset(1))), "--to-dir",
                                               str(tmp_path / "afile" / "mirror")])
    assert out.exit_code == 1 and "cannot create" in out.output and "pass --to-dir" in out.output, out.output
    assert (tmp_path / "afile").read_text() == "mine\n"


def test_a_folder_of_another_source_or_a_broken_index_names_the_folder_and_the_fix(tmp_path: Path) -> None:
    """Publishing into a folder of another source's sets names that folder (not a repository) and says to choose
    another folder; a whole index.json that is not an index says to repair or move it."""
    mirror = tmp_path / "mirror"
    runner = CliRunner()
    assert runner.invoke(publish_command, [str(save(tmp_path, make_cset(1, source="cifar10"))),
                                           "--to-dir", str(mirror)]).exit_code == 0
    out = runner.invoke(publish_command, [str(save(tmp_path, make_cset(1))), "--to-dir", str(mirror)])
    assert out.exit_code == 1 and f"{mirror} holds cifar10 sets" in out.output, out.output
    assert "another folder" in out.output and "condensed-fashionmnist" not in out.output, out.output
    (mirror / "index.json").write_text("{not json")
    out = runner.invoke(publish_command, [str(save(tmp_path, make_cset(1, source="cifar10"))),
                                          "--to-dir", str(mirror)])
    assert out.exit_code == 1 and "is not JSON" in out.output and "move it away" in out.output, out.output
