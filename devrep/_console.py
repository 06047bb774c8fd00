"""rich consoles for CLI output that is read by people at a terminal and by scripts and logs everywhere else."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

UNWRAPPED_WIDTH = 1000
"""Width used when the stream is not a terminal: wide enough that no line or table is folded."""


def make_console(*, stderr: bool = False) -> Console:
    """A ``Console`` on stdout (or stderr) that wraps at the terminal's width, but not at rich's default 80 columns
    when the stream is a pipe or a file (CI logs, ``| grep``): there lines keep their full length. ``$COLUMNS``
    still sets the width when given."""
    from rich.console import Console

    console = Console(stderr=stderr)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(stderr=stderr, width=UNWRAPPED_WIDTH)
    return console


class LazyConsole:
    """Stands in for ``make_console(stderr=...)`` and makes it on first use: importing rich costs tens of
    milliseconds, which ``devrep serve`` (it prints through logging) would otherwise pay before it serves."""

    def __init__(self, *, stderr: bool = False) -> None:
        self._stderr = stderr
        self._console: Console | None = None

    def get(self) -> Console:
        """The real console (for APIs that want a ``Console`` instance, such as ``rich.progress.Progress``)."""
        if self._console is None:
            self._console = make_console(stderr=self._stderr)
        return self._console

    def __getattr__(self, name: str) -> Any:
        return getattr(self.get(), name)
