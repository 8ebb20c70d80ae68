"""The demo's pipeline: steps in one run directory, a later step reading an earlier step's file, the index."""

from __future__ import annotations

import json

from circuitlab.results import load_results
from circuitlab.runner.demo import Output, Step, demo_steps, run_demo


def test_a_later_step_reads_an_earlier_steps_circuit(toy, task_file, tmp_path):
    steps = [
        Step("discover", "EAP circuit", "discover/eap", {"top_n": 10}, n=2),
        Step("verify", "its verification", "verify",
             {"circuit": Output("discover", "circuit.json"), "subsets": 1, "greedy_steps": 0,
              "all_ablations": False, "n_bootstrap": 50}, n=2),
        Step("roles", "needs IOI's structure", "study/ioi", n=2, ioi_only=True),  # left out: not IOI
    ]
    index = run_demo(toy, tmp_path / "demo", task=str(task_file), steps=steps)
    out = tmp_path / "demo"
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["discover", "verify"]
    verified = load_results(out / "verify")
    assert verified.params["circuit"] == str(out / "discover" / "circuit.json")  # the final place, not staging
    circuit = json.loads((out / "discover" / "circuit.json").read_text())
    assert sum(e["in_graph"] for e in circuit["edges"].values()) == 10
    page = index.read_text()
    assert "discover/report.html" in page and "verify/report.html" in page


def test_the_main_job_covers_the_whole_pipeline():
    analyses = [s.analysis for s in demo_steps(32, 8)]
    assert analyses == ["eval", "patch", "patch", "path-patch", "discover/eap-ig", "verify", "heads", "study/ioi",
                        "study/induction"]
    verify = next(s for s in demo_steps(32, 8) if s.analysis == "verify")
    assert verify.n == 16 and verify.options["split"] == "test"  # held-out prompts the discovery never saw
