"""Allocator settings: applied by the command-line entry points, off with the environment variable."""

from click.testing import CliRunner

import builders.cli
from builders.allocator import ENV_OFF, tune_allocator


def test_allocator_settings_are_off_with_the_environment_variable(monkeypatch):
    monkeypatch.setenv(ENV_OFF, "1")
    assert tune_allocator() is False


def test_build_and_eval_commands_apply_the_settings_first(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(builders.cli, "tune_allocator", lambda: calls.append(1))
    runner = CliRunner()
    runner.invoke(builders.cli.build_command, [str(tmp_path / "missing.yaml")])
    runner.invoke(builders.cli.eval_command, [str(tmp_path / "missing.safetensors")])
    assert calls == [1, 1]
