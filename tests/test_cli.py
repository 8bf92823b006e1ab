"""The command line through click's CliRunner."""

import json

import pytest
from click.testing import CliRunner

from builders.cli import build_command, counted, eval_command, format_evaluation, show_command
from condensed_datasets.format import CondensedSet

RECIPE = """\
source: fashionmnist
method: dm
ipc: 1
model: ConvNetW32
iterations: 2
augment: none
real_per_class: 10
params: {batch_real: 8}
eval: {runs: 1, epochs: 2, test_per_class: 3}
"""


@pytest.fixture
def built(fashion_mnist_root, tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(RECIPE)
    result = CliRunner().invoke(build_command, [
        str(recipe), "--out", str(tmp_path / "out"), "--data-root", str(fashion_mnist_root),
        "--device", "cpu", "--quiet", "--set", "eval.runs=2", "--set", "params.lr_img=0.5",
    ])
    assert result.exit_code == 0, result.output
    return result, tmp_path / "out" / "condensed" / "fashionmnist" / "dm_ipc1.safetensors"


def test_build_writes_the_set_and_reports(built):
    result, path = built
    assert f"saved {path}" in result.output and "improvement" in result.output
    meta = CondensedSet.load(path).metadata
    assert meta["recipe"]["eval"]["runs"] == 2 and meta["recipe"]["params"]["lr_img"] == 0.5
    assert path.with_suffix(".png").exists()


def test_user_errors_are_one_message_without_traceback(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(RECIPE.replace("iterations: 2", "iteratons: 2"))
    result = CliRunner().invoke(build_command, [str(recipe)])
    assert result.exit_code != 0
    assert "Error: unknown key in the recipe: 'iteratons' (did you mean 'iterations'?)" in result.output
    assert "Traceback" not in result.output
    result = CliRunner().invoke(build_command, [str(recipe.with_name("none.yaml"))])
    assert result.exit_code != 0 and "no recipe at" in result.output
    result = CliRunner().invoke(build_command, [str(recipe), "--set", "oops"])
    assert result.exit_code != 0 and "expected KEY=VALUE" in result.output


def test_eval_and_show(built, fashion_mnist_root, tmp_path):
    _, path = built
    result = CliRunner().invoke(eval_command, [str(path), "--runs", "1", "--epochs", "1",
                                               "--root", str(fashion_mnist_root), "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["runs"] == 1 and report["epochs"] == 1 and len(report["accuracies"]) == 1
    png = tmp_path / "grid.png"
    result = CliRunner().invoke(show_command, [str(path), "-o", str(png)])
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:4] == b"\x89PNG" and "dm ipc 1" in result.output
    result = CliRunner().invoke(show_command, [str(tmp_path / "nothing.safetensors"), "-o", str(png)])
    assert result.exit_code != 0 and "no condensed set at" in result.output


def test_counts_read_as_english():
    assert [counted(n, "run") for n in (0, 1, 5)] == ["0 runs", "1 run", "5 runs"]
    line = format_evaluation({"model": "ConvNet", "accuracy_mean": 80.0, "accuracy_std": None, "runs": 1, "epochs": 1})
    assert line == "ConvNet: 80.00 % (1 run, 1 epoch)"


def test_a_one_shot_build_says_so_not_zero_iterations(fashion_mnist_root, tmp_path):
    recipe = tmp_path / "random.yaml"
    recipe.write_text("source: fashionmnist\nmethod: random\nipc: 1\nmodel: ConvNetW32\nreal_per_class: 10\n")
    result = CliRunner().invoke(build_command, [str(recipe), "--out", str(tmp_path / "out"), "--data-root",
                                                str(fashion_mnist_root), "--device", "cpu", "--quiet", "--no-eval"])
    assert result.exit_code == 0, result.output
    assert "building random on fashionmnist, ipc 1, one-shot selection, model ConvNetW32" in result.output


def test_a_rerun_draws_the_preview_a_killed_build_left_out_and_keeps_the_set(fashion_mnist_root, tmp_path):
    recipe = tmp_path / "random.yaml"
    recipe.write_text("source: fashionmnist\nmethod: random\nipc: 1\nmodel: ConvNetW32\nreal_per_class: 10\n")
    args = [str(recipe), "--out", str(tmp_path / "out"), "--data-root", str(fashion_mnist_root), "--device", "cpu",
            "--quiet", "--no-eval"]
    assert CliRunner().invoke(build_command, args).exit_code == 0
    folder = tmp_path / "out" / "condensed" / "fashionmnist"
    path, png = folder / "random_ipc1.safetensors", folder / "random_ipc1.png"
    set_bytes, png_bytes = path.read_bytes(), png.read_bytes()
    png.unlink()  # as when a build is killed between writing the set and its preview
    result = CliRunner().invoke(build_command, args)
    assert result.exit_code == 1
    assert "already exists; pass --overwrite" in result.output
    assert f"Its missing preview (a build stopped before writing it) was drawn from it: {png}" in result.output
    assert png.read_bytes() == png_bytes and path.read_bytes() == set_bytes
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and "tmp" in p.name) == []
    assert "missing preview" not in CliRunner().invoke(build_command, args).output  # drawn once: now it is there


def test_the_help_of_overwrite_says_what_it_does_with_resume():
    """--resume --overwrite continues the checkpoint and then replaces the set (README); the help of --overwrite
    must not say that it always starts over."""
    text = " ".join(CliRunner().invoke(build_command, ["--help"]).output.split())
    overwrite = text.split("--overwrite", 1)[1].split("--no-eval", 1)[0]
    assert "start over from no checkpoint)" not in overwrite and "--resume" in overwrite
