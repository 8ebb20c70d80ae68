"""The registered attribution analyses: options validated without a model, and every prompt of a task
with two token lengths attributed (none dropped), the combined results still meeting their identities."""

from __future__ import annotations

import importlib

import pytest
import torch
from matplotlib.figure import Figure

from circuitlab.attribution.analysis import AtPParams, IGParams, PromptIndex
from circuitlab.attribution.attribution_patching import attribution_patching
from circuitlab.attribution.dla import direct_logit_attribution
from circuitlab.errors import AttributionError
from circuitlab.runner import get_analysis, run
from circuitlab.tasks import Task
from circuitlab.tasks.task import prompt_task

from .toys import EPS32, EXAMPLES, ROUNDING, SHORT, rounding_bound

NAMES = ["attribute/dla", "attribute/ig", "attribute/rollout", "attribute/flow", "attribute/attn-grad", "attribute/atp"]


@pytest.fixture(scope="module")
def two_lengths():
    """Three prompts of 15 tokens and two of 13 (with BOS), interleaved so task order != batch order."""
    examples = [EXAMPLES[0], SHORT[0], EXAMPLES[1], SHORT[1], EXAMPLES[2]]
    return Task("two-lengths", examples)


@pytest.mark.parametrize("name", NAMES)
def test_entries_are_registered(name):
    assert get_analysis(name).name == name


@pytest.mark.parametrize(("make", "message"), [
    (lambda: IGParams(steps=0), "steps >= 1"),
    (lambda: IGParams(rule="riemann_trapezoid", steps=1), "steps >= 2"),
    (lambda: IGParams(rule="simpson"), "unknown integration rule 'simpson'; choose one of riemann_left"),
    (lambda: IGParams(baseline="noise"), "unknown baseline 'noise'; choose one of auto, zero, pad, bos, corrupt"),
    (lambda: IGParams(hook=""), "hook must be"),
    (lambda: PromptIndex(-1), "index must be an integer >= 0"),
    (lambda: PromptIndex(1.5), "index must be an integer >= 0"),
    (lambda: AtPParams(("z", "embed_out")), "unknown attribution-patching site 'embed_out'; choose from resid_pre"),
    (lambda: AtPParams(()), "at least one site"),
])
def test_params_validate_without_a_model(make, message):
    with pytest.raises(AttributionError, match=message):
        make()


def test_atp_sites_from_a_string():
    assert AtPParams("z, q").sites == ("z", "q")


def test_runs_refuse_a_missing_corruption_before_loading(toy_dir, monkeypatch):
    runner_run = importlib.import_module("circuitlab.runner.run")  # the module (the package exports the verb)
    task = prompt_task("When Mary and John went to the store , John gave a drink to", " Mary", " John")
    monkeypatch.setattr(runner_run, "_load", lambda spec: pytest.fail("the model was loaded"))
    with pytest.raises(AttributionError, match="needs a corrupt prompt"):
        run("attribute/atp", model=str(toy_dir), task=task)
    with pytest.raises(AttributionError, match="needs a corrupt prompt"):
        run("attribute/ig", model=str(toy_dir), task=task, baseline="corrupt")


def test_dla_combines_every_length(toy, two_lengths):
    done = run("attribute/dla", model=toy, task=two_lengths)
    out = done.output
    assert done.result.summary["n_prompts"] == 5 and sorted(done.result.summary["token_lengths"]) == [13, 15]
    combined = out.combined
    assert combined.values.shape[0] == 5
    # the identity holds for every prompt: components sum to the model's own logit difference
    scale = combined.values.abs().sum(-1)
    assert bool(((combined.total - combined.target).abs() <= ROUNDING * EPS32 * scale).all())
    # records are means over all five prompts = the size-weighted mean of the two groups' means
    prepared = two_lengths.prepare(toy)
    parts = [direct_logit_attribution(toy, b) for b in prepared.batches]
    weighted = sum(p.values.sum(0) for p in parts) / 5
    values = torch.tensor([r["value"] for r in done.result.records])
    assert float((values - weighted).abs().max()) <= rounding_bound(scale.max())
    figures = out.figures()
    assert set(figures) == {"dla_heads.png", "dla_layers.png", "dla_positions.png"}
    assert all(isinstance(f, Figure) and f.dpi == 110 for f in figures.values())
    assert "the 3 of 5 prompts with 15 tokens" in figures["dla_positions.png"].axes[0].get_title()


