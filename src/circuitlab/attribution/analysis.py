"""The attribution methods as registered analyses (``attribute/dla``, ``attribute/ig``, ...): options,
and result objects that give the runner records, a summary and figures.

Prompts of several token lengths: a task is prepared into one batch per token length. The methods that
read one position per prompt (direct logit attribution, integrated gradients, attention x gradient,
attribution patching) run every batch and combine them, so no prompt is dropped: per-prompt values are
concatenated, means over prompts are therefore weighted by batch size, and a figure over positions shows
one batch and says which when there are several. Rollout and flow show one prompt (`index` counts every
prompt of the task). See docs/METHODS.md for each method.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float

from circuitlab.analysis import Analysis, NoParams, ShardSpec
from circuitlab.attribution import plots
from circuitlab.attribution.attention_flow import (
    attention_flow,
    attention_patterns,
    attention_rollout,
    normalised_flow,
)
from circuitlab.attribution.attention_gradient import AttentionGradient, attention_times_gradient
from circuitlab.attribution.attribution_patching import (
    DEFAULT_SITES,
    HEAD_SITES,
    AtPSums,
    AttributionPatching,
    attribution_patching_sums,
    check_sites,
)
from circuitlab.attribution.attribution_patching import check_direction as check_atp_direction
from circuitlab.attribution.dla import ComponentAttribution, DirectLogitAttribution, direct_logit_attribution
from circuitlab.attribution.integrated_gradients import (
    BASELINES,
    EMBED_HOOK,
    IntegratedGradients,
    layer_integrated_gradients,
)
from circuitlab.attribution.quadrature import check_rule
from circuitlab.errors import AnalysisError, AttributionError
from circuitlab.models.model import Model
from circuitlab.tasks.metrics import normalised
from circuitlab.tasks.source import TaskSource
from circuitlab.tasks.task import PreparedTask, Task, TaskBatch

if TYPE_CHECKING:
    from matplotlib.figure import Figure

IG_BASELINES = ("auto", *BASELINES)  # auto: the corrupt prompt when there is one, else the pad token
# Above this relative completeness gap an IG run says so on stderr and in its summary.
COMPLETENESS_TOLERANCE = 0.01


# --- options -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class IGParams:
    """Integrated gradients: `steps` points of the quadrature `rule`, from `baseline` to the prompt, at `hook`."""

    steps: int = 64
    rule: str = "gausslegendre"
    baseline: str = "auto"
    hook: str = EMBED_HOOK

    def __post_init__(self) -> None:
        check_rule(self.rule, self.steps)
        if self.baseline not in IG_BASELINES:
            raise AttributionError(f"unknown baseline {self.baseline!r}; choose one of {', '.join(IG_BASELINES)}")
        if not isinstance(self.hook, str) or not self.hook:
            raise AttributionError(f"hook must be a hook name such as {EMBED_HOOK!r}, got {self.hook!r}")


BOS_CHOICES = ("auto", "include", "exclude")


@dataclass(frozen=True)
class PromptIndex:
    """Rollout and flow: the prompt shown (`index`, counted over every prompt of the task from 0) and whether
    BOS is a source (`bos`: "exclude" drops it and renormalises the rows; "include" keeps it; "auto", the
    default, excludes it when the prompt starts with the model's BOS token)."""

    index: int = 0
    bos: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.index, bool) or not isinstance(self.index, int) or self.index < 0:
            raise AttributionError(f"index must be an integer >= 0 (the task's prompts count from 0), got {self.index!r}")
        if self.bos not in BOS_CHOICES:
            raise AttributionError(f"unknown bos choice {self.bos!r}; choose include, exclude or auto (exclude when "
                                   "the model has a BOS token)")


@dataclass(frozen=True)
class AtPParams:
    """Attribution patching: the sites estimated (one backward gives them all) and the direction estimated
    ("denoise": clean into corrupt, gradient at the corrupt run; "noise": corrupt into clean, gradient at
    the clean run), named as in activation patching."""

    sites: tuple[str, ...] = DEFAULT_SITES
    direction: str = "denoise"

    def __post_init__(self) -> None:
        sites = self.sites.split(",") if isinstance(self.sites, str) else self.sites
        object.__setattr__(self, "sites", check_sites(tuple(s.strip() for s in sites)))
        check_atp_direction(self.direction)


