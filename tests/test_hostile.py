"""Hostile input and faults (issue 13): names that would become paths, sets the user owns, malformed headers
and listings, stalled and failing servers, interrupted and concurrent builds, and the small edges."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import types
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from conftest import run_in_threads
from filelock import FileLock
from hubserver import HubServer, point_huggingface_hub_at
from safetensors.torch import save as st_save

import builders.recipe
from builders.build import build_set, load_recipe
from builders.cli import build_command, eval_command, list_command, show_command
from builders.data import RealData
from builders.engine import Engine
from builders.errors import BuildError, PublishError, RecipeError
from builders.publish import publish_to_dir, publish_to_hub
from builders.recipe import parse_overrides, parse_recipe, shipped_recipe_path
from condensed_datasets import CondensedFashionMNIST, catalogue, hub
from condensed_datasets._atomic import atomic_write_bytes
from condensed_datasets.datasets import set_path
from condensed_datasets.errors import (
    CondensedSetError,
    HubError,
    HubIntegrityError,
    HubServerError,
    HubStalledError,
    SkippedEntryWarning,
    SourceDataError,
    UnknownNameError,
)
from condensed_datasets.format import METADATA_KEY, CondensedSet

REPO = "org/condensed-fashionmnist"


def make_cset(ipc: int = 1, seed: int = 0, **metadata: Any) -> CondensedSet:
    g = torch.Generator().manual_seed(seed)
    return CondensedSet(torch.randn(10 * ipc, 1, 28, 28, generator=g), torch.arange(10).repeat_interleave(ipc),
                        source="fashionmnist", method="dm", ipc=ipc, metadata=metadata)


def crafted(**changes: Any) -> bytes:
    """A set file's bytes whose metadata has ``changes`` applied, written without any validation (a stranger's
    file); a change to ``METADATA`` replaces the whole metadata value, ``TENSORS`` the tensors."""
    good = make_cset()
    tensors = dict(changes.pop("TENSORS", good.tensors()))
    meta: Any = {**good.metadata, **changes}
    raw = changes.get("METADATA", meta)
    text = raw if isinstance(raw, str) else json.dumps(raw)
    return st_save(tensors, metadata={METADATA_KEY: text})


def put_repo(server: HubServer, *sets: CondensedSet, index: dict[str, Any] | None = None) -> dict[str, bytes]:
    folder = server.repo_dir(REPO)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for cset in sets:
        out[catalogue.set_filename(cset.method, cset.ipc)] = data = cset.to_bytes()
        (folder / catalogue.set_filename(cset.method, cset.ipc)).write_bytes(data)
    entries = {name: catalogue.index_entry(CondensedSet.from_bytes(d).metadata,
                                           sha256=hashlib.sha256(d).hexdigest(), size=len(d)) for name, d in out.items()}
    doc = index if index is not None else catalogue.make_index(entries)
    (folder / "index.json").write_text(json.dumps(doc))
    return out


# -- 1. names that become paths ------------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value", [
    ("method", "../../../escaped"), ("method", "/abs/path"), ("source", "../x"), ("method", "evil"),
    ("method", "DM"), ("method", "user_"),
])
def test_names_that_would_climb_out_or_are_unknown_are_refused(field: str, value: str) -> None:
    kwargs = {"source": "fashionmnist", "method": "dm", field: value}
    with pytest.raises(CondensedSetError):
        CondensedSet(torch.zeros(10, 1, 28, 28), torch.arange(10), ipc=1, **kwargs)
    with pytest.raises(CondensedSetError):
        CondensedSet.from_bytes(crafted(**{field: value}))


def test_a_users_own_method_follows_the_documented_pattern(tmp_path: Path) -> None:
    cset = CondensedSet(torch.zeros(10, 1, 28, 28), torch.arange(10), source="fashionmnist", method="user_mine",
                        ipc=1)
    ds = CondensedFashionMNIST(tmp_path, "user_mine", 1) if cset.save(
        set_path(tmp_path, "fashionmnist", "user_mine", 1)) else None
    assert ds is not None and ds.method == "user_mine"
    with pytest.raises(UnknownNameError, match="user_<name>"):
        CondensedFashionMNIST(tmp_path, "mine", 1)


def test_publish_to_dir_writes_only_inside_its_folder_and_skips_a_malformed_index_entry(tmp_path: Path) -> None:
    folder = tmp_path / "mirror"
    folder.mkdir()
    bad = {"source": "../../escaped", "method": "dm", "ipc": 5, "sha256": None, "size": 1}
    (folder / "index.json").write_text(json.dumps({"index_version": 1, "files": {"dm_ipc5.safetensors": bad,
                                                                                 "../../x.safetensors": {}}}))
    src = make_cset().save(tmp_path / "sets" / "mine.safetensors")
    with pytest.warns(SkippedEntryWarning, match="left out"):
        result = publish_to_dir(src, folder)
    assert sorted(p.name for p in result.written) == ["README.md", "dm_ipc1.safetensors", "index.json"]
    assert all(p.parent == folder for p in result.written)
    index = catalogue.parse_index((folder / "index.json").read_bytes())
    assert list(index["files"]) == ["dm_ipc1.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mirror", "sets"]


@pytest.mark.parametrize("kwargs", [{"repo_id": "../../etc"}, {"repo_id": "org/../x"}, {"repo_id": "org/x.git"},
                                    {"repo_id": "org/x-"}, {"repo_id": "org./x"}, {"repo_id": "org--a/x"},
                                    {"revision": "../../x"},
                                    {"revision": "/abs"}, {"revision": "a/../../b"}, {"revision": ""}])
def test_repo_ids_and_revisions_are_checked_before_any_request(tmp_path: Path, server: HubServer,
                                                               kwargs: dict[str, str]) -> None:
    put_repo(server, make_cset())
    with pytest.raises(UnknownNameError):
        CondensedFashionMNIST(tmp_path, "dm", 1, download=True, **kwargs)
    with pytest.raises(HubError):
        hub.download_set(tmp_path, "fashionmnist", "dm", 1, **{"repo_id": REPO, **kwargs})
    with pytest.raises(HubError):
        hub.list_repo(kwargs.get("repo_id", REPO), revision=kwargs.get("revision"))
    assert server.requests == []
    assert not any(p.name == "x" for p in tmp_path.rglob("*"))


def test_condensed_list_and_publish_refuse_a_bad_revision(tmp_path: Path, server: HubServer) -> None:
    put_repo(server, make_cset())
    result = CliRunner().invoke(list_command, ["--repo", REPO, "--revision", "../../x"])
    assert result.exit_code == 1 and "revision '../../x'" in result.output and "Traceback" not in result.output
    src = make_cset().save(tmp_path / "mine.safetensors")
    with pytest.raises(PublishError, match="revision"):
        publish_to_hub(src, REPO, revision="../../x")
    assert server.requests == []


# -- 2. a set the user built is never replaced by a download ---------------------------------------------------------
def test_a_rebuilt_or_resaved_set_is_never_replaced_by_a_download(tmp_path: Path, server: HubServer) -> None:
    served = put_repo(server, make_cset())
    path = CondensedFashionMNIST(tmp_path, "dm", 1, download=True, repo_id=REPO).path
    assert path.read_bytes() == served["dm_ipc1.safetensors"] and hub.is_hub_copy(path)
    make_cset(seed=7).save(path)  # what condensed-build --overwrite does: the record beside it survives
    mine = path.read_bytes()
    assert hub.read_record(path) is not None and not hub.is_hub_copy(path)
    ds = CondensedFashionMNIST(tmp_path, "dm", 1, download=True, repo_id=REPO)
    assert path.read_bytes() == mine and torch.equal(ds.data, make_cset(seed=7).images)
    with pytest.raises(HubError, match="never replaces it"):
        hub.download_set(tmp_path, "fashionmnist", "dm", 1, repo_id=REPO)
    assert path.read_bytes() == mine
    # condensed-eval --save on a download: the evaluation the user added is theirs too
    path.write_bytes(served["dm_ipc1.safetensors"])
    assert hub.is_hub_copy(path)
    CondensedSet.load(path).with_metadata(evaluation={"accuracy_mean": 12.5}).save(path)
    saved = path.read_bytes()
    CondensedFashionMNIST(tmp_path, "dm", 1, download=True, repo_id=REPO)
    assert path.read_bytes() == saved


# -- 4. malformed headers raise the format's own error; repair paths then work ------------------------------------------
MALFORMED = {
    "metadata is a list": {"METADATA": [1, 2]},
    "metadata is a string": {"METADATA": '"text"'},
    "format_version a list": {"format_version": [1]},
    "format_version a float": {"format_version": 1.0},
    "ipc a string": {"ipc": "1"},
    "ipc huge": {"ipc": 10 ** 400},
    "classes a string": {"classes": "abcdefghij"},
    "classes of numbers": {"classes": list(range(10))},
    "image_shape a number": {"image_shape": 5},
    "image_shape of strings": {"image_shape": ["1", "28", "28"]},
    "normalization a list": {"normalization": [0.5, 0.5]},
    "normalization std 0": {"normalization": {"mean": [0.5], "std": [0.0]}},
    "normalization wrong length": {"normalization": {"mean": [0.5, 0.5], "std": [1.0, 1.0]}},
    "evaluation a list": {"evaluation": [1]},
    "evaluation accuracy a string": {"evaluation": {"accuracy_mean": "high"}},
    "evaluation runs a float": {"evaluation": {"accuracy_mean": 1.0, "runs": 2.5}},
    "cross-architecture a list": {"evaluation": {"accuracy_mean": 1.0, "cross_architecture": [1]}},
    "recipe a list": {"recipe": [1]},
    "zca a list": {"zca": [1]},
    "seed a string": {"seed": "0"},
    "huge float": {"seed": 1e400},
    "NaN": {"METADATA": '{"format_version": NaN}'},
    "deep nesting": {"METADATA": '{"format_version": 1, "x": ' + "[" * 100_000 + "]" * 100_000 + "}"},
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_metadata_raises_the_formats_error_everywhere(tmp_path: Path, name: str) -> None:
    data = crafted(**MALFORMED[name])
    with pytest.raises(CondensedSetError):
        CondensedSet.from_bytes(data)
    path = tmp_path / "condensed" / "fashionmnist" / "dm_ipc1.safetensors"
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    with pytest.raises(CondensedSetError):
        catalogue.read_set_metadata(path)
    with pytest.warns(SkippedEntryWarning):
        assert catalogue.list_local(tmp_path, "fashionmnist") == []


def test_a_malformed_local_file_is_repaired_by_download(tmp_path: Path, server: HubServer) -> None:
    served = put_repo(server, make_cset())
    path = set_path(tmp_path, "fashionmnist", "dm", 1)
    path.parent.mkdir(parents=True)
    path.write_bytes(crafted(format_version=[1]))
    CondensedFashionMNIST(tmp_path, "dm", 1, download=True, repo_id=REPO)
    assert path.read_bytes() == served["dm_ipc1.safetensors"]


# -- 5. build=True resumes and builds once ------------------------------------------------------------------------------
TINY_DM = """\
source: fashionmnist
method: dm
ipc: 10
model: ConvNetW32
iterations: 4
checkpoint_every: 1
augment: none
real_per_class: 10
params: {batch_real: 8}
eval: {runs: 1, epochs: 1, test_per_class: 2}
"""


@pytest.fixture
def tiny_shipped_dm(fashion_mnist_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A root with Fashion-MNIST and a shipped dm recipe of 4 iterations; returns the root."""
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "dm_fashionmnist.yaml").write_text(TINY_DM)
    monkeypatch.setattr(builders.recipe, "RECIPES_DIR", recipes)
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    monkeypatch.setenv("CONDENSED_DATASETS_EMBEDDED_DIR", str(tmp_path / "no_embedded"))
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(fashion_mnist_root / "FashionMNIST", root / "FashionMNIST")
    return root


