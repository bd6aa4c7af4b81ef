"""One progress bar for long work (export, classification, calibration): rich, on stderr."""

from __future__ import annotations

from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

_console = Console(stderr=True)


@contextmanager
def progress_bar(description: str, total: int | None, enabled: bool = True):
    """Yields ``advance(n=1, note=None)``; `note` (e.g. the running loss) follows the description.
    A no-op bar when disabled (library calls, tests) and when stderr is no terminal or notebook (a log file,
    a pipe: a bar there is noise; the command's own result lines say what was done)."""
    if not enabled or not (_console.is_terminal or _console.is_jupyter):
        yield lambda n=1, note=None: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=_console, transient=False) as bar:
        task = bar.add_task(description, total=total)

        def advance(n=1, note=None):
            bar.update(task, advance=n, **({"description": f"{description} {note}"} if note else {}))

        try:
            yield advance
        except BaseException:
            bar.live.transient = True  # a failure leaves its one error line, not a half-drawn bar
            raise
