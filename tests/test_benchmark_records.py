"""The benchmarks' own helpers: records never replace one another and go where they are told; timed children."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))  # the scripts' own import path
import machine  # noqa: E402  (benchmarks/machine.py)


def test_records_go_to_the_named_folder_and_never_replace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "records" / "nested"
    monkeypatch.setenv(machine.RESULTS_ENV, str(folder))
    record = {"benchmark": "x", "date": "2026-11-26T08:00:00Z"}
    paths = [machine.write_record("speed_cpu", {**record, "run": k}) for k in range(3)]
    assert [p.name for p in paths] == ["speed_cpu_2026-11-26.json", "speed_cpu_2026-11-26_2.json",
                                       "speed_cpu_2026-11-26_3.json"]
    assert all(p.parent == folder for p in paths)
    assert [json.loads(p.read_text())["run"] for p in paths] == [0, 1, 2]  # the first record kept as written


def test_results_folder_defaults_to_benchmarks_results(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(machine.RESULTS_ENV, raising=False)
    assert machine.results_dir() == Path(machine.__file__).parent / "results"
    monkeypatch.setenv(machine.RESULTS_ENV, "")  # empty: as unset
    assert machine.results_dir() == machine.RESULTS


def test_gpu_sessions_paper_rows_parse_and_refuse_what_no_recipe_names() -> None:
    import click
    import gpu_session  # benchmarks/gpu_session.py

    assert gpu_session.parse_paper_rows(" dc:10, DSA:1 ,dm:50:5000") == [("dc", 10, None), ("dsa", 1, None),
                                                                        ("dm", 50, 5000)]
    assert gpu_session.parse_paper_rows("") == []
    for bad in ("dc", "dc:0", "dc:ten", "dc:1:2:3", "dc:1:-5", "nope:1", "../dc:1"):
        with pytest.raises(click.BadParameter):
            gpu_session.parse_paper_rows(bad)
    assert gpu_session.recipe_iterations(Path(gpu_session.REPO) / "recipes" / "dm_fashionmnist.yaml") == 20000


def test_dm_vs_references_durations_are_the_timed_iterations_alone() -> None:
    import children  # benchmarks/children.py
    import dm_vs_reference  # benchmarks/dm_vs_reference.py

    stamps = [1.0, 1.5, 3.0, 3.25, 4.0]  # iteration ends; warm-up 2, timed 2: iterations 3 and 4
    assert dm_vs_reference._durations(stamps, 2, 2) == [1.5, 0.25]
    assert children.per_iteration(stamps, 2, 2) == pytest.approx(0.875)


def test_a_stamped_child_is_timed_by_its_stamps_and_a_failed_one_says_so(tmp_path: Path) -> None:
    import children  # benchmarks/children.py
    import click

    lines = ["warming up", "BENCH_ITER 0 10.0 1.0", "BENCH_ITER 1 12.0 2.5", "BENCH_ITER 2 15.0 5.5", "a warning"]
    script = "print(" + repr("\n".join(lines)) + ")"
    got = children.run_stamped([sys.executable, "-c", script], dict(os.environ), tmp_path / "child.log", 1, 2)
    assert got["s_per_iteration"] == pytest.approx(2.5) and got["cpu_s_per_iteration"] == pytest.approx(2.25)
    assert got["log_tail"] == ["warming up", "a warning"] and got["peak_rss_mib"] > 0
    with pytest.raises(click.ClickException, match="only 3 iteration stamps, 4 needed"):
        children.run_stamped([sys.executable, "-c", script], dict(os.environ), tmp_path / "child.log", 2, 2)
    with pytest.raises(click.ClickException, match=r"failed \(3\)"):
        children.run_stamped([sys.executable, "-c", "raise SystemExit(3)"], dict(os.environ), tmp_path / "x.log", 1, 1)


def test_dm_vs_references_variant_env_is_parsed_strictly_and_timed_against_the_reference() -> None:
    import click
    import dm_vs_reference  # benchmarks/dm_vs_reference.py

    assert dm_vs_reference.parse_env_pairs(("OMP_NUM_THREADS=1", "A_B=x=y", "EMPTY=")) == {
        "OMP_NUM_THREADS": "1", "A_B": "x=y", "EMPTY": ""}
    for bad in ("NOEQUALS", "=1", "1X=2", "A-B=1", "../X=1"):
        with pytest.raises(click.BadParameter):
            dm_vs_reference.parse_env_pairs((bad,))
    figures = dm_vs_reference.variant_figures([0.09, 0.08], [0.02, 0.04], [0.1, 0.3])
    assert figures["package_variant_s_per_iteration_median"] == pytest.approx(0.03)
    assert figures["package_variant_cpu_s_per_iteration_median"] == pytest.approx(0.2)
    assert figures["package_variant_speedup_median"] == pytest.approx(0.085 / 0.03, abs=1e-3)
    assert figures["package_variant_speedup_per_round"] == [4.5, 2.0]


def test_compiled_gradient_accuracy_compares_each_parameter_to_its_exact_gradient() -> None:
    import torch
    from compiled_gradient_accuracy import largest_relative_error  # benchmarks/compiled_gradient_accuracy.py

    exact = [torch.tensor([1.0, 1.0], dtype=torch.float64), torch.tensor([3.0, 4.0], dtype=torch.float64),
             torch.tensor([1e-12], dtype=torch.float64)]  # the last: an exact 0 (left out)
    got = [torch.tensor([1.0, 0.0]), torch.tensor([3.0, 4.5]), torch.tensor([5.0])]
    # |(0, -1)| / sqrt 2 = 0.7071 against |(0, 0.5)| / 5 = 0.1
    assert largest_relative_error(got, exact) == pytest.approx(2 ** -0.5)