class _Killed(Exception):
    pass


def test_build_true_resumes_an_interrupted_build(tiny_shipped_dm: Path, tmp_path: Path) -> None:
    root = tiny_shipped_dm
    recipe = load_recipe(shipped_recipe_path("dm", "fashionmnist"), [("ipc", 1)])
    whole_root = tmp_path / "whole"
    whole_root.mkdir()
    os.symlink(root / "FashionMNIST", whole_root / "FashionMNIST")
    whole = Engine(recipe, out_root=whole_root, data_root=whole_root, device="cpu", progress=False)
    whole.run()

    def kill(iteration: int, loss: float) -> None:
        if iteration == 2:
            raise _Killed

    part = Engine(recipe, out_root=root, data_root=root, device="cpu", progress=False)
    with pytest.raises(_Killed):
        part.run(on_iteration=kill)
    assert part.paths.checkpoint.is_file() and not part.paths.set.exists()
    ds = CondensedFashionMNIST(root, "dm", 1, build=True)
    assert ds.path.read_bytes() == whole.paths.set.read_bytes()
    log = [json.loads(line) for line in part.paths.log.read_text().splitlines()]
    assert [e["iteration"] for e in log if "loss" in e] == [1, 2, 3, 4]


def test_build_true_over_another_recipes_checkpoint_says_what_to_delete(tiny_shipped_dm: Path) -> None:
    root = tiny_shipped_dm
    other = load_recipe(shipped_recipe_path("dm", "fashionmnist"), [("ipc", 1), ("seed", 5)])
    part = Engine(other, out_root=root, data_root=root, device="cpu", progress=False)

    def kill(iteration: int, loss: float) -> None:
        if iteration == 2:
            raise _Killed

    with pytest.raises(_Killed):
        part.run(on_iteration=kill)
    assert part.paths.checkpoint.is_file()
    with pytest.raises(BuildError, match=f"Delete {part.paths.checkpoint} to start this build over"):
        CondensedFashionMNIST(root, "dm", 1, build=True)


