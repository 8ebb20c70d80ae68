"""The result protocol every analysis meets, and `Result`, the record every run writes.

An analysis returns an object meeting `AnalysisResult` (three methods, nothing else is required):

- ``records()``: tidy flat rows (for sweeps: site, layer, pos, head, value) that load straight into pandas
  and become ``results.csv``;
- ``summary()``: a small dict of headline numbers (plain JSON values), shown on the terminal and at the top
  of the report;
- ``figures()``: ``{file name: matplotlib Figure}``; the runner saves exactly these, and the report embeds
  exactly these, so a report never shows another run's plots.

An analysis may also offer ``files() -> {file name: text}`` for extra outputs (e.g. ``patching.json``).

The runner (`circuitlab.runner.run`) wraps that object in a `Result` with the model, task, parameters,
seed, versions and timings, and writes the run directory once.
"""

from __future__ import annotations

import csv
import importlib.metadata
import io
import json
import math
import platform
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import pandas as pd

from circuitlab.atomic import write_atomically, write_text_atomically
from circuitlab.errors import CircuitlabError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SCHEMA = "circuitlab.result/1"


@runtime_checkable
class AnalysisResult(Protocol):
    """What every analysis returns (see the module docstring)."""

    def records(self) -> list[dict[str, Any]]: ...

    def summary(self) -> dict[str, Any]: ...

    def figures(self) -> dict[str, Figure]: ...

_VERSIONED = ("circuitlab", "torch", "transformer-lens", "transformers", "numpy", "pandas")


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


@dataclass
class Result:
    """One command's output. `timing_s` = the computation itself, `load_s` = model loading."""

    command: str
    model: dict[str, Any]
    task: dict[str, Any] | None
    params: dict[str, Any]
    records: list[dict[str, Any]]
    seed: int | None = None
    timing_s: float = 0.0
    load_s: float = 0.0
    summary: dict[str, Any] = field(default_factory=dict)
    artifacts: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=package_versions)
    schema: str = SCHEMA

    def to_json(self) -> str:
        # NaN (e.g. a heatmap cell with no edge) becomes null: strict JSON readers reject NaN.
        return json.dumps(_nan_to_none(asdict(self)), indent=2, default=_json_default, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> Result:
        data = json.loads(text)
        if data.get("schema") != SCHEMA:
            raise CircuitlabError(f"not a circuitlab result (schema {data.get('schema')!r}, expected {SCHEMA!r})")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame.from_records(self.records)

    def save(self, out_dir: str | Path) -> Path:
        """Write results.json and results.csv atomically into `out_dir`; returns the json path."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_atomically(out / "results.csv", lambda tmp: self.to_frame().to_csv(tmp, index=False))
        return write_text_atomically(out / "results.json", self.to_json())


def csv_text(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """Rows as CSV text for an analysis' `files()` (default columns: every key, in first-seen order); ""
    when there are neither rows nor columns."""
    columns = columns if columns is not None else list(dict.fromkeys(key for row in rows for key in row))
    if not columns:
        return ""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def load_results(path: str | Path) -> Result:
    """Read a results.json (or the directory holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise CircuitlabError(f"no results file at {path}")
    return Result.from_json(path.read_text())


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(v) for v in value]
    return value


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__} in results.json")
