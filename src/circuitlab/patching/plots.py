"""Figures of patching and tracing results (matplotlib's object API, no pyplot; nothing is written here).

- `patching_figures`: the heatmaps of a `PatchingResult`, keyed by file name. Each name says what the
  figure shows: ``heatmap_{site}_layer_pos.png`` (layer x position), ``heatmap_{site}_layer_head.png``
  (layer x head) and ``heatmap_{site}_layer.png`` (one value per layer, every position patched at once).
- `plot_trace` / `plot_average`: ROME-style causal-tracing heatmaps (tokens or token groups x layers).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from matplotlib.figure import Figure

from circuitlab.patching.causal_trace import TOKEN_GROUPS, AverageTrace, TraceGrid
from circuitlab.patching.result import PatchingResult
from circuitlab.report.layout import CELL_HEIGHT_IN, CELL_WIDTH_IN, positions_as_rows, token_label

HEATMAP_DPI = 120
TRACE_DPI = 130
_TITLE_SIZE = 9


@dataclass(frozen=True)
class View:
    """One heatmap of a sweep: rows are layers; `cols` is "pos", "head" or None (one column per layer)."""

    rows: str
    cols: str | None

    def file_name(self, site: str) -> str:
        return f"heatmap_{site}_{self.rows}" + (f"_{self.cols}.png" if self.cols else ".png")


def heatmap_views(result: PatchingResult) -> list[View]:
    """The views that show the sweep: layer x pos, layer x head, both for (layer, head, pos), or per layer."""
    by = set(result.by)
    views = [View("layer", axis) for axis in ("pos", "head") if axis in by]
    return views or [View("layer", None)]


def patching_figures(result: PatchingResult) -> dict[str, Figure]:
    """{file name: heatmap} for every view of the sweep."""
    return {view.file_name(result.site): plot_heatmap(result, view) for view in heatmap_views(result)}


def plot_heatmap(result: PatchingResult, view: View) -> Figure:
    """A diverging heatmap of the normalised effect (0 = corrupt, 1 = clean), centred on 0. Long prompts put
    positions on the rows (report/layout.py) so the figure stays legible."""
    grid = result.grid(view.rows, view.cols or "pos")
    if view.cols is None:  # per-layer sweep: one column covering every position
        grid = grid[:, :1]
    transpose = view.cols == "pos" and positions_as_rows(grid.shape[1])
    if transpose:
        grid = grid.T
    n_rows, n_cols = grid.shape
    # At least 5.5 in wide: the title lines (< 50 characters each at 9 pt) are never clipped.
    fig = Figure(figsize=(max(5.5, CELL_WIDTH_IN * n_cols + 2.5), max(3.0, CELL_HEIGHT_IN * n_rows + 1.8)),
                 dpi=HEATMAP_DPI)
    ax = fig.subplots()
    bound = float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else 0.0
    bound = bound if bound > 1e-6 else 1.0  # an all-zero sweep: a plain 0..1 scale, not one of width 1e-6
    image = ax.imshow(grid, cmap="RdBu", vmin=-bound, vmax=bound, aspect="auto", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="normalised effect")
    tokens = [token_label(t, i) for i, t in enumerate(result.pos_labels)] if result.pos_labels else None
    if transpose:
        ax.set_xlabel(view.rows)
        ax.set_xticks(range(n_cols), [str(i) for i in range(n_cols)], fontsize=7)
        ax.set_ylabel("position (first clean prompt)")
        ax.set_yticks(range(n_rows), tokens[:n_rows] if tokens else [str(i) for i in range(n_rows)], fontsize=7)
        ax.set_title("\n".join(_title_lines(result, view)), fontsize=_TITLE_SIZE)
        fig.tight_layout()
        return fig
    ax.set_ylabel(view.rows)
    ax.set_yticks(range(n_rows), [str(i) for i in range(n_rows)], fontsize=7 if n_rows > 16 else 9)
    if view.cols == "pos" and tokens:
        ax.set_xticks(range(n_cols), tokens[:n_cols], rotation=90, fontsize=7)
        ax.set_xlabel("position (first clean prompt)")
    elif view.cols is None:
        ax.set_xticks([0], ["all positions"])
    else:
        ax.set_xlabel(view.cols)
        ax.set_xticks(range(n_cols))
    ax.set_title("\n".join(_title_lines(result, view)), fontsize=_TITLE_SIZE)
    fig.tight_layout()
    return fig


def _title_lines(result: PatchingResult, view: View) -> list[str]:
    shown = f"{view.rows} x {view.cols}" if view.cols else f"per {view.rows}"
    lines = [f"{result.direction} patching of {result.site}: {shown}"]
    if view.cols is None:
        lines.append("(every position patched at once)")
    lines.append(f"{result.metric}, normalised: 0 = corrupt, 1 = clean")
    reduced = [a for a in result.by if a not in (view.rows, view.cols)]
    if reduced:
        lines.append(f"largest |effect| over {' and '.join(reduced)}")
    return lines


# --- causal tracing ----------------------------------------------------------------------------------------
_CMAPS = {"resid": "Purples", "mlp": "Greens", "attn": "Reds"}  # ROME's colours
_TITLES = {"resid": "single restored layer", "mlp": "restored MLP outputs", "attn": "restored attention outputs"}


def plot_trace(grid: TraceGrid) -> Figure:
    """ROME-style heatmap: rows = tokens (subject marked '*'), columns = layers, colour = indirect effect."""
    fig = Figure(figsize=(0.22 * len(grid.layers) + 2.5, 0.32 * len(grid.positions) + 1.6), dpi=TRACE_DPI)
    ax = fig.add_subplot()
    image = ax.pcolormesh(grid.effect.numpy(), cmap=_CMAPS[grid.kind], vmin=min(0.0, float(grid.effect.min())))
    ax.invert_yaxis()
    ax.set_yticks([i + 0.5 for i in range(len(grid.positions))], grid.token_labels())
    step = max(1, len(grid.layers) // 10)
    ax.set_xticks([i + 0.5 for i in range(0, len(grid.layers), step)], [str(x) for x in grid.layers[::step]])
    window = "" if grid.kind == "resid" else f", window {grid.window}"
    ax.set_title(f"Causal trace: {_TITLES[grid.kind]}{window}", fontsize=10)
    ax.set_xlabel(f"layer (clean p = {grid.clean_prob:.3f}, corrupted p = {grid.corrupt_prob:.3f})", fontsize=8)
    fig.colorbar(image, ax=ax).set_label(f"indirect effect on p({grid.target!r})", fontsize=8)
    fig.tight_layout()
    return fig


def plot_average(avg: AverageTrace) -> Figure:
    """AIE heatmap over ROME's token groups x layers."""
    fig = Figure(figsize=(0.22 * len(avg.layers) + 3.5, 3.2), dpi=TRACE_DPI)
    ax = fig.add_subplot()
    image = ax.pcolormesh(avg.effect.nan_to_num(0.0).numpy(), cmap=_CMAPS[avg.kind])
    ax.invert_yaxis()
    labels = [f"{g} (n={n})" for g, n in zip(TOKEN_GROUPS, avg.counts, strict=True)]
    ax.set_yticks([i + 0.5 for i in range(len(TOKEN_GROUPS))], labels)
    step = max(1, len(avg.layers) // 10)
    ax.set_xticks([i + 0.5 for i in range(0, len(avg.layers), step)], [str(x) for x in avg.layers[::step]])
    ax.set_xlabel("layer")
    window = "" if avg.kind == "resid" else f", window {avg.window}"
    ax.set_title(f"Average indirect effect: {_TITLES[avg.kind]}{window} ({len(avg.clean_probs)} prompts)",
                 fontsize=10)
    fig.colorbar(image, ax=ax).set_label("AIE on p(target)", fontsize=8)
    fig.tight_layout()
    return fig
