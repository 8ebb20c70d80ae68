"""Shared fixtures: one real SmolLM2 per test session, and tiny toy models built in code."""

from __future__ import annotations

import json

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


@pytest.fixture(scope="session")
def toy_dir(tmp_path_factory, toy):
    """The `toy` model saved as a native model directory, so CLI tests can pass it as --model."""
    from circuitlab.models.loading import save_native
    from circuitlab.models.toy import toy_config

    path = tmp_path_factory.mktemp("toy") / "model"
    save_native(toy, path, toy_config(d_vocab=len(toy.tokenizer), seed=0))
    return path


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if `circuitlab.runner.run` gets as far as loading a model (validation must come first)."""
    import importlib

    def refuse(spec):
        raise AssertionError(f"model {spec!r} was loaded before the input was validated")

    monkeypatch.setattr(importlib.import_module("circuitlab.runner.run"), "_load", refuse)


@pytest.fixture(scope="session")
def architecture_models(tmp_path_factory):
    """Tiny models of every architecture the graph supports, built once per session: native toy models by
    `circuitlab.models.toy.ARCHITECTURES` name, and random HF models ('hf_llama', 'hf_gpt2', 'hf_gemma3')
    made from a `transformers` config and loaded through `load_model` (no download)."""
    from circuitlab import load_model
    from circuitlab.models.toy import ARCHITECTURES, tiny_hf_dir

    built: dict[tuple, object] = {}

    def get(name: str, *, words: list[str], n_layers: int = 2):
        key = (name, tuple(words), n_layers)
        if key not in built:
            if name.startswith("hf_"):
                path = tiny_hf_dir(name[3:], tmp_path_factory.mktemp(name) / "model", words, seed=1)
                built[key] = load_model(path)
            else:
                built[key] = toy_model(words=words, n_layers=n_layers, seed=2, **ARCHITECTURES[name])
        return built[key]

    return get


def masked_identity_logits(engine, clean, corrupt):
    """(all edges kept, all edges ablated, clean forward, corrupt forward) logits under corrupt ablation: the
    two identities every masked-edge engine must meet (kept = clean, ablated = corrupt)."""
    from circuitlab.graph.ablation import ablated_outputs

    ablated = ablated_outputs(engine, "corrupt", clean, corrupt=corrupt)
    n = engine.graph.n_edges
    with torch.no_grad():
        both = engine.run(clean, torch.stack([torch.ones(n), torch.zeros(n)]), ablated)
        return both[0], both[1], engine.model.bridge(clean), engine.model.bridge(corrupt)


IOI_LIKE_ROWS = [
    {"clean": "When Mary and John went to the store , John gave a drink to",
     "corrupt": "When Tom and Anna went to the store , Paul gave a drink to", "answer": " Mary", "wrong": " John"},
    {"clean": "When John and Mary went to the store , Mary gave a drink to",
     "corrupt": "When Tom and Anna went to the store , Paul gave a drink to", "answer": " John", "wrong": " Mary"},
]


@pytest.fixture(scope="session")
def task_file(tmp_path_factory):
    """A two-example IOI-like JSONL task in the toy vocabulary."""
    path = tmp_path_factory.mktemp("task") / "names.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in IOI_LIKE_ROWS))
    return path


# A two-prompt IOI-like task in the toy vocabulary, shared by the discovery and head-analysis tests.
NAMES_ROWS = [
    ("When Mary and John went to the store , John gave a drink to",
     "When Tom and Anna went to the store , Paul gave a drink to", " Mary", " John"),
    ("When John and Mary went to the store , Mary gave a drink to",
     "When Tom and Anna went to the store , Paul gave a drink to", " John", " Mary"),
]


@pytest.fixture(scope="module")
def names_task():
    from circuitlab.tasks.task import Example, Task

    return Task("names", [Example(clean, corrupt, [answer], [wrong]) for clean, corrupt, answer, wrong in NAMES_ROWS])


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)
