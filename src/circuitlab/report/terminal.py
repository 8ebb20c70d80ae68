"""Terminal output of a run, readable at 80 columns.

Summaries print as a vertical key/value table (one row per headline number, nested values flattened to
``a.b``); records print as the rows of largest |value|, with the columns that fit, numbers at 4
significant digits. Everything a table leaves out is in results.csv.
"""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.table import Table

from circuitlab.results import Result

MAX_CELL = 28  # characters of one text cell before it is shortened with an ellipsis
MAX_COLUMNS = 6


def format_value(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        text = ", ".join(format_value(v) for v in value)
        return text if len(text) <= 60 else text[:57] + "..."
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


def _flatten(data: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows += _flatten(value, f"{name}.")
        else:
            rows.append((name, value))
    return rows


def summary_table(summary: dict[str, Any], title: str) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("key", style="bold", no_wrap=True)
    table.add_column("value", overflow="fold")
    for key, value in _flatten(summary):
        table.add_row(key, format_value(value))
    return table


def _short(text: str) -> str:
    text = text.replace("\n", "\\n")
    return text if len(text) <= MAX_CELL else text[: MAX_CELL - 1] + "…"


def records_table(records: list[dict[str, Any]], title: str, *, limit: int = 10,
                  columns: list[str] | None = None) -> Table | None:
    """The `limit` records of largest |value| (all when they have no numeric `value`)."""
    if not records:
        return None
    rows = records
    if all(isinstance(r.get("value"), (int, float)) for r in records):
        rows = sorted(records, key=lambda r: -abs(r["value"]) if r["value"] == r["value"] else 0.0)
    if columns is None:
        present = [c for c in dict.fromkeys(k for r in rows[:limit] for k in r)
                   if any(r.get(c) is not None for r in rows[:limit])]
        columns = ([c for c in present if c == "value"] + [c for c in present if c != "value"])[:MAX_COLUMNS]
        columns = sorted(columns, key=lambda c: c == "value")  # value last, as the eye expects
    table = Table(title=title, title_justify="left")
    for c in columns:
        table.add_column(c, overflow="ellipsis", no_wrap=True, justify="right" if c == "value" else "left")
    for r in rows[:limit]:
        table.add_row(*(_short(format_value(r.get(c, ""))) for c in columns))
    return table


def print_result(result: Result, console: Console, *, limit: int = 10) -> None:
    """Summary, then the strongest records, then where the files are."""
    console.print(summary_table(result.summary, f"{result.command}: summary"))
    table = records_table(result.records, f"{result.command}: {min(limit, len(result.records))} of "
                          f"{len(result.records)} records (largest |value| first)", limit=limit)
    if table is not None:
        console.print(table)
