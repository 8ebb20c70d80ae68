"""Contrastive tasks (clean/corrupt prompt pairs with answers) and their metrics."""

from circuitlab.tasks.evaluate import TaskEvaluation, evaluate_task
from circuitlab.tasks.metrics import METRICS, get_metric, normalised
from circuitlab.tasks.registry import builtin_tasks, make_task
from circuitlab.tasks.task import Example, PreparedTask, Task, TaskBatch

__all__ = [
    "Example", "Task", "TaskBatch", "PreparedTask", "make_task", "builtin_tasks", "evaluate_task",
    "TaskEvaluation", "METRICS", "get_metric", "normalised",
]
