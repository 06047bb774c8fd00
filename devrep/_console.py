"""rich consoles for CLI output that is read by people at a terminal and by scripts and logs everywhere else, and
the progress bar the CLI and the demo share (a leaf: it imports only rich and the standard library)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # rich loads on first use: `devrep serve` reaches SERVING without it (bench S1)
    from rich.console import Console
    from rich.progress import Progress

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


def progress_bar(out: Console | None = None) -> Progress:
    """A byte-count progress bar (on stderr unless ``out`` is given)."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    return Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                    TransferSpeedColumn(), TimeRemainingColumn(), console=out or make_console(stderr=True),
                    transient=False)


def replicate_with_progress(client: Any, name: str, devices: Sequence[str], show: bool = True,
                            console: Console | None = None) -> Any:
    """``client.replicate`` with a rich progress bar (on stderr unless ``console`` is given)."""
    if not show:
        return client.replicate(name, devices)
    with progress_bar(console) as bar:
        task = bar.add_task(f"replicate {name} -> {', '.join(devices)}", total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=max(total, done) or None)

        return client.replicate(name, devices, progress=update)


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
