"""Discovery on the real SmolLM2-135M: EAP over all 123,211 edges of two short IOI prompts."""

from __future__ import annotations

import torch

from circuitlab.discovery import edge_scores
from circuitlab.tasks.task import Example, Task

CLEAN = ["When Mary and John went to the store, John gave a drink to",
         "When Tom and Anna went to the park, Anna gave a book to"]
CORRUPT = ["When Mary and John went to the store, Paul gave a drink to",
           "When Tom and Anna went to the park, Kate gave a book to"]


def test_eap_scores_every_edge(smollm):
    task = Task("ioi2", [Example(CLEAN[0], CORRUPT[0], [" Mary"], [" John"]),
                         Example(CLEAN[1], CORRUPT[1], [" Tom"], [" Anna"])])
    result = edge_scores(smollm, task, method="eap")  # speed: benchmarks/discovery.py
    assert result.graph.n_edges == 123_211 and result.scores.shape == (123_211,)
    assert result.scores.isfinite().all() and result.n_prompts == 2
    assert result.full_metric > 0  # the model prefers the indirect object on these prompts
    # The strongest edges of IOI end at the logits or in late layers; at least they are not all zero.
    assert float(result.scores.abs().max()) > 0.01 * abs(result.full_metric)
    top = result.top(5)
    assert len(top) == 5 and all(torch.isfinite(torch.tensor(s)) for _, s in top)
