"""Hostile input to the builders (recipes, --set, checkpoints, expert stores, output folders, run specs,
publishing): each is refused with the package's own error, naming the problem, and nothing the user made is
lost or written outside the paths they gave."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from builders import continual, nas
from builders.build import recipe_from_dict
from builders.checkpoint import CHECKPOINT_KEY
from builders.cli import build_command, eval_command
from builders.data import RealData
from builders.engine import Engine, _log_iteration
from builders.errors import BuildError, BuildersError, ExpertStoreError, PublishConflict, RecipeError
from builders.experts import STORE_INDEX_NAME, STORE_VERSION, ExpertStore
from builders.publish import publish_to_dir
from builders.recipe import load_recipe_data as yaml_mapping
from builders.recipe import parse_overrides
from builders.runspec import check_keys
from condensed_datasets.errors import CondensedDatasetsError, SourceDataError
from condensed_datasets.format import CondensedSet, read_safetensors_metadata

BOUNDED = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
OURS = (BuildersError, CondensedDatasetsError)

BASE = {"source": "fashionmnist", "method": "dm", "ipc": 1}

# -- 1. recipes ------------------------------------------------------------------------------------------------------
VALUES = (st.none() | st.booleans() | st.integers(min_value=-(2 ** 70), max_value=2 ** 70)
          | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8)
          | st.sampled_from(["1e309", "-1e309", "²", "9" * 30, "../x", "/abs", "none", "ConvNet", "auto"]))
KEYS = st.sampled_from(["source", "method", "ipc", "model", "seed", "iterations", "checkpoint_every", "augment",
                        "real_per_class", "params", "eval", "ipc_overrides", "notes", "classes"]) \
    | st.integers(-3, 3) | st.none() | st.booleans() | st.text(max_size=5)
ANY = st.recursive(VALUES, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS | VALUES.filter(
    lambda v: v is None or isinstance(v, (bool, int, str, float)) and not (isinstance(v, float) and math.isnan(v))),
    inner, max_size=3), max_leaves=8)
PARAM_KEYS = st.sampled_from(["lr_img", "momentum", "batch_real", "init", "precision", "compile"])
EVAL_KEYS = st.sampled_from(["model", "models", "runs", "epochs", "every", "lr", "batch", "augment",
                             "random_baseline", "test_per_class"])


@st.composite
def recipes(draw: st.DrawFn) -> Any:
    """The base dm recipe with a few top-level, params or eval keys set to anything (or any value at all)."""
    if draw(st.integers(0, 9)) == 0:
        return draw(ANY)
    data: dict[Any, Any] = dict(BASE)
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(["top", "params", "eval", "ipc_overrides"]))
        if where == "top":
            data[draw(KEYS)] = draw(ANY)
        elif where == "params":
            data.setdefault("params", {})[draw(PARAM_KEYS | KEYS)] = draw(ANY)
        elif where == "eval":
            data.setdefault("eval", {})[draw(EVAL_KEYS | KEYS)] = draw(ANY)
        else:
            data["ipc_overrides"] = {draw(KEYS | VALUES.filter(lambda v: isinstance(v, (int, str)))): draw(ANY)}
    return data


@BOUNDED
@given(data=recipes())
def test_any_recipe_mapping_is_a_recipe_or_a_recipe_error(data: Any) -> None:
    try:
        r = recipe_from_dict(data)
    except OURS:
        return
    assert isinstance(r.ipc, int) and 1 <= r.ipc and 0 <= r.seed < 2 ** 63
    assert all(math.isfinite(v) for v in r.params.values() if isinstance(v, float))
    assert math.isfinite(r.eval.lr) and r.eval.lr > 0 and r.eval.every >= 0
    json.dumps(r.to_dict(), allow_nan=False)  # what the metadata records


@BOUNDED
@given(pairs=st.lists(st.text(max_size=12) | st.sampled_from(
    ["ipc=1e309", "seed=99999999999999999999", "params.lr_img=.nan", "eval.lr=-.inf", "a..b=1", "=1", ".=2",
     "ipc=&a [*a]", "ipc=!!python/object:os.system", "params=[1]", "eval.runs.x=1", "ipc_overrides.²=1"]), max_size=3))
def test_any_set_option_is_applied_or_a_recipe_error(pairs: list[str]) -> None:
    try:
        recipe_from_dict(BASE, parse_overrides(pairs))
    except OURS:
        pass


@pytest.mark.parametrize("changes, message", [
    ({1: 2}, "unknown key in the recipe: 1"),
    ({None: 2}, "unknown key in the recipe: None"),
    ({"params": {7: 1}}, "unknown key in params"),
    ({"eval": {True: 1}}, "unknown key in eval"),
    ({"ipc_overrides": {1: {5: 1}}}, "unknown key in ipc_overrides.1"),
    ({"ipc_overrides": {"²": {"seed": 1}}}, "not an ipc"),
    ({"ipc_overrides": {"9" * 5000: {"seed": 1}}}, "not an ipc"),
    ({"seed": 2 ** 63}, "seed: 9223372036854775808 is out of range"),
    ({"ipc": 10 ** 30}, "ipc: 1000000000000000000000000000000 is out of range"),
    ({"ipc": 10 ** 9}, "ipc: must be below 1000000000 (a set's file name holds at most 9 digits), got 1000000000"),
    ({"params": {"lr_img": float("nan")}}, "params.lr_img: expected a finite number"),
    ({"params": {"lr_img": "1e309"}}, "params.lr_img: expected a finite number, got inf"),
    ({"params": {"lr_img": -1.0}}, "params.lr_img: must be >= 0"),
    ({"params": {"momentum": -0.5}}, "params.momentum: must be >= 0"),
    ({"params": {"batch_real": 0}}, "params.batch_real: must be >= 1"),
    ({"params": {"batch_real": -3}}, "params.batch_real: must be >= 1"),
    ({"eval": {"lr": -1.0}}, "eval.lr: must be > 0"),
    ({"eval": {"lr": float("inf")}}, "eval.lr: expected a finite number"),
    ({"eval": {"every": -1}}, "eval.every: must be >= 0"),
    ({"eval": {"every": None}}, "eval.every: expected a value, got null"),
    ({"eval": {"runs": None}}, "eval.runs: expected a value, got null"),
    ({"eval": {"models": None}}, "eval.models: expected a value, got null"),
    ({"method": "dc", "params": {"lr_net": -1.0}}, "params.lr_net: must be >= 0"),
    ({"method": "herding", "params": {"feature_lr": -1.0}}, "params.feature_lr: must be >= 0"),
    ({"method": "herding", "params": {"feature_model": "../x"}}, "params.feature_model: unknown network '../x'"),
    ({"method": "dq", "params": {"extractor_lr": -0.1}}, "params.extractor_lr: must be >= 0"),
    ({"method": "experts", "params": {"expert_dir": "/tmp/x\x00y"}}, "params.expert_dir: a NUL character"),
    ({"notes": "a\x00b"}, "notes: a NUL character"),
])
def test_recipe_values_torch_would_reject_mid_build_are_recipe_errors(changes: dict[Any, Any], message: str) -> None:
    with pytest.raises(RecipeError) as caught:
        recipe_from_dict({**BASE, **changes})
    assert message in str(caught.value)


@pytest.mark.parametrize("content", [bytes(range(256)), b"\xff\xfesource: x", "source: \x00".encode()])
def test_a_binary_recipe_is_one_line_of_error(tmp_path: Path, content: bytes) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(content)
    result = CliRunner().invoke(build_command, [str(recipe), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and "not valid YAML" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_yaml_nested_too_deeply_is_one_line_of_error(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("source: fashionmnist\nmethod: dm\nipc: 1\nnotes: " + "[" * 5000 + "]" * 5000 + "\n")
    result = CliRunner().invoke(build_command, [str(recipe)])
    assert result.exit_code == 1 and "nested too deeply to be a recipe" in result.output
    recipe.write_text("source: fashionmnist\nmethod: dm\nipc: 1\n")
    result = CliRunner().invoke(build_command, [str(recipe), "--set", "notes=" + "[" * 5000 + "]" * 5000])
    assert result.exit_code == 1 and "--set notes=...: the value is nested too deeply" in result.output
    assert "Traceback" not in result.output


def _alias_bomb(layers: int) -> str:
    """A YAML flow list of ``layers`` anchors, each naming nine of the one before: 9**layers strings once expanded."""
    nodes = ['&l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    nodes += [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, layers)]
    return "[" + ", ".join(nodes) + "]"


@pytest.mark.parametrize("where", ["notes", "source", "ipc", "params.lr_img", "eval.runs", "classes"])
def test_a_yaml_alias_bomb_is_one_short_line_of_error(tmp_path: Path, where: str) -> None:
    """A few lines of anchors and aliases that stand for millions of values, in a recipe or a --set value, are
    refused as such at once: never expanded into an error message, a memory error or a hang."""
    bomb = _alias_bomb(7)  # 4.8 million strings: tens of megabytes once written out
    recipe = tmp_path / "r.yaml"
    base = {"source": "fashionmnist", "method": "dm", "ipc": 1}
    section, _, key = where.rpartition(".")
    lines = [f"{k}: {v}" for k, v in base.items() if k != where]
    lines.append(f"{section}: {{{key}: {bomb}}}" if section else f"{where}: {bomb}")
    recipe.write_text("\n".join(lines) + "\n")
    for args in ([str(recipe)], [str(recipe.with_name("ok.yaml")), "--set", f"{where}={bomb}"]):
        recipe.with_name("ok.yaml").write_text("source: fashionmnist\nmethod: dm\nipc: 1\n")
        result = CliRunner().invoke(build_command, [*args, "--out", str(tmp_path / "out")])
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output[:500]
        assert "YAML aliases" in result.output and len(result.output) < 1000, result.output[:500]
    assert not (tmp_path / "out").exists()


def test_an_out_below_a_file_is_found_before_the_build(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("mine\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("source: fashionmnist\nmethod: random\nipc: 1\nmodel: ConvNetW32\n")
    result = CliRunner().invoke(build_command, [str(recipe), "--out", str(tmp_path / "afile" / "sub"), "--data-root",
                                                str(tmp_path / "no-data"), "--device", "cpu", "--quiet"])
    assert result.exit_code == 1 and "cannot create" in result.output and "pass --out" in result.output
    assert (tmp_path / "afile").read_text() == "mine\n"


def test_the_command_line_reports_a_number_key_and_a_huge_seed_in_one_line(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("source: fashionmnist\nmethod: dm\nipc: 1\n3: x\n")
    result = CliRunner().invoke(build_command, [str(recipe)])
    assert result.exit_code == 1 and "unknown key in the recipe: 3" in result.output
    recipe.write_text("source: fashionmnist\nmethod: dm\nipc: 1\n")
    result = CliRunner().invoke(build_command, [str(recipe), "--set", "seed=99999999999999999999"])
    assert result.exit_code == 1 and "seed: 99999999999999999999 is out of range" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("value", ["abc", "1e400", "99999999999999999999", "1.5"])
def test_a_malformed_source_date_epoch_is_one_line_of_error_before_the_build(tmp_path: Path, value: str) -> None:
    """SOURCE_DATE_EPOCH that is no time a timestamp can be made of is refused, naming the variable, before any
    work (not as a traceback, nor after the whole build when the metadata is written)."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("source: fashionmnist\nmethod: random\nipc: 1\nmodel: ConvNetW32\n")
    result = CliRunner().invoke(build_command, [str(recipe), "--out", str(tmp_path / "out"), "--data-root",
                                                str(tmp_path / "no-data"), "--device", "cpu", "--quiet", "--no-eval"],
                                env={"SOURCE_DATE_EPOCH": value})
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert f"SOURCE_DATE_EPOCH={value!r}" in result.output and "date +%s" in result.output
    assert not (tmp_path / "no-data").exists() and not list((tmp_path / "out").rglob("*.safetensors"))


