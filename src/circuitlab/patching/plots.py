"""Heatmaps of a `PatchingResult`: layer x position (token labels on the x axis) and layer x head."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from circuitlab.atomic import save_figure_atomically
from circuitlab.patching.result import PatchingResult


def heatmap_views(result: PatchingResult) -> list[tuple[str, str]]:
    """(rows, cols) views that show the sweep: layer x pos, layer x head, or both for (layer, head, pos)."""
    by = set(result.by)
    views = []
    if "pos" in by:
        views.append(("layer", "pos"))
    if "head" in by:
        views.append(("layer", "head"))
    return views or [("layer", "pos")]


def plot_heatmap(result: PatchingResult, rows: str = "layer", cols: str = "pos") -> Figure:
    """A diverging heatmap of the normalised effect (0 = corrupt, 1 = clean), centred on 0."""
    grid = result.grid(rows, cols)
    if cols == "pos" and "pos" not in result.by:  # per-layer sweep: one column covering every position
        grid = grid[:, :1]
    n_rows, n_cols = grid.shape
    fig = Figure(figsize=(max(4.0, 0.45 * n_cols + 2.5), max(3.0, 0.22 * n_rows + 1.5)))
    ax = fig.subplots()
    bound = float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else 1.0
    bound = max(bound, 1e-6)
    image = ax.imshow(grid, cmap="RdBu", vmin=-bound, vmax=bound, aspect="auto", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="normalised effect")
    ax.set_ylabel(rows)
    ax.set_yticks(range(n_rows), [str(i) for i in range(n_rows)], fontsize=7 if n_rows > 16 else 9)
    if cols == "pos" and "pos" in result.by and result.pos_labels:
        labels = [f"{t!r}"[1:-1] + f" ({i})" for i, t in enumerate(result.pos_labels[:n_cols])]
        ax.set_xticks(range(n_cols), labels, rotation=90, fontsize=7)
        ax.set_xlabel("position (first clean prompt)")
    elif cols == "pos":
        ax.set_xticks([0], ["all positions"])
    else:
        ax.set_xlabel(cols)
        ax.set_xticks(range(n_cols))
    reduced = [a for a in result.by if a not in (rows, cols)]
    note = f", max |effect| over {'/'.join(reduced)}" if reduced else ""
    ax.set_title(f"{result.direction} {result.site} patching, {result.metric}: 0 = corrupt, 1 = clean{note}", fontsize=9)
    fig.tight_layout()
    return fig


def save_heatmaps(result: PatchingResult, out_dir: str | Path) -> list[Path]:
    """Write heatmap_{rows}_{cols}.png for each view of the sweep; returns the paths."""
    paths = []
    for rows, cols in heatmap_views(result):
        path = Path(out_dir) / f"heatmap_{result.site}_{rows}_{cols}.png"
        paths.append(save_figure_atomically(plot_heatmap(result, rows, cols), path, dpi=120))
    return paths
