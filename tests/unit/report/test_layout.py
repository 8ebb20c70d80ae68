"""Heatmaps over token positions stay legible up to 64 tokens: bounded width, tokens readable as tick labels."""

from __future__ import annotations

import pytest
import torch

from circuitlab.attribution.plots import heatmap
from circuitlab.patching.grid import Cell
from circuitlab.patching.plots import View, plot_heatmap
from circuitlab.patching.result import PatchingResult
from circuitlab.report.layout import MAX_POSITION_COLUMNS

MAX_WIDTH_PX = 1600  # a report page is ~1100 px wide; wider figures are shrunk until 7 pt text is unreadable


def patching_result(n_layers: int, n_pos: int) -> PatchingResult:
    cells = [Cell(layer, pos, None) for layer in range(n_layers) for pos in range(n_pos)]
    values = torch.linspace(-1, 1, len(cells))[:, None].repeat(1, 2)
    return PatchingResult("resid_pre", ("layer", "pos"), "denoise", "logit_diff", cells, values,
                          clean=torch.tensor([1.0, 1.0]), corrupt=torch.tensor([0.0, 0.0]), n_layers=n_layers,
                          pos_labels=[f" tok{i}" for i in range(n_pos)])


def pixel_size(fig) -> tuple[float, float]:
    w, h = fig.get_size_inches()
    return w * fig.dpi, h * fig.dpi


@pytest.mark.parametrize("n_pos", [8, MAX_POSITION_COLUMNS, MAX_POSITION_COLUMNS + 1, 64])
def test_patching_heatmap_width_is_bounded_and_tokens_readable(n_pos):
    fig = plot_heatmap(patching_result(30, n_pos), View("layer", "pos"))
    width, _ = pixel_size(fig)
    assert width <= MAX_WIDTH_PX, f"{n_pos} positions give a {width:.0f} px wide figure"
    ax = fig.axes[0]
    labels = [t.get_text() for t in (ax.get_yticklabels() if n_pos > MAX_POSITION_COLUMNS else ax.get_xticklabels())]
    assert labels[-1] == f" tok{n_pos - 1} ({n_pos - 1})"  # every token labelled, leading space kept


@pytest.mark.parametrize("n_pos", [8, 64])
def test_attribution_heatmap_over_positions_is_bounded(n_pos):
    fig = heatmap(torch.randn(30, n_pos), title="t", xlabel="position", ylabel="layer",
                  xticklabels=[f" w{i}" for i in range(n_pos)])
    width, _ = pixel_size(fig)
    assert width <= MAX_WIDTH_PX
    ax = fig.axes[0]
    labels = ax.get_yticklabels() if n_pos > MAX_POSITION_COLUMNS else ax.get_xticklabels()
    assert [t.get_text() for t in labels][-1] == f" w{n_pos - 1}"