def _has_corrupt(task: Task) -> bool:
    """False for a one-prompt task given without a corrupt prompt (see `tasks.task.prompt_task`)."""
    return bool(task.params.get("has_corrupt", True))


def _atp_source(source: TaskSource, params: AtPParams) -> TaskSource:
    if source.task is not None and not _has_corrupt(source.task):
        raise AttributionError("attribution patching needs a corrupt prompt: pass --corrupt (or use --task)")
    return source


def _ig_source(source: TaskSource, params: IGParams) -> TaskSource:
    if params.baseline == "corrupt" and source.task is not None and not _has_corrupt(source.task):
        raise AttributionError("baseline 'corrupt' needs a corrupt prompt: pass --corrupt, or choose --baseline "
                               "auto, pad, bos or zero")
    return source


# --- shared helpers ------------------------------------------------------------------------------------

def _prepare(model: Model, task: Task | None) -> PreparedTask:
    if task is None:
        raise AnalysisError("attribution needs a task: a built-in name, a .jsonl/.csv file or a prompt")
    return task.prepare(model)


@dataclass
class Groups:
    """The prompts of a task as batches of one token length each, with their readable tokens."""

    batches: list[TaskBatch]
    tokens: list[list[list[str]]]  # per batch, per prompt

    @staticmethod
    def of(prepared: PreparedTask) -> Groups:
        return Groups(list(prepared.batches), [[prepared.str_tokens[i] for i in b.indices] for b in prepared.batches])

    @property
    def n_prompts(self) -> int:
        return sum(b.size for b in self.batches)

    @property
    def lengths(self) -> list[int]:
        return [b.n_pos for b in self.batches]

    @property
    def shown(self) -> int:
        """The batch a figure over positions shows: the largest (the first of equal size)."""
        return max(range(len(self.batches)), key=lambda g: (self.batches[g].size, -g))

    def note(self) -> str:
        """'' for one batch; else which prompts a position figure shows."""
        if len(self.batches) == 1:
            return ""
        batch = self.batches[self.shown]
        return f" [the {batch.size} of {self.n_prompts} prompts with {batch.n_pos} tokens]"

    def info(self) -> dict[str, Any]:
        return {"n_prompts": self.n_prompts, "token_lengths": self.lengths}


def _merged_parts(runs: list[Any]) -> tuple[Groups, list[Any]]:
    """Prompt shards' runs (DLA, IG: `groups` and one per-prompt `parts` entry per batch) as the whole task's:
    its token-length groups (`_regroup`) and, per group, its members' parts joined prompt by prompt."""
    groups, members = _regroup([run.groups for run in runs])
    return groups, [_cat_parts([runs[s].parts[b] for s, b in group]) for group in members]


def _cat_parts(parts: list[Any]) -> Any:
    """Per-prompt results of one token length (dataclasses whose tensors have the prompt first) as one."""
    if len(parts) == 1:
        return parts[0]
    tensors = {f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(parts[0])
               if f.init and isinstance(getattr(parts[0], f.name), torch.Tensor)}
    return replace(parts[0], **tensors)


def _regroup(shards: list[Groups]) -> tuple[Groups, list[list[tuple[int, int]]]]:
    """Prompt shards' token-length groups as the whole task's (`PreparedTask.build` groups prompts by their
    clean and corrupt token lengths, in sorted order; a group can span shards): the merged groups, each
    batch's prompts numbered in the task, and per merged group its members as (shard, batch) pairs. One
    shard (a whole task) comes back as it is."""
    members: dict[tuple[int, int], list[tuple[int, int]]] = {}
    offsets, offset = [], 0
    for s, groups in enumerate(shards):
        offsets.append(offset)
        offset += groups.n_prompts
        for b, batch in enumerate(groups.batches):
            members.setdefault((batch.n_pos, int(batch.corrupt.shape[1])), []).append((s, b))
    keys = sorted(members)  # shards keep task order, so each group's prompts stay in task order
    batches = [_cat_batches([replace(shards[s].batches[b], indices=[offsets[s] + i for i in shards[s].batches[b].indices])
                             for s, b in members[key]]) for key in keys]
    tokens = [[t for s, b in members[key] for t in shards[s].tokens[b]] for key in keys]
    return Groups(batches, tokens), [members[key] for key in keys]


