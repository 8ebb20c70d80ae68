"""Learned edge masks and expand-and-prune on the real SmolLM2-135M (all 123,211 edges): a few steps on two
short IOI prompts, to show both run at full scale; their quality is measured on the ground truths."""

from __future__ import annotations

import math

from circuitlab.discovery.grow import GrowParams, grow
from circuitlab.discovery.prune import PruneParams, prune
from circuitlab.tasks.task import Example, Task

CLEAN = ["When Mary and John went to the store, John gave a drink to",
         "When Tom and Anna went to the park, Anna gave a book to"]
CORRUPT = ["When Mary and John went to the store, Paul gave a drink to",
           "When Tom and Anna went to the park, Kate gave a book to"]


def _task() -> Task:
    return Task("ioi2", [Example(CLEAN[0], CORRUPT[0], [" Mary"], [" John"]),
                         Example(CLEAN[1], CORRUPT[1], [" Tom"], [" Anna"])])


def test_prune_learns_a_mask(smollm):
    # Each step is a masked forward + backward over every edge (about as costly as one EAP pass).
    done = prune(smollm, _task(), PruneParams(target_edges=500, steps=2, curve=False))
    training = done.training
    assert training is not None and len(training.log) == 2 and done.circuit.n_edges == 500
    assert all(math.isfinite(row["loss"]) for row in training.log)
    assert training.logits.shape == (123_211,) and bool((training.logits != training.logits[0]).any())
    assert math.isfinite(done.faithfulness)


def test_grow_from_the_logits(smollm):
    done = grow(smollm, _task(), GrowParams(steps=1, max_edges=8, per_round=4, curve=False))
    assert done.growth is not None and 1 <= done.circuit.n_edges <= 8
    assert "logits" in done.circuit.nodes  # grown from the logits: some kept edge ends there
    assert math.isfinite(done.faithfulness) and len(done.growth.rounds) >= 1
