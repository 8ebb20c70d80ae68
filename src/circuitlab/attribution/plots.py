"""Figures for attribution results (matplotlib object API, no display): heatmaps, bars, coloured text.

Each function returns a `Figure` with its dpi set; the runner saves it (nothing here writes files).
"""

from __future__ import annotations

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

from circuitlab.report.layout import CELL_HEIGHT_IN, CELL_WIDTH_IN, positions_as_rows, token_label

DPI = 110


def _symmetric_norm(values: torch.Tensor) -> TwoSlopeNorm:
    finite = values[torch.isfinite(values)]
    bound = float(finite.abs().max()) if finite.numel() else 1.0
    bound = bound or 1.0
    return TwoSlopeNorm(vcenter=0.0, vmin=-bound, vmax=bound)


def heatmap(
    values: torch.Tensor, *, title: str, xlabel: str, ylabel: str, xticklabels: list[str] | None = None,
    signed: bool = True,
) -> Figure:
    """A [rows, cols] heatmap (rows = layers, bottom to top); diverging colours when `signed`. With more
    token columns than report/layout.py allows, tokens go on the rows so long prompts stay legible."""
    values = values.detach().float().cpu()
    transpose = xticklabels is not None and positions_as_rows(values.shape[1])
    if transpose:
        values, xlabel, ylabel = values.T, ylabel, xlabel
    n_rows, n_cols = values.shape
    fig = Figure(figsize=(max(4.0, CELL_WIDTH_IN * n_cols + 2), max(3.0, CELL_HEIGHT_IN * n_rows + 1.5)), dpi=DPI)
    ax = fig.add_subplot()
    kwargs = {"cmap": "RdBu", "norm": _symmetric_norm(values)} if signed else {"cmap": "viridis"}
    image = ax.imshow(values.numpy(), aspect="auto", origin="upper" if transpose else "lower", **kwargs)
    fig.colorbar(image, ax=ax)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    tokens = [token_label(t) for t in xticklabels] if xticklabels is not None else None
    if transpose and tokens is not None:
        ax.set_yticks(range(n_rows), tokens, fontsize=7)
        ax.set_xticks(range(n_cols))
    else:
        if tokens is not None:
            ax.set_xticks(range(n_cols), tokens, rotation=90, fontsize=7)
        else:
            ax.set_xticks(range(n_cols))
        ax.set_yticks(range(n_rows))
    fig.tight_layout()
    return fig


def layer_bars(per_layer: dict[str, torch.Tensor], *, title: str) -> Figure:
    """Side-by-side bars per layer, one series per key (e.g. attn and mlp DLA)."""
    fig = Figure(figsize=(8, 3.5), dpi=DPI)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(per_layer))
    for i, (label, values) in enumerate(per_layer.items()):
        xs = [layer + i * width for layer in range(len(values))]
        ax.bar(xs, values.detach().float().tolist(), width=width, label=label)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_xlabel("layer")
    ax.set_ylabel("contribution to metric")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig


def coloured_text(tokens: list[list[str]], attributions: list[torch.Tensor], *, title: str) -> Figure:
    """Tokens rendered as text, one prompt per line (prompts may differ in length), each token on a
    background coloured by its attribution (red < 0 < blue, one colour scale for all prompts)."""
    rows = [a.detach().float().cpu() for a in attributions]
    norm = _symmetric_norm(torch.cat(rows)) if rows else _symmetric_norm(torch.zeros(1))
    from matplotlib import colormaps

    cmap = colormaps["RdBu"]
    fig = Figure(figsize=(10, 0.6 * len(tokens) + 0.8), dpi=DPI)
    renderer = FigureCanvasAgg(fig).get_renderer()  # token widths are measured to lay the text out
    ax = fig.add_subplot()
    ax.set_axis_off()
    ax.set_title(title, fontsize=9)
    for row, prompt in enumerate(tokens):
        y = 1.0 - (row + 1) / (len(tokens) + 1)
        x = 0.0
        for pos, token in enumerate(prompt):
            colour = cmap(norm(float(rows[row][pos])))
            text = ax.text(x, y, token.replace("\n", "\\n"), fontsize=10, family="monospace", transform=ax.transAxes,
                           bbox={"facecolor": colour, "edgecolor": "none", "pad": 1.5})
            box = text.get_window_extent(renderer=renderer).transformed(ax.transAxes.inverted())
            x += box.width + 0.004
    fig.colorbar(_scalar_mappable(cmap, norm), ax=ax, orientation="horizontal", fraction=0.05, pad=0.02)
    return fig


def _scalar_mappable(cmap, norm):
    from matplotlib.cm import ScalarMappable

    mappable = ScalarMappable(norm=norm, cmap=cmap)
    mappable.set_array([])
    return mappable
