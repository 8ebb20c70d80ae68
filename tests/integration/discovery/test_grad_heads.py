"""Parameter-gradient importance and the head map on the real SmolLM2-135M (two short IOI prompts)."""

from __future__ import annotations

import math

from circuitlab.discovery.param_grad import grad_importance
from circuitlab.tasks.task import Example, Task

TASK = Task("ioi2", [
    Example("When Mary and John went to the store, John gave a drink to",
            "When Mary and John went to the store, Paul gave a drink to", [" Mary"], [" John"]),
    Example("When Tom and Anna went to the park, Anna gave a book to",
            "When Tom and Anna went to the park, Kate gave a book to", [" Tom"], [" Anna"]),
])


def test_grad_importance_covers_every_parameter_once(smollm):
    """30 layers x (9 heads + 1 MLP) nodes; with 3 kv heads each W_K / W_V slice is split among 3 query heads,
    and the nodes plus the unattributed parameters count every parameter of the model once."""
    importance = grad_importance(smollm, TASK)
    assert len(importance.nodes) == 30 * 10 and importance.kinds.count("mlp") == 30
    assert all(math.isfinite(s.abs_gxw) and s.abs_grad > 0 for s in importance.sums)
    n_params = sum(p.numel() for p in dict.fromkeys(smollm.bridge.parameters()))
    assert sum(s.n_params for s in importance.sums) + importance.unattributed.n_params == n_params
    assert importance.metric_value > 0  # the model prefers the indirect object on these prompts
    assert len(importance.records()) == 300 and math.isfinite(max(importance.z))


def test_head_map_equals_the_patch_command(smollm):
    """`discover --method heads` values = `patch --site z --by layer,head --direction noise` (two layers here).
    One prompt: the sweep of all 270 heads is the cost (about 15 full forwards of 9 rows)."""
    from circuitlab.runner import run

    one = TASK.subset(1)
    heads = run("discover/heads", model=smollm, task=one, top_n=10, curve=False)
    patch = run("patch", model=smollm, task=one, site="z", by="layer,head", direction="noise", layers=[0, 29])
    mine = {(r["layer"], r["head"]): r["value"] for r in heads.result.records}
    assert len(mine) == 270 and heads.result.summary["n_kept"] == 10
    assert len(patch.result.records) == 18
    for row in patch.result.records:
        assert abs(mine[(row["layer"], row["head"])] - row["value"]) <= 1e-4
    assert math.isfinite(heads.result.summary["faithfulness"])
    assert heads.result.summary["circuit_mlps"] == 30 and heads.result.summary["circuit_heads"] == 10