def test_concurrent_build_true_builds_once(tiny_shipped_dm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tiny_shipped_dm
    runs: list[int] = []
    real_run = Engine.run

    def counted(self: Engine, *args: Any, **kwargs: Any) -> Any:
        runs.append(threading.get_ident())
        time.sleep(0.2)  # both threads are surely waiting on the lock or building by now
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "run", counted)
    paths, errors = run_in_threads(lambda: build_set("fashionmnist", "dm", 1, root, device="cpu"), 2)
    assert errors == [] and len(runs) == 1 and len(set(paths)) == 1 and paths[0].is_file()
    log = [json.loads(line) for line in paths[0].with_name("dm_ipc1.log.jsonl").read_text().splitlines()]
    assert [e["iteration"] for e in log if "loss" in e] == [1, 2, 3, 4]  # one build's lines, not two interleaved


# -- 6. a trickling download is aborted ------------------------------------------------------------------------------
def test_a_trickling_download_is_aborted_and_nothing_is_written(tmp_path: Path, server: HubServer,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    put_repo(server, make_cset())
    monkeypatch.setenv("CONDENSED_DATASETS_MIN_DOWNLOAD_RATE", "20000")  # bytes/s
    monkeypatch.setenv("CONDENSED_DATASETS_MIN_DOWNLOAD_WINDOW", "0.5")  # s
    server.trickle = (64, 0.02)  # at most 3.2 kB/s: the 32 kB file would take 10 s
    start = time.monotonic()
    with pytest.raises(HubStalledError, match="minimum of 20000 bytes/s over 0.5 s.*nothing was written"):
        hub.download_set(tmp_path, "fashionmnist", "dm", 1, repo_id=REPO)
    assert time.monotonic() - start < 5
    dest = set_path(tmp_path, "fashionmnist", "dm", 1)
    assert not dest.exists() and hub.read_record(dest) is None
    with FileLock(str(dest.parent / f".{dest.name}.lock"), timeout=0):  # released
        pass
    server.trickle = None
    assert hub.download_set(tmp_path, "fashionmnist", "dm", 1, repo_id=REPO).is_file()


def test_a_trickling_download_with_build_true_builds_instead(tmp_path: Path, server: HubServer,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A stalled hub is like an unreachable one: with build=True the set is built, as for offline or 5xx."""
    import builders.build

    put_repo(server, make_cset())
    monkeypatch.setenv("CONDENSED_DATASETS_MIN_DOWNLOAD_RATE", "20000")  # bytes/s
    monkeypatch.setenv("CONDENSED_DATASETS_MIN_DOWNLOAD_WINDOW", "0.5")  # s
    server.trickle = (64, 0.02)
    built = make_cset(seed=7)
    monkeypatch.setattr(builders.build, "build_set",
                        lambda source, method, ipc, root: built.save(set_path(root, source, method, ipc)))
    ds = CondensedFashionMNIST(tmp_path, "dm", 1, download=True, build=True, repo_id=REPO)
    assert torch.equal(ds.data, built.images)
    with pytest.raises(HubStalledError):  # without build=True the stall is the error
        CondensedFashionMNIST(tmp_path / "other", "dm", 1, download=True, repo_id=REPO)


def test_bad_speed_settings_are_a_clear_error(tmp_path: Path, server: HubServer,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    put_repo(server, make_cset())
    monkeypatch.setenv("CONDENSED_DATASETS_MIN_DOWNLOAD_WINDOW", "soon")
    with pytest.raises(HubError, match="CONDENSED_DATASETS_MIN_DOWNLOAD_WINDOW"):
        hub.download_set(tmp_path, "fashionmnist", "dm", 1, repo_id=REPO)


# -- 7. condensed-eval reads real data only under --root ----------------------------------------------------------------
def test_condensed_eval_ignores_any_data_root_in_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    evil = tmp_path / "evil"
    cset = make_cset(data_root=str(evil), recipe={"data_root": str(evil), "out_root": str(evil),
                                                  "eval": {"runs": 1, "epochs": 1}, "model": "ConvNetW32"})
    path = cset.save(tmp_path / "set.safetensors")
    roots: list[Path] = []

    def from_source(source: str, root: Any, **kwargs: Any) -> Any:
        roots.append(Path(root))
        raise SourceDataError("stop here: the test only needs the root")

    monkeypatch.setattr(RealData, "from_source", staticmethod(from_source))
    mine = tmp_path / "mine"
    result = CliRunner().invoke(eval_command, [str(path), "--root", str(mine), "--device", "cpu"])
    assert result.exit_code == 1 and "stop here" in result.output
    assert roots == [mine] and not evil.exists()


# -- 8. untrusted listings -----------------------------------------------------------------------------------------------
def test_a_hub_index_with_one_malformed_entry_lists_the_rest(tmp_path: Path, server: HubServer,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    good = make_cset()
    data = good.to_bytes()
    entry = catalogue.index_entry(good.metadata, sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    index = catalogue.make_index({"dm_ipc1.safetensors": entry})
    index["files"]["dm_ipc2.safetensors"] = {**entry, "ipc": 2, "accuracy_mean": "NaN\x1b[2J"}
    index["files"]["dm_ipc3.safetensors"] = [1, 2]
    put_repo(server, good, index=index)
    with pytest.warns(SkippedEntryWarning) as caught:
        rows = hub.list_repo(REPO)
    assert [r["ipc"] for r in rows] == [1]
    assert sorted(str(w.message).split("entry ")[1][:21] for w in caught) == ["'dm_ipc2.safetensors'",
                                                                              "'dm_ipc3.safetensors'"]
    monkeypatch.setenv("CONDENSED_DATASETS_ORG", "org")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedEntryWarning)
        assert [r["ipc"] for r in CondensedFashionMNIST.available(download=True)] == [1]
        result = CliRunner().invoke(list_command, ["--repo", REPO])
    assert result.exit_code == 0 and "dm_ipc1" not in result.output and "\x1b" not in result.output


def test_strings_from_files_are_escaped_before_the_terminal(tmp_path: Path) -> None:
    root = tmp_path / "a\x1b[31mred\rroot"
    make_cset(evaluation={"model": "Conv\x1b[2JNet", "accuracy_mean": 80.0, "runs": 1}).save(
        set_path(root, "fashionmnist", "dm", 1))
    result = CliRunner().invoke(list_command, ["fashionmnist", "--root", str(root)])
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and "\r" not in result.output and "\\x1b[31mred\\rroot" in result.output
    shown = CliRunner().invoke(show_command, [str(set_path(root, "fashionmnist", "dm", 1)), "-o",
                                              str(tmp_path / "grid.png")])
    assert shown.exit_code == 0, shown.output
    assert "\x1b" not in shown.output and "Conv\\x1b[2JNet" in shown.output
    assert "Conv\\x1b[2JNet" in CondensedFashionMNIST(root, "dm", 1).extra_repr()


def test_a_folder_with_one_broken_file_lists_the_rest(tmp_path: Path) -> None:
    make_cset().save(set_path(tmp_path, "fashionmnist", "dm", 1))
    set_path(tmp_path, "fashionmnist", "dm", 2).write_bytes(b"\x00" * 40)
    (tmp_path / "condensed" / "not-a-source\x1b").mkdir()
    with pytest.warns(SkippedEntryWarning, match="dm_ipc2"):
        rows = catalogue.list_local(tmp_path, "fashionmnist")
    assert [r["ipc"] for r in rows] == [1]
    with pytest.warns(SkippedEntryWarning) as caught:
        assert [r["ipc"] for r in catalogue.list_local(tmp_path)] == [1]
    assert any("'not-a-source\\x1b' is not a source" in str(w.message) for w in caught)


# -- 9. validation gaps -------------------------------------------------------------------------------------------------
GAPS = {
    "soft labels NaN": {"soft_labels": torch.full((10, 10), float("nan"))},
    "soft labels inf": {"soft_labels": torch.full((10, 10), float("inf"))},
    "lr NaN": {"lr": float("nan")},
    "lr inf": {"lr": torch.tensor([0.1, float("inf")])},
    "lr empty": {"lr": torch.zeros(0)},
    "negative index": {"indices": torch.tensor([-1] + list(range(9)))},
    "index past the train split": {"indices": torch.tensor([60_000] + list(range(9)))},
    "zero-size images": {"images": torch.zeros(10, 1, 0, 28)},
    "three channels for a grey source": {"images": torch.zeros(10, 3, 28, 28)},
    "std 0": {"metadata": {"normalization": {"mean": [0.5], "std": [0.0]}}},
    "normalization of the wrong length": {"metadata": {"normalization": {"mean": [0.5, 0.5], "std": [1.0, 1.0]}}},
    "evaluation of the wrong shape": {"metadata": {"evaluation": {"accuracy_mean": [80.0]}}},
    "eleven class names": {"metadata": {"classes": [str(i) for i in range(11)]}},
}


@pytest.mark.parametrize("name", sorted(GAPS))
def test_validation_gaps_are_closed(name: str) -> None:
    kwargs: dict[str, Any] = {"images": torch.zeros(10, 1, 28, 28), **GAPS[name]}
    images = kwargs.pop("images")
    with pytest.raises(CondensedSetError):
        CondensedSet(images, torch.arange(10), source="fashionmnist", method="dm", ipc=1, **kwargs)


def test_partial_evaluation_blocks_do_not_crash_repr_or_show(tmp_path: Path) -> None:
    for i, ev in enumerate(({"accuracy_mean": 80.0}, {"accuracy_mean": None}, {"model": "ConvNet"},
                            {"accuracy_mean": 80.0, "random_accuracy_mean": 70.0})):
        root = tmp_path / str(i)
        path = make_cset(evaluation=ev).save(set_path(root, "fashionmnist", "dm", 1))
        assert "Source: fashionmnist" in repr(CondensedFashionMNIST(root, "dm", 1))
        shown = CliRunner().invoke(show_command, [str(path), "-o", str(root / "grid.png")])
        assert shown.exit_code == 0, shown.output


# -- 10. CLI and recipe edges ------------------------------------------------------------------------------------------------
def test_set_values_that_are_not_yaml_are_a_recipe_error() -> None:
    with pytest.raises(RecipeError, match="not valid YAML"):
        parse_overrides(["params.lr_img=[1"])
    result = CliRunner().invoke(build_command, ["recipes/dm_fashionmnist.yaml", "--set", "ipc={"])
    assert result.exit_code == 1 and "not valid YAML" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("key", ["ten", "1.5", "-1", "0", True, None])
def test_ipc_overrides_keys_must_be_ipcs(key: Any) -> None:
    with pytest.raises(RecipeError, match="ipc_overrides"):
        parse_recipe({"source": "fashionmnist", "method": "dm", "ipc": 1, "ipc_overrides": {key: {"seed": 1}}})


def test_other_ipcs_overrides_never_reach_the_metadata(tmp_path: Path) -> None:
    """Another ipc's entry is left out of the set's metadata; one that holds a YAML alias bomb (10^9 strings once
    expanded) is refused when the recipe is read, without expanding it."""
    recipe = tmp_path / "other.yaml"
    recipe.write_text("source: fashionmnist\nmethod: dm\nipc: 1\nipc_overrides:\n  50:\n    params:\n"
                      "      batch_real: 512\n  1:\n    seed: 3\n")
    r = load_recipe(recipe)
    assert r.seed == 3 and 50 in r.ipc_overrides
    assert "ipc_overrides" not in r.to_dict()
    levels = ["      a: &a [x, x, x, x, x, x, x, x, x, x]"] + [
        f"      {c}: &{c} [{', '.join([f'*{p}'] * 10)}]" for p, c in zip("abcdefgh", "bcdefghi")]
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text("source: fashionmnist\nmethod: dm\nipc: 1\nipc_overrides:\n  50:\n    params:\n"
                      + "\n".join(levels) + "\n  1:\n    seed: 3\n")
    with pytest.raises(RecipeError, match="more than 100,000 values once its YAML aliases"):
        load_recipe(recipe)


# -- 11. small ones --------------------------------------------------------------------------------------------------------
def test_orphaned_temporary_files_are_swept_on_the_next_write(tmp_path: Path) -> None:
    target = tmp_path / "dm_ipc1.safetensors"
    old = tmp_path / ".dm_ipc1.safetensors.k1ll3d.tmp"
    fresh = tmp_path / ".dm_ipc1.safetensors.wr1t1ng.tmp"
    other = tmp_path / ".dm_ipc10.safetensors.k1ll3d.tmp"
    for path in (old, fresh, other):
        path.write_bytes(b"partial")
    two_hours_ago = time.time() - 7200
    os.utime(old, (two_hours_ago, two_hours_ago))
    os.utime(other, (two_hours_ago, two_hours_ago))
    atomic_write_bytes(target, b"data")
    assert target.read_bytes() == b"data"
    assert not old.exists() and fresh.exists() and other.exists()  # only this name's stale leftovers


def test_an_unwritable_out_is_found_before_the_build(tmp_path: Path) -> None:
    out = tmp_path / "out"
    set_path(out, "fashionmnist", "random", 1).mkdir(parents=True)  # a folder where the set would go
    recipe = tmp_path / "r.yaml"
    recipe.write_text("source: fashionmnist\nmethod: random\nipc: 1\nmodel: ConvNetW32\n")
    result = CliRunner().invoke(build_command, [str(recipe), "--out", str(out), "--data-root",
                                                str(tmp_path / "no_data"), "--device", "cpu", "--quiet", "--overwrite"])
    assert result.exit_code == 1 and "cannot write" in result.output and "Fashion-MNIST" not in result.output


def test_not_found_advice_names_the_ipc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONDENSED_DATASETS_EMBEDDED_DIR", str(tmp_path / "none"))
    with pytest.raises(RuntimeError, match="--set ipc=3"):
        CondensedFashionMNIST(tmp_path, "dm", 3)
    make_cset().save(set_path(tmp_path, "fashionmnist", "dm", 1))
    with pytest.raises(ValueError, match="--set ipc=3"):
        CondensedFashionMNIST(tmp_path, "dm", 3)


def test_a_500_is_reported_as_a_server_error(tmp_path: Path, server: HubServer,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub.utils import _http

    no_wait = {name: getattr(time, name) for name in dir(time) if not name.startswith("_")}
    monkeypatch.setattr(_http, "time", types.SimpleNamespace(**{**no_wait, "sleep": lambda s: None}))  # no backoff
    put_repo(server, make_cset())
    server.fail = {"/resolve/": 500}
    with pytest.raises(HubServerError, match="HTTP 500") as caught:
        hub.download_set(tmp_path, "fashionmnist", "dm", 1, repo_id=REPO)
    assert "could not be reached" not in str(caught.value)
    with pytest.raises(HubServerError, match="server error"):
        hub.list_repo(REPO)


def test_a_bad_checksum_leaves_nothing_in_the_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    srv = HubServer(tmp_path / "hub", lfs_hashes=False).start()
    try:
        point_huggingface_hub_at(srv, monkeypatch, tmp_path / "hf_home")
        data = put_repo(srv, make_cset())["dm_ipc1.safetensors"]
        index_file = srv.repo_dir(REPO) / "index.json"
        index = json.loads(index_file.read_text())
        index["files"]["dm_ipc1.safetensors"]["sha256"] = "0" * 64
        index_file.write_text(json.dumps(index))
        with pytest.raises(HubIntegrityError, match="nothing was written"):
            hub.download_set(tmp_path / "data", "fashionmnist", "dm", 1, repo_id=REPO)
        cached = [p for p in (tmp_path / "hf_home").rglob("*") if p.is_file() and p.read_bytes() == data]
        assert cached == []
    finally:
        srv.stop()
