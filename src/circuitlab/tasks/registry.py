"""Built-in task generators by name, and `make_task`, which also accepts a JSONL/CSV path."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from circuitlab.errors import TaskError
from circuitlab.models.model import Model
from circuitlab.tasks.files import load_task_file
from circuitlab.tasks.task import Task

# A generator: (model, n, seed, **options) -> Task. Model-aware so answers are single tokens for it.
Generator = Callable[..., Task]
GENERATORS: dict[str, tuple[Generator, str]] = {}


def register_task(name: str, description: str) -> Callable[[Generator], Generator]:
    def wrap(fn: Generator) -> Generator:
        GENERATORS[name] = (fn, description)
        return fn

    return wrap


def _load_builtins() -> None:
    # Importing the generator modules registers them.
    from circuitlab.tasks import facts, greater_than, induction, ioi, qa  # noqa: F401


def builtin_tasks() -> dict[str, str]:
    _load_builtins()
    return {name: desc for name, (_, desc) in sorted(GENERATORS.items())}


def make_task(
    name_or_path: str, model: Model, *, n: int | None = None, seed: int = 0, metric: str | None = None, **options: Any
) -> Task:
    """A built-in task by name (seeded, deterministic) or a user task file (.jsonl / .csv)."""
    _load_builtins()
    if name_or_path in GENERATORS:
        fn, _ = GENERATORS[name_or_path]
        kwargs: dict[str, Any] = dict(options)
        if n is not None:
            kwargs["n"] = n
        task = fn(model, seed=seed, **kwargs)
    elif Path(name_or_path).suffix in (".jsonl", ".csv"):
        task = load_task_file(name_or_path, metric=metric).subset(n)
    else:
        raise TaskError(
            f"unknown task {name_or_path!r}: use a built-in ({', '.join(sorted(GENERATORS))}) "
            "or a path to a .jsonl/.csv file"
        )
    return task.with_metric(metric) if metric else task
