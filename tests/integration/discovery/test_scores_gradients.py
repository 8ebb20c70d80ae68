"""EAP-IG (and so EAP, its clean point) on the real SmolLM2-135M (all 123,211 edges, one short IOI prompt): the receiver-gradient
path (one product per group) against the masked engine's coefficient gradient (a per-edge product at
every point)."""

from __future__ import annotations

from unit.discovery.test_scores_gradients import coefficient_scores

from circuitlab.discovery import edge_scores
from circuitlab.tasks.task import Example, Task

TASK = Task("ioi1", [Example("When Mary and John went to the store, John gave a drink to",
                             "When Mary and John went to the store, Paul gave a drink to", [" Mary"], [" John"])])


def test_receiver_gradients_equal_the_coefficient_gradient(smollm):
    """30 layers of float32 regrouped sums (sender outputs, per-head attention, the gradients reaching each
    receiver by another graph): measured ~1e-6 of max|score|; 1e-4 relative (the brief's bound) leaves a
    100x margin, while a wrong or missing term moves scores by far more."""
    got = edge_scores(smollm, TASK, method="eap-ig", steps=2)  # its clean point is EAP's (unit tests)
    want = coefficient_scores(smollm, TASK, "eap-ig", 2)
    assert got.scores.shape == (123_211,) and float(want.abs().max()) > 0
    assert float((got.scores - want).abs().max()) <= 1e-4 * float(want.abs().max())