def _cat_batches(batches: list[TaskBatch]) -> TaskBatch:
    """Batches of one token length as one (answer and wrong ids padded with -1 to the widest)."""
    if len(batches) == 1:
        return batches[0]

    def padded(ids: list[torch.Tensor]) -> torch.Tensor:
        width = max(t.shape[1] for t in ids)
        return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1]), value=-1) for t in ids])

    first = batches[0]
    return TaskBatch(
        clean=torch.cat([b.clean for b in batches]), corrupt=torch.cat([b.corrupt for b in batches]),
        answers=padded([b.answers for b in batches]), wrong=padded([b.wrong for b in batches]),
        answer_pos=torch.cat([b.answer_pos for b in batches]), indices=[i for b in batches for i in b.indices],
        targets=None if first.targets is None else torch.cat([b.targets for b in batches if b.targets is not None]),
        extra={k: torch.cat([b.extra[k] for b in batches]) for k in first.extra},
        reference_logprobs=(None if first.reference_logprobs is None
                            else torch.cat([b.reference_logprobs for b in batches if b.reference_logprobs is not None])),
    )


# --- direct logit attribution --------------------------------------------------------------------------

@dataclass
class DLARun:
    """DLA of every prompt: `parts` per token length, `combined` = all prompts' component values."""

    groups: Groups
    parts: list[DirectLogitAttribution]
    combined: ComponentAttribution = field(init=False)

    def __post_init__(self) -> None:
        self.combined = ComponentAttribution.concat(list(self.parts))

    def records(self) -> list[dict[str, Any]]:
        return self.combined.records()

    def summary(self) -> dict[str, Any]:
        top = sorted(self.records(), key=lambda r: -abs(r["value"]))[:5]
        c = self.combined
        return {"logit_diff_mean": float(c.target.mean()), "components_sum_mean": float(c.total.mean()),
                "relative_error": c.relative_error, "top_components": [r["component"] for r in top],
                **self.groups.info()}

    def figures(self) -> dict[str, Figure]:
        shown = self.groups.shown
        tokens = self.groups.tokens[shown][0]
        return {
            "dla_heads.png": plots.heatmap(self.combined.head_values().mean(0), xlabel="head", ylabel="layer",
                                           title="direct logit attribution per head"),
            "dla_layers.png": plots.layer_bars({k: v.mean(0) for k, v in self.combined.layer_values().items()},
                                               title="direct logit attribution per layer"),
            "dla_positions.png": plots.heatmap(
                self.parts[shown].layer_by_position(), xticklabels=tokens, xlabel="position", ylabel="layer",
                title="direct logit attribution per layer at every position" + self.groups.note()),
        }


def _dla(model: Model, task: Task | None, params: NoParams) -> DLARun:
    groups = Groups.of(_prepare(model, task))
    return DLARun(groups, [direct_logit_attribution(model, batch) for batch in groups.batches])


def _dla_merge(model: Model, task: Task, partials: list[DLARun], params: NoParams) -> DLARun:
    """Shards' per-prompt component values side by side: the means over prompts are the whole task's."""
    return DLARun(*_merged_parts(partials))


# --- integrated gradients ------------------------------------------------------------------------------

