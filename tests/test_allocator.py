"""Allocator settings: applied by the command-line entry points, off with the environment variable."""

from pathlib import Path

from click.testing import CliRunner

import builders.cli
from builders.allocator import ENV_OFF, tune_allocator
from builders.build import load_recipe


def test_allocator_settings_are_off_with_the_environment_variable(monkeypatch):
    monkeypatch.setenv(ENV_OFF, "1")
    assert tune_allocator() is False


def test_eval_command_applies_the_settings_first(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(builders.cli, "tune_allocator", lambda: calls.append(1) or True)
    CliRunner().invoke(builders.cli.eval_command, [str(tmp_path / "missing.safetensors")])
    assert calls == [1]


def test_builds_get_the_settings_only_for_methods_that_ask_for_them(monkeypatch):
    """DM's builds are tuned; DC's and DSA's are not (no gain there, 19 % more peak RSS: see dc.py)."""
    calls = []
    monkeypatch.setattr(builders.cli, "tune_allocator", lambda: calls.append(1) or True)
    recipes = Path(__file__).resolve().parent.parent / "recipes"
    for name in ("dm_fashionmnist.yaml", "experts_fashionmnist.yaml"):  # experts: a runner, not a Method
        assert builders.cli.tune_allocator_for(load_recipe(recipes / name, [])) is True
    assert calls == [1, 1]
    for name in ("dc_fashionmnist.yaml", "dsa_fashionmnist.yaml"):
        assert builders.cli.tune_allocator_for(load_recipe(recipes / name, [])) is False
    assert calls == [1, 1]


def test_build_command_tunes_after_reading_the_recipe(monkeypatch, tmp_path):
    """A recipe that cannot be read fails before any process-wide setting changes."""
    calls = []
    monkeypatch.setattr(builders.cli, "tune_allocator", lambda: calls.append(1) or True)
    result = CliRunner().invoke(builders.cli.build_command, [str(tmp_path / "missing.yaml")])
    assert result.exit_code != 0 and calls == []
