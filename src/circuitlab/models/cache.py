"""The on-disk cache of dequantized fp32 checkpoints: entries written atomically, verified on every load.

Layout: `<root>/<key>/` holds one converted checkpoint (config.json, model.safetensors, tokenizer files) and
its manifest `circuitlab-cache.json`: the source it was converted from and every file's size and sha256.
An entry is built in a temp directory `.tmp-<key>.<host>-<pid>.<random>` beside it, the manifest is
written last, and the directory is renamed into place: an entry exists whole, with its manifest, or not
at all.

Verification policy. On the 538 MB SmolLM2 entry, sha256 takes 0.27 s when the file is in the page
cache and 1.2 s when it is read from disk (a CPU with SHA extensions; expect ~1.5 s without them), while
the warm load itself takes ~0.8 s. So every load:
- checks each file's size against the manifest and the safetensors header against the file size, at
  once (this catches truncation, the common damage: a full disk, a killed copy);
- hashes every file in a background thread while the weights load (`loading.load_gguf`), which costs
  little wall time since hashing and loading read the same pages; a mismatch discards the loaded model.
A damaged entry is rebuilt from its source with a warning on stderr, never a traceback. Entries written
before manifests existed ("legacy") are checked structurally and adopted: their hashes are recorded.

Leftovers. A killed cold load leaves its temp directory (hundreds of MB). `remove_leftovers()`, called on
every load and by `circuitlab cache clean`, deletes the ones not in use: made on this host by a process
that no longer runs, or older than an hour (a day when their process still seems to run, which a reused
pid can fake).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import platformdirs

from circuitlab.atomic import current_umask, write_text_atomically
from circuitlab.errors import CacheError
from circuitlab.models.checkpoint import safetensors_problem

MARKER = "circuitlab-cache.json"
MANIFEST_VERSION = 2
TMP_PREFIX, OLD_PREFIX = ".tmp-", ".old-"
STALE_S = 3600.0  # a leftover from another host, or of unknown origin, is abandoned after an hour
ALIVE_STALE_S = 86400.0  # ... and after a day even when a process with its pid still runs here
_OWNER = re.compile(r"\.([0-9a-f]{8})-(\d+)\.[^.]*$")  # <host tag>-<pid>.<random> ending a temp name


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
    """The complete cache entry for `key`, or None (an entry without its manifest is never returned)."""
    path = cache_root() / key
    return path if (path / MARKER).is_file() else None


# --- manifests ---------------------------------------------------------------------------------------

def sha256_file(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def file_records(directory: Path) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file of an entry (its manifest excluded), by name."""
    return {
        p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(directory.iterdir()) if p.is_file() and p.name != MARKER
    }


