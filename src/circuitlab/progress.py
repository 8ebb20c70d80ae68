"""Progress bars with an ETA, on stderr, for every loop that can take more than a couple of seconds.

Bars show only when stderr is a terminal and the run is not quiet (`--quiet`, or `set_quiet(True)` from
Python), so logs, pipes and CI stay clean. Library code asks for a bar and never needs to know whether it
is shown::

    with progress_bar(total=len(chunks), description="patching resid_pre") as advance:
        for chunk in chunks:
            ...
            advance(1)
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

_quiet = False


def set_quiet(quiet: bool) -> None:
    """Silence (True) or allow (False) every circuitlab progress bar in this process."""
    global _quiet
    _quiet = quiet


def bars_enabled() -> bool:
    return not _quiet and sys.stderr.isatty()


def stderr_console():  # noqa: ANN201 - rich is imported lazily: `circuitlab --help` should stay fast
    from rich.console import Console

    return Console(stderr=True)


class Advance(Protocol):
    """`advance(n)` moves a bar on by n; `advance(n, note)` also shows `note` after its description (e.g. a
    training loss that changes every step)."""

    def __call__(self, n: float, note: str | None = None) -> None: ...


@contextmanager
def progress_bar(total: float, description: str) -> Iterator[Advance]:
    """A bar with elapsed time and ETA; yields `advance(n, note=None)`. A no-op when bars are off."""
    if not bars_enabled() or total <= 0:
        yield lambda _n, note=None: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn("{task.description}"), BarColumn(bar_width=24), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
    with Progress(*columns, console=stderr_console(), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n, note=None: bar.update(task, advance=n,
                                              description=description if note is None else f"{description} {note}")


@contextmanager
def status(message: str) -> Iterator[None]:
    """A spinner with a message for one step of unknown length (e.g. a one-time model conversion)."""
    if not bars_enabled():
        yield
        return
    with stderr_console().status(message):
        yield
