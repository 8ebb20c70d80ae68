"""Figures of the head analysis (matplotlib's object API; nothing is written here).

- `detector_figure`: one detector's scores as a layer x head heatmap (0..1), the uniform head's score
  in the title; cells of a small grid carry their values.
- `composition_figure`: one mode's composition scores, reader head (rows) x writer head (columns), heads
  ordered by layer with a line at each layer boundary; the random baseline in the title.
"""

from __future__ import annotations

import numpy as np
import torch
from jaxtyping import Float
from matplotlib.figure import Figure

from circuitlab.graph.naming import head_name
from circuitlab.heads.composition import CompositionScores
from circuitlab.report.layout import CELL_HEIGHT_IN, CELL_WIDTH_IN

DPI = 120
HEAD_LABELS_MAX = 48  # heads per composition axis that still fit one name each at 6 pt
ANNOTATE_MAX_CELLS = 144  # values written in the cells up to a 12 x 12 grid; beyond, they would not fit
TITLES = {"prev_token": "previous-token score", "duplicate_token": "duplicate-token score",
          "induction": "induction score", "bos": "attention to BOS"}
MODE_NAMES = {"q": "Q-composition", "k": "K-composition", "v": "V-composition"}


def detector_figure(scores: Float[torch.Tensor, "layer head"], kind: str, uniform: float) -> Figure:
    grid = scores.detach().cpu().numpy()
    n_layers, n_heads = grid.shape
    fig = Figure(figsize=(max(4.5, CELL_WIDTH_IN * 1.6 * n_heads + 2.2), max(2.6, CELL_HEIGHT_IN * n_layers + 1.6)),
                 dpi=DPI)
    ax = fig.subplots()
    image = ax.imshow(grid, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    fig.colorbar(image, ax=ax, label=TITLES.get(kind, kind))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(n_heads))
    ax.set_yticks(range(n_layers), [str(i) for i in range(n_layers)], fontsize=7 if n_layers > 16 else 9)
    if grid.size <= ANNOTATE_MAX_CELLS:
        for (layer, head), value in np.ndenumerate(grid):
            ax.text(head, layer, f"{value:.2f}", ha="center", va="center", fontsize=7,
                    color="black" if value > 0.6 else "white")
    ax.set_title(f"{TITLES.get(kind, kind)} per head\n(uniform causal head: {uniform:.3f})", fontsize=9)
    fig.tight_layout()
    return fig


def composition_figure(composition: CompositionScores, mode: str) -> Figure:
    n_layers, n_heads = composition.n_layers, composition.n_heads
    n = n_layers * n_heads
    # [writer layer, writer head, reader layer, reader head] -> rows = readers (layers 1..), columns = writers
    # (layers ..L-2): layer-0 heads read nothing earlier and last-layer heads write to no later head
    grid = composition.scores[mode].reshape(n, n).T.detach().cpu().numpy()[n_heads:, :-n_heads]
    side = min(11.0, max(4.0, 0.035 * (n - n_heads) + 2.5))
    fig = Figure(figsize=(side + 1.2, side), dpi=DPI)
    ax = fig.subplots()
    finite = grid[np.isfinite(grid)]
    image = ax.imshow(np.ma.masked_invalid(grid), cmap="magma", vmin=0.0,
                      vmax=float(finite.max()) if finite.size and finite.max() > 0 else 1.0,
                      aspect="equal", interpolation="nearest")
    fig.colorbar(image, ax=ax, label=MODE_NAMES[mode], shrink=0.8)
    # layer boundaries as a minor-tick grid (not drawn lines, so the report can still read the heatmap back)
    boundaries = [b * n_heads - 0.5 for b in range(1, n_layers - 1)]
    ax.set_xticks(boundaries, minor=True)
    ax.set_yticks(boundaries, minor=True)
    ax.tick_params(which="minor", length=0)
    ax.grid(which="minor", color="0.7", linewidth=0.4)
    side_heads = (n_layers - 1) * n_heads
    if side_heads <= HEAD_LABELS_MAX:  # every head named (also what the report's hover shows)
        heads = list(range(side_heads))
        ax.set_xticks(heads, [head_name(*divmod(i, n_heads)) for i in heads], fontsize=6, rotation=90)
        ax.set_yticks(heads, [head_name(*divmod(i + n_heads, n_heads)) for i in heads], fontsize=6)
    else:
        step = max(1, n_layers // 15)  # at most ~15 layer labels per axis
        shown = range(0, n_layers - 1, step)
        ticks = [index * n_heads + (n_heads - 1) / 2 for index in shown]
        ax.set_xticks(ticks, [f"L{index}" for index in shown], fontsize=7)
        ax.set_yticks(ticks, [f"L{index + 1}" for index in shown], fontsize=7)
    ax.set_xlabel("writer head (earlier layer)")
    ax.set_ylabel("reader head (later layer)")
    ax.set_title(f"{MODE_NAMES[mode]}: how much of each writer's output the reader's "
                 f"{'query' if mode == 'q' else 'key' if mode == 'k' else 'value'} reads\n"
                 f"(random matrices of the same shapes: {composition.baseline[mode]:.3f})", fontsize=9)
    fig.tight_layout()
    return fig
