"""Prompt shards: how a task is split, what names a shard's result, and where finished shards are kept.

A sharded run (``--backend ray``, or ``--resume``) splits the task's prompts, in task order, into shards of
`shard_size` prompts; each shard's partial result (see `circuitlab.analysis.ShardSpec`) is saved as soon as
it finishes, atomically, under ``<out>.shards/`` beside the run directory (the run directory itself is built
aside and swapped in at the end, so it cannot hold work that must survive a crash). A shard's file is keyed
by a hash of everything its result depends on (analysis, model spec, options, the shard's prompts and the
task's metric, and for a later pass over the same shards its function and a digest of its payload), so
`--resume` reuses exactly the shards whose inputs are unchanged. After the run directory
is written the shard directory is removed. See docs/METHODS.md, "Distributed runs".
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

import torch

from circuitlab.atomic import write_atomically
from circuitlab.tasks.task import Task

SHARD_FORMAT = "circuitlab.shard/1"  # part of every key: a new layout never reads an old file


def split_task(task: Task, shard_size: int) -> list[Task]:
    """The task's prompts in task order, `shard_size` at a time (the last shard may be smaller)."""
    return [replace(task, examples=task.examples[lo:lo + shard_size])
            for lo in range(0, len(task.examples), shard_size)]


def shard_key(analysis: str, spec: str, params: dict[str, Any], shard: Task,
              stage: tuple[str, str] | None = None) -> str:
    """A hash of what a shard's result depends on; 16 hex digits name its file. `stage`: None for the
    analysis's own partial (the first pass), else (the pass function's "module:name", `payload_digest`)."""
    data: dict[str, Any] = {"format": SHARD_FORMAT, "analysis": analysis, "spec": spec, "params": params,
                            "task": {"name": shard.name, "metric": shard.metric, "params": shard.params},
                            "examples": [asdict(ex) for ex in shard.examples]}
    if stage is not None:
        data["stage"] = list(stage)
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def payload_digest(payload: Any) -> str:
    """A hash of a pass's payload from its values: a tensor by dtype, shape and raw bytes (a pickle of it
    would also hash storage details that do not change the result); containers, dataclasses and plain
    scalars by their contents. Any other type is refused rather than hashed by an unstable repr."""
    digest = hashlib.sha256()
    _feed(digest, payload)
    return digest.hexdigest()[:16]


def _feed(digest: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        data = value.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"tensor:{data.dtype}:{tuple(value.shape)}:".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes())  # every dtype, bool and bfloat16 included
    elif value is None or isinstance(value, (bool, int, float, str, bytes)):
        digest.update(f"{type(value).__name__}:{value!r};".encode())
    elif isinstance(value, (list, tuple)):
        digest.update(f"{type(value).__name__}[{len(value)}]:".encode())
        for item in value:
            _feed(digest, item)
    elif isinstance(value, dict):
        digest.update(f"dict[{len(value)}]:".encode())
        for key in sorted(value, key=repr):
            _feed(digest, key)
            _feed(digest, value[key])
    elif is_dataclass(value) and not isinstance(value, type):
        digest.update(f"{type(value).__qualname__}:".encode())
        _feed(digest, {f.name: getattr(value, f.name) for f in fields(value)})
    else:
        raise TypeError(f"a shard pass payload of type {type(value).__name__} has no stable digest: pass tensors, "
                        "numbers, strings, lists, dicts or dataclasses of them")


def prompts_of(shard: Task, limit: int = 3) -> str:
    """The first prompts of a shard, for an error message that names them."""
    shown = [repr(ex.clean) for ex in shard.examples[:limit]]
    more = len(shard.examples) - limit
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


class ShardStore:
    """Finished shards of one run: ``<index>-<key>.pt`` files in `directory` (None: kept in memory only)."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory

    def path(self, index: int, key: str) -> Path | None:
        return None if self.directory is None else self.directory / f"{index:05d}-{key}.pt"

    def load(self, index: int, key: str) -> Any | None:
        """The saved partial of shard `index` with this key, or None (absent, or unreadable: run it again)."""
        path = self.path(index, key)
        if path is None or not path.is_file():
            return None
        try:
            # our own files, written by save() below: partials are result objects, not plain tensors
            return torch.load(path, weights_only=False)
        except Exception:  # a truncated file cannot exist (atomic writes) but a foreign one might: redo it
            return None

    def save(self, index: int, key: str, partial: Any) -> None:
        path = self.path(index, key)
        if path is not None:
            write_atomically(path, lambda tmp: torch.save(partial, tmp))

    def clear(self) -> None:
        """Remove the directory (after the run directory was written, or before a fresh run)."""
        if self.directory is not None and self.directory.exists():
            shutil.rmtree(self.directory)


def shard_directory(out: str | Path) -> Path:
    """Where the shards of a run into `out` are kept: ``<out>.shards`` beside it."""
    out = Path(out)
    return out.parent / f"{out.name}.shards"
