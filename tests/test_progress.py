"""Progress bars: shown on a terminal, quiet otherwise or when turned off."""

import io
import sys
from typing import ClassVar, Iterator

import torch

from builders.build import load_recipe
from builders.compile_setting import COMPILING_NOTE, CompileSetting
from builders.engine import Engine
from builders.methods.base import Method
from builders.networks import build_network
from builders.progress import progress_bar
from builders.registry import register


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_shows_on_a_terminal():
    out = _Terminal()
    bar = progress_bar(4, "eval ConvNet", file=out, unit="epoch")
    bar.update(4)
    bar.close()
    assert "eval ConvNet" in out.getvalue() and "4/4" in out.getvalue()


def test_progress_bar_is_quiet_off_a_terminal_or_when_disabled():
    for out, enabled in ((io.StringIO(), True), (_Terminal(), False)):
        bar = progress_bar(4, "eval ConvNet", enabled=enabled, file=out)
        bar.update(4)
        bar.close()
        assert out.getvalue() == ""


# -- a method's status note shows beside the build's bar --------------------------------------------------------
@register
class _StatusNote(Method):
    """An iterative method for this test: one loss per iteration, and a status note in the first."""

    name: ClassVar[str] = "user_status_note"

    def initial_state(self) -> dict[str, torch.Tensor]:
        return {"images": torch.zeros(self.ctx.num_classes * self.ctx.ipc, *self.ctx.real.image_shape,
                                      requires_grad=True)}

    def optimizers(self, state: dict[str, torch.Tensor]) -> dict[str, torch.optim.Optimizer]:
        return {"images": torch.optim.SGD([state["images"]], lr=0.1)}

    def losses(self, state: dict[str, torch.Tensor], iteration: int) -> Iterator[torch.Tensor]:
        if iteration == 0:
            self.ctx.status("a note from the method")
        yield ((state["images"] - 1) ** 2).mean()


def test_a_methods_status_note_shows_beside_the_build_bar(fashion_mnist_root, tmp_path, monkeypatch):
    recipe = tmp_path / "note.yaml"
    recipe.write_text("source: fashionmnist\nmethod: user_status_note\nipc: 1\niterations: 2\nreal_per_class: 2\n"
                      "checkpoint_every: 0\n")
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    engine = Engine(load_recipe(recipe, []), out_root=tmp_path / "out", data_root=fashion_mnist_root, device="cpu",
                    evaluate=False, progress=True)
    engine.run()
    assert "a note from the method" in terminal.getvalue() and "2/2" in terminal.getvalue()


def test_compile_setting_announces_once_before_its_first_compiled_computation():
    notes, order = [], []
    choice = CompileSetting(True, False, "ConvNetW32", announce=notes.append)
    net = build_network("ConvNetW32", 1, 10, (8, 8), seed=0)
    for _ in range(2):
        choice.run(net, lambda compiled: order.append((compiled, list(notes))))
    assert notes == [COMPILING_NOTE] and order == [(True, [COMPILING_NOTE])] * 2
    quiet = []
    CompileSetting(False, True, "ConvNetW32", announce=quiet.append).run(net, lambda compiled: None)
    assert quiet == []  # nothing compiles: nothing said
