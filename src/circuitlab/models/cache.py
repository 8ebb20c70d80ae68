"""The on-disk cache of dequantized fp32 checkpoints, written atomically (temp dir + rename)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import platformdirs

MARKER = "circuitlab-cache.json"


def cache_root() -> Path:
    """`$CIRCUITLAB_CACHE`, else the user cache dir (`~/.cache/circuitlab` on Linux)."""
    env = os.environ.get("CIRCUITLAB_CACHE")
    return Path(env) if env else Path(platformdirs.user_cache_dir("circuitlab"))


def cache_key(source: Path) -> str:
    """A key naming one source file version: stem + hash of its absolute path, size and mtime."""
    st = source.stat()
    digest = hashlib.sha256(f"{source.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return f"{source.stem}-{digest}"


def cached_dir(key: str) -> Path | None:
    """The complete cache entry for `key`, or None (an entry without its marker is never returned)."""
    path = cache_root() / key
    return path if (path / MARKER).is_file() else None


def write_atomically(key: str, fill: Callable[[Path], None], meta: dict) -> Path:
    """Build the entry in a temp dir beside the final one, then rename it into place.

    An interrupted build leaves only a `.tmp-*` dir, never a half-written entry under `key`.
    """
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    final = root / key
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=root))
    try:
        fill(tmp)
        (tmp / MARKER).write_text(json.dumps(meta, indent=2))
        if final.exists():  # a concurrent process won the race, or a stale entry without marker
            if (final / MARKER).is_file():
                shutil.rmtree(tmp)
                return final
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
