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
        (["--method", "prune", "--level", "head"], "--level does not apply to --method prune"),
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


def test_discover_prune_and_grow(tmp_path, toy_dir, task_file):
    """`--method prune --target-edges N --steps S` and `--method grow --seed-nodes ... --max-edges N`."""
    base = ["discover", "--model", str(toy_dir), "--task", str(task_file)]
    out = tmp_path / "prune"
    res = runner.invoke(app, [*base, "--method", "prune", "--target-edges", "8", "--steps", "3", "--out", str(out)])
    assert res.exit_code == 0, res.output
    result = load_results(out)
    assert result.command == "discover/prune" and result.params["target_edges"] == 8 and result.params["steps"] == 3
    assert result.summary["circuit_edges"] == 8 and result.summary["metric"] == "kl"  # kl is prune's default
    assert (out / "prune.png").is_file() and (out / "prune_log.csv").is_file()
    out = tmp_path / "grow"
    res = runner.invoke(app, [*base, "--method", "grow", "--seed-nodes", "logits, a1.h0", "--max-edges", "5",
                              "--steps", "1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    result = load_results(out)
    assert result.params["seed_nodes"] == ["logits", "a1.h0"] and result.params["max_edges"] == 5
    assert result.summary["circuit_edges"] <= 5 and (out / "grow.png").is_file()


def test_discover_prune_and_grow_bad_inputs(tmp_path, toy_dir, task_file):
    base = ["discover", "--model", str(toy_dir), "--task", str(task_file), "--out", str(tmp_path / "d")]
    cases = [
        (["--method", "prune", "--target-edges", "100000"], "larger than the graph, which has 110 edges"),
        (["--method", "prune", "--target-edges", "0"], "target edges must be a positive integer"),
        (["--method", "prune", "--top-n", "5"], "--top-n does not apply to --method prune"),
        (["--method", "grow", "--seed-nodes", "a1.h9"], "unknown seed node 'a1.h9'"),
        (["--method", "grow", "--max-edges", "0"], "max edges must be a positive integer"),
        (["--method", "grow", "--target-edges", "4"], "--target-edges does not apply to --method grow"),
    ]
    for extra, message in cases:
        res = runner.invoke(app, [*base, *extra])
        assert res.exit_code == 2 and message in res.output, (extra, res.output)
    assert not (tmp_path / "d").exists()


def test_discover_grad_and_heads_write_node_circuits(tmp_path, toy_dir, task_file):
    """Node-level methods (issue 13 §3, §4): one record per node, a circuit.json whose in-graph edges are
    the summary's, and each method's own figure."""
    for method, extra, figure, n_records in (("grad", ["--top-n", "3"], "grad.png", 2 * 5),
                                             ("heads", ["--threshold", "0"], "heatmap_z_layer_head.png", 2 * 4)):
        out = tmp_path / method
        res = runner.invoke(app, ["discover", "--method", method, "--model", str(toy_dir), "--task", str(task_file),
                                  *extra, "--out", str(out)])
        assert res.exit_code == 0, res.output
        result = load_results(out)
        assert result.command == f"discover/{method}" and len(result.records) == n_records
        edges = json.loads((out / "circuit.json").read_text())["edges"]
        assert sum(e["in_graph"] for e in edges.values()) == result.summary["circuit_edges"] > 0
        assert (out / figure).is_file() and (out / "circuit.png").is_file()
    assert load_results(tmp_path / "grad").summary["n_kept"] == 3


def test_discover_grad_and_heads_bad_inputs(tmp_path, toy_dir, task_file):
    base = ["discover", "--model", str(toy_dir), "--task", str(task_file), "--out", str(tmp_path / "d")]
    cases = [
        (["--method", "grad", "--metric", "kl"], "its gradient there is 0"),
        (["--method", "grad", "--metric", "l2"], "its gradient there is 0"),
        (["--method", "grad", "--threshold", "0.1"], "--threshold does not apply to --method grad"),
        (["--method", "grad", "--ablation", "zero"], "--ablation does not apply to --method grad"),
        (["--method", "heads", "--ablation", "mean"], "only 'corrupt' exists"),
        (["--method", "heads", "--metric", "l2"], "l2 does not apply to --method heads"),
        (["--method", "heads", "--top-n", "2", "--threshold", "0.1"], "mutually exclusive"),
        (["--method", "heads", "--top-n", "99"], "larger than the number of heads"),
    ]
    for extra, message in cases:
        res = runner.invoke(app, [*base, *extra])
        assert res.exit_code == 2 and message in " ".join(res.output.split()), (extra, res.output)
    assert not (tmp_path / "d").exists()


def test_discover_acdc_on_the_toy_model(tmp_path, toy_dir, task_file):
    out = tmp_path / "acdc"
    res = runner.invoke(app, ["discover", "--method", "acdc", "--tau", "0.02", "--ablation", "zero", "--model",
                              str(toy_dir), "--task", str(task_file), "--out", str(out), "--level", "head"])
    assert res.exit_code == 0, res.output
    result = load_results(out)
    assert result.command == "discover/acdc" and result.params["tau"] == 0.02
    assert result.params["level"] == "head" and result.summary["level"] == "head"
    assert result.summary["metric"] == "kl" and result.summary["method"] == "acdc"
    edges = json.loads((out / "circuit.json").read_text())["edges"]
    assert sum(e["in_graph"] for e in edges.values()) == result.summary["circuit_edges"]
    assert (out / "acdc_log.json").is_file() and (out / "circuit.png").is_file()


def test_discover_acdc_bad_inputs(tmp_path, toy_dir, task_file):
    base = ["discover", "--method", "acdc", "--model", str(toy_dir), "--task", str(task_file), "--out", str(tmp_path / "d")]
    for extra, message in [(["--tau", "-0.5"], "tau must be a finite number >= 0"),
                           (["--level", "node"], "level must be 'edge'"),
                           (["--top-n", "5"], "--top-n does not apply to --method acdc")]:
        res = runner.invoke(app, [*base, *extra])
        assert res.exit_code == 2 and message in res.output, (extra, res.output)
    assert not (tmp_path / "d").exists()