@dataclass
class IGRun:
    """Integrated gradients of every prompt: one `IntegratedGradients` per token length. `requested` is the
    baseline asked for ("auto" resolves to "corrupt" or "pad"); `warning` is set when completeness misses
    by more than `COMPLETENESS_TOLERANCE` of f(x) - f(x')."""

    groups: Groups
    parts: list[IntegratedGradients]
    requested: str = ""
    warning: str | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        gap = float(self._cat(lambda p: p.relative_gap).max())
        if gap > COMPLETENESS_TOLERANCE:
            first = self.parts[0]
            why = (" (--baseline auto fell back to pad: no corrupt prompt was given)"
                   if self.requested == "auto" and first.baseline == "pad" else "")
            self.warning = (
                f"integrated gradients misses completeness by {gap:.1%} of f(x) - f(x') with the {first.baseline} "
                f"baseline{why}: the attributions do not add up to the metric change, so do not read them as "
                f"shares of it. Fix: pass --corrupt (a corrupt prompt as the baseline; on SmolLM2 it meets "
                f"completeness to 1e-6), or more --steps (now {first.steps}) if the gap shrinks with them")

    def _cat(self, get: Callable[[IntegratedGradients], torch.Tensor]) -> torch.Tensor:
        return torch.cat([get(p) for p in self.parts])

    def records(self) -> list[dict[str, Any]]:
        """One row per prompt and position; `prompt` is the example's index in the task."""
        rows = []
        for batch, tokens, part in zip(self.groups.batches, self.groups.tokens, self.parts, strict=True):
            for row in part.records(tokens):
                rows.append({**row, "prompt": batch.indices[row["prompt"]]})
        return sorted(rows, key=lambda r: (r["prompt"], r["pos"]))

    def summary(self) -> dict[str, Any]:
        first = self.parts[0]
        return {
            "hook": first.hook, "rule": first.rule, "steps": first.steps, "baseline": first.baseline,
            "f_input_mean": float(self._cat(lambda p: p.f_input).mean()),
            "f_baseline_mean": float(self._cat(lambda p: p.f_baseline).mean()),
            "max_completeness_gap": float(self._cat(lambda p: p.completeness_gap).max()),
            "max_relative_gap": float(self._cat(lambda p: p.relative_gap).max()),
            "baseline_requested": self.requested or first.baseline,
            "completeness_ok": self.warning is None,
            **({"warning": self.warning} if self.warning else {}),
            **self.groups.info(),
        }

    def figures(self) -> dict[str, Figure]:
        first = self.parts[0]
        rows = sorted(((index, tokens, part.attributions[b])
                       for batch, tokens_of, part in zip(self.groups.batches, self.groups.tokens, self.parts, strict=True)
                       for b, (index, tokens) in enumerate(zip(batch.indices, tokens_of, strict=True))),
                      key=lambda r: r[0])  # task order
        title = f"integrated gradients at {first.hook} ({first.rule}, {first.steps} steps, {first.baseline} baseline)"
        return {"ig_tokens.png": plots.coloured_text([r[1] for r in rows], [r[2] for r in rows], title=title)}


def _ig(model: Model, task: Task | None, params: IGParams) -> IGRun:
    run = _ig_run(model, task, params)
    if run.warning:  # loud: a number that does not add up must not pass silently
        print(f"warning: {run.warning}", file=sys.stderr)
    return run


def _ig_run(model: Model, task: Task | None, params: IGParams) -> IGRun:
    """`_ig` without the warning (a prompt shard's part; the merged run warns once)."""
    prepared = _prepare(model, task)
    baseline = params.baseline
    if baseline == "auto":  # the corrupt prompt when there is one (see integrated_gradients.py)
        baseline = "corrupt" if _has_corrupt(prepared.task) else "pad"
    groups = Groups.of(prepared)
    run = IGRun(groups, [
        layer_integrated_gradients(model, batch, prepared.metric, hook=params.hook, baseline=baseline,
                                   steps=params.steps, rule=params.rule)
        for batch in groups.batches
    ], params.baseline)
    return run


def _ig_merge(model: Model, task: Task, partials: list[IGRun], params: IGParams) -> IGRun:
    """Shards' per-prompt attributions side by side, prompts numbered in the task (one row per prompt)."""
    run = IGRun(*_merged_parts(partials), params.baseline)
    if run.warning:
        print(f"warning: {run.warning}", file=sys.stderr)
    return run


