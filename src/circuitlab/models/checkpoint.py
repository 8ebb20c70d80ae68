"""Cheap structural checks of checkpoint files, run before any library parses them.

A damaged file (a truncated download, a killed copy, a file that only has the right name) would otherwise
surface as a traceback from deep inside safetensors, the GGUF reader or `json`. These checks read only the
few bytes that describe a file's layout, so they cost microseconds and run before every load:

- safetensors: an 8-byte little-endian header length N, N bytes of JSON naming each tensor's byte range,
  then the data; the file is valid only if the ranges end exactly at the end of the file.
- GGUF: the magic `GGUF`, a version (1 to 3) and tensor / metadata counts.
- JSON configs: must parse, and hold an object.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from circuitlab.errors import ModelLoadError

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (1, 2, 3)
# Far above any real checkpoint (a 70B model has ~10^3 tensors and ~10^2 metadata keys), far below what
# random bytes read as a uint64: a damaged header is told apart from a real one without reading further.
_MAX_GGUF_COUNT = 1 << 24
_MAX_SAFETENSORS_HEADER = 100 << 20  # safetensors itself refuses headers over 100 MB


def safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a complete safetensors file, or None when its layout is sound."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return f"it is {size} bytes, too short for a safetensors header"
        n = int.from_bytes(head, "little")
        if n > min(size - 8, _MAX_SAFETENSORS_HEADER):
            return f"its first 8 bytes announce a {n}-byte header but the file has {size} bytes"
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "its header is not JSON"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    ends = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            return f"its header entry for tensor {name!r} has no valid data_offsets"
        ends.append(offsets[1])
    expected = 8 + n + max(ends, default=0)
    if size < expected:
        return f"it is truncated: {size} bytes, but its header describes {expected}"
    if size > expected:
        return f"it has {size - expected} bytes after the last tensor its header describes"
    return None


def check_safetensors(path: Path, *, fix: str) -> None:
    """ModelLoadError naming `path`, what is wrong and `fix`, unless `path` is a sound safetensors file."""
    problem = safetensors_problem(path)
    if problem is not None:
        raise ModelLoadError(f"{path} is not a valid safetensors file: {problem}; {fix}")


def check_gguf_header(path: Path) -> None:
    """ModelLoadError unless `path` starts like a GGUF checkpoint (magic, known version, sane counts)."""
    with path.open("rb") as fh:
        head = fh.read(24)
    if head[:4] != GGUF_MAGIC:
        raise ModelLoadError(
            f"{path} is not a GGUF file (it starts with {head[:4]!r}, not {GGUF_MAGIC!r}); pass a .gguf "
            "checkpoint in llama.cpp's format, a model directory, or a known model name"
        )
    damaged = f"{path} starts with the GGUF magic but its header is damaged"
    fix = "the file is corrupt or truncated: download it again (or reinstall the package that ships it)"
    if len(head) < 24:
        raise ModelLoadError(f"{damaged} (the file is only {path.stat().st_size} bytes); {fix}")
    version = int.from_bytes(head[4:8], "little")
    if version not in GGUF_VERSIONS:
        raise ModelLoadError(f"{damaged} (version {version}, expected one of {GGUF_VERSIONS}); {fix}")
    if version >= 2:  # version 1 used 32-bit counts; versions 2 and 3 use 64-bit ones
        tensors, keys = int.from_bytes(head[8:16], "little"), int.from_bytes(head[16:24], "little")
        if tensors > _MAX_GGUF_COUNT or keys > _MAX_GGUF_COUNT:
            raise ModelLoadError(f"{damaged} ({tensors} tensors and {keys} metadata keys announced); {fix}")


def read_json_object(path: Path, *, what: str, fix: str) -> dict[str, Any]:
    """The JSON object in `path`, or a ModelLoadError saying where it fails to parse and `fix`."""
    try:
        value = json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise ModelLoadError(f"{what} {path} is not UTF-8 text (byte {exc.start}); {fix}") from exc
    except json.JSONDecodeError as exc:
        raise ModelLoadError(
            f"{what} {path} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); {fix}"
        ) from exc
    if not isinstance(value, dict):
        raise ModelLoadError(f"{what} {path} must hold a JSON object, not a {type(value).__name__}; {fix}")
    return value
