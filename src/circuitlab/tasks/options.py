"""Validation of the options every built-in generator shares (`n`, template indices)."""

from __future__ import annotations

from circuitlab.errors import TaskError


def check_n(n: int) -> None:
    if n < 1:
        raise TaskError(f"n must be >= 1, got {n}")


def choose_templates(task: str, templates: list[int] | None, n_available: int) -> list[int]:
    """All template indices when `templates` is None, else the given ones, each checked to be in range."""
    chosen = list(range(n_available)) if templates is None else list(templates)
    if not chosen:
        raise TaskError(f"templates is empty; pass at least one {task} template index")
    for t in chosen:
        if not 0 <= t < n_available:
            raise TaskError(f"{task} template index {t} out of range 0..{n_available - 1}")
    return chosen