# --- attention rollout and flow ------------------------------------------------------------------------

@dataclass
class FlowRun:
    """Rollout or flow of one prompt into its answer position: values [layer, source], source j being
    prompt position `positions[j]` (1.. when BOS is excluded). For flow, `values` are normalised (each row
    divided by its sum, as the authors' `compute_flows`) and `raw` keeps the max-flow values."""

    method: str
    prompt: int
    tokens: list[str]
    target_pos: int
    values: Float[torch.Tensor, "layer src"]
    bos: str = "include"
    positions: list[int] = field(default_factory=list)
    raw: Float[torch.Tensor, "layer src"] | None = None

    def __post_init__(self) -> None:
        if not self.positions:
            self.positions = list(range(self.values.shape[1]))

    def records(self) -> list[dict[str, Any]]:
        rows = []
        for layer in range(self.values.shape[0]):
            for j, pos in enumerate(self.positions):
                row = {"layer": layer, "pos": pos, "token": self.tokens[pos], "value": float(self.values[layer, j])}
                if self.raw is not None:
                    row["raw"] = float(self.raw[layer, j])
                rows.append(row)
        return rows

    def summary(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "target_pos": self.target_pos, "bos": self.bos,
                "sources": self.positions, "final_layer": [float(v) for v in self.values[-1]]}

    def figures(self) -> dict[str, Figure]:
        shown = "BOS excluded" if self.bos == "exclude" else "BOS included"
        return {f"{self.method}.png": plots.heatmap(
            self.values, xlabel="source token", ylabel="layer", xticklabels=[self.tokens[p] for p in self.positions],
            signed=False, title=f"attention {self.method} into position {self.target_pos} (prompt {self.prompt}, {shown})")}


def _locate(prepared: PreparedTask, index: int) -> tuple[TaskBatch, int]:
    """The batch holding example `index` and its row there; an `AttributionError` when out of range."""
    for batch in prepared.batches:
        if index in batch.indices:
            return batch, batch.indices.index(index)
    raise AttributionError(f"prompt index {index} out of range: task {prepared.task.name!r} has "
                           f"{prepared.n_prompts} prompt(s); use --index 0..{prepared.n_prompts - 1}")


def _flow_compute(method: str) -> Callable[[Model, Task | None, PromptIndex], FlowRun]:
    def compute(model: Model, task: Task | None, params: PromptIndex) -> FlowRun:
        prepared = _prepare(model, task)
        batch, row = _locate(prepared, params.index)
        tokens = batch.clean[row: row + 1]
        exclude = _exclude_bos(model, tokens, params.bos)
        patterns = attention_patterns(model, tokens)[0]
        target = int(batch.answer_pos[row])
        positions = list(range(int(exclude), tokens.shape[1]))
        bos = "exclude" if exclude else "include"
        str_tokens = prepared.str_tokens[params.index]
        if method == "rollout":
            values = attention_rollout(patterns, exclude_bos=exclude)[:, target - int(exclude), :]  # [layer, src]
            return FlowRun(method, params.index, str_tokens, target, values, bos, positions)
        raw = attention_flow(patterns, target=target, exclude_bos=exclude)
        return FlowRun(method, params.index, str_tokens, target, normalised_flow(raw), bos, positions, raw)

    return compute


def _exclude_bos(model: Model, tokens: torch.Tensor, bos: str) -> bool:
    """Whether to drop position 0: 'auto' = when the prompt starts with the model's BOS token."""
    starts_with_bos = model.bos_token_id is not None and int(tokens[0, 0]) == model.bos_token_id
    if bos == "exclude" and not starts_with_bos:
        raise AttributionError(f"--bos exclude: {model.spec}'s prompts do not start with a BOS token; use --bos include")
    if bos == "exclude" and tokens.shape[1] < 2:
        raise AttributionError("--bos exclude: the prompt is BOS alone; pass a longer prompt or --bos include")
    return bos == "exclude" or (bos == "auto" and starts_with_bos and tokens.shape[1] > 1)


