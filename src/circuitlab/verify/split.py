"""Task splits for generalisation: evaluate a circuit on prompts it was not found on.

A split names a part of the task's examples; the rest is its complement (the other split):

- ``train`` / ``test``: the first / second half of the examples, by index (the first half has the extra
  example when n is odd). Built-in generators and task files are *prefix-stable* (the task with ``--n N``
  is the first N examples of the task with ``--n 2N``, same seed), so a circuit found with
  ``discover --n N`` was found on the ``train`` half of ``verify --n 2N`` and ``--split test`` evaluates
  it on N prompts it never saw.
- ``template:I[,J...]``: the examples written from template I (J, ...), for tasks whose examples record
  their template (``ioi``, ``qa``): held-out templates.

See docs/METHODS.md, "Circuit verification".
"""

from __future__ import annotations

from dataclasses import replace

from circuitlab.errors import VerifyError
from circuitlab.tasks.task import Task

SPLITS = ("train", "test")
TEMPLATE = "template:"


def check_split(split: str | None) -> str | None:
    """Validate a split name without a task: train, test or template:I[,J...]."""
    if split is None or split in SPLITS:
        return split
    if split.startswith(TEMPLATE):
        _templates(split)
        return split
    raise VerifyError(f"unknown split {split!r}; choose train, test or template:I[,J...] (e.g. template:0,1)")


def _templates(split: str) -> set[int]:
    parts = [p.strip() for p in split[len(TEMPLATE):].split(",") if p.strip()]
    try:
        chosen = {int(p) for p in parts}
    except ValueError:
        chosen = set()
    if not chosen or any(t < 0 for t in chosen):
        raise VerifyError(f"split {split!r} needs template indices >= 0, e.g. template:0 or template:0,2")
    return chosen


def split_indices(task: Task, split: str) -> tuple[list[int], list[int]]:
    """(indices in the split, indices in its complement); a VerifyError when the split is empty."""
    check_split(split)
    n = len(task)
    if split in SPLITS:
        half = (n + 1) // 2
        first, second = list(range(half)), list(range(half, n))
        inside, outside = (first, second) if split == "train" else (second, first)
    else:
        chosen = _templates(split)
        recorded = [ex.meta.get("template") for ex in task.examples]
        if all(t is None for t in recorded):
            raise VerifyError(f"split {split!r}: the examples of task {task.name!r} record no template; use "
                              "--split train or test")
        inside = [i for i, t in enumerate(recorded) if t in chosen]
        outside = [i for i, t in enumerate(recorded) if t not in chosen]
        if not inside:
            present = sorted({t for t in recorded if t is not None})
            raise VerifyError(f"split {split!r} is empty: task {task.name!r} has templates {present}")
    if not inside:
        raise VerifyError(f"split {split!r} is empty: task {task.name!r} has {n} example(s); the test half needs "
                          "at least 2 (raise --n)")
    return inside, outside


def split_task(task: Task, split: str | None) -> tuple[Task, Task | None]:
    """(the task restricted to `split`, its complement or None when empty); the whole task for None."""
    if split is None:
        return task, None
    inside, outside = split_indices(task, split)

    def part(indices: list[int], name: str) -> Task:
        return replace(task, examples=[task.examples[i] for i in indices],
                       params={**task.params, "split": name})

    other_name = {"train": "test", "test": "train"}.get(split, "other templates")
    other = part(outside, other_name) if outside else None
    return part(inside, split), other
