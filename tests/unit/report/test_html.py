"""The HTML report escapes every prompt string and embeds the plots."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from circuitlab.atomic import save_figure_atomically  # noqa: E402
from circuitlab.report import write_report  # noqa: E402
from circuitlab.results import Result  # noqa: E402


def test_report_escapes_prompts_and_embeds_plots(tmp_path):
    evil = "<script>alert('x')</script> & Mary"
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    save_figure_atomically(fig, tmp_path / "heatmap.png")
    plt.close(fig)
    res = Result("eval", {"spec": "toy"}, {"name": evil}, {"prompt": evil}, [{"clean": evil, "value": 0.5}],
                 summary={"note": evil}, artifacts=["heatmap.png"])
    res.save(tmp_path)
    page = write_report(res, tmp_path).read_text()
    assert "<script>" not in page
    assert page.count("&lt;script&gt;") >= 4
    assert "data:image/png;base64," in page and "heatmap.png" in page
