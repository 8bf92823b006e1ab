"""The architecture holds: import contracts, imports at module top, and a new method is one module + one recipe."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import torch
from click.testing import CliRunner

from builders.cli import build_command
from builders.methods.base import Method, SetContents
from builders.recipe import check_at_least
from builders.registry import get_method, method_names, register
from condensed_datasets.format import CondensedSet

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("condensed_datasets", "builders")
#: The only imports allowed inside functions: (file, imported module). Build-on-demand is the consumer's one
#: knock on the producer's door (DESIGN.md); everything else imports at module top.
ALLOWED_LOCAL_IMPORTS = {("condensed_datasets/datasets.py", "builders.build"),
                         ("condensed_datasets/continual.py", "builders.build")}


def test_import_contracts_hold() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    command = [str(lint)] if lint.exists() else [sys.executable, "-m", "importlinter.cli"]
    result = subprocess.run([*command, "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def _local_imports(path: Path, base: Path = REPO) -> list[tuple[str, str]]:
    """(file relative to ``base``, module) of every import statement inside a function of ``path``."""
    found = []
    tree = ast.parse(path.read_text(), filename=str(path))
    for func in ast.walk(tree):
        if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(func):
            if isinstance(node, ast.ImportFrom):
                found.append((path.relative_to(base).as_posix(), node.module or ""))
            elif isinstance(node, ast.Import):
                found += [(path.relative_to(base).as_posix(), alias.name) for alias in node.names]
    return found


def test_function_local_imports_are_only_the_allowed_ones() -> None:
    found = {hit for package in PACKAGES for path in sorted((REPO / package).rglob("*.py"))
             for hit in _local_imports(path)}
    optional_extras = {hit for hit in found if hit[1] in OPTIONAL_EXTRAS}
    assert found - optional_extras == ALLOWED_LOCAL_IMPORTS


#: Optional extras may be imported where used (with a one-line comment there): they are not installed by default.
OPTIONAL_EXTRAS = {"scipy", "transformers", "matplotlib", "matplotlib.pyplot"}


def test_the_local_import_scan_sees_an_import_inside_a_function(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("import os\n\ndef f():\n    import json\n    from pathlib import Path\n")
    assert _local_imports(probe, tmp_path) == [("probe.py", "json"), ("probe.py", "pathlib")]


# -- a method defined here, outside the package, builds through the normal command line -----------------------
@register
class FirstImagesPerClass(Method):
    """A one-shot method for this test: the first ``ipc`` real images of every class, scaled by ``params.gain``."""

    name: ClassVar[str] = "user_firstimages"
    iterative: ClassVar[bool] = False
    defaults: ClassVar[dict[str, Any]] = {"gain": 1.0}

    @classmethod
    def check_recipe(cls, recipe) -> None:
        check_at_least(recipe.params, ("gain",), 0, strict=True)

    def select(self) -> SetContents:
        real = self.ctx.real
        rows = torch.cat([real.class_indices[c][: self.ctx.ipc] for c in range(real.num_classes)])
        return SetContents(images=real.rows(rows) * self.params["gain"], indices=real.source_rows[rows],
                           metadata={"gain": self.params["gain"]})


def test_a_method_defined_outside_the_package_builds_through_the_cli(fashion_mnist_root: Path, tmp_path: Path) -> None:
    assert get_method("user_firstimages") is FirstImagesPerClass and "user_firstimages" in method_names()
    recipe = tmp_path / "user_firstimages.yaml"
    recipe.write_text("source: fashionmnist\nmethod: user_firstimages\nipc: 2\nreal_per_class: 5\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(build_command, [str(recipe), "--out", str(out), "--data-root", str(fashion_mnist_root),
                                                "--device", "cpu", "--quiet", "--no-eval", "--set", "params.gain=2"])
    assert result.exit_code == 0, result.output
    cset = CondensedSet.load(out / "condensed" / "fashionmnist" / "user_firstimages_ipc2.safetensors")
    assert cset.method == "user_firstimages" and len(cset) == 20
    assert cset.metadata["build"]["method"] == {"gain": 2.0} and cset.metadata["recipe"]["params"] == {"gain": 2.0}
    first = cset.indices.view(10, 2)
    assert (first[:, 0] < first[:, 1]).all()  # the first two of each class, in order

    bad = CliRunner().invoke(build_command, [str(recipe), "--out", str(tmp_path / "o2"), "--set", "params.gain=0"])
    assert bad.exit_code != 0 and "params.gain: must be > 0" in bad.output
