"""The numbers behind a heatmap figure, read from what the figure draws.

A report page shows heatmaps as SVG with the value of every cell on hover. Rather than asking every
analysis to hand its grids over twice (once to matplotlib, once to the report), the grid, its colours
and its tick labels are read back from the `Figure` itself when the run is saved: an ``imshow`` image or
a ``pcolormesh`` mesh, the colour map and norm it was drawn with, the axis labels and the tick labels at
each cell. Figures that draw anything else (lines, bars, several kinds of panel) are left as pictures.

Saved beside the picture as ``<name>.heatmap.json``; `circuitlab report` reads those back.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

SUFFIX = ".heatmap.json"
MAX_CELLS = 40_000  # beyond this an SVG with one element per cell is heavier than the picture it replaces


@dataclass
class Heatmap:
    """One panel: cells in display order (row 0 = top row), their values, colours and labels."""

    title: str
    x_label: str
    y_label: str
    rows: list[str]  # a label per row: the tick label at that row, or "" when the figure showed none
    cols: list[str]
    row_ids: list[int]  # the row's index in the analysis's grid (what a hover names when there is no label)
    col_ids: list[int]
    values: list[list[float | None]]  # None = no value (NaN / masked)
    colors: list[list[str]]  # "#rrggbb" or "" (no colour: masked cell)
    vmin: float
    vmax: float
    low_color: str
    high_color: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Heatmap:
        return cls(**data)


def heatmaps_of(figure: Figure) -> list[Heatmap] | None:
    """The heatmaps of `figure`, one per panel, when every panel is one heatmap; otherwise None."""
    panels = [ax for ax in figure.axes if ax.get_label() != "<colorbar>" and ax.get_visible()]
    if not panels:
        return None
    maps = []
    for ax in panels:
        heatmap = _panel(ax)
        if heatmap is None:
            return None
        maps.append(heatmap)
    return maps


def to_json(maps: list[Heatmap]) -> str:
    return json.dumps([m.to_dict() for m in maps], allow_nan=False)


def from_json(text: str) -> list[Heatmap]:
    return [Heatmap.from_dict(d) for d in json.loads(text)]


def _panel(ax: Axes) -> Heatmap | None:
    from matplotlib.collections import QuadMesh
    from matplotlib.colors import Normalize
    from matplotlib.image import AxesImage

    meshes = [c for c in ax.collections if isinstance(c, QuadMesh)]
    drawn = list(ax.images) + meshes
    others = [a for a in (*ax.lines, *ax.patches, *ax.collections) if not isinstance(a, QuadMesh)]
    if len(drawn) != 1 or others:
        return None
    mappable = drawn[0]
    array: np.ma.MaskedArray = np.ma.masked_invalid(np.ma.asarray(mappable.get_array(), dtype=float))
    if array.ndim != 2 or array.size > MAX_CELLS:
        return None
    n_rows, n_cols = array.shape
    if isinstance(mappable, AxesImage):
        left, right, bottom, top = mappable.get_extent()
        width, height = (right - left) / n_cols, (top - bottom) / n_rows
        x_centres = left + (np.arange(n_cols) + 0.5) * width
        # origin "upper": array row 0 is drawn at the top of the extent
        first = top if mappable.origin == "upper" else bottom
        step = -height if mappable.origin == "upper" else height
        y_centres = first + (np.arange(n_rows) + 0.5) * step
    else:
        coords = np.asarray(mappable.get_coordinates())  # [n_rows + 1, n_cols + 1, 2]
        x_centres = (coords[0, :-1, 0] + coords[0, 1:, 0]) / 2
        y_centres = (coords[:-1, 0, 1] + coords[1:, 0, 1]) / 2
    cols = _tick_labels(ax.xaxis, x_centres)
    rows = _tick_labels(ax.yaxis, y_centres)
    rgba = mappable.to_rgba(array)
    # display order: columns left to right, rows top to bottom
    col_order = np.argsort(x_centres)[::-1] if ax.xaxis_inverted() else np.argsort(x_centres)
    row_order = np.argsort(y_centres) if ax.yaxis_inverted() else np.argsort(y_centres)[::-1]
    mask = np.ma.getmaskarray(array)  # a full boolean grid even when nothing is masked
    values = [[_value(array, mask, r, c) for c in col_order] for r in row_order]
    colors = [["" if mask[r, c] else _hex(rgba[r, c]) for c in col_order] for r in row_order]
    finite = array.compressed()
    norm = mappable.norm
    if not isinstance(norm, Normalize):  # a multivariate norm colours several grids at once: not a heatmap
        return None
    vmin = float(norm.vmin) if norm.vmin is not None else float(finite.min()) if finite.size else 0.0
    vmax = float(norm.vmax) if norm.vmax is not None else float(finite.max()) if finite.size else 0.0
    cmap = mappable.get_cmap()
    return Heatmap(title=ax.get_title(), x_label=ax.get_xlabel(), y_label=ax.get_ylabel(),
                   rows=[rows[r] for r in row_order], cols=[cols[c] for c in col_order],
                   row_ids=[int(r) for r in row_order], col_ids=[int(c) for c in col_order], values=values,
                   colors=colors, vmin=_finite(vmin), vmax=_finite(vmax), low_color=_hex(cmap(0.0)),
                   high_color=_hex(cmap(1.0)))


def _tick_labels(axis: Any, centres: np.ndarray) -> list[str]:
    """A label per cell: the tick label set by the analysis (a fixed locator) within half a cell of the
    cell's centre. Automatic ticks are coordinates, not names: the report numbers those cells itself."""
    from matplotlib.ticker import FixedLocator

    labels = [""] * len(centres)
    if len(centres) == 0 or not isinstance(axis.get_major_locator(), FixedLocator):
        return labels
    ticks, texts = axis.get_majorticklocs(), [t.get_text() for t in axis.get_majorticklabels()]
    half = abs(float(centres[1] - centres[0])) / 2 if len(centres) > 1 else 0.5
    for position, text in zip(ticks, texts, strict=False):
        nearest = int(np.argmin(np.abs(centres - position)))
        if text and abs(float(centres[nearest]) - float(position)) < half:
            labels[nearest] = text
    return labels


def _value(array: np.ma.MaskedArray, mask: np.ndarray, r: int, c: int) -> float | None:
    if mask[r, c]:
        return None
    value = float(array[r, c])
    return value if math.isfinite(value) else None


def _finite(value: float) -> float:
    return value if math.isfinite(value) else 0.0


def _hex(rgba: Any) -> str:
    r, g, b = (int(round(float(channel) * 255)) for channel in tuple(rgba)[:3])
    return f"#{r:02x}{g:02x}{b:02x}"
