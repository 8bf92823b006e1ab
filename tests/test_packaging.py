"""The wheel: it carries the shipped recipes and embedded sets, and an installed package finds its recipes."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from a copy of the checkout (setuptools builds in its source tree: the copy keeps the
    checkout clean)."""
    pytest.importorskip("setuptools")
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("condensed_datasets", "builders", "recipes"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "-q", "-w", str(out), str(src)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    (path,) = out.glob("*.whl")
    return path


def test_the_wheel_carries_every_shipped_recipe_and_embedded_set(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    recipes = sorted(p.name for p in (REPO / "recipes").glob("*.yaml"))
    assert recipes and all(f"builders/recipes/{name}" in names for name in recipes)
    embedded = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "condensed_datasets" / "embedded").rglob("*")
                      if p.is_file() and p.suffix in (".safetensors", ".md"))
    assert embedded and all(name in names for name in embedded)
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "recipes/"))]


def test_an_installed_package_finds_its_recipes(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import builders, builders.recipe as r; print(builders.__file__); "
            "print(r.shipped_recipe_path('dm', 'fashionmnist'))")
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}  # no CONDENSED_RECIPES_DIR
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr
    package, recipe = done.stdout.split()
    assert Path(package).parent == site / "builders"  # the unpacked wheel, not the checkout
    assert Path(recipe) == site / "builders" / "recipes" / "dm_fashionmnist.yaml"
