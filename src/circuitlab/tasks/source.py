"""`TaskSource`: where a run's task comes from, checked before any model loads.

A built-in generator needs the model (its answers must be single tokens for that tokenizer), so a run
first *describes* its task (name or file, n, seed, metric, generator options), validates that description
(known name, readable file, known metric, n >= 1) and only builds the `Task` once the model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from circuitlab.errors import TaskError
from circuitlab.models.model import Model
from circuitlab.tasks.metrics import get_metric
from circuitlab.tasks.options import check_n
from circuitlab.tasks.registry import builtin_tasks, make_task
from circuitlab.tasks.task import Task

TASK_FILE_SUFFIXES = (".jsonl", ".csv")


@dataclass(frozen=True)
class TaskSource:
    """A task by built-in name or file path, with the options `make_task` takes; or a ready `Task`."""

    name: str | None = None
    n: int | None = None
    seed: int = 0
    metric: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    task: Task | None = None

    def validate(self) -> TaskSource:
        """Every check that needs no model: raises `TaskError` / `MetricError` naming the fix. Returns the
        source to build from: a task file comes back parsed (`task` set), so it is read once per run."""
        if self.n is not None:
            check_n(self.n)
        if self.metric is not None:
            get_metric(self.metric)
        if self.task is not None:
            return self
        if self.name is None:
            raise TaskError("no task given; pass a built-in task name or a .jsonl/.csv file")
        builtins = builtin_tasks()
        if self.name in builtins:
            return self
        path = Path(self.name)
        if path.suffix not in TASK_FILE_SUFFIXES:
            raise TaskError(f"unknown task {self.name!r}: use a built-in ({', '.join(builtins)}) or a path to a "
                            ".jsonl/.csv file")
        from circuitlab.tasks.files import load_task_file

        # every row parsed and checked now, before the model loads; build() then uses this Task
        return replace(self, task=load_task_file(path, metric=self.metric))

    def build(self, model: Model) -> Task:
        if self.task is not None:
            task = self.task.subset(self.n)
            return task.with_metric(self.metric) if self.metric else task
        assert self.name is not None  # validate() said so
        return make_task(self.name, model, n=self.n, seed=self.seed, metric=self.metric, **self.options)