# --- attention x gradient ------------------------------------------------------------------------------

@dataclass
class AttentionGradientRun:
    """Attention x gradient of every prompt; head scores are means over all prompts."""

    groups: Groups
    parts: list[AttentionGradient]

    @property
    def head_scores(self) -> Float[torch.Tensor, "layer head"]:
        return torch.cat([p.prompt_head_scores for p in self.parts]).mean(0)

    def records(self) -> list[dict[str, Any]]:
        heads = self.head_scores
        return [{"layer": layer, "head": head, "value": float(heads[layer, head])}
                for layer in range(heads.shape[0]) for head in range(heads.shape[1])]

    def summary(self) -> dict[str, Any]:
        return {"max_abs_head_score": float(self.head_scores.abs().max()), **self.groups.info()}

    def figures(self) -> dict[str, Figure]:
        return {"attn_grad_heads.png": plots.heatmap(self.head_scores, xlabel="head", ylabel="layer",
                                                     title="attention x gradient per head")}


def _attn_grad(model: Model, task: Task | None, params: NoParams) -> AttentionGradientRun:
    prepared = _prepare(model, task)
    groups = Groups.of(prepared)
    return AttentionGradientRun(groups, [attention_times_gradient(model, b, prepared.metric) for b in groups.batches])


# --- attribution patching ------------------------------------------------------------------------------

@dataclass
class AttributionPatchingRun:
    """Attribution patching of every prompt, from `sums` (one `AtPSums` per token-length group of `groups`);
    `parts` are the groups' own normalised results.

    With one token length, `effects` are that batch's normalised effects. With several, each batch's cell
    is its share of the whole task's normalised value: (n_b / N) * (m_b - k_b) / (clean - corrupt), m_b the
    batch's estimated patched metric, k_b its corrupt metric and clean, corrupt the means over all N prompts,
    so summing a cell over batches gives the whole-task first-order value (rows then carry the batch's token
    `length`). Over positions, the changes add: value(all positions) = base + sum_p (value_p - base), base
    = 0 for denoising and 1 for noising (`bases` holds each batch's share of it).
    """

    groups: Groups
    sums: list[AtPSums]
    parts: list[AttributionPatching] = field(init=False)
    clean_metric: float = field(init=False)
    corrupt_metric: float = field(init=False)
    effects: list[dict[str, torch.Tensor]] = field(init=False)
    bases: list[float] = field(init=False)

    def __post_init__(self) -> None:
        self.parts = [s.finish() for s in self.sums]
        sizes = [b.size for b in self.groups.batches]
        n = sum(sizes)
        self.clean_metric = sum(s * p.clean_metric for s, p in zip(sizes, self.parts, strict=True)) / n
        self.corrupt_metric = sum(s * p.corrupt_metric for s, p in zip(sizes, self.parts, strict=True)) / n
        if len(self.parts) == 1:
            self.clean_metric, self.corrupt_metric = self.parts[0].clean_metric, self.parts[0].corrupt_metric
            self.effects = [self.parts[0].effects]
            self.bases = [self.parts[0].baseline]
            return
        gap = self.clean_metric - self.corrupt_metric
        normalised(self.clean_metric, self.clean_metric, self.corrupt_metric)  # a MetricError when gap ~ 0
        # Each batch's normalised values use its own clean/corrupt: re-express them on the task's scale.
        weights = [(s / n) * (p.clean_metric - p.corrupt_metric) / gap for s, p in zip(sizes, self.parts, strict=True)]
        self.effects = [{site: values * w for site, values in p.effects.items()}
                        for w, p in zip(weights, self.parts, strict=True)]
        self.bases = [p.baseline * w for w, p in zip(weights, self.parts, strict=True)]

    @property
    def direction(self) -> str:
        return self.parts[0].direction

    def records(self) -> list[dict[str, Any]]:
        several = len(self.parts) > 1
        rows = []
        for length, effects in zip(self.groups.lengths, self.effects, strict=True):
            part = AttributionPatching(effects, self.clean_metric, self.corrupt_metric, self.direction)
            rows += [{**r, "length": length} if several else r for r in part.records()]
        return rows

    def summary(self) -> dict[str, Any]:
        return {"direction": self.direction, "clean_metric": self.clean_metric, "corrupt_metric": self.corrupt_metric,
                **self.groups.info()}

    def figures(self) -> dict[str, Figure]:
        shown = self.groups.shown
        out = {}
        for site in self.effects[0]:
            if site in HEAD_SITES:  # [layer, pos, head] -> each head over all positions (first order: changes add)
                name = "atp_heads.png" if site == "z" else f"atp_{site}_heads.png"
                out[name] = plots.heatmap(self.head_values(site), xlabel="head", ylabel="layer",
                                          title=f"attribution patching ({self.direction}): {site} per head (all positions)")
                continue
            out[f"atp_{site}.png"] = plots.heatmap(
                self.effects[shown][site], xlabel="position", ylabel="layer", xticklabels=self.groups.tokens[shown][0],
                title=f"attribution patching ({self.direction}): {site}" + self.groups.note())
        return out

    def head_values(self, site: str = "z") -> Float[torch.Tensor, "layer head"]:
        """A per-head site's value of each head patched at every position of every prompt (its figure)."""
        return sum(self.bases) + torch.stack(
            [(e[site] - base).sum(1) for e, base in zip(self.effects, self.bases, strict=True)]).sum(0)


