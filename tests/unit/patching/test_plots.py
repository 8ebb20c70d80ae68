"""Patching heatmaps: one file per view, named after what it shows, titles inside the figure."""

from __future__ import annotations

import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg

from circuitlab.patching.grid import Cell
from circuitlab.patching.plots import HEATMAP_DPI, patching_figures
from circuitlab.patching.result import PatchingResult

N_LAYERS, N_HEADS, N_POS = 30, 9, 15  # SmolLM2-sized sweeps: the widest titles against the narrowest figures


def _sweep(by: tuple[str, ...], site: str = "resid_post", direction: str = "denoise") -> PatchingResult:
    pos = range(N_POS) if "pos" in by else [None]
    head = range(N_HEADS) if "head" in by else [None]
    cells = [Cell(layer, p, h) for layer in range(N_LAYERS) for h in head for p in pos]
    values = torch.linspace(-1.0, 2.0, len(cells) * 2).reshape(len(cells), 2)
    labels = [f"tok{i}" for i in range(N_POS)] if "pos" in by else []
    return PatchingResult(site=site, by=by, direction=direction, metric="logit_diff", cells=cells, values=values,
                          clean=torch.tensor([2.0, 2.0]), corrupt=torch.tensor([0.0, 0.0]), n_layers=N_LAYERS,
                          n_heads=N_HEADS if "head" in by else 0, pos_labels=labels)


@pytest.mark.parametrize("by, names", [
    (("layer", "pos"), ["heatmap_resid_post_layer_pos.png"]),
    (("layer",), ["heatmap_resid_post_layer.png"]),  # not "_layer_pos": it has no position axis
    (("layer", "head"), ["heatmap_resid_post_layer_head.png"]),
    (("layer", "head", "pos"), ["heatmap_resid_post_layer_pos.png", "heatmap_resid_post_layer_head.png"]),
])
def test_one_named_figure_per_view(by, names):
    figures = patching_figures(_sweep(by))
    assert list(figures) == names
    for figure in figures.values():
        assert figure.dpi == HEATMAP_DPI


@pytest.mark.parametrize("by", [("layer",), ("layer", "pos"), ("layer", "head"), ("layer", "head", "pos")])
def test_titles_fit_inside_the_figure(by):
    for name, figure in patching_figures(_sweep(by, direction="noise")).items():
        FigureCanvasAgg(figure)
        renderer = figure.canvas.get_renderer()
        box = figure.axes[0].title.get_window_extent(renderer)
        assert 0 <= box.x0 and box.x1 <= figure.bbox.width and box.y1 <= figure.bbox.height, (name, box)


def test_titles_say_what_is_shown():
    per_layer = patching_figures(_sweep(("layer",)))["heatmap_resid_post_layer.png"]
    title = per_layer.axes[0].get_title()
    assert "per layer" in title and "every position patched at once" in title and "logit_diff" in title
    both = patching_figures(_sweep(("layer", "head", "pos")))
    assert "largest |effect| over head" in both["heatmap_resid_post_layer_pos.png"].axes[0].get_title()
    assert "largest |effect| over pos" in both["heatmap_resid_post_layer_head.png"].axes[0].get_title()
