"""A run directory is replaced whole or not at all.

`RunDirectory(out, force)` is checked when it is made (before any model loads or anything is computed):
`out` must not be a file, its parent must be writable, and an existing `out` must be empty or hold a
circuitlab run, which only `force` may replace. Entering it takes a lock (a second writer to the same
`out` gets an `OutputError` at once), removes what killed runs left behind, and makes an empty staging
directory beside `out`; the run writes everything there. Leaving it without an error swaps the staging
directory into place (one atomic `renameat2(RENAME_EXCHANGE)` on Linux, two renames elsewhere); leaving it
with an error removes the staging directory and keeps the old run.

kill -9 at any moment therefore leaves the old complete run or the new one: staging and old copies are
hidden siblings (``.NAME.staging-*``, ``.NAME.old-*``) that the next run into `out` cleans up (and, in the
one gap of the two-rename fallback, puts the old run back).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from types import TracebackType

from circuitlab.atomic import current_umask
from circuitlab.errors import OutputError

MARKER = ".circuitlab-run"  # written into every run directory: what may be replaced with --force
_RENAME_EXCHANGE = 2


def is_run_directory(path: Path) -> bool:
    """A directory circuitlab wrote (marker file, or a results.json from before the marker existed)."""
    return (path / MARKER).is_file() or (path / "results.json").is_file()


def check_out(out: Path, force: bool) -> None:
    """Refuse an `out` that cannot take a new run; raises `OutputError` with the fix."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file, not a directory; choose a directory path")
    parent = out.parent if out.parent != Path("") else Path(".")
    existing = next((p for p in [parent, *parent.parents] if p.exists()), Path("/"))
    if not existing.is_dir():
        raise OutputError(f"--out {out}: {existing} is a file, so no directory can be made there; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"--out {out}: {existing} is not writable; choose a directory you can write to")
    if out.is_dir() and any(out.iterdir()):
        if not is_run_directory(out):
            raise OutputError(f"--out {out} exists and holds files that are not a circuitlab run; "
                              "choose a new directory or empty this one (nothing was overwritten)")
        if not force:
            raise OutputError(f"--out {out} already holds a circuitlab run; pass --force to replace it "
                              "whole, or choose another --out")


class RunDirectory:
    """Validate, lock, stage and swap one run directory (see the module docstring)."""

    def __init__(self, out: str | Path, *, force: bool = False) -> None:
        self.out = Path(out).absolute()
        self.force = force
        check_out(self.out, force)
        self._lock_fd: int | None = None
        self.staging: Path | None = None

    # --- context ---------------------------------------------------------------------------------------
    def __enter__(self) -> RunDirectory:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._lock()
        try:
            self._clean_leftovers()  # may put back an old run that a killed swap left hidden
            check_out(self.out, self.force)  # again under the lock: another run may have finished meanwhile
            self.staging = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.staging-", dir=self.out.parent))
            os.chmod(self.staging, 0o777 & ~current_umask())
        except BaseException:
            self._unlock()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        try:
            if kind is None and self.staging is not None:
                self._commit(self.staging)
            elif self.staging is not None:
                shutil.rmtree(self.staging, ignore_errors=True)
        finally:
            self.staging = None
            self._unlock()

    @property
    def path(self) -> Path:
        """The staging directory to write into (only inside the `with` block)."""
        if self.staging is None:
            raise OutputError("RunDirectory.path is only available inside its `with` block")
        return self.staging

    # --- internals -------------------------------------------------------------------------------------
    def _lock_path(self) -> Path:
        return self.out.parent / f".{self.out.name}.lock"

    def _lock(self) -> None:
        path = self._lock_path()
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EAGAIN, errno.EACCES):
                    raise OutputError(f"another circuitlab run is writing {self.out} right now; wait for it "
                                      "to finish or choose another --out") from None
                raise
            # the file may have been unlinked by the previous holder between our open and our flock
            if os.path.exists(path) and os.stat(path).st_ino == os.fstat(fd).st_ino:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                self._lock_fd = fd
                return
            os.close(fd)

    def _unlock(self) -> None:
        if self._lock_fd is None:
            return
        try:
            self._lock_path().unlink(missing_ok=True)
        finally:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    def _siblings(self, kind: str) -> list[Path]:
        return sorted(self.out.parent.glob(f".{self.out.name}.{kind}-*"))

    def _clean_leftovers(self) -> None:
        # We hold the lock, so every staging/old sibling belongs to a run that died.
        old = self._siblings("old")
        if not self.out.exists() and old:  # killed between the two renames of the fallback swap
            os.rename(old[-1], self.out)
            old = old[:-1]
        for path in [*self._siblings("staging"), *old]:
            shutil.rmtree(path, ignore_errors=True)

    def _commit(self, staging: Path) -> None:
        (staging / MARKER).write_text(json.dumps({"written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")
        if not self.out.exists():
            os.rename(staging, self.out)
            return
        if _exchange(staging, self.out):  # staging now holds the old run
            shutil.rmtree(staging, ignore_errors=True)
            return
        old = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.old-", dir=self.out.parent))
        os.rmdir(old)
        os.rename(self.out, old)
        os.rename(staging, self.out)
        shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where the system lacks it."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd = -100
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    return result == 0
