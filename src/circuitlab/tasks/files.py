"""User tasks from JSONL or CSV files (UTF-8, with or without a byte-order mark).

Schema (one example per line / row):
  clean    (str)  the clean prompt
  corrupt  (str)  the corrupt prompt (same token length when positions must align)
  answer   (str or list of str)  the correct next token(s), e.g. " Mary" (not needed by the metric output:K,
           nor by circuit discovery scored with kl or l2)
  wrong    (str or list of str, optional)  the incorrect next token(s), e.g. " John" (needed by logit_diff)
Optional structural fields (see `Example`): clean_ids, corrupt_ids, answer_ids, wrong_ids, targets (lists
of token ids, used as given: no BOS is added), answer_pos (int), subject (str), extra (object of ints or
lists of ints). A row that gives `clean_ids` may omit `clean`, likewise `corrupt_ids` / `corrupt` and
`answer_ids` / `answer`; with token ids only, a model needs no tokenizer. Any other field is kept in
`Example.meta`.
In CSV, list fields are written with `|` between items (" Paris| London", "1|4005|17"), and `extra` as a
JSON object.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from circuitlab.errors import TaskError
from circuitlab.tasks.metrics import get_metric, needs_answers
from circuitlab.tasks.task import STRUCTURAL_FIELDS, Example, Task

REQUIRED = ("clean", "corrupt", "answer")
# A text field that token ids can stand in for.
IDS_FOR = {"clean": "clean_ids", "corrupt": "corrupt_ids", "answer": "answer_ids"}
_ID_LISTS = ("clean_ids", "corrupt_ids", "answer_ids", "wrong_ids", "targets")
SCHEMA_HINT = (f"each example needs {list(REQUIRED)} (or their token ids {list(IDS_FOR.values())}), "
               "plus optional 'wrong'; with the metric output:K, 'answer' is not needed (nor by "
               "`discover --metric kl|l2`)")


def load_task_file(path: str | Path, *, metric: str | None = None, require_answers: bool = True) -> Task:
    """A `Task` from a .jsonl or .csv file; every problem is a TaskError naming the line and the fix.

    `metric` overrides the default (logit_diff when every row has a wrong answer, else logprob); with
    `output:K` the rows need no answer. require_answers=False: rows may omit answers whatever the metric
    (for scores that need none, such as discovery's kl and l2); the Task records it (`Task.require_answers`).
    """
    path = Path(path)
    if metric is not None:
        get_metric(metric)
    answers = require_answers and (metric is None or needs_answers(metric))
    required = REQUIRED if answers else ("clean", "corrupt")
    if not path.is_file():
        raise TaskError(f"task file {path} does not exist")
    if path.suffix not in (".jsonl", ".csv"):
        raise TaskError(f"task file {path} must end in .jsonl or .csv")
    text = _read_text(path)
    rows = _jsonl_rows(path, text) if path.suffix == ".jsonl" else _csv_rows(path, text)
    examples = []
    for where, row in rows:
        try:
            examples.append(_example(row, required))
        except TaskError as exc:
            raise TaskError(f"{where}: {exc}") from None
    if not examples:
        raise TaskError(f"task file {path} holds no examples; {SCHEMA_HINT}")
    default_metric = "logit_diff" if all(e.wrong or e.wrong_ids for e in examples) else "logprob"
    return Task(name=path.stem, examples=examples, metric=metric or default_metric, params={"file": str(path)},
                require_answers=require_answers)


def _read_text(path: Path) -> str:
    # utf-8-sig drops a byte-order mark (Excel and Notepad write one), which would otherwise become part
    # of the first JSON line or the first CSV column name.
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise TaskError(
            f"task file {path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
            "save it as UTF-8"
        ) from None


def _jsonl_rows(path: Path, text: str) -> list[tuple[str, dict[str, Any]]]:
    rows = []
    # split on "\n" only: str.splitlines would also split on U+2028, which JSON strings may hold raw
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TaskError(f"{path}:{n} is not valid JSON: {exc.msg} (column {exc.colno})") from None
        if not isinstance(row, dict):
            raise TaskError(
                f"{path}:{n} is a JSON {_json_type(row)}, but each line must be one JSON object such as "
                '{"clean": "...", "corrupt": "...", "answer": " Mary", "wrong": " John"}'
            )
        rows.append((f"{path}:{n}", row))
    return rows


def _csv_rows(path: Path, text: str) -> list[tuple[str, dict[str, Any]]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows = []
    try:
        for raw in reader:
            where = f"{path}:{reader.line_num}"
            if None in raw:
                raise TaskError(f"{where} has more cells than the header has columns; quote cells holding commas")
            rows.append((where, _from_csv(where, raw)))
    except csv.Error as exc:
        raise TaskError(f"{path}:{reader.line_num} is not valid CSV: {exc}") from None
    return rows


def _from_csv(where: str, raw: dict[str, str | None]) -> dict[str, Any]:
    """CSV cells are strings: empty cells are absent, list and number fields are parsed."""
    row: dict[str, Any] = {}
    for key, cell in raw.items():
        if cell is None or cell == "":
            continue
        if key in ("answer", "wrong"):
            row[key] = cell.split("|")
        elif key in _ID_LISTS:
            row[key] = [_int(where, key, item) for item in cell.split("|")]
        elif key == "answer_pos":
            row[key] = _int(where, key, cell)
        elif key == "extra":
            try:
                row[key] = json.loads(cell)
            except json.JSONDecodeError:
                raise TaskError(f"{where}: 'extra' must be a JSON object such as {{\"yy\": 45}}") from None
        else:
            row[key] = cell
    return row


def _int(where: str, key: str, text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise TaskError(f"{where}: {key!r} must hold integers separated by '|', got {text!r}") from None


def _example(row: dict[str, Any], required: tuple[str, ...]) -> Example:
    missing = [k for k in required if row.get(k) in (None, "", []) and row.get(IDS_FOR[k]) is None]
    if missing:
        raise TaskError(f"lacks field(s) {missing}; {SCHEMA_HINT}")
    structural = {k: row[k] for k in STRUCTURAL_FIELDS if row.get(k) is not None}
    meta = {k: v for k, v in row.items()
            if k not in (*REQUIRED, "wrong", *STRUCTURAL_FIELDS) and v not in (None, "")}
    # Example checks every type (a number where a string belongs, a list holding a number, ...).
    return Example(
        clean=_text(row.get("clean")), corrupt=_text(row.get("corrupt")), answer=_answers(row.get("answer")),
        wrong=_answers(row.get("wrong")), meta=meta, **structural,
    )


def _text(value: Any) -> Any:
    return "" if value is None else value


def _answers(value: Any) -> Any:
    if value is None or value == "":
        return []
    return value  # a string becomes a one-item list in Example; anything else is checked there


def _json_type(value: object) -> str:
    return {list: "list", int: "number", float: "number", str: "string", bool: "boolean"}.get(
        type(value), "null" if value is None else type(value).__name__)
