"""Shared fixtures: one real SmolLM2 per test session, and tiny toy models built in code."""

from __future__ import annotations

import pytest
import torch

from circuitlab.models.toy import toy_model

TOY_WORDS = (
    "Mary John Tom Anna Paul Kate When and went to the store , gave a drink . Then Paris France is in "
    "capital of city The 1 2 3 4 5 6 7 8 9 0 year from"
).split()


@pytest.fixture(scope="session")
def smollm():
    """The embedded default model, loaded once per session (cold: dequantize + cache; warm: < 3 s)."""
    from circuitlab import load_model

    torch.manual_seed(0)
    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def toy():
    """A 2-layer random native model with RMSNorm, MLPs and a word tokenizer."""
    return toy_model(words=TOY_WORDS, n_layers=2, seed=0)


@pytest.fixture(scope="session")
def toy_attn_only():
    return toy_model(words=TOY_WORDS, n_layers=2, attn_only=True, seed=1)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)
