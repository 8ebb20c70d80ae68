"""User tasks from JSONL or CSV files.

Schema (one example per line / row):
  clean    (str, required)  the clean prompt
  corrupt  (str, required)  the corrupt prompt (same token length when positions must align)
  answer   (str or list, required)  the correct next token(s), e.g. " Mary"
  wrong    (str or list, optional)  the incorrect next token(s), e.g. " John" (needed by logit_diff)
Any other field (e.g. `subject`, which causal tracing reads) is kept in `Example.meta`.
In CSV, list fields are written with `|` between items (" Paris| London").
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from circuitlab.errors import TaskError
from circuitlab.tasks.task import Example, Task

REQUIRED = ("clean", "corrupt", "answer")


def _as_list(value: object) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, list):
        return [str(v) for v in value]
    return str(value).split("|")


def load_task_file(path: str | Path, *, metric: str | None = None) -> Task:
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"task file {path} does not exist")
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise TaskError(f"{path}:{n} is not valid JSON: {exc.msg}") from exc
    elif path.suffix == ".csv":
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
    else:
        raise TaskError(f"task file {path} must end in .jsonl or .csv")
    examples = []
    for n, row in enumerate(rows, 1):
        missing = [k for k in REQUIRED if not row.get(k)]
        if missing:
            raise TaskError(f"{path} example {n} lacks field(s) {missing}; each needs {list(REQUIRED)} (+ optional 'wrong')")
        meta = {k: v for k, v in row.items() if k not in (*REQUIRED, "wrong") and v not in (None, "")}
        examples.append(Example(
            clean=row["clean"], corrupt=row["corrupt"], answer=_as_list(row["answer"]),
            wrong=_as_list(row.get("wrong")), meta=meta,
        ))
    if not examples:
        raise TaskError(f"task file {path} holds no examples")
    default_metric = "logit_diff" if all(e.wrong for e in examples) else "logprob"
    return Task(name=path.stem, examples=examples, metric=metric or default_metric, params={"file": str(path)})
