"""Self-contained HTML pages for run directories: one `report.html` per run, one `index.html` per demo.

A report shows a short header (command, model, task, timings), the headline numbers, the run's own
figures, its parameters and its records (largest |value| first). It embeds exactly the figures listed in
`Result.artifacts`, base64-encoded, so the page can be mailed or archived on its own and never shows a
plot that another run left in the same directory. Every string that came from a user or a model (prompts,
tokens, parameters, file names) goes through `html.escape`. See "Run directories" in docs/METHODS.md.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from circuitlab.atomic import write_text_atomically
from circuitlab.report.figure_data import SUFFIX as HEATMAP_SUFFIX
from circuitlab.report.figure_data import Heatmap
from circuitlab.report.figure_data import from_json as heatmaps_from_json
from circuitlab.report.interactive import ZOOM_SCRIPT, circuit_svg, heatmap_svg
from circuitlab.report.terminal import flatten_summary, is_number, strongest_first
from circuitlab.results import Result

MAX_ROWS = 200  # record rows shown in a report; all of them are in results.csv
INDEX = "index.html"
REPORT = "report.html"
CIRCUIT = "circuit.json"
CIRCUIT_PICTURE = "circuit.png"

# Summary keys worth a place in the demo index, most telling first; a step whose summary has none of
# them shows its first few numbers instead.
HEADLINE_KEYS = (
    "faithfulness", "circuit_edges", "cpr", "accuracy", "clean_mean", "corrupt_mean", "max_abs_cell", "final_top1", "final_top1_prob",
    "target_prob_final", "clean_prob", "corrupt_prob", "mean_clean_prob", "mean_corrupt_prob",
    "max_completeness_gap", "n_edges",
)
MAX_HEADLINE = 4

STYLE = """
:root{--line:#d8dce3;--head:#f2f4f7;--muted:#6b7280}
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;padding:1.2em 1.5em 3em;
max-width:1200px;color:#1f2328;line-height:1.45}
h1{font-size:1.5em;margin:.2em 0 .1em}h2{font-size:1.15em;margin:1.6em 0 .4em;border-bottom:1px solid var(--line);
padding-bottom:.2em}
h3{font-size:1.02em;margin:1.2em 0 .3em}
nav{font-size:14px;margin-bottom:.4em}a{color:#0b5cad}
.meta{color:var(--muted);font-size:14px;margin:.2em 0 1em}.meta b{color:#1f2328;font-weight:600}
.muted{color:var(--muted);font-size:13px}
.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;font-size:13px;margin:.4em 0}
td,th{border:1px solid var(--line);padding:3px 8px;text-align:left;vertical-align:top}
th{background:var(--head);font-weight:600}
table.records th{position:sticky;top:0}
table.records tr:nth-child(even) td{background:#fafbfc}
div.problems{background:#fff4e5;border:1px solid #f0c36d;padding:.5em 1em;margin:1em 0}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.text{max-width:32em;overflow-wrap:anywhere;white-space:pre-wrap}  /* tokens keep their leading space */
table.kv th{white-space:nowrap}
figure{margin:1em 0}
figure img{display:block;max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:var(--muted);font-size:12px;margin-top:.2em}
img.thumb{max-width:280px;max-height:180px;height:auto;border:1px solid #eee}
svg.heatmap{display:block;margin:.3em 0}svg.heatmap rect:hover{stroke:#000;stroke-width:1.5}
svg.circuit{border:1px solid #eee;cursor:grab;max-width:100%}svg.circuit line:hover{stroke-opacity:1}
details summary{cursor:pointer;color:var(--muted);font-size:12px}
@media print{details,nav{display:none}svg.circuit{height:auto}}
code{background:#f3f4f6;padding:1px 4px;border-radius:3px}
"""


# --- cells and tables ----------------------------------------------------------------------------------
def _text(value: object) -> str:
    """A value as plain (unescaped) text: floats at 4 significant digits, containers as JSON."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=str)
    return str(value)


def _td(value: object) -> str:
    cls = "num" if is_number(value) else "text"
    return f"<td class={cls}>{html.escape(_text(value))}</td>"


def _kv_table(data: dict[str, Any]) -> str:
    rows = "".join(f"<tr><th>{html.escape(k)}</th>{_td(v)}</tr>" for k, v in flatten_summary(data))
    return f"<div class=scroll><table class=kv>{rows}</table></div>"


def _records_table(records: list[dict[str, Any]], max_rows: int = MAX_ROWS) -> str:
    if not records:
        return "<p class=muted>no records</p>"
    rows = strongest_first(records)
    shown = rows[:max_rows]
    # Columns empty in every shown row (e.g. `head` of a layer x pos sweep) are left out; results.csv has them.
    cols = [c for c in dict.fromkeys(k for r in shown for k in r) if any(r.get(c) is not None for r in shown)]
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = "".join("<tr>" + "".join(_td(r.get(c)) for c in cols) + "</tr>" for r in shown)
    order = "largest |value| first" if rows is not records else "in the order the analysis wrote them"
    note = f"{len(records)} records, {order}"
    if len(records) > max_rows:
        note = (f"the first {max_rows} of {len(records)} records, {order}; "
                f"{len(records) - max_rows} more rows in results.csv")
    return (f"<p class=muted>{html.escape(note)}</p>"
            f"<div class=scroll><table class=records><tr>{head}</tr>{body}</table></div>")


def _figures(out_dir: Path, result: Result, prefix: str = "") -> str:
    """This run's own figures (a directory may hold files of other runs, never shown here): heatmaps whose
    numbers were saved beside them as interactive SVG (the picture one click away), the rest as pictures,
    and a circuit.json as a zoomable graph."""
    parts = []
    circuit = _circuit(out_dir, result)
    for k, name in enumerate(a for a in result.artifacts if a.lower().endswith(".png")):
        path = out_dir / name
        if not path.is_file():
            continue
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        image = f"<img alt='{html.escape(name)}' src='data:image/png;base64,{data}'>"
        maps = _heatmaps(out_dir, result, name)
        if maps:
            svgs = "".join(heatmap_svg(m, f"{prefix}{k}-{i}") for i, m in enumerate(maps))
            parts.append(f"<figure><div class=scroll>{svgs}</div><figcaption>{html.escape(name)} (hover a cell for "
                         f"its value)</figcaption><details><summary>picture</summary>{image}</details></figure>")
        elif circuit and name == CIRCUIT_PICTURE:
            svg, caption = circuit
            parts.append(f"<figure>{svg}<figcaption>{html.escape(caption)}</figcaption>"
                         f"<details><summary>picture</summary>{image}</details></figure>")
            circuit = None
        else:
            parts.append(f"<figure>{image}<figcaption>{html.escape(name)}</figcaption></figure>")
    if circuit:
        svg, caption = circuit
        parts.append(f"<figure>{svg}<figcaption>{html.escape(caption)}</figcaption></figure>")
    return "".join(parts)


def _circuit(out_dir: Path, result: Result) -> tuple[str, str] | None:
    """The run's circuit.json as a zoomable graph and its caption (None without one)."""
    if CIRCUIT not in result.artifacts or not (out_dir / CIRCUIT).is_file():
        return None
    try:
        svg, caption = circuit_svg(json.loads((out_dir / CIRCUIT).read_text(encoding="utf-8")))
    except (ValueError, AttributeError, TypeError):
        return None  # not a circuit file we can draw: the picture still shows
    return svg, f"{CIRCUIT}: {caption}"


def _heatmaps(out_dir: Path, result: Result, picture: str) -> list[Heatmap]:
    name = Path(picture).stem + HEATMAP_SUFFIX
    path = out_dir / name
    if name not in result.artifacts or not path.is_file():
        return []
    try:
        return heatmaps_from_json(path.read_text(encoding="utf-8"))
    except (ValueError, TypeError, KeyError):
        return []  # a damaged sidecar: the picture still shows


# --- headline numbers -----------------------------------------------------------------------------------
def _cell_text(cell: dict[str, Any]) -> str:
    """`max_abs_cell`-style dicts: the value, then where it is (layer / pos / head that are set)."""
    where = " ".join(f"{k} {cell[k]}" for k in ("layer", "pos", "head") if cell.get(k) is not None)
    return f"{_text(cell.get('value'))} at {where}" if where else _text(cell.get("value"))


def headline(summary: dict[str, Any], limit: int = MAX_HEADLINE) -> list[tuple[str, str]]:
    """A few (name, text) pairs that say what a run found, for the demo index."""
    keys = [k for k in HEADLINE_KEYS if k in summary]
    keys += [k for k in summary if k.endswith("_peak") and k not in keys]
    if not keys:
        keys = [k for k, v in summary.items() if is_number(v) and not k.startswith("n_")]
    out = []
    for key in keys[:limit]:
        value = summary[key]
        out.append((key, _cell_text(value) if isinstance(value, dict) and "value" in value else _text(value)))
    return out


# --- pages ----------------------------------------------------------------------------------------------
def page(title: str, body: str, *, head: str = "") -> str:
    """A whole self-contained page; the zoom script comes along when the body holds a circuit graph."""
    return (f"<!doctype html><html lang=en><head><meta charset='utf-8'>{head}"
            f"<meta name=viewport content='width=device-width,initial-scale=1'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>{body}"
            + (f"<script>{ZOOM_SCRIPT}</script>" if "class=circuit" in body else "") + "</body></html>")


def now_text() -> str:
    return datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")


def _header_line(result: Result) -> str:
    task = result.task or {}
    parts = [("model", result.model.get("spec", "?"))]
    if task:
        n = task.get("n_prompts", task.get("n"))
        parts.append(("task", f"{task.get('name', '-')}" + (f" ({n} prompts)" if n is not None else "")))
    parts += [("computation", f"{result.timing_s:.2f} s"), ("model load", f"{result.load_s:.2f} s")]
    if result.seed is not None:
        parts.append(("seed", str(result.seed)))
    parts.append(("written", now_text()))
    return " · ".join(f"{html.escape(k)} <b>{html.escape(str(v))}</b>" for k, v in parts)


def render_report(result: Result, out_dir: str | Path, *, index: str | None = None) -> str:
    """The report page of `result`, whose files are in `out_dir`.

    `index`: a relative link to the page listing this run's siblings (the demo's index.html); by default
    ``../index.html`` when the parent of `out_dir` holds one.
    """
    out = Path(out_dir)
    if index is None and (out.parent / INDEX).is_file():
        index = f"../{INDEX}"
    model = result.model.get("spec", "?")
    task = (result.task or {}).get("name")
    title = f"circuitlab {result.command}: {model}" + (f" / {task}" if task else "")
    nav = f"<nav><a href='{html.escape(index)}'>&larr; back to index</a></nav>" if index else ""
    return page(title, nav + f"<h1>circuitlab {html.escape(result.command)}</h1>" + run_body(result, out))


def run_body(result: Result, out_dir: Path, *, prefix: str = "", level: int = 2, max_rows: int = MAX_ROWS) -> str:
    """One run's header line and sections (summary, plots, records, parameters, task, versions) with
    headings at `level`; `prefix` keeps element ids unique when several runs share a page."""
    h = f"h{level}"
    figures = _figures(out_dir, result, prefix)
    sections = [
        f"<p class=meta>{_header_line(result)}</p>",
        f"<{h}>Summary</{h}>" + _kv_table(result.summary) if result.summary else "",
        f"<{h}>Plots</{h}>" + figures if figures else "",
        f"<{h}>Records</{h}>" + _records_table(result.records, max_rows),
        f"<{h}>Parameters</{h}>" + _kv_table(result.params) if result.params else "",
        f"<{h}>Task</{h}>" + _kv_table(result.task) if result.task else "",
        f"<{h}>Model and versions</{h}>" + _kv_table(result.model) + _kv_table(result.versions),
    ]
    return "".join(sections)


def write_report(result: Result, out_dir: str | Path, *, index: str | None = None) -> Path:
    """Write report.html into `out_dir` (atomically, with the user's umask) and return its path."""
    return write_text_atomically(Path(out_dir) / REPORT, render_report(result, out_dir, index=index))


def _href(*parts: str) -> str:
    return html.escape("/".join(quote(p) for p in parts))


def _index_row(out: Path, folder: str, description: str, result: Result) -> str:
    link = _href(folder, REPORT)
    numbers = "<br>".join(f"{html.escape(k)} <b>{html.escape(v)}</b>" for k, v in headline(result.summary))
    pngs = [a for a in result.artifacts if a.lower().endswith(".png") and (out / folder / a).is_file()]
    thumb = (f"<a href='{link}'><img class=thumb alt='{html.escape(pngs[0])}' src='{_href(folder, pngs[0])}'></a>"
             if pngs else "")
    return (f"<tr><td><a href='{link}'>{html.escape(folder)}</a><br>"
            f"<span class=muted>circuitlab {html.escape(result.command)}</span></td>"
            f"<td class=text>{html.escape(description)}</td><td class=text>{numbers}</td>"
            f"<td class=num>{result.timing_s:.1f} s</td><td>{thumb}</td></tr>")


def render_index(out_dir: str | Path, steps: Sequence[tuple[str, str, Result]], *, title: str = "circuitlab demo") -> str:
    """The index page of a multi-step run: one row per step with its headline numbers and a link."""
    out = Path(out_dir)
    models = list(dict.fromkeys(str(r.model.get("spec", "?")) for _, _, r in steps)) or ["?"]
    tasks = list(dict.fromkeys(str((r.task or {}).get("name")) for _, _, r in steps if r.task))
    load = max((r.load_s for _, _, r in steps), default=0.0)
    total = sum(r.timing_s for _, _, r in steps)
    meta = [("model", ", ".join(models))] + ([("task", ", ".join(tasks))] if tasks else [])
    meta += [("steps", str(len(steps))), ("computation", f"{total:.1f} s"), ("model load", f"{load:.1f} s"),
             ("written", now_text())]
    meta_html = " · ".join(f"{html.escape(k)} <b>{html.escape(v)}</b>" for k, v in meta)
    rows = "".join(_index_row(out, folder, desc, r) for folder, desc, r in steps)
    body = (f"<h1>{html.escape(title)}: {html.escape(', '.join(models))}</h1><p class=meta>{meta_html}</p>"
            "<div class=scroll><table class=records><tr><th>step</th><th>what</th><th>headline numbers</th>"
            f"<th>time</th><th>plot</th></tr>{rows}</table></div>"
            "<p class=muted>Each step's folder holds its report.html, results.json, results.csv and plots.</p>")
    return page(f"{title}: {models[0]}", body)


def write_index(out_dir: str | Path, steps: list[tuple[str, str, Result]], *, title: str = "circuitlab demo") -> Path:
    """index.html linking the report.html of each step folder (folder, description, result).

    Each step's report is rewritten with a link back to the index, so the pages link both ways.
    """
    out = Path(out_dir)
    for folder, _, result in steps:
        if (out / folder).is_dir():
            write_report(result, out / folder, index=f"../{INDEX}")
    return write_text_atomically(out / INDEX, render_index(out, steps, title=title))
