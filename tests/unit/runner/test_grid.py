"""`circuitlab grid`: the whole spec is checked before any cell runs; one run directory per cell, an index."""

from __future__ import annotations

import json

import pytest
from conftest import IOI_LIKE_ROWS
from typer.testing import CliRunner

from circuitlab.cli import app
from circuitlab.errors import CircuitlabError, OutputError
from circuitlab.runner.grid import parse_spec, read_spec, run_grid


def write_spec(path, text: str):
    path.write_text(text)
    return path


@pytest.mark.parametrize("data, message", [
    ({"models": ["m"], "tasks": ["ioi"]}, "'methods' must list"),
    ({"models": ["m"], "tasks": ["ioi"], "methods": ["eval"], "colour": 1}, "unknown key"),
    ({"models": "m", "tasks": ["ioi"], "methods": ["eval"]}, "'models' must be a list"),
    ({"models": ["m"], "tasks": ["ioi"], "methods": ["eval"], "seeds": [0, 0]}, "twice"),
    ({"models": ["m"], "tasks": ["ioi"], "methods": ["eval"], "n": 0}, "'n' must be"),
    ({"models": ["m"], "tasks": ["ioi"], "methods": {"patch": 3}}, "table of name -> options"),
])
def test_bad_specs_are_refused(data, message):
    with pytest.raises(CircuitlabError, match=message):
        parse_spec(data)


def test_toml_and_cells(tmp_path):
    spec = read_spec(write_spec(tmp_path / "g.toml", 'models = ["a/b/model"]\ntasks = ["ioi"]\nseeds = [0, 1]\n'
                                '[methods.patch]\nsite = "z"\n[methods."attribute/dla"]\n'))
    cells = spec.cells()
    assert [c.folder for c in cells] == ["patch__ioi__model__seed0", "patch__ioi__model__seed1",
                                         "attribute-dla__ioi__model__seed0", "attribute-dla__ioi__model__seed1"]
    assert cells[0].options == {"site": "z"} and cells[2].options == {}


@pytest.mark.parametrize("methods, message", [
    ('["no-such"]', "unknown analysis"),
    ('{patch = {site = "nowhere"}}', "site"),
])
def test_every_cell_is_checked_before_anything_runs(no_model_load, toy_dir, tmp_path, methods, message):
    spec = write_spec(tmp_path / "g.toml", f'models = ["{toy_dir}"]\ntasks = ["ioi"]\nmethods = {methods}\n')
    with pytest.raises(CircuitlabError, match=message):
        run_grid(spec, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_grid_runs_every_cell_writes_an_index_and_resumes(toy_dir, tmp_path):
    task = tmp_path / "names.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in IOI_LIKE_ROWS))
    spec = write_spec(tmp_path / "g.toml", f'models = ["{toy_dir}"]\ntasks = ["{task}"]\nseeds = [0, 1]\n'
                      'methods = ["eval", "attribute/dla"]\n')
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["grid", str(spec), "--out", str(out)])
    assert result.exit_code == 0, result.output
    index = json.loads((out / "index.json").read_text())
    assert index["finished"] == index["cells"] == 4
    for run in index["runs"]:
        assert (out / run["folder"] / "results.json").is_file()
    assert "circuitlab grid" in (out / "index.html").read_text()
    with pytest.raises(OutputError, match="earlier grid"):
        run_grid(spec, out)
    before = (out / index["runs"][0]["folder"] / "results.json").stat().st_mtime_ns
    run_grid(spec, out, resume=True)  # finished cells are kept, not run again
    assert (out / index["runs"][0]["folder"] / "results.json").stat().st_mtime_ns == before
