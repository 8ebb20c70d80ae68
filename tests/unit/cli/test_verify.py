"""`circuitlab verify` on the toy model saved to disk: a circuit from `discover`, then its verdict."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from circuitlab.cli import app
from circuitlab.results import load_results

runner = CliRunner()
QUICK = ["--n-bootstrap", "50", "--subsets", "2", "--greedy-steps", "1", "--noise", "0,0.2"]


@pytest.fixture(scope="module")
def circuit_file(tmp_path_factory, toy):
    """12 edges of the toy model's graph (the model saved as toy_dir), in the EAP-IG / MIB layout."""
    import torch

    from circuitlab.graph.circuit import Circuit
    from circuitlab.graph.graph import Graph

    graph = Graph.from_model(toy)
    scores = torch.randn(graph.n_edges, generator=torch.Generator().manual_seed(0))
    return Circuit.top_n(graph, scores, 12).save(tmp_path_factory.mktemp("circuit") / "circuit.json")


def test_verify_prints_a_verdict_and_writes_the_run(tmp_path, toy_dir, task_file, circuit_file):
    out = tmp_path / "v"
    res = runner.invoke(app, ["verify", "--model", str(toy_dir), "--task", str(task_file), "--circuit",
                              str(circuit_file), "--compare", str(circuit_file), "--out", str(out), *QUICK])
    assert res.exit_code == 0, res.output
    assert "faithfulness" in res.output and "95% CI" in res.output and "completeness" in res.output
    assert max(len(line) for line in res.output.splitlines() if not line.startswith("wrote")) <= 80
    result = load_results(out)
    assert result.command == "verify" and result.summary["circuit_edges"] == 12
    assert result.summary["compare_edge_jaccard"] == 1.0
    assert result.params["noise"] == [0.0, 0.2]
    assert (out / "perturbation.png").is_file() and (out / "consistency.csv").is_file()


def test_verify_bad_inputs_are_one_line_errors(tmp_path, toy_dir, task_file, circuit_file):
    from circuitlab.discovery.ground_truth import DIRS, HANDSET, TRUTH_FILE

    base = ["verify", "--model", str(toy_dir), "--task", str(task_file), "--out", str(tmp_path / "v"), *QUICK]
    cases = [
        (["--circuit", str(tmp_path / "none.json")], "no circuit file"),
        (["--circuit", str(circuit_file), "--ablation", "shuffle"], "unknown ablation 'shuffle'"),
        (["--circuit", str(DIRS[HANDSET] / TRUTH_FILE)], "was made for a model with"),
        (["--circuit", str(circuit_file), "--split", "test", "--n", "1"], "split 'test' is empty"),
        (["--circuit", str(circuit_file), "--split", "template:0"], "record no template"),
        (["--circuit", str(circuit_file), "--noise", "0,x"], "--noise takes comma-separated numbers"),
    ]
    for extra, message in cases:
        res = runner.invoke(app, [*base, *extra])
        assert res.exit_code == 2 and message in res.output, (extra, res.output)
    assert not (tmp_path / "v").exists()