def test_an_ipc_above_a_class_size_is_one_line_of_error(fashion_mnist_root: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("source: fashionmnist\nmethod: random\nipc: 6001\nmodel: ConvNetW32\n")
    result = CliRunner().invoke(build_command, [str(recipe), "--out", str(tmp_path / "out"), "--data-root",
                                                str(fashion_mnist_root), "--device", "cpu", "--no-eval", "--quiet"])
    assert result.exit_code == 1 and "fewer than ipc 6001; lower ipc" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("params, message", [
    ({"bins": 100}, "params.bins: cannot split 20 images into 100 non-empty bins (class 0); lower params.bins"),
    ({"fraction": 1e-9}, "keeps less than one image per class"),
])
def test_dq_values_that_fit_no_class_are_recipe_errors(fashion_mnist_root: Path, tmp_path: Path,
                                                       params: dict[str, Any], message: str) -> None:
    recipe = recipe_from_dict({"source": "fashionmnist", "method": "dq", "ipc": 1, "model": "ConvNetW32",
                               "real_per_class": 20, "params": {"extractor": "ConvNetD1", "extractor_epochs": 0,
                                                                **params}})
    engine = Engine(recipe, out_root=tmp_path, data_root=fashion_mnist_root, device="cpu", evaluate=False,
                    progress=False)
    with pytest.raises(RecipeError) as caught:
        engine.run()
    assert message in str(caught.value)
    assert not engine.paths.set.exists()


@pytest.mark.parametrize("recorded, message", [
    ({"eval": {"runs": "many"}}, "eval.runs: expected an integer"), ({"eval": {"lr": -1}}, "eval.lr: must be > 0"),
    ({"eval": {"batch": 0}}, "eval.batch: must be >= 1"), ({"eval": {"runs": 0}}, "eval.runs: must be >= 1"),
    ({"eval": {"augment": "nope"}}, "unknown augmentation family"), ({"augment": 5}, "augment: expected a string"),
    ({"eval": [1]}, "eval: expected a mapping"),
])
def test_condensed_eval_checks_the_protocol_recorded_in_a_strangers_set(tmp_path: Path, recorded: dict[str, Any],
                                                                         message: str) -> None:
    path = CondensedSet(torch.zeros(10, 1, 28, 28), torch.arange(10), source="fashionmnist", method="dm", ipc=1,
                        metadata={"recipe": recorded}).save(tmp_path / "set.safetensors")
    result = CliRunner().invoke(eval_command, [str(path), "--root", str(tmp_path / "no-data"), "--device", "cpu"])
    assert result.exit_code == 1 and "the evaluation settings recorded in it are unusable" in result.output
    assert message in result.output and "Traceback" not in result.output


# -- 2. checkpoints and resume ------------------------------------------------------------------------------------------
TINY = {"source": "fashionmnist", "method": "dm", "ipc": 1, "model": "ConvNetW32", "iterations": 3,
        "checkpoint_every": 1, "real_per_class": 10, "params": {"batch_real": 8}}


class _Killed(Exception):
    pass


@pytest.fixture(scope="module")
def killed_build(fashion_mnist_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    """The checkpoint bytes (iteration 1) of a killed tiny dm build, and the finished set's bytes."""
    out = tmp_path_factory.mktemp("killed")
    engine = Engine(recipe_from_dict(TINY), out_root=out, data_root=fashion_mnist_root, device="cpu",
                    evaluate=False, progress=False)

    def kill(iteration: int, loss: float) -> None:
        if iteration == 2:  # after the checkpoint of iteration 1
            raise _Killed

    with pytest.raises(_Killed):
        engine.run(on_iteration=kill)
    checkpoint = engine.paths.checkpoint.read_bytes()
    engine.resume = True
    engine.run()
    return checkpoint, engine.paths.set.read_bytes()


def _resumed(root: Path, out: Path, checkpoint: bytes) -> Engine:
    engine = Engine(recipe_from_dict(TINY), out_root=out, data_root=root, device="cpu", evaluate=False,
                    progress=False, resume=True)
    engine.paths.checkpoint.parent.mkdir(parents=True, exist_ok=True)
    engine.paths.checkpoint.write_bytes(checkpoint)
    return engine


def _crafted(checkpoint: bytes, case: str) -> bytes:
    meta = json.loads(read_safetensors_metadata(checkpoint, "checkpoint")[CHECKPOINT_KEY])
    tensors = st_load(checkpoint)
    header: Any = meta
    if case == "header not JSON":
        header = "{not json"
    elif case == "header a list":
        header = [1]
    elif case.startswith("no "):
        header = {k: v for k, v in meta.items() if k != case[3:]}
    elif case == "iteration a string":
        header = {**meta, "iteration": "two"}
    elif case == "iteration negative":
        header = {**meta, "iteration": -5}
    elif case == "iteration past the recipe":
        header = {**meta, "iteration": 99}
    elif case == "optimiser not a mapping":
        header = {**meta, "optimizers": {"images": 5}}
    elif case == "optimiser state of another key":
        header = {**meta, "optimizers": {"images": {**meta["optimizers"]["images"], "state": {"x": {}}}}}
    elif case == "rng missing":
        del tensors["rng.generator"]
    elif case == "rng of another size":
        tensors["rng.torch_cpu"] = torch.zeros(3, dtype=torch.uint8)
    elif case == "momentum of another shape":
        tensors["optim.images.0.momentum_buffer"] = torch.zeros(3)
    elif case == "momentum missing":
        del tensors["optim.images.0.momentum_buffer"]
    elif case == "images NaN":
        tensors["state.images"] = torch.full_like(tensors["state.images"], float("nan"))
    text = header if isinstance(header, str) else json.dumps(header)
    return st_save(tensors, metadata={CHECKPOINT_KEY: text})


@pytest.mark.parametrize("case, message", [
    ("header not JSON", "unreadable checkpoint header"), ("header a list", "checkpoint version None"),
    ("no recipe", "no recipe mapping"), ("no optimizers", "no optimiser states"),
    ("no iteration", "iteration None"), ("iteration a string", "iteration 'two'"),
    ("iteration negative", "iteration -5"), ("iteration past the recipe", "past this recipe's 3 iterations"),
    ("optimiser not a mapping", "no optimiser states"), ("optimiser state of another key", "does not fit"),
    ("rng missing", "does not fit"), ("rng of another size", "does not fit"),
    ("momentum of another shape", "momentum_buffer"), ("momentum missing", "does not fit"),
    ("images NaN", "holds NaN or inf"),
])
def test_a_damaged_or_foreign_checkpoint_is_a_build_error_and_is_kept(
        fashion_mnist_root: Path, tmp_path: Path, killed_build: tuple[bytes, bytes], case: str, message: str) -> None:
    data = _crafted(killed_build[0], case)
    engine = _resumed(fashion_mnist_root, tmp_path, data)
    with pytest.raises(BuildError, match=message):
        engine.run()
    assert engine.paths.checkpoint.read_bytes() == data  # never overwritten by the failed resume
    assert not engine.paths.set.exists()


def test_resume_never_replaces_a_finished_set(fashion_mnist_root: Path, tmp_path: Path,
                                              killed_build: tuple[bytes, bytes]) -> None:
    checkpoint, finished = killed_build
    engine = _resumed(fashion_mnist_root, tmp_path, checkpoint)
    engine.paths.set.write_bytes(finished)
    with pytest.raises(BuildError, match="already exists; pass --overwrite"):
        engine.run()
    engine.paths.checkpoint.unlink()  # no checkpoint at all: --resume would have built afresh over the set
    with pytest.raises(BuildError, match="already exists"):
        engine.run()
    assert engine.paths.set.read_bytes() == finished


def test_a_log_that_is_a_symlink_is_never_followed(fashion_mnist_root: Path, tmp_path: Path,
                                                   killed_build: tuple[bytes, bytes]) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "out"
    engine = _resumed(fashion_mnist_root, out, killed_build[0])
    engine.resume = False
    engine.paths.checkpoint.unlink()
    os.symlink(elsewhere / "not-yet.txt", engine.paths.log)  # a dangling link: appending would create its target
    with pytest.raises(BuildError, match="symbolic link"):
        engine.run()
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("line", ["5", "[1]", '"text"', '{"iteration": "3"}', '{"iteration": true}',
                                  '{"iteration": 2, "loss": 1', "null"])
def test_a_log_line_that_is_no_entry_is_dropped_on_resume(line: str) -> None:
    assert _log_iteration(line) == math.inf
    assert _log_iteration('{"iteration": 2, "loss": 1.5}') == 2


def test_a_log_with_damaged_bytes_is_rewritten_on_resume(fashion_mnist_root: Path, tmp_path: Path,
                                                        killed_build: tuple[bytes, bytes]) -> None:
    engine = _resumed(fashion_mnist_root, tmp_path, killed_build[0])
    engine.paths.log.write_bytes(b'{"iteration": 1, "loss": 1.0, "time_s": 0.1}\n\xff\xfe\x00garbage\n')
    engine.run()
    assert [json.loads(line)["iteration"] for line in engine.paths.log.read_text().splitlines()] == [1, 2, 3]
    assert engine.paths.set.is_file()


def test_resume_before_the_first_checkpoint_starts_the_log_over(fashion_mnist_root: Path, tmp_path: Path) -> None:
    """--resume of a build killed before its first checkpoint starts over, and so does its log: the killed run's
    lines are not kept in front of the new ones (each iteration is logged once)."""
    engine = Engine(recipe_from_dict({**TINY, "checkpoint_every": 2}), out_root=tmp_path, data_root=fashion_mnist_root,
                    device="cpu", evaluate=False, progress=False, resume=True)
    engine.paths.log.parent.mkdir(parents=True)
    engine.paths.log.write_text('{"iteration": 1, "loss": 99.0, "time_s": 0.1}\n')  # killed before iteration 2
    engine.run()
    entries = [json.loads(line) for line in engine.paths.log.read_text().splitlines()]
    assert [e["iteration"] for e in entries] == [1, 2, 3] and entries[0]["loss"] != 99.0


# -- 3. expert stores ----------------------------------------------------------------------------------------------------
def _index(**changes: Any) -> dict[str, Any]:
    entry = {"index": 0, "file": "expert_0000.safetensors", "test_accuracy": 50.0}
    index = {"format_version": STORE_VERSION, "kind": "expert_trajectories", "source": "fashionmnist",
             "model": "ConvNetW32", "zca": False, "epochs": 2, "parameter_count": 6, "training": {},
             "experts": [entry]}
    for key, value in changes.items():
        if value is ...:
            index.pop(key)
        else:
            index[key] = value
    return index


@pytest.mark.parametrize("changes", [
    {"epochs": "two"}, {"epochs": ...}, {"parameter_count": ...}, {"parameter_count": True}, {"model": 3},
    {"zca": "no"}, {"training": "sgd"}, {"experts": 5}, {"experts": [1]},
    {"experts": [{"file": "expert_0000.safetensors", "test_accuracy": 1.0}]},
    {"experts": [{"index": 0, "test_accuracy": 1.0}]},
    {"experts": [{"index": 0, "file": "expert_0000.safetensors"}]},
    {"experts": [{"index": 0, "file": "../../../../etc/hostname", "test_accuracy": 1.0}]},
    {"experts": [{"index": 0, "file": "/etc/hostname", "test_accuracy": 1.0}]},
])
def test_a_malformed_expert_index_is_an_expert_store_error(tmp_path: Path, changes: dict[str, Any]) -> None:
    (tmp_path / STORE_INDEX_NAME).write_text(json.dumps(_index(**changes)))
    with pytest.raises(ExpertStoreError, match="damaged expert index"):
        ExpertStore.open(tmp_path)
    (tmp_path / STORE_INDEX_NAME).write_text(json.dumps(_index()))
    assert ExpertStore.open(tmp_path).num_experts == 1  # the well-formed index opens


def test_an_unreadable_trajectory_is_an_expert_store_error(tmp_path: Path) -> None:
    (tmp_path / STORE_INDEX_NAME).write_text(json.dumps(_index()))
    header = json.dumps({"trajectory": {"dtype": "F32", "shape": [3, 6], "data_offsets": [0, 4]}}).encode()
    (tmp_path / "expert_0000.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(4))
    with pytest.raises(ExpertStoreError, match="unreadable trajectory"):
        ExpertStore.open(tmp_path).trajectory(0)


def test_a_trajectory_shorter_than_its_index_says_is_an_expert_store_error(tmp_path: Path) -> None:
    (tmp_path / STORE_INDEX_NAME).write_text(json.dumps(_index(epochs=10)))
    (tmp_path / "expert_0000.safetensors").write_bytes(st_save({"trajectory": torch.zeros(3, 6)}))
    store = ExpertStore.open(tmp_path)
    with pytest.raises(ExpertStoreError, match=r"shape \[3, 6\], the index says \[11, 6\]"):
        store.snapshots(0, [0, 7])


# -- 4. publishing into a folder -------------------------------------------------------------------------------------------
def test_publishing_into_a_folder_with_its_own_readme_keeps_it(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    src = CondensedSet(torch.randn(10, 1, 28, 28, generator=g), torch.arange(10), source="fashionmnist",
                       method="dm", ipc=1).save(tmp_path / "mine.safetensors")
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "README.md").write_text("# my project\n")
    with pytest.raises(PublishConflict, match="not a published folder"):
        publish_to_dir(src, folder)
    with pytest.raises(PublishConflict):
        publish_to_dir(src, folder, dry_run=True)
    assert (folder / "README.md").read_text() == "# my project\n"
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == ["README.md"]
    publish_to_dir(src, folder, force=True)  # asked for: the card replaces it
    assert (folder / "index.json").is_file() and (folder / "README.md").read_text() != "# my project\n"
    assert publish_to_dir(src, folder).plan.changed is False  # a published folder is republished as before


# -- 5. run specs (condensed-continual, condensed-nas) -------------------------------------------------------------------
NAS_SPEC = {"source": "fashionmnist", "out": "out", "space": {"depth": [1], "width": [32]},
            "truth": {"per_class": 2, "epochs": 1}, "proxy_protocol": {"epochs": 1},
            "proxies": [{"name": "p", "path": "p.safetensors"}]}
CL_SPEC = {"source": "fashionmnist", "out": "out", "steps": 2, "ipc": 1,
           "methods": {"random": {"recipe": "random_fashionmnist.yaml"}}}


@pytest.mark.parametrize("changes, message", [
    ({"proxies": [{"name": "../../evil", "path": "p.safetensors"}]}, "is not a table name"),
    ({"proxies": [{"name": "/abs", "path": "p.safetensors"}]}, "is not a table name"),
    ({"proxies": [{"name": "truth", "path": "p.safetensors"}]}, "is not a table name"),
    ({"proxies": [{"name": "", "path": "p.safetensors"}]}, "is not a table name"),
    ({"proxies": [{"name": "p", "method": "dm", "ipc": 1, "set": {1: 2}}]}, "proxies[0].set"),
    ({"truth": {"per_class": 2, "epochs": 1, "lr": float("nan")}}, "truth.lr"),
    ({"truth": {"per_class": 2, "epochs": 1, "lr": -1.0}}, "truth.lr: must be > 0"),
    ({"proxy_protocol": {"epochs": 1, "augment": "blur"}}, "proxy_protocol.augment"),
    ({"tops": ["a"]}, "tops:"), ({"tops": [0]}, "tops:"), ({"out": ""}, "out:"), ({"root": None}, "got null"),
    ({"seed": 2 ** 70}, "seed"), ({7: 1}, "unknown key 7"), ({"tops": None}, "tops: expected list, got null"),
    ({"out": "o\x00ut"}, "out: a NUL character"),
    ({"proxies": [{"name": "p", "path": "p\x00.safetensors"}]}, "proxies[0].path: a NUL character"),
])
def test_a_hostile_nas_spec_is_a_recipe_error(changes: dict[Any, Any], message: str) -> None:
    with pytest.raises(RecipeError) as caught:
        nas.check_spec({**NAS_SPEC, **changes})
    assert message in str(caught.value)


def test_a_killed_continual_step_build_is_continued_not_refused(fashion_mnist_root: Path, tmp_path: Path) -> None:
    """condensed-continual has no --resume: a step whose build was killed continues from its checkpoint."""
    recipe = tmp_path / "dm.yaml"
    recipe.write_text("source: fashionmnist\nmethod: dm\nipc: 1\nmodel: ConvNetW32\niterations: 3\n"
                      "checkpoint_every: 1\nreal_per_class: 10\nparams: {batch_real: 4}\n")
    build = continual.step_builder(recipe, {}, data_root=fashion_mnist_root, device="cpu", progress=False)
    killed = Engine(recipe_from_dict({**yaml_mapping(recipe), "classes": [2, 8]}), out_root=tmp_path / "sets",
                    data_root=fashion_mnist_root, device="cpu", evaluate=False, progress=False)

    def kill(iteration: int, loss: float) -> None:
        if iteration == 2:
            raise _Killed

    with pytest.raises(_Killed):
        killed.run(on_iteration=kill)
    assert build("fashionmnist", "dm", 1, [2, 8], tmp_path / "sets") == killed.paths.set
    log = [json.loads(line)["iteration"] for line in killed.paths.log.read_text().splitlines()]
    assert log == [1, 2, 3]  # continued after the checkpoint of iteration 1, not started over


def test_a_nas_table_file_made_by_something_else_is_a_build_error(tmp_path: Path) -> None:
    table = tmp_path / "truth.json"
    for content in ("{not json", "[1]", json.dumps({"key": "{}", "rows": [{"x": 1}]})):
        table.write_text(content)
        with pytest.raises(BuildError, match="delete it"):
            nas._cached_table(table, {}, lambda: [], lambda line: None)
        assert table.read_text() == content


@pytest.mark.parametrize("changes, message", [
    ({"lr": float("nan")}, "lr"), ({"lr": -0.1}, "lr: must be > 0"), ({"augment": "blur"}, "augment"),
    ({"test_per_class": "x"}, "test_per_class"), ({"test_per_class": -1}, "test_per_class"),
    ({"sets_root": 5}, "sets_root"), ({"orders": [True]}, "orders"), ({"orders": [2 ** 40]}, "orders"),
    ({"seed": 2 ** 40}, "seed"), ({"out": ""}, "out:"), ({None: 1}, "unknown key None"),
    ({"methods": {"a": {"recipe": "random_fashionmnist.yaml", "set": {1: 2}}}}, "methods.a.set"),
])
def test_a_hostile_continual_spec_is_a_recipe_error(changes: dict[Any, Any], message: str) -> None:
    with pytest.raises(RecipeError) as caught:
        continual.check_spec({**CL_SPEC, **changes})
    assert message in str(caught.value)


@BOUNDED
@given(data=st.dictionaries(KEYS, ANY, max_size=4))
def test_any_run_spec_section_is_checked_or_a_recipe_error(data: dict[Any, Any]) -> None:
    defaults = {"source": "", "seed": 0, "lr": 0.01, "orders": [0], "sets_root": None, "set": {}}
    try:
        out = check_keys("section", data, defaults)
    except RecipeError:
        return
    assert set(out) == set(defaults)
    for key, value in out.items():
        if isinstance(value, float):
            assert math.isfinite(value)


SPEC_VALUES = VALUES | st.lists(st.integers(-2, 40) | st.text(max_size=3) | st.none(), max_size=3) | st.dictionaries(
    st.text(max_size=6) | st.integers(), st.integers() | st.text(max_size=3), max_size=3)


@st.composite
def run_specs(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """A tiny NAS or continual spec with a few keys (top level or in a section) set to anything."""
    which = draw(st.sampled_from(["nas", "continual"]))
    spec = json.loads(json.dumps(NAS_SPEC if which == "nas" else CL_SPEC))
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(sorted(nas._SPEC if which == "nas" else continual._SPEC)) | KEYS)
        if draw(st.booleans()):
            spec[key] = draw(SPEC_VALUES)
        elif which == "nas":
            section = draw(st.sampled_from(["truth", "proxy_protocol", "validation", "space"]))
            inner = draw(st.sampled_from(["per_class", "epochs", "lr", "batch", "augment", "depth", "x"]))
            spec[section] = {**(spec.get(section) or {}), inner: draw(SPEC_VALUES)}
        else:
            inner = draw(st.sampled_from(["recipe", "set", "x"]))
            spec["methods"] = {"random": {"recipe": "random_fashionmnist.yaml", inner: draw(SPEC_VALUES)}}
    return which, spec


@BOUNDED
@given(case=run_specs())
def test_any_run_spec_is_checked_or_a_recipe_error(case: tuple[str, dict[str, Any]]) -> None:
    which, spec = case
    try:
        (nas if which == "nas" else continual).check_spec(spec)
    except OURS:
        pass



@pytest.mark.parametrize("seed", [2 ** 70, 10 ** 17, -1, None])
def test_condensed_eval_checks_the_seed_recorded_in_a_strangers_set(tmp_path: Path, seed: Any,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A recorded seed whose run seeds (seed * 1000 + 17 + run) torch cannot take is one line naming --seed,
    before any work (it was a traceback from torch after the real data loaded); a null seed is seed 0, as an
    absent one."""
    def from_source(*args: Any, **kwargs: Any) -> Any:
        raise SourceDataError("stop here: the seed was taken")

    monkeypatch.setattr(RealData, "from_source", staticmethod(from_source))
    path = CondensedSet(torch.zeros(10, 1, 28, 28), torch.arange(10), source="fashionmnist", method="dm", ipc=1,
                        metadata={"seed": seed}).save(tmp_path / "set.safetensors")
    result = CliRunner().invoke(eval_command, [str(path), "--device", "cpu"])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    if seed is None:
        assert "stop here" in result.output, result.output
    else:
        assert f"the seed recorded in it ({seed})" in result.output and "pass --seed" in result.output
        assert "stop here" not in result.output
    result = CliRunner().invoke(eval_command, [str(path), "--seed", str(10 ** 20), "--device", "cpu"])
    assert result.exit_code == 2 and "--seed" in result.output


def test_condensed_eval_save_never_replaces_a_set_that_changed_while_it_ran(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A set rebuilt (or otherwise replaced) while condensed-eval --save evaluated the old one is kept: the
    evaluation of the old bytes is printed, not written over the new set."""
    from builders import cli

    def cset(value: float) -> CondensedSet:
        return CondensedSet(torch.full((10, 1, 28, 28), value), torch.arange(10), source="fashionmnist",
                            method="dm", ipc=1)

    path = cset(0.0).save(tmp_path / "set.safetensors")
    rebuilt = cset(1.0).to_bytes()

    class NoData:
        def set_zca(self, *args: Any) -> None:
            pass

    def evaluate_set(*args: Any, **kwargs: Any) -> dict[str, Any]:
        path.write_bytes(rebuilt)  # a build of the same name finishes meanwhile
        return {"model": "ConvNet", "runs": 1, "epochs": 1, "accuracy_mean": 50.0, "accuracy_std": 0.0}

    monkeypatch.setattr(RealData, "from_source", staticmethod(lambda *args, **kwargs: NoData()))
    monkeypatch.setattr(cli, "evaluate_set", evaluate_set)
    result = CliRunner().invoke(eval_command, [str(path), "--device", "cpu", "--save"])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "ConvNet: 50.00" in result.output and "changed while it was evaluated" in result.output, result.output
    assert path.read_bytes() == rebuilt
