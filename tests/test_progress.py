"""Progress bars: shown on a terminal, quiet otherwise or when turned off."""

import io

from builders.progress import progress_bar


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
