"""The HTML report and the demo index: own figures only, escaping, sorted records, links both ways, umask,
and one report rendered in headless Chromium (skipped where Chromium is not installed)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

from circuitlab.atomic import save_figure_atomically
from circuitlab.report import write_index, write_report
from circuitlab.report.html import MAX_ROWS, headline, render_report
from circuitlab.report.terminal import strongest_first
from circuitlab.results import Result

EVIL = "<script>alert('x')</script> <img src=x onerror=alert(1)> & Mary"


def _figure(path, width_in=4.0, dpi=50):
    fig = Figure(figsize=(width_in, 2), dpi=dpi)
    fig.add_subplot().plot([0, 1])
    return save_figure_atomically(fig, path, dpi=dpi)


def _result(**kw) -> Result:
    base = dict(command="patch", model={"spec": "toy"}, task={"name": "ioi", "n": 8}, params={"site": "z"},
                records=[{"layer": 0, "value": 0.5}], summary={"clean_mean": 2.0}, timing_s=1.5, load_s=0.25)
    base.update(kw)
    return Result(**base)


def test_report_escapes_every_string(tmp_path):
    _figure(tmp_path / "a.png")
    evil_png = f"{EVIL}.png"
    res = _result(task={"name": EVIL}, params={"prompt": EVIL, EVIL: 1}, records=[{"clean": EVIL, "value": 0.5}],
                  summary={"note": EVIL}, model={"spec": EVIL}, command=EVIL, artifacts=["a.png", evil_png])
    page = write_report(res, tmp_path).read_text()
    assert "<script>" not in page and "<img src=x" not in page
    assert page.count("&lt;script&gt;") >= 7  # title, h1, header model and task, summary, params x2, record, task
    assert page.count("&lt;img src=x onerror=alert(1)&gt;") >= 7


def test_report_embeds_only_its_own_figures(tmp_path):
    _figure(tmp_path / "mine.png")
    _figure(tmp_path / "stray_from_another_run.png")
    page = write_report(_result(artifacts=["mine.png", "patching.json"]), tmp_path).read_text()
    assert page.count("data:image/png;base64,") == 1
    assert "mine.png" in page and "stray_from_another_run" not in page


def test_no_empty_plots_section(tmp_path):
    _figure(tmp_path / "stray.png")  # present in the folder, but not this run's
    page = render_report(_result(artifacts=[]), tmp_path)
    assert "Plots" not in page and "<img" not in page
    assert "Plots" in render_report(_result(artifacts=["stray.png"]), tmp_path)


def test_records_largest_first_and_capped(tmp_path):
    n = MAX_ROWS + 37
    values = [((-1) ** i) * i / n for i in range(n)]  # alternating signs, |value| grows with i
    records = [{"layer": i, "value": v} for i, v in enumerate(values)] + [{"layer": -1, "value": float("nan")}]
    page = render_report(_result(records=records), tmp_path)
    table = page[page.index("<table class=records>"):]
    table = table[: table.index("</table>")]
    shown = [float(x) for x in re.findall(r"<td class=num>(-?[0-9.e+-]+)</td></tr>", table)]
    assert len(shown) == MAX_ROWS
    assert shown[:3] == pytest.approx([values[n - 1], values[n - 2], values[n - 3]], rel=1e-3)
    assert [abs(v) for v in shown] == sorted((abs(v) for v in shown), reverse=True)
    assert f"{n + 1 - MAX_ROWS} more rows in results.csv" in page
    assert "largest |value| first" in page


def test_records_without_numeric_value_keep_their_order():
    records = [{"token": "b", "value": "x"}, {"token": "a"}]
    assert strongest_first(records) == records
    nan_last = strongest_first([{"value": float("nan")}, {"value": -2.0}, {"value": 1.0}])
    assert [r["value"] for r in nan_last[:2]] == [-2.0, 1.0]


def test_header_has_command_model_task_timing(tmp_path):
    page = render_report(_result(), tmp_path)
    header = page[page.index("<h1>"): page.index("<h2>")]
    for text in ("circuitlab patch", "toy", "ioi (8 prompts)", "1.50 s", "0.25 s"):
        assert text in header


def test_back_link_only_under_an_index(tmp_path):
    step = tmp_path / "step"
    step.mkdir()
    assert "back to index" not in render_report(_result(), step)
    (tmp_path / "index.html").write_text("<html></html>")
    assert "href='../index.html'" in render_report(_result(), step)


def test_index_has_headlines_and_links_both_ways(tmp_path):
    ev = _result(command="eval", summary={"metric": "logit_diff", "n_prompts": 32, "accuracy": 0.875,
                                          "clean_mean": 3.25, "corrupt_mean": -3.5, "clean_std": 1.0})
    patch = _result(summary={"site": "z", "n_cells": 270, "clean_mean": 3.25,
                             "max_abs_cell": {"layer": 8, "pos": None, "head": 6, "value": 0.4321}},
                    artifacts=["patch_z.png"], timing_s=12.0)
    steps = [("eval", "IOI evaluation", ev), ("patch z", f"patching {EVIL}", patch)]
    for folder, _, res in steps:
        (tmp_path / folder).mkdir()
        write_report(res, tmp_path / folder)
    _figure(tmp_path / "patch z" / "patch_z.png")
    index = write_index(tmp_path, steps).read_text()
    assert "href='eval/report.html'" in index and "href='patch%20z/report.html'" in index
    assert "<script>" not in index and "&lt;script&gt;" in index
    for text in ("accuracy <b>0.875</b>", "clean_mean <b>3.25</b>", "corrupt_mean <b>-3.5</b>",
                 "max_abs_cell <b>0.4321 at layer 8 head 6</b>", "toy", "12.0 s", "written"):
        assert text in index, text
    assert "src='patch%20z/patch_z.png'" in index  # thumbnail of the step's figure
    for folder, _, _ in steps:  # and every report links back
        assert "href='../index.html'" in (tmp_path / folder / "report.html").read_text()


def test_headline_falls_back_to_numbers():
    assert headline({"site": "z", "n_prompts": 3, "alpha": 0.5, "beta": 2}) == [("alpha", "0.5"), ("beta", "2")]
    assert headline({"resid_aie_peak": 0.25, "n_prompts": 3}) == [("resid_aie_peak", "0.25")]


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        report = write_report(_result(), tmp_path)
        (tmp_path / "s").mkdir()
        index = write_index(tmp_path, [("s", "step", _result())])
    finally:
        os.umask(old)
    for path in (report, index, tmp_path / "s" / "report.html"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask


# --- the page as a browser shows it ---------------------------------------------------------------------
MAGENTA, CYAN = (255, 0, 255), (0, 200, 200)


def _chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def _colour_mask(pixels: np.ndarray, rgb: tuple[int, int, int]) -> np.ndarray:
    # PNG screenshots are lossless, but the browser resamples the scaled image: allow a small blend margin.
    return (np.abs(pixels[..., :3].astype(int) - np.array(rgb)) <= 24).all(axis=-1)


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (Debian: apt-get install chromium; "
                    "`make install` does it where apt is available and it runs as root)")
def test_report_renders_in_headless_chromium(tmp_path):
    # A figure twice as wide as the window: magenta left half, cyan right half. Both halves must be on
    # screen, which only holds when the page scales the image to its width.
    fig = Figure(figsize=(24, 4), dpi=100)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(np.array([[MAGENTA, CYAN]], dtype=np.uint8), aspect="auto")
    ax.set_axis_off()
    save_figure_atomically(fig, tmp_path / "colours.png", dpi=100)
    records = [{"layer": i, "pos": i % 7, "token": f"tok{i}", "value": (i % 5) / 5} for i in range(40)]
    write_report(_result(records=records, artifacts=["colours.png"]), tmp_path)

    shot = tmp_path / "shot.png"
    subprocess.run([_chromium(), "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,1600",
                    (tmp_path / "report.html").as_uri()], check=True, capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (1600, 1200)
    assert pixels.std() > 20, "the screenshot is (nearly) blank"
    magenta, cyan = _colour_mask(pixels, MAGENTA), _colour_mask(pixels, CYAN)
    # The image is 2400x400 scaled to at most 1200 px wide: each half covers at least ~400x130 px.
    assert magenta.sum() > 40_000 and cyan.sum() > 40_000, (magenta.sum(), cyan.sum())
    cols = np.flatnonzero(cyan.any(axis=0))
    assert cols.max() < 1200 - 8, "the figure runs off the right edge"
    assert np.flatnonzero(magenta.any(axis=0)).max() < cols.min() + 2  # magenta left of cyan, side by side
