"""The logit-lens figure: one row per prompt position, one column per depth, the top-1 token in each cell.

Positions run down the rows so a long prompt makes the figure taller, never wider: the width depends on
the model's depth only and is capped at `MAX_WIDTH_IN` (1,300 px; the report shows figures at most
1,100 px wide, so it shrinks this one by at most 15 %, where one column per position made a 32-token
prompt 3,965 px wide, shrunk to a quarter). Cells narrow and their font shrinks with the number of depths,
never below `MIN_FONT` points.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from matplotlib.figure import Figure

if TYPE_CHECKING:
    from circuitlab.lens.logit_lens import LensResult

DPI = 100
MAX_WIDTH_IN = 13.0  # 1,300 px at DPI
CELL_WIDTH_IN = 0.42  # one depth column when the width allows it
ROW_HEIGHT_IN = 0.2  # one position row: 14 pt, room for 7 pt labels
LABEL_WIDTH_IN = 1.5  # the position labels ("12 ' Paris'")
MARGIN_WIDTH_IN = 1.1  # colour bar and padding
CELL_CHARS = 6  # characters of the top-1 token shown in a cell
MAX_FONT, MIN_FONT = 7.0, 5.0
CHAR_WIDTH_EM = 0.62  # a glyph of DejaVu Sans is at most ~0.62 em wide on average text


def _cell_text(token: str) -> str:
    text = repr(token)[1:-1]
    return text if len(text) <= CELL_CHARS else text[: CELL_CHARS - 1] + "…"


def plot_lens(result: LensResult) -> Figure:
    """Positions x depths grid: top-1 token text in each cell, colour = its probability."""
    n_pos, n_depths = len(result.str_tokens), result.n_depths
    cell = min(CELL_WIDTH_IN, (MAX_WIDTH_IN - LABEL_WIDTH_IN - MARGIN_WIDTH_IN) / n_depths)
    font = min(MAX_FONT, cell * 72 / (CHAR_WIDTH_EM * CELL_CHARS))  # CELL_CHARS glyphs fill one cell
    show_text = font >= MIN_FONT  # very deep models: colours only (the tokens are in the records)
    fig = Figure(figsize=(LABEL_WIDTH_IN + MARGIN_WIDTH_IN + cell * n_depths, max(3.0, ROW_HEIGHT_IN * n_pos + 1.6)),
                 dpi=DPI)
    ax = fig.add_subplot()
    probs = result.top_probs[:, :, 0].T.numpy()  # [pos, depth]
    image = ax.pcolormesh(probs, cmap="Blues", vmin=0.0, vmax=1.0)
    for p in range(n_pos if show_text else 0):
        for d in range(n_depths):
            ax.text(d + 0.5, p + 0.5, _cell_text(result.top_tokens[d][p][0]), ha="center", va="center",
                    fontsize=font, color="white" if probs[p, d] > 0.6 else "black")
    ax.set_yticks([p + 0.5 for p in range(n_pos)],
                  [f"{p} {repr(t)[1:-1][:16]}" for p, t in enumerate(result.str_tokens)], fontsize=7)
    ax.set_xticks([d + 0.5 for d in range(n_depths)],
                  [("emb" if d == 0 else "final" if d == n_depths - 1 else str(d)) for d in range(n_depths)],
                  fontsize=6, rotation=90)
    ax.invert_yaxis()  # the prompt reads top to bottom
    ax.xaxis.tick_top()
    ax.set_xlabel("layer (residual stream after l blocks)", fontsize=8)
    ax.set_ylabel("position", fontsize=8)
    ax.set_title("Logit lens: top-1 token (colour = its probability)", fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02).set_label("p(top-1)", fontsize=8)
    fig.tight_layout()
    return fig
