"""Heatmap numbers read back from matplotlib figures: values, display order, colours, tick labels."""

from __future__ import annotations

import numpy as np
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from circuitlab.report.figure_data import from_json, heatmaps_of, to_json

GRID = np.array([[0.0, 1.0, 2.0], [3.0, np.nan, 5.0]])


def _imshow(origin: str) -> Figure:
    fig = Figure()
    ax = fig.add_subplot()
    image = ax.imshow(GRID, origin=origin, cmap="RdBu", norm=Normalize(-5, 5))
    fig.colorbar(image)
    ax.set_xticks([0, 1, 2], ["a", "b", "c"])
    ax.set_yticks([0, 1], ["r0", "r1"])
    ax.set_xlabel("pos")
    ax.set_ylabel("layer")
    return fig


def test_imshow_lower_puts_row_zero_at_the_bottom():
    (h,) = heatmaps_of(_imshow("lower"))
    assert h.rows == ["r1", "r0"] and h.row_ids == [1, 0] and h.cols == ["a", "b", "c"]
    assert h.values == [[3.0, None, 5.0], [0.0, 1.0, 2.0]]
    assert h.colors[0][1] == ""  # NaN: no colour
    assert (h.vmin, h.vmax, h.x_label, h.y_label) == (-5.0, 5.0, "pos", "layer")


def test_imshow_upper_keeps_row_zero_on_top():
    (h,) = heatmaps_of(_imshow("upper"))
    assert h.rows == ["r0", "r1"] and h.values[0] == [0.0, 1.0, 2.0]


def test_colours_are_the_figures_colour_map():
    (h,) = heatmaps_of(_imshow("upper"))
    import matplotlib

    r, g, b, _ = matplotlib.colormaps["RdBu"](Normalize(-5, 5)(2.0))
    assert h.colors[0][2] == f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}"


def test_pcolormesh_and_round_trip():
    fig = Figure()
    ax = fig.add_subplot()
    ax.pcolormesh(GRID)
    ax.set_yticks([0.5, 1.5], ["first", "second"])
    ax.invert_yaxis()  # first row on top
    (h,) = from_json(to_json(heatmaps_of(fig)))
    assert h.rows == ["first", "second"] and h.values[1] == [3.0, None, 5.0]
    assert h.cols == ["", "", ""]  # the automatic ticks sit on cell edges, not centres: no labels invented


def test_figures_with_anything_else_stay_pictures():
    fig = Figure()
    ax = fig.add_subplot()
    ax.imshow(GRID)
    ax.plot([0, 1], [0, 1])
    assert heatmaps_of(fig) is None
    line = Figure()
    line.add_subplot().plot([0, 1])
    assert heatmaps_of(line) is None
