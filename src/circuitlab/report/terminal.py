"""Terminal output of a run, readable at 80 columns.

Summaries print as a vertical key/value table (one row per headline number, nested values flattened to
``a.b``, long values wrapped, never cut). Records print as the rows of largest |value| with the columns
that fit the width: numbers are always printed whole (4 significant digits), and only long text (prompts,
tokens) is shortened with an ellipsis; columns that do not fit are left out rather than squeezed.
Everything a table leaves out is in results.csv.
"""

from __future__ import annotations

import json
import math
from typing import Any

from rich.console import Console
from rich.table import Table

from circuitlab.results import Result

WIDTH = 80  # the terminal width every table is laid out for unless the console says otherwise
MAX_CELL = 28  # characters of one text cell before it is shortened with an ellipsis
MIN_TEXT = 10  # the narrowest a shortened text column gets; narrower and it says nothing
MAX_COLUMNS = 6
MAX_KEY = 48  # summary keys longer than this wrap (fold), never cut


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


def flatten_summary(data: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested dicts as ``a.b`` rows; unset nested entries (the head of a layer x pos cell) are dropped."""
    rows: list[tuple[str, Any]] = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            rows += flatten_summary(value, f"{name}.")
        elif not (prefix and value is None):
            rows.append((name, value))
    return rows


def summary_table(summary: dict[str, Any], title: str) -> Table:
    rows = flatten_summary(summary)
    table = Table(title=title, show_header=False, title_justify="left", min_width=min(len(title), WIDTH))
    # A fixed key width: rich would otherwise wrap the keys as readily as the long values.
    key_width = min(max((len(k) for k, _ in rows), default=1), MAX_KEY)
    table.add_column("key", style="bold", width=key_width, overflow="fold")
    table.add_column("value", overflow="fold")
    for key, value in rows:
        table.add_row(key, format_value(value))
    return table


# --- records --------------------------------------------------------------------------------------------
def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _cell(value: Any) -> str:
    return "" if value is None else format_value(value).replace("\n", "\\n")


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def strongest_first(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records by decreasing |value| (NaN last) when every record has a numeric `value`; else as given.

    Sweeps write their records in layer order, where the first rows are mostly near zero; the rows a
    reader wants are the strongest effects. The sort is stable: equal |value| keeps the sweep order.
    """
    if not records or not all(is_number(r.get("value")) for r in records):
        return records
    return sorted(records, key=lambda r: (math.isnan(r["value"]), 0.0 if math.isnan(r["value"]) else -abs(r["value"])))


def _widths(rows: list[dict[str, Any]], column: str) -> tuple[int, int, bool]:
    """(full, minimum, numeric) width of a column: numbers never shrink, text down to MIN_TEXT."""
    values = [r.get(column) for r in rows]
    numeric = all(v is None or is_number(v) or isinstance(v, bool) for v in values)
    cells = max((len(_cell(v)) for v in values), default=0)
    if numeric:
        full = max(cells, len(column))
        return full, full, True
    full = max(min(cells, MAX_CELL), min(len(column), MAX_CELL))
    return full, min(full, max(MIN_TEXT, len(column))), False


def _fit(candidates: list[str], rows: list[dict[str, Any]], width: int, max_columns: int) -> dict[str, int]:
    """Columns (in priority order) that fit in `width` and the width of each; text columns share the rest."""
    sizes = {c: _widths(rows, c) for c in candidates}
    chosen: list[str] = []
    for c in candidates:  # a column that does not fit is skipped; a narrower later one may still fit
        trial = [*chosen, c]
        if len(trial) <= max_columns and 1 + sum(sizes[x][1] + 3 for x in trial) <= width:
            chosen = trial
    spare = width - (1 + sum(sizes[c][1] + 3 for c in chosen))
    widths = {c: sizes[c][1] for c in chosen}
    growing = [c for c in chosen if widths[c] < sizes[c][0]]
    while spare > 0 and growing:  # one character at a time, so text columns share the room evenly
        for c in list(growing):
            if spare == 0:
                break
            widths[c] += 1
            spare -= 1
            if widths[c] == sizes[c][0]:
                growing.remove(c)
    return widths


def records_table(records: list[dict[str, Any]], title: str, *, limit: int = 10,
                  columns: list[str] | None = None, width: int = WIDTH) -> Table | None:
    """The `limit` records of largest |value| (all when they have no numeric `value`), in `width` columns.

    `columns`: the columns wanted, in order (default: those set in the shown rows, up to MAX_COLUMNS);
    `value` is always kept, and the others are kept in order while they fit.
    """
    if not records:
        return None
    rows = strongest_first(records)[:limit]
    auto = columns is None
    if columns is None:
        columns = [c for c in dict.fromkeys(k for r in rows for k in r) if any(r.get(c) is not None for r in rows)]
    priority = [c for c in columns if c == "value"] + [c for c in columns if c != "value"]
    widths = _fit(priority, rows, width, MAX_COLUMNS if auto else len(priority))
    shown = [c for c in columns if c in widths and c != "value"] + [c for c in widths if c == "value"]
    # A table at least as wide as its title, so a narrow table does not wrap the title over two lines.
    table = Table(title=title, title_justify="left", min_width=min(len(title), width))
    for c in shown:
        numeric = _widths(rows, c)[2]
        table.add_column(_short(c, widths[c]), width=widths[c], no_wrap=True, overflow="ellipsis",
                         justify="right" if numeric else "left")
    for r in rows:
        table.add_row(*(_short(_cell(r.get(c)), widths[c]) for c in shown))
    return table


def print_result(result: Result, console: Console, *, limit: int = 10) -> None:
    """Summary, then the strongest records (laid out for the console's width, at most 120 columns)."""
    console.print(summary_table(result.summary, f"{result.command}: summary"))
    records = result.records
    order = " (largest |value| first)" if strongest_first(records) is not records else ""
    table = records_table(records, f"{result.command}: {min(limit, len(records))} of {len(records)} records{order}",
                          limit=limit, width=min(console.width, 120))
    if table is not None:
        console.print(table)