@dataclass
class AtPShard:
    """Attribution patching of some prompts (the task, or a prompt shard of it) before normalising: one
    `AtPSums` per token-length group of `groups`."""

    groups: Groups
    sums: list[AtPSums]


def _atp_sums(model: Model, task: Task | None, params: AtPParams) -> AtPShard:
    prepared = _prepare(model, task)
    if not _has_corrupt(prepared.task):
        raise AttributionError("attribution patching needs a corrupt prompt: pass --corrupt (or use --task)")
    groups = Groups.of(prepared)
    return AtPShard(groups, [attribution_patching_sums(model, b, prepared.metric, sites=params.sites,
                                                       direction=params.direction) for b in groups.batches])


def _atp_run(shards: list[AtPShard]) -> AttributionPatchingRun:
    """Shards' sums added within each token-length group of the whole task (a group can span shards), then
    normalised by the whole task's clean and corrupt means: the one-process run (which is one shard)."""
    groups, members = _regroup([shard.groups for shard in shards])
    sums = []
    for group in members:
        total = shards[group[0][0]].sums[group[0][1]]
        for s, b in group[1:]:
            total = total + shards[s].sums[b]
        sums.append(total)
    return AttributionPatchingRun(groups, sums)


def _atp(model: Model, task: Task | None, params: AtPParams) -> AttributionPatchingRun:
    return _atp_run([_atp_sums(model, task, params)])


def _atp_merge(model: Model, task: Task, partials: list[AtPShard], params: AtPParams) -> AttributionPatchingRun:
    return _atp_run(partials)


# --- the registry entries ------------------------------------------------------------------------------

DLA = Analysis("attribute/dla", "direct logit attribution of every head, MLP and embedding", NoParams, _dla,
               shard=ShardSpec(_dla, _dla_merge))
IG = Analysis("attribute/ig", "integrated gradients over the input embeddings (or any hook)", IGParams, _ig,
              task_source=_ig_source, shard=ShardSpec(_ig_run, _ig_merge))
ROLLOUT = Analysis("attribute/rollout", "attention rollout into one prompt's answer position", PromptIndex,
                   _flow_compute("rollout"))
FLOW = Analysis("attribute/flow", "attention flow (max flow) into one prompt's answer position", PromptIndex,
                _flow_compute("flow"))
ATTN_GRAD = Analysis("attribute/attn-grad", "attention x gradient per head", NoParams, _attn_grad)
ATP = Analysis("attribute/atp", "attribution patching: first-order activation patching of every site",
               AtPParams, _atp, task_source=_atp_source, shard=ShardSpec(_atp_sums, _atp_merge))
