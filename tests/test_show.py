"""The image grid maps a set back to pixels through its own space (normalisation, then ZCA)."""

import torch

from builders.show import save_grid, to_pixels
from condensed_datasets.format import CondensedSet, class_contiguous_labels
from condensed_datasets.zca import fit_zca


def test_pixels_undo_the_normalisation_by_hand(tmp_path):
    pixels = torch.rand(10, 1, 4, 4)
    images = (pixels - 0.2861) / 0.3530
    cset = CondensedSet(images, class_contiguous_labels(10, 1), source="fashionmnist", method="dm", ipc=1)
    torch.testing.assert_close(to_pixels(cset), pixels, atol=1e-6, rtol=0)
    path = save_grid(cset, tmp_path / "grid.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_pixels_undo_zca_first():
    pixels = torch.rand(20, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    normalised = (pixels - 0.2861) / 0.3530
    zca = fit_zca(normalised)
    cset = CondensedSet(zca(normalised), class_contiguous_labels(10, 2), source="fashionmnist", method="mtt",
                        ipc=2, zca=zca)
    torch.testing.assert_close(to_pixels(cset), pixels, atol=1e-4, rtol=0)


def test_the_grid_is_written_where_asked_and_nowhere_else(tmp_path):
    """A link planted at the grid's temporary name is never followed: the grid lands at its path as a plain file,
    and nothing appears where the link points."""
    cset = CondensedSet(torch.zeros(10, 1, 4, 4), class_contiguous_labels(10, 1), source="fashionmnist",
                        method="dm", ipc=1)
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir(), elsewhere.mkdir()
    (out / ".grid.png.tmp.png").symlink_to(elsewhere / "planted.png")
    path = save_grid(cset, out / "grid.png")
    assert not path.is_symlink() and path.read_bytes()[:4] == b"\x89PNG"
    assert list(elsewhere.iterdir()) == []


def test_show_never_writes_its_grid_over_the_set_and_names_an_output_below_a_file(tmp_path):
    """-o naming the SET itself (however spelt) is refused and the set kept; -o below a file is one line naming
    the path and the fix."""
    from click.testing import CliRunner

    from builders.cli import show_command

    cset = CondensedSet(torch.zeros(10, 1, 4, 4), class_contiguous_labels(10, 1), source="fashionmnist",
                        method="dm", ipc=1)
    path = cset.save(tmp_path / "dm_ipc1.safetensors")
    before = path.read_bytes()
    (tmp_path / "link.safetensors").symlink_to(path)
    for output in (path, tmp_path / "." / path.name, tmp_path / "link.safetensors"):
        out = CliRunner().invoke(show_command, [str(path), "-o", str(output)])
        assert out.exit_code == 2 and "the SET itself" in out.output, out.output
    assert path.read_bytes() == before and (tmp_path / "link.safetensors").is_symlink()
    (tmp_path / "afile").write_text("mine\n")
    out = CliRunner().invoke(show_command, [str(path), "-o", str(tmp_path / "afile" / "grid.png")])
    assert out.exit_code == 1 and "Traceback" not in out.output, out.output
    assert f"cannot write {tmp_path / 'afile' / 'grid.png'}" in out.output and "pass -o" in out.output, out.output
    assert (tmp_path / "afile").read_text() == "mine\n"
