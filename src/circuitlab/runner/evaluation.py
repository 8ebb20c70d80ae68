"""The `eval` analysis: a task's clean vs corrupt metric and top-1 accuracy, one record per example.

It lives in the runner layer (not in `tasks/`) because `tasks` sits below the `Analysis` registry entry type.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from circuitlab.analysis import Analysis, NoParams
from circuitlab.models.model import Model
from circuitlab.tasks.evaluate import TaskEvaluation, evaluate_task
from circuitlab.tasks.task import Task

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass
class EvaluationRun:
    """`evaluate_task` on a task, as an analysis result: one record per example."""

    task: Task
    evaluation: TaskEvaluation

    def records(self) -> list[dict[str, Any]]:
        e = self.evaluation
        return [
            {"example": i, "clean": ex.clean, "corrupt": ex.corrupt, "answer": "|".join(ex.answer),
             "wrong": "|".join(ex.wrong), "clean_metric": float(e.clean[i]), "corrupt_metric": float(e.corrupt[i]),
             "top1_correct": bool(e.top1_correct[i])}
            for i, ex in enumerate(self.task.examples)
        ]

    def summary(self) -> dict[str, Any]:
        return self.evaluation.summary()

    def figures(self) -> dict[str, Figure]:
        return {}


def _evaluate(model: Model, task: Task | None, params: NoParams) -> EvaluationRun:
    assert task is not None  # the entry requires a task
    return EvaluationRun(task, evaluate_task(model, task.prepare(model)))


EVAL = Analysis("eval", "clean vs corrupt metric and top-1 accuracy of a task", NoParams, _evaluate)
