"""CPU threads on an accelerator: one intra-op thread, set by the command-line entry points only."""

import pytest
import torch
from click.testing import CliRunner

import builders.cli
from builders.host_threads import ENV_OFF, limit_threads_for


@pytest.fixture
def threads(monkeypatch):
    """torch's thread count as the test found it, restored after; no variable that would stop the setting."""
    before = torch.get_num_threads()
    monkeypatch.delenv(ENV_OFF, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_an_accelerator_gets_one_thread(threads):
    assert limit_threads_for(torch.device("meta")) is True  # any device that is not the CPU
    assert torch.get_num_threads() == 1
    assert limit_threads_for(torch.device("meta")) is False  # already one: nothing changed


def test_the_cpu_keeps_its_threads(threads):
    assert limit_threads_for(torch.device("cpu")) is False
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("variable, value", [(ENV_OFF, "1"), ("OMP_NUM_THREADS", "4")])
def test_the_environment_variable_or_the_users_omp_setting_wins(threads, monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    assert limit_threads_for(torch.device("meta")) is False
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("command", [builders.cli.continual_command, builders.cli.nas_command])
@pytest.mark.parametrize("spec_device, option, expected", [("cpu", [], "cpu"), ("cuda", ["--device", "cpu"], "cpu")])
def test_spec_commands_set_threads_for_the_device_they_run_on(monkeypatch, tmp_path, command, spec_device, option,
                                                            expected):
    """--device first, else the spec's; the spec itself (here without a source) is checked by its runner."""
    seen = []
    monkeypatch.setattr(builders.cli, "limit_threads_for", lambda device: seen.append(device.type) or False)
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"device: {spec_device}\n")
    result = CliRunner().invoke(command, [str(spec), *option])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert seen == [expected]


@pytest.mark.parametrize("command", [builders.cli.continual_command, builders.cli.nas_command])
def test_a_spec_device_that_is_no_name_is_left_to_the_runners_checks(monkeypatch, tmp_path, command):
    seen = []
    monkeypatch.setattr(builders.cli, "limit_threads_for", lambda device: seen.append(device.type) or False)
    spec = tmp_path / "spec.yaml"
    spec.write_text("device: [1, 2]\n")
    result = CliRunner().invoke(command, [str(spec)])
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit) and seen == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_build_on_a_gpu_runs_with_one_thread(threads, tmp_path, fashion_mnist_root):
    """The whole entry point on a real GPU: the thread count it leaves behind."""
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text("source: fashionmnist\nmethod: dm\nipc: 1\nmodel: ConvNetW32\niterations: 2\naugment: none\n"
                      "real_per_class: 10\nparams: {batch_real: 8}\n")
    result = CliRunner().invoke(builders.cli.build_command, [
        str(recipe), "--out", str(tmp_path / "out"), "--data-root", str(fashion_mnist_root), "--device", "cuda",
        "--quiet", "--no-eval"])
    assert result.exit_code == 0, result.output
    assert torch.get_num_threads() == 1
