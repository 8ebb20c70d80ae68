"""Atomic file writes: write to a temp file in the same directory, then rename over the target.

An interrupted run (Ctrl-C, crash) leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)` to fill a temp file beside `path`, then rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix or ".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; the user's umask decides instead
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def current_umask() -> int:
    """The process umask (read by setting and restoring it: there is no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text_atomically(path: str | Path, text: str) -> Path:
    def write(tmp: Path) -> None:
        tmp.write_text(text, encoding="utf-8")

    return write_atomically(path, write)


def save_figure_atomically(fig: object, path: str | Path, **kwargs: object) -> Path:
    """Save a matplotlib figure atomically (format from the suffix of `path`)."""
    fmt = Path(path).suffix.lstrip(".") or "png"
    return write_atomically(path, lambda tmp: fig.savefig(tmp, format=fmt, **kwargs))  # type: ignore[attr-defined]
