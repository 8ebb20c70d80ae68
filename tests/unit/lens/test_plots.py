"""The logit-lens figure stays legible for long prompts: positions are rows, so the width depends on the
model's depth only and is capped; each cell's text fits its cell."""

from __future__ import annotations

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from PIL import Image

from circuitlab.lens import logit_lens
from circuitlab.lens.plots import DPI, MAX_WIDTH_IN, MIN_FONT, ROW_HEIGHT_IN, plot_lens
from circuitlab.models.toy import toy_model

WORDS = ("Mary John Tom Anna Paul Kate When and went to the store , gave a drink . Then Paris France is in "
         "capital of city The year from").split()


@pytest.fixture(scope="module")
def deep():
    """As deep as SmolLM2-135M (30 layers, 31 depths), with room for 64-token prompts."""
    return toy_model(words=WORDS, n_layers=30, n_ctx=80, d_model=16, n_heads=2, d_head=8, d_mlp=16, seed=0)


def _prompt(n_tokens: int) -> str:
    return " ".join(WORDS[i % len(WORDS)] for i in range(n_tokens - 1))  # + BOS


@pytest.mark.parametrize("n_tokens", [8, 32, 64])
def test_lens_figure_size_is_capped(deep, tmp_path, n_tokens):
    result = logit_lens(deep, _prompt(n_tokens), top_k=1)
    assert len(result.str_tokens) == n_tokens
    fig = plot_lens(result)
    path = tmp_path / "lens.png"
    fig.savefig(path, format="png")  # as the runner saves it
    width, height = Image.open(path).size
    assert width <= MAX_WIDTH_IN * DPI  # 1,300 px whatever the prompt length (was 3,965 px at 32 tokens)
    assert height <= (ROW_HEIGHT_IN * n_tokens + 1.6) * DPI + 1


def test_lens_cells_hold_their_text(deep):
    """At 64 tokens and 31 depths every cell's token fits inside its cell, at a readable size."""
    fig = plot_lens(logit_lens(deep, _prompt(64), top_k=1))
    renderer = FigureCanvasAgg(fig).get_renderer()
    ax = fig.axes[0]
    box = ax.get_window_extent(renderer)
    cell_w, cell_h = box.width / 31, box.height / 64
    texts = ax.texts
    assert len(texts) == 64 * 31
    assert min(t.get_fontsize() for t in texts) >= MIN_FONT
    for text in texts:
        extent = text.get_window_extent(renderer)
        assert extent.width <= cell_w and extent.height <= cell_h, text.get_text()