def read_manifest(entry: Path) -> dict[str, Any]:
    """The manifest of `entry`; CacheError when it is missing or unreadable."""
    try:
        manifest = json.loads((entry / MARKER).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CacheError(f"cache entry {entry} has an unreadable manifest {MARKER} ({exc}); {_FIX}") from exc
    if not isinstance(manifest, dict):
        raise CacheError(f"cache entry {entry} has a manifest that is not a JSON object; {_FIX}")
    return manifest


_FIX = "it is rebuilt on the next load, or remove it with `circuitlab cache clean --all`"


def is_legacy(manifest: dict[str, Any]) -> bool:
    """An entry written before manifests recorded sizes and hashes."""
    return not isinstance(manifest.get("files"), dict)


def quick_problem(entry: Path) -> str | None:
    """What is wrong with `entry` that sizes and headers show (no hashing), or None."""
    try:
        manifest = read_manifest(entry)
    except CacheError as exc:
        return str(exc)
    expected = {} if is_legacy(manifest) else manifest["files"]
    for name, record in expected.items():
        path = entry / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != record.get("size"):
            return f"{name} is {path.stat().st_size} bytes, the manifest says {record.get('size')}"
    for weights in sorted(entry.glob("*.safetensors")):
        problem = safetensors_problem(weights)
        if problem is not None:
            return f"{weights.name}: {problem}"
    if is_legacy(manifest) and not any(entry.glob("*.safetensors")):
        return "it holds no .safetensors weights"
    return None


def hash_problem(entry: Path) -> str | None:
    """Which file of `entry` does not match its recorded sha256, or None (legacy entries: None)."""
    manifest = read_manifest(entry)
    if is_legacy(manifest):
        return None
    for name, record in manifest["files"].items():
        path = entry / name
        if not path.is_file():
            return f"{name} is missing"
        if sha256_file(path) != record.get("sha256"):
            return f"{name} does not match its recorded sha256"
    return None


def check_entry(entry: Path, *, hashes: bool = True) -> None:
    """CacheError naming the entry, what is wrong and the fix, unless `entry` matches its manifest."""
    problem = quick_problem(entry) or (hash_problem(entry) if hashes else None)
    if problem is not None:
        raise CacheError(f"cache entry {entry} is damaged: {problem}; {_FIX}")


def adopt(entry: Path) -> None:
    """Record the sizes and hashes of a legacy entry (its layout was checked by `quick_problem`)."""
    manifest = read_manifest(entry)
    manifest.update(version=MANIFEST_VERSION, files=file_records(entry))
    _write_manifest(entry, manifest)


def _write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    write_text_atomically(directory / MARKER, json.dumps(manifest, indent=2))


# --- writing -----------------------------------------------------------------------------------------

def owner_tag() -> str:
    """`<host hash>-<pid>`: names a temp file or dir by the process that makes it."""
    host = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
    return f"{host}-{os.getpid()}"


def write_atomically(key: str, fill: Callable[[Path], None], meta: dict, *, replace: bool = False) -> Path:
    """Build the entry in a temp dir beside the final one, record its manifest, rename it into place.

    An interrupted build leaves only a temp dir (removed by `remove_leftovers`), never a half-written
    entry under `key`. An existing complete entry is kept (a concurrent process won the race) unless
    `replace`, used to rebuild a damaged one.
    """
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    final = root / key
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{key}.{owner_tag()}.", dir=root))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700; the user's umask decides instead
        fill(tmp)
        for file in tmp.iterdir():  # safetensors writes 0600; the user's umask decides instead
            os.chmod(file, 0o666 & ~current_umask())
        _write_manifest(tmp, {**meta, "version": MANIFEST_VERSION, "created": time.time(),
                              "files": file_records(tmp)})
        if final.exists():
            if (final / MARKER).is_file() and not replace:
                shutil.rmtree(tmp)
                return final
            # Move the old entry aside first: a rename is atomic, a recursive delete is not.
            old = Path(tempfile.mkdtemp(prefix=f"{OLD_PREFIX}{key}.{owner_tag()}.", dir=root))
            os.replace(final, old / key)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


# --- leftovers, listing, cleaning --------------------------------------------------------------------

@dataclass(frozen=True)
class Leftover:
    """A temp directory of a cold load (or a replaced entry) that has not been removed."""

    path: Path
    size: int
    in_use: bool


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, but belongs to another user
        return True
    return True


def _in_use(path: Path, now: float) -> bool:
    age = now - path.stat().st_mtime
    match = _OWNER.search(path.name)
    if match and match.group(1) == owner_tag().split("-")[0]:
        if not _pid_alive(int(match.group(2))):
            return False
        return age < ALIVE_STALE_S
    return age < STALE_S


def _tree_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def leftovers(root: Path | None = None) -> list[Leftover]:
    """Temp directories in the cache (and partial assembled GGUF files), each marked in use or not."""
    root = cache_root() if root is None else root
    if not root.is_dir():
        return []
    now = time.time()
    found = [p for p in root.iterdir() if p.name.startswith((TMP_PREFIX, OLD_PREFIX))]
    found += list((root / "gguf").glob("*.partial")) if (root / "gguf").is_dir() else []
    out = []
    for path in sorted(found):
        try:
            out.append(Leftover(path, _tree_size(path), _in_use(path, now)))
        except FileNotFoundError:  # its owner finished (renamed or removed it) meanwhile
            continue
    return out


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_leftovers(root: Path | None = None) -> list[Leftover]:
    """Delete the leftovers not in use; returns what was removed."""
    removed = [item for item in leftovers(root) if not item.in_use]
    for item in removed:
        _remove(item.path)
    return removed


@dataclass(frozen=True)
class CacheEntry:
    """One cache entry as `circuitlab cache list` shows it."""

    key: str
    path: Path
    size: int
    spec: str
    source: str
    status: str  # "verified", "legacy (no hashes recorded)", or "damaged: <reason>"


def list_entries(*, hashes: bool = True) -> list[CacheEntry]:
    """Every entry of the cache with its size and whether it matches its manifest."""
    root = cache_root()
    if not root.is_dir():
        return []
    out = []
    for path in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name != "gguf"):
        problem = quick_problem(path) if (path / MARKER).is_file() else f"no manifest {MARKER}"
        manifest: dict[str, Any] = {}
        if problem is None:
            manifest = read_manifest(path)
            problem = hash_problem(path) if hashes else None
        if problem is not None:
            status = f"damaged: {problem}"
        elif is_legacy(manifest):
            status = "legacy (no hashes recorded)"
        else:
            status = "verified" if hashes else "sizes match"
        out.append(CacheEntry(path.name, path, _tree_size(path), str(manifest.get("spec", "")),
                              str(manifest.get("source", "")), status))
    return out


@dataclass(frozen=True)
class CleanReport:
    removed: list[Path]
    freed: int
    kept_in_use: list[Path]


def clean(*, everything: bool = False) -> CleanReport:
    """Remove leftovers not in use; with `everything`, every entry and assembled GGUF file too."""
    root = cache_root()
    items = leftovers(root)
    removed = [(i.path, i.size) for i in items if not i.in_use]
    kept = [i.path for i in items if i.in_use]
    if everything and root.is_dir():
        for path in sorted(root.iterdir()):
            if not path.name.startswith((TMP_PREFIX, OLD_PREFIX)) and path.name != "gguf":
                removed.append((path, _tree_size(path)))
        gguf = root / "gguf"
        if gguf.is_dir():
            removed += [(p, p.stat().st_size) for p in sorted(gguf.glob("*.gguf"))]
    for path, _ in removed:
        _remove(path)
    return CleanReport([p for p, _ in removed], sum(s for _, s in removed), kept)
