"""`run_attribution`: one attribution method on a prepared task -> a `Result` (not yet saved) plus figures
written into `out_dir`.

This is what the `circuitlab attribute` command calls; every method works on one batch of prompts of equal
token length (`PreparedTask.single_batch`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from circuitlab.attribution import plots
from circuitlab.attribution.attention_flow import attention_flow, attention_patterns, attention_rollout
from circuitlab.attribution.attention_gradient import attention_times_gradient
from circuitlab.attribution.attribution_patching import (
    DEFAULT_SITES,
    HEAD_SITES,
    AttributionPatching,
    attribution_patching,
)
from circuitlab.attribution.dla import direct_logit_attribution
from circuitlab.attribution.integrated_gradients import layer_integrated_gradients
from circuitlab.errors import CircuitlabError
from circuitlab.models.model import Model
from circuitlab.results import Result
from circuitlab.tasks.task import Example, PreparedTask, Task, TaskBatch

METHODS = ("dla", "ig", "rollout", "flow", "attn-grad", "atp")


def prompt_task(prompt: str, answer: str, wrong: str | None = None, corrupt: str | None = None) -> Task:
    """A one-prompt task from the command line: logit difference with a wrong answer, else log P(answer).
    Without `corrupt` the clean prompt stands in (methods that need a corruption then say so)."""
    example = Example(clean=prompt, corrupt=corrupt or prompt, answer=[answer], wrong=[wrong] if wrong else [])
    return Task("prompt", [example], metric="logit_diff" if wrong else "logprob", params={"has_corrupt": corrupt is not None})


def run_attribution(
    model: Model, prepared: PreparedTask, method: str, out_dir: str | Path, *, steps: int = 64,
    rule: str = "gausslegendre", baseline: str = "auto", hook: str = "hook_embed", sites: tuple[str, ...] = DEFAULT_SITES,
    prompt: int = 0, seed: int | None = None,
) -> Result:
    """Run `method` (one of METHODS), write its figures into `out_dir` and return the Result (call
    `.save(out_dir)` on it to write results.json / results.csv). With prompts of several token lengths, the
    largest group of equal length is used (`params['prompt_indices']` lists it)."""
    if method not in METHODS:
        raise CircuitlabError(f"unknown attribution method {method!r}; choose one of {', '.join(METHODS)}")
    if len(prepared.batches) > 1:  # positions must mean the same thing: keep the largest same-length group
        prepared = prepared.largest_group()
    batch = prepared.single_batch()
    if not 0 <= prompt < batch.size:
        raise CircuitlabError(f"prompt index {prompt} out of range: the task has {batch.size} prompts of this length")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokens = [prepared.str_tokens[i] for i in batch.indices]
    start = time.perf_counter()
    params: dict[str, Any] = {"method": method, "n_prompts": batch.size, "prompt_indices": batch.indices,
                              "metric": prepared.metric_name}
    if method == "dla":
        records, summary, artifacts = _dla(model, batch, tokens[0], out)
    elif method == "ig":
        if baseline == "auto":  # the corrupt prompt when there is one (see integrated_gradients.py)
            baseline = "corrupt" if prepared.task.params.get("has_corrupt", True) else "pad"
        params.update(steps=steps, rule=rule, baseline=baseline, hook=hook)
        result = layer_integrated_gradients(model, batch, prepared.metric, hook=hook, baseline=baseline, steps=steps, rule=rule)
        records, summary = result.records(tokens), result.summary()
        artifacts = [plots.coloured_text(tokens, result.attributions, out / "ig_tokens.png",
                                         title=f"integrated gradients at {hook} ({rule}, {steps} steps, {baseline} baseline)")]
    elif method in ("rollout", "flow"):
        params["prompt"] = prompt
        records, summary, artifacts = _flow(model, batch, tokens[prompt], prompt, method, out)
    elif method == "attn-grad":
        result = attention_times_gradient(model, batch, prepared.metric)
        records, summary = result.records(), {"max_abs_head_score": float(result.head_scores.abs().max())}
        artifacts = [plots.heatmap(result.head_scores, out / "attn_grad_heads.png", title="attention x gradient per head",
                                   xlabel="head", ylabel="layer")]
    else:
        if not prepared.task.params.get("has_corrupt", True):
            raise CircuitlabError("attribution patching needs a corrupt prompt: pass --corrupt (or use --task)")
        params["sites"] = list(sites)
        result = attribution_patching(model, batch, prepared.metric, sites=sites)
        records = result.records()
        summary = {"clean_metric": result.clean_metric, "corrupt_metric": result.corrupt_metric}
        artifacts = _atp_figures(result, tokens[0], out)
    elapsed = time.perf_counter() - start
    return Result(f"attribute/{method}", model.info(), prepared.task.info(), params, records, seed=seed, timing_s=elapsed,
                  load_s=model.load_s, summary=summary, artifacts=[Path(a).name for a in artifacts])


def _dla(model: Model, batch: TaskBatch, tokens: list[str], out: Path) -> tuple[list[dict], dict, list[Path]]:
    result = direct_logit_attribution(model, batch)
    top = sorted(result.records(), key=lambda r: -abs(r["value"]))[:5]
    summary = {
        "logit_diff_mean": float(result.target.mean()), "components_sum_mean": float(result.total.mean()),
        "relative_error": result.relative_error, "top_components": [r["component"] for r in top],
    }
    artifacts = [
        plots.heatmap(result.head_values().mean(0), out / "dla_heads.png", title="direct logit attribution per head",
                      xlabel="head", ylabel="layer"),
        plots.layer_bars({k: v.mean(0) for k, v in result.layer_values().items()}, out / "dla_layers.png",
                         title="direct logit attribution per layer"),
        plots.heatmap(result.layer_by_position(), out / "dla_positions.png", xticklabels=tokens,
                      title="direct logit attribution per layer at every position", xlabel="position", ylabel="layer"),
    ]
    return result.records(), summary, artifacts


def _flow(model: Model, batch: TaskBatch, tokens: list[str], prompt: int, method: str, out: Path) -> tuple[list[dict], dict, list[Path]]:
    patterns = attention_patterns(model, batch.clean[prompt: prompt + 1])[0]
    target = int(batch.answer_pos[prompt])
    if method == "rollout":
        values = attention_rollout(patterns)[:, target, :]  # [layer, src]
    else:
        values = attention_flow(patterns, target=target)
    records = [{"layer": layer, "pos": pos, "token": tokens[pos], "value": float(values[layer, pos])}
               for layer in range(values.shape[0]) for pos in range(values.shape[1])]
    summary = {"target_pos": target, "final_layer": [float(v) for v in values[-1]]}
    artifacts = [plots.heatmap(values, out / f"{method}.png", title=f"attention {method} into position {target}",
                               xlabel="source token", ylabel="layer", xticklabels=tokens, signed=False)]
    return records, summary, artifacts


def _atp_figures(result: AttributionPatching, tokens: list[str], out: Path) -> list[Path]:
    paths = []
    for site, values in result.effects.items():
        if site in HEAD_SITES:  # [layer, pos, head] -> each head over all positions (first order: the sum)
            name = "atp_heads.png" if site == "z" else f"atp_{site}_heads.png"
            paths.append(plots.heatmap(values.sum(1), out / name, title=f"attribution patching: {site} per head "
                                       "(all positions)", xlabel="head", ylabel="layer"))
            continue
        paths.append(plots.heatmap(values, out / f"atp_{site}.png", title=f"attribution patching: {site}",
                                   xlabel="position", ylabel="layer", xticklabels=tokens))
    return paths
