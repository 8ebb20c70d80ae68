"""The hand-set induction model with its true circuit (discovery I), shared by the verification tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="package")
def handset():
    """(model, task, true circuit) on 6 repeated-token prompts."""
    from circuitlab.discovery.ground_truth import load_ground_truth

    return load_ground_truth("handset-induction", n=6)


@pytest.fixture(scope="package")
def verifier(handset):
    from circuitlab.verify.measures import Verifier

    model, task, truth = handset
    return Verifier(model, task, truth.graph, n_bootstrap=200)