def test_ig_combines_every_length(toy, two_lengths):
    done = run("attribute/ig", model=toy, task=two_lengths, steps=16, baseline="pad")
    records = done.result.records
    assert sorted({r["prompt"] for r in records}) == [0, 1, 2, 3, 4]
    lengths = {i: sum(r["prompt"] == i for r in records) for i in range(5)}
    assert lengths == {0: 15, 1: 13, 2: 15, 3: 13, 4: 15}
    # completeness, per prompt of either length: sum_pos IG = f(x) - f(x'), to the quadrature + rounding
    for part, batch in zip(done.output.parts, done.output.groups.batches, strict=True):
        by_prompt = {i: sum(r["value"] for r in records if r["prompt"] == i) for i in batch.indices}
        total = torch.tensor([by_prompt[i] for i in batch.indices], dtype=torch.float64)
        gap = (total - (part.f_input - part.f_baseline).double()).abs()
        assert bool((gap <= part.completeness_gap.double() + rounding_bound(part.full.abs().sum())).all())
    assert done.result.summary["n_prompts"] == 5
    assert set(done.output.figures()) == {"ig_tokens.png"}


def test_atp_combines_every_length(toy, two_lengths):
    done = run("attribute/atp", model=toy, task=two_lengths, sites=("z", "resid_pre"))
    out = done.output
    prepared = two_lengths.prepare(toy)
    parts = [attribution_patching(toy, b, prepared.metric, sites=["z", "resid_pre"]) for b in prepared.batches]
    sizes = [b.size for b in prepared.batches]
    clean = sum(n * p.clean_metric for n, p in zip(sizes, parts, strict=True)) / 5
    corrupt = sum(n * p.corrupt_metric for n, p in zip(sizes, parts, strict=True)) / 5
    assert done.result.summary["clean_metric"] == pytest.approx(clean, rel=ROUNDING * EPS32)
    # summing every cell over lengths and positions gives the whole task's first-order effect
    raw = sum(n * p.head_all_positions() * (p.clean_metric - p.corrupt_metric) for n, p in zip(sizes, parts, strict=True))
    expected = raw / 5 / (clean - corrupt)
    heads = torch.zeros_like(expected)
    for r in done.result.records:
        if r["site"] == "z":
            heads[r["layer"], r["head"]] += r["value"]
    assert float((heads - expected).abs().max()) <= rounding_bound(expected.abs().sum())
    assert {r["length"] for r in done.result.records} == {13, 15}
    assert set(out.figures()) == {"atp_heads.png", "atp_resid_pre.png"}


def test_attn_grad_combines_every_length(toy, two_lengths):
    done = run("attribute/attn-grad", model=toy, task=two_lengths)
    per_prompt = torch.cat([p.prompt_head_scores for p in done.output.parts])
    assert per_prompt.shape[0] == 5
    values = torch.tensor([r["value"] for r in done.result.records]).reshape(per_prompt.shape[1:])
    assert torch.equal(values, per_prompt.mean(0))


@pytest.mark.parametrize("method", ["rollout", "flow"])
def test_rollout_and_flow_index_counts_every_prompt(toy, two_lengths, method):
    done = run(f"attribute/{method}", model=toy, task=two_lengths, index=3, bos="include")  # SHORT[1]: 13 tokens
    assert done.result.summary["prompt"] == 3 and done.result.summary["bos"] == "include"
    assert len({r["pos"] for r in done.result.records}) == 13
    assert done.result.records[0]["token"] == two_lengths.prepare(toy).str_tokens[3][0]
    # The default for a model with BOS: excluded, positions 1..12 remain, every row a distribution.
    auto = run(f"attribute/{method}", model=toy, task=two_lengths, index=3)
    assert auto.result.summary["bos"] == "exclude" and auto.result.summary["sources"] == list(range(1, 13))
    assert {r["pos"] for r in auto.result.records} == set(range(1, 13))
    assert auto.result.records[0]["token"] == two_lengths.prepare(toy).str_tokens[3][1]
    tol = 64 * torch.finfo(torch.float32).eps
    assert abs(sum(auto.result.summary["final_layer"]) - 1) <= tol
    if method == "flow":  # normalised as the authors' compute_flows, the raw max flow kept
        rows = [r for r in auto.result.records if r["layer"] == 0]
        total = sum(r["raw"] for r in rows)
        assert all(r["value"] == pytest.approx(r["raw"] / total, rel=1e-12) for r in rows)
    with pytest.raises(AttributionError, match="prompt index 5 out of range.*--index 0..4"):
        run(f"attribute/{method}", model=toy, task=two_lengths, index=5)
