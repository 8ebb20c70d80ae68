"""`circuitlab report DIR`: every run under a folder in one self-contained HTML file.

A results folder may be one run directory, a demo (an index over step folders) or any tree of runs made
by hand. The page lists every run found (any folder holding a circuitlab ``results.json``) with a table
of contents, then each run as it appears in its own report.html: headline, interactive heatmaps, the
circuit graph, records, parameters. Pictures are embedded, so the file can be mailed or archived alone
and needs no network to view. A folder whose results.json cannot be read is listed at the top with the
reason (never dropped silently). See docs/METHODS.md, "Run directories".
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

from circuitlab.atomic import write_text_atomically
from circuitlab.errors import CircuitlabError, OutputError
from circuitlab.report.html import headline, now_text, page, run_body
from circuitlab.results import Result, load_results

DEFAULT_NAME = "circuitlab-report.html"
MARKER = "<meta name=generator content='circuitlab report'>"  # marks a file this command may overwrite
RECORDS_PER_RUN = 50  # a combined page shows the strongest rows of each run; results.csv has all


@dataclass
class FoundRun:
    folder: Path  # relative to the root ("." for the root itself)
    result: Result


def find_runs(root: str | Path) -> tuple[list[FoundRun], list[tuple[Path, str]]]:
    """The runs under `root` in path order, and (folder, reason) for folders whose results.json is unreadable."""
    root = Path(root)
    if not root.is_dir():
        raise OutputError(f"{root} is not a folder; give a run directory or a folder of runs")
    runs, broken = [], []
    for path in sorted(root.rglob("results.json")):
        if any(part.startswith(".") for part in path.relative_to(root).parts[:-1]):
            continue  # staging or leftover folders of a run in progress
        folder = path.parent.relative_to(root)
        try:
            runs.append(FoundRun(folder, load_results(path)))
        except (CircuitlabError, ValueError, TypeError) as exc:
            broken.append((folder, str(exc).splitlines()[0][:200]))
    return runs, broken


def render_collection(root: str | Path, runs: list[FoundRun], broken: list[tuple[Path, str]]) -> str:
    root = Path(root)
    title = f"circuitlab report: {root.resolve().name}"
    toc = "".join(
        f"<tr><td><a href='#run-{i}'>{html.escape(str(r.folder))}</a></td><td>{html.escape(r.result.command)}</td>"
        f"<td class=text>{html.escape(_what(r.result))}</td><td class=text>"
        + "<br>".join(f"{html.escape(k)} <b>{html.escape(v)}</b>" for k, v in headline(r.result.summary))
        + "</td></tr>" for i, r in enumerate(runs))
    problems = "".join(f"<li><b>{html.escape(str(folder))}</b>: {html.escape(reason)}</li>" for folder, reason in broken)
    parts = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p class=meta>runs <b>{len(runs)}</b> · folder <b>{html.escape(str(root))}</b> · written <b>{now_text()}</b></p>",
        f"<div class=problems><b>{len(broken)} folder(s) not shown:</b><ul>{problems}</ul></div>" if broken else "",
        "<h2>Runs</h2><div class=scroll><table class=records><tr><th>folder</th><th>command</th><th>model / task</th>"
        f"<th>headline numbers</th></tr>{toc}</table></div>" if runs else "<p>No circuitlab runs found.</p>",
    ]
    for i, found in enumerate(runs):
        parts.append(f"<section id='run-{i}'><h2>{html.escape(str(found.folder))}: circuitlab "
                     f"{html.escape(found.result.command)}</h2>"
                     + run_body(found.result, root / found.folder, prefix=f"r{i}-", level=3,
                                max_rows=RECORDS_PER_RUN)
                     + "<p class=muted><a href='#'>&uarr; top</a></p></section>")
    return page(title, "".join(parts), head=MARKER)


def write_collection(root: str | Path, out: str | Path | None = None, *, force: bool = False) -> tuple[Path, int, int]:
    """Write the combined report; returns (path, runs shown, folders not shown). An existing file at `out`
    that this command did not write is replaced only with `force`."""
    root = Path(root)
    target = Path(out) if out is not None else root / DEFAULT_NAME
    if target.is_dir():
        raise OutputError(f"{target} is a folder; give a file name for the report, e.g. {target / DEFAULT_NAME}")
    if target.exists() and not force and MARKER not in target.read_text(encoding="utf-8", errors="replace")[:4096]:
        raise OutputError(f"{target} exists and was not written by circuitlab report; pass --force to replace it")
    runs, broken = find_runs(root)
    if not runs and not broken:
        raise OutputError(f"no circuitlab runs (results.json) under {root}; run an analysis with --out there first")
    write_text_atomically(target, render_collection(root, runs, broken))
    return target, len(runs), len(broken)


def _what(result: Result) -> str:
    model = str(result.model.get("spec", "?"))
    task = (result.task or {}).get("name")
    return model + (f" / {task}" if task else "")
