"""`circuitlab report DIR`: every run of a tree in one self-contained page, interactive heatmaps and
circuits, escaping, unreadable runs named, and no overwriting of files it did not write."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from matplotlib.figure import Figure

from circuitlab.errors import OutputError
from circuitlab.report.collection import DEFAULT_NAME, write_collection
from circuitlab.report.figure_data import heatmaps_of, to_json
from circuitlab.report.html import render_report
from circuitlab.results import Result

EVIL = "<script>alert('x')</script>"


def _run(folder, command="patch", heatmap=True, circuit=None, token=EVIL):
    folder.mkdir(parents=True)
    artifacts = []
    if heatmap:
        fig = Figure(figsize=(2, 2), dpi=40)
        ax = fig.add_subplot()
        ax.imshow(np.array([[0.25, -1.5], [2.0, 0.0]]))
        ax.set_xticks([0, 1], [token, "b"])
        fig.savefig(folder / "grid.png")
        (folder / "grid.heatmap.json").write_text(to_json(heatmaps_of(fig)))
        artifacts += ["grid.png", "grid.heatmap.json"]
    if circuit is not None:
        (folder / "circuit.json").write_text(json.dumps(circuit))
        artifacts.append("circuit.json")
    result = Result(command=command, model={"spec": "toy"}, task={"name": token}, params={},
                    records=[{"value": 1.0, "token": token}], artifacts=artifacts)
    result.save(folder)
    return result


CIRCUIT = {"cfg": {"n_layers": 1, "n_heads": 2},
           "nodes": {"input": {"in_graph": True}, "a0.h1": {"in_graph": True, "score": 0.5},
                     "logits": {"in_graph": True}},
           "edges": {"input->a0.h1<q>": {"score": 0.75, "in_graph": True},
                     "a0.h1->logits": {"score": -0.25, "in_graph": True},
                     "input->logits": {"score": 9.0, "in_graph": False}}}


def test_tree_of_runs_in_one_page(tmp_path):
    _run(tmp_path / "a")
    _run(tmp_path / "deep" / "b", command="discover/eap", heatmap=False, circuit=CIRCUIT)
    (tmp_path / ".staging" / "x").mkdir(parents=True)  # an unfinished run's staging folder is not a run
    (tmp_path / ".staging" / "x" / "results.json").write_text("{}")
    path, shown, broken = write_collection(tmp_path)
    page = path.read_text()
    assert path == tmp_path / DEFAULT_NAME and (shown, broken) == (2, 0)
    assert "data:image/png;base64," in page and "src='grid.png'" not in page  # self-contained
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "")  # no network
    # hover values: every heatmap cell carries its value; the circuit's kept edges carry their scores
    assert re.search(r"<title>[^<]*: 0\.25</title>", page) and "<title>input-&gt;a0.h1&lt;q&gt;: 0.75</title>" in page
    assert "input-&gt;logits" not in page  # out of the circuit: not drawn
    assert "<script>alert" not in page and "&lt;script&gt;alert" in page


def test_unreadable_runs_are_named_not_dropped(tmp_path):
    _run(tmp_path / "good")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "results.json").write_text('{"schema": "other"}')
    path, shown, broken = write_collection(tmp_path)
    assert (shown, broken) == (1, 1) and "1 folder(s) not shown" in path.read_text()


def test_a_single_run_directory(tmp_path):
    _run(tmp_path / "run")
    _, shown, _ = write_collection(tmp_path / "run")
    assert shown == 1


def test_refuses_to_overwrite_a_foreign_file_without_force(tmp_path):
    _run(tmp_path / "a")
    foreign = tmp_path / "mine.html"
    foreign.write_text("my notes")
    with pytest.raises(OutputError, match="--force"):
        write_collection(tmp_path, foreign)
    assert foreign.read_text() == "my notes"
    write_collection(tmp_path, foreign, force=True)
    write_collection(tmp_path, foreign)  # its own file: rewritten freely
    (tmp_path / "empty").mkdir()
    with pytest.raises(OutputError, match="no circuitlab runs"):
        write_collection(tmp_path / "empty")
    with pytest.raises(OutputError, match="not a folder"):
        write_collection(tmp_path / "missing")


def test_run_report_shows_heatmap_as_svg_and_picture_on_demand(tmp_path):
    result = _run(tmp_path / "r")
    page = render_report(result, tmp_path / "r")
    assert "<svg class=heatmap" in page and "<details><summary>picture</summary><img" in page


def test_damaged_sidecar_falls_back_to_the_picture(tmp_path):
    result = _run(tmp_path / "r")
    (tmp_path / "r" / "grid.heatmap.json").write_text("{not json")
    page = render_report(result, tmp_path / "r")
    assert "<svg class=heatmap" not in page and "data:image/png;base64," in page
