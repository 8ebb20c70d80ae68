"""`circuitlab discover` on the toy model saved to disk."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from circuitlab.cli import app
from circuitlab.results import load_results

runner = CliRunner()


def test_discover_writes_a_circuit(tmp_path, toy_dir, task_file):
    out = tmp_path / "d"
    res = runner.invoke(app, ["discover", "--method", "eap", "--model", str(toy_dir), "--task", str(task_file),
                              "--top-n", "10", "--out", str(out)])
    assert res.exit_code == 0, res.output
    result = load_results(out)
    assert result.command == "discover/eap" and result.params["top_n"] == 10
    assert result.summary["circuit_edges"] == 10
    edges = json.loads((out / "circuit.json").read_text())["edges"]
    assert sum(e["in_graph"] for e in edges.values()) == 10 and len(edges) == len(result.records)
    assert (out / "circuit.png").is_file() and (out / "faithfulness.png").is_file()


def test_discover_bad_inputs_are_one_line_errors(tmp_path, toy_dir, task_file):
    base = ["discover", "--model", str(toy_dir), "--task", str(task_file), "--out", str(tmp_path / "d")]
    cases = [
        (["--method", "bogus"], "unknown discovery method 'bogus'"),
        (["--method", "eap", "--tau", "0.1"], "--tau does not apply to --method eap"),
        (["--method", "exact", "--tau", "3", "--max-edges", "4"], "--tau, --max-edges does not apply"),
        (["--threshold", "-0.5"], "threshold must be a number >= 0"),
        (["--target-faithfulness", "1.5"], "(0, 1]"),
        (["--top-n", "5", "--threshold", "0.1"], "mutually exclusive"),
        (["--top-n", "100000"], "larger than the graph"),
        (["--positions", "all"], "positions all needs kl or l2"),
    ]
    for extra, message in cases:
        res = runner.invoke(app, [*base, *extra])
        assert res.exit_code == 2 and message in res.output, (extra, res.output)
    assert not (tmp_path / "d").exists()


def test_discover_with_kl_needs_no_answers(tmp_path, toy_dir, task_file):
    """kl compares with the full model: a task file without 'answer' works (issue 12 §2); the task's own
    metric still asks for the answers, before the model loads."""
    rows = [json.loads(line) for line in task_file.read_text().splitlines()]
    bare = tmp_path / "bare.jsonl"
    bare.write_text("".join(json.dumps({"clean": r["clean"], "corrupt": r["corrupt"]}) + "\n" for r in rows))
    out = tmp_path / "d"
    res = runner.invoke(app, ["discover", "--method", "eap", "--metric", "kl", "--model", str(toy_dir),
                              "--task", str(bare), "--top-n", "5", "--out", str(out)])
    assert res.exit_code == 0, res.output
    result = load_results(out)
    assert result.summary["metric"] == "kl" and result.summary["circuit_edges"] == 5
    assert result.summary["n_prompts"] == 2
    res = runner.invoke(app, ["discover", "--method", "eap", "--model", str(toy_dir), "--task", str(bare),
                              "--out", str(tmp_path / "e")])
    assert res.exit_code == 2 and "answer" in res.output, res.output
    assert not (tmp_path / "e").exists()
