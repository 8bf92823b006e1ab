"""benchmarks/machine.py's write_record: records never replace one another, and go where they are told."""

from __future__ import annotations

import json
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
