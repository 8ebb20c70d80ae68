"""Figures for attribution results (matplotlib object API, no display): heatmaps, bars, coloured text.

Each function returns a `Figure` with its dpi set; the runner saves it (nothing here writes files).
"""

from __future__ import annotations

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

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
    """A [rows, cols] heatmap (rows = layers, bottom to top); diverging colours when `signed`."""
    values = values.detach().float().cpu()
    fig = Figure(figsize=(max(4.0, 0.45 * values.shape[1] + 2), max(3.0, 0.25 * values.shape[0] + 1.5)), dpi=DPI)
    ax = fig.add_subplot()
    kwargs = {"cmap": "RdBu", "norm": _symmetric_norm(values)} if signed else {"cmap": "viridis"}
    image = ax.imshow(values.numpy(), aspect="auto", origin="lower", **kwargs)
    fig.colorbar(image, ax=ax)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if xticklabels is not None:
        ax.set_xticks(range(len(xticklabels)), [repr(t)[1:-1] for t in xticklabels], rotation=90, fontsize=7)
    else:
        ax.set_xticks(range(values.shape[1]))
    ax.set_yticks(range(values.shape[0]))
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
