"""A self-contained HTML page for one result directory: summary, parameters, plots, records.

Every string that came from a user or a model (prompts, tokens, parameters) goes through `html.escape`;
plots are embedded as base64 so the page can be mailed or archived on its own.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from circuitlab.atomic import write_text_atomically
from circuitlab.results import Result

MAX_ROWS = 200
STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 6px;text-align:left}
th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee;margin:.5em 0}code{background:#f6f6f6;padding:1px 4px}
.muted{color:#777;font-size:12px}
"""


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return html.escape(json.dumps(value))
    return html.escape(str(value))


def _kv_table(data: dict) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{_cell(v)}</td></tr>" for k, v in data.items())
    return f"<table>{rows}</table>"


def _records_table(records: list[dict]) -> str:
    if not records:
        return "<p class=muted>no records</p>"
    cols = list(dict.fromkeys(k for r in records[:MAX_ROWS] for k in r))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{_cell(r.get(c, ''))}</td>" for c in cols) + "</tr>" for r in records[:MAX_ROWS]
    )
    more = f"<p class=muted>{len(records) - MAX_ROWS} more rows in results.csv</p>" if len(records) > MAX_ROWS else ""
    return f"<table><tr>{head}</tr>{body}</table>{more}"


def _images(out_dir: Path, result: Result) -> str:
    # Only this run's own figures: a directory may hold files of other runs, never shown here.
    names = [a for a in result.artifacts if a.lower().endswith(".png")]
    parts = []
    for name in names:
        path = out_dir / name
        if path.is_file():
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            parts.append(f"<figure><img alt='{html.escape(name)}' src='data:image/png;base64,{data}'>"
                         f"<figcaption class=muted>{html.escape(name)}</figcaption></figure>")
    return "".join(parts)


def render_report(result: Result, out_dir: str | Path) -> str:
    out = Path(out_dir)
    model = result.model.get("spec", "?")
    task = (result.task or {}).get("name", "-")
    title = f"circuitlab {result.command}: {model} / {task}"
    sections = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p class=muted>computation {result.timing_s:.2f} s, model load {result.load_s:.2f} s, seed {result.seed}</p>",
        "<h2>Summary</h2>" + _kv_table(result.summary) if result.summary else "",
        "<h2>Plots</h2>" + _images(out, result),
        "<h2>Parameters</h2>" + _kv_table(result.params),
        "<h2>Task</h2>" + _kv_table(result.task) if result.task else "",
        "<h2>Records</h2>" + _records_table(result.records),
        "<h2>Model and versions</h2>" + _kv_table(result.model) + _kv_table(result.versions),
    ]
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>{''.join(sections)}</body></html>")


def write_report(result: Result, out_dir: str | Path) -> Path:
    """Write report.html into `out_dir` (atomically) and return its path."""
    return write_text_atomically(Path(out_dir) / "report.html", render_report(result, out_dir))


def write_index(out_dir: str | Path, steps: list[tuple[str, str, Result]]) -> Path:
    """index.html linking the report.html of each step folder (name, description, result)."""
    rows = "".join(
        f"<tr><td><a href='{html.escape(name)}/report.html'>{html.escape(name)}</a></td><td>{html.escape(desc)}</td>"
        f"<td>{r.timing_s:.1f} s</td></tr>"
        for name, desc, r in steps
    )
    model = steps[0][2].model.get("spec", "?") if steps else "?"
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>circuitlab demo</title><style>{STYLE}</style>"
            f"</head><body><h1>circuitlab: {html.escape(str(model))}</h1><table><tr><th>step</th><th>what</th>"
            f"<th>time</th></tr>{rows}</table></body></html>")
    return write_text_atomically(Path(out_dir) / "index.html", page)
