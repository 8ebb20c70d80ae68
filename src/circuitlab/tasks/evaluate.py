"""Clean vs corrupt evaluation of a prepared task: the numbers every other analysis normalises against."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from circuitlab.models.model import Model
from circuitlab.tasks.task import PreparedTask


@dataclass
class TaskEvaluation:
    """Per-prompt metric values on the clean and corrupt prompts (ordered by example index).

    Accuracy counts the prompts that have answers; with none (a task scored by `output:K`) it is NaN, which
    results.json records as null.
    """

    metric: str
    clean: torch.Tensor  # [n_prompts]
    corrupt: torch.Tensor  # [n_prompts]
    top1_correct: torch.Tensor  # [n_prompts] bool: clean top-1 token is in the answer set
    has_answer: torch.Tensor | None = None  # [n_prompts] bool; None: every prompt has one

    @property
    def clean_mean(self) -> float:
        return float(self.clean.mean())

    @property
    def corrupt_mean(self) -> float:
        return float(self.corrupt.mean())

    @property
    def accuracy(self) -> float:
        scored = self.top1_correct if self.has_answer is None else self.top1_correct[self.has_answer]
        return float(scored.float().mean()) if scored.numel() else float("nan")

    def summary(self) -> dict:
        return {
            "metric": self.metric, "n_prompts": int(self.clean.numel()), "accuracy": self.accuracy,
            "clean_mean": self.clean_mean, "corrupt_mean": self.corrupt_mean,
            "clean_std": float(self.clean.std()) if self.clean.numel() > 1 else 0.0,
            "corrupt_std": float(self.corrupt.std()) if self.corrupt.numel() > 1 else 0.0,
        }


@torch.no_grad()
def evaluate_task(model: Model, prepared: PreparedTask, *, batch_size: int = 32) -> TaskEvaluation:
    n = prepared.n_prompts
    clean, corrupt = torch.empty(n), torch.empty(n)
    top1, has_answer = torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
    for batch in prepared:
        for start in range(0, batch.size, batch_size):
            sub = batch.select(slice(start, start + batch_size))
            idx = torch.tensor(sub.indices)
            clean_logits = model.logits(sub.clean)
            clean[idx] = prepared.metric(clean_logits, sub).float()
            corrupt[idx] = prepared.metric(model.logits(sub.corrupt), sub).float()
            pred = clean_logits[torch.arange(sub.size), sub.answer_pos].argmax(-1)
            top1[idx] = (sub.answers == pred[:, None]).any(1)
            has_answer[idx] = (sub.answers >= 0).any(1)
    return TaskEvaluation(prepared.metric_name, clean, corrupt, top1, has_answer)

