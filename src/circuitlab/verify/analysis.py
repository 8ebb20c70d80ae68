"""`verify`: test a circuit (a circuit JSON in the EAP-IG / MIB layout) on a model and a task.

One run measures, under the chosen ablation: faithfulness and KL(model || circuit), behaviour consistency
per prompt, completeness (worst gap found), minimality (per node, optionally per edge), and perturbation
curves under input-embedding noise; faithfulness and KL under every ablation type; with ``split``, the
same faithfulness on the other split (generalisation); with ``compare``, the overlap with another circuit
and each one's faithfulness inside the other. Every number carries a bootstrap 95% interval over prompts.

Outputs: records = one row per circuit component (minimality); summary = the verdict; files
consistency.csv, completeness.csv, perturbation.csv, ablations.csv; figures faithfulness.png,
minimality.png, perturbation.png. See docs/METHODS.md, "Circuit verification".

A run is `prompt_values` (the masked runs, kept as per-prompt values) then `finish` (the verdict). Over prompt
shards (``--backend ray``, ``--resume``) each shard returns its `PromptValues` and the merge concatenates
them before the same `finish`; the split is picked by prompt index in the whole task, and the mean and
resample rows are measured on the whole task. The greedy completeness search and a mean or resample
ablation as the chosen one need every prompt at once and are refused there. See docs/METHODS.md,
"Distributed runs".
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from circuitlab.analysis import Analysis, ShardSpec
from circuitlab.discovery.analysis import answers_optional
from circuitlab.discovery.metrics import check_metric_name
from circuitlab.discovery.scores import check_ablation
from circuitlab.errors import VerifyError
from circuitlab.graph.ablation import ABLATIONS
from circuitlab.graph.circuit import Circuit
from circuitlab.graph.mib_json import read_mib_json
from circuitlab.models.model import Model
from circuitlab.progress import status
from circuitlab.results import csv_text
from circuitlab.tasks.source import TaskSource
from circuitlab.tasks.task import Task
from circuitlab.verify.bootstrap import Bootstrap, Interval, check_resamples
from circuitlab.verify.measures import (
    DEFAULT_NOISE,
    Completeness,
    CompletenessRows,
    Consistency,
    Finisher,
    MinimalityRows,
    Perturbation,
    PerturbationRows,
    Verifier,
    check_noise,
    check_positive,
    concat_prompts,
    select_prompts,
    undefined,
)
from circuitlab.verify.split import check_split, split_indices, split_task

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# comparison keys -> labels: f of the other circuit; this circuit inside the other; the other inside this one
COMPARISON_LABELS = {"other_faithfulness": "compare: faithfulness", "inside_other": "circuit inside compare",
                     "other_inside": "compare inside circuit"}
MAX_DRAWN_COMPONENTS = 60  # bars beyond this are unreadable; the smallest |drop| (the suspects) are drawn


def _sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise VerifyError(f"{name} must be an integer >= 0, got {value!r}")
    return value


@dataclass(frozen=True)
class VerifyParams:
    """circuit: a circuit JSON file (EAP-IG / MIB layout), parsed now, before any model loads.
    ablation: corrupt | mean | zero | resample. score_metric: the task's metric when None, or kl / l2 /
    another task metric. split: None (every prompt), train, test or template:I[,J...]. compare: another
    circuit JSON. tolerance: max |logit difference| for "allclose". epsilon: a component whose removal
    changes faithfulness by less is non-minimal. noise: relative strengths of the embedding noise.
    n_bootstrap: resamples per interval. subsets / greedy_steps: the completeness search. per_edge: also
    edge-level minimality. all_ablations: faithfulness and KL under every ablation type.
    circuit_sha256 / compare_sha256 (set here, not options): the files' contents, recorded in results.json
    and in the key of every prompt shard, so `--resume` never reuses shards of a circuit file since rewritten."""

    circuit: str
    ablation: str = "corrupt"
    score_metric: str | None = None
    split: str | None = None
    compare: str | None = None
    tolerance: float = 0.1
    epsilon: float = 0.01
    noise: tuple[float, ...] = DEFAULT_NOISE
    n_bootstrap: int = 1000
    subsets: int = 8
    greedy_steps: int = 2
    per_edge: bool = False
    all_ablations: bool = True
    seed: int = 0
    circuit_sha256: str = field(default="", init=False)
    compare_sha256: str | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        check_ablation(self.ablation)
        check_metric_name(self.score_metric)
        check_split(self.split)
        read_mib_json(self.circuit)  # missing file, bad JSON, unknown names: before the model loads
        object.__setattr__(self, "circuit_sha256", _sha256(self.circuit))
        if self.compare is not None:
            read_mib_json(self.compare)
            object.__setattr__(self, "compare_sha256", _sha256(self.compare))
        check_positive("tolerance", self.tolerance)
        check_positive("epsilon", self.epsilon)
        object.__setattr__(self, "noise", check_noise(tuple(self.noise)))
        check_resamples(self.n_bootstrap)
        _count("subsets", self.subsets)
        _count("greedy_steps", self.greedy_steps)


@dataclass
class Verification:
    """Every measure of one circuit (see the module docstring)."""

    circuit: Circuit
    metric: str
    ablation: str
    n_prompts: int
    full_metric: float
    empty_metric: float
    faithfulness: Interval
    kl: Interval
    consistency: Consistency
    consistency_means: dict[str, Interval]
    completeness: Completeness
    minimality: list[dict[str, Any]]
    perturbation: Perturbation
    epsilon: float
    prompts: list[str]
    ablations: list[dict[str, Any]] = field(default_factory=list)
    split: str | None = None
    other_split: dict[str, Any] | None = None
    comparison: dict[str, Any] | None = None

    @property
    def non_minimal(self) -> list[str]:
        return [r["component"] for r in self.minimality if abs(r["drop"]) < self.epsilon]

    # --- AnalysisResult -----------------------------------------------------------------------------------
    def records(self) -> list[dict[str, Any]]:
        """One row per component of the circuit: drop in faithfulness when it alone is removed."""
        return [{**r, "non_minimal": abs(r["drop"]) < self.epsilon} for r in self.minimality]

    def verdict(self) -> list[dict[str, Any]]:
        """The verdict table: measure, value, 95% interval."""
        rows: list[tuple[str, Any, Interval | None]] = [
            (f"faithfulness ({self.metric}, {self.ablation})", None, self.faithfulness),
            ("KL(model || circuit)", None, self.kl),
            ("top-1 agreement", None, self.consistency_means["top1_agreement"]),
            ("max |logit diff| (mean)", None, self.consistency_means["max_abs_logit_diff"]),
            (f"allclose (tol {self.consistency.tolerance:g})", None, self.consistency_means["allclose"]),
            ("completeness: worst gap", None, self.completeness.worst),
            (f"non-minimal (|drop| < {self.epsilon:g})", f"{len(self.non_minimal)} of {len(self.minimality)}", None),
            ("perturbation slope: model", None, self.perturbation.model_slope),
            ("perturbation slope: circuit", None, self.perturbation.circuit_slope),
        ]
        for row in self.ablations:
            if row["ablation"] != self.ablation:
                rows.append((f"faithfulness ({row['ablation']})", row.get("note"), _interval(row, "faithfulness")))
        if self.other_split is not None:
            rows.append((f"faithfulness, other split ({self.other_split['split']})", self.other_split.get("note"),
                         _interval(self.other_split, "faithfulness")))
        if self.comparison is not None:
            c = self.comparison
            rows.append(("edge / node Jaccard", f"{c['edge_jaccard']:.3f} / {c['node_jaccard']:.3f}", None))
            for key, label in COMPARISON_LABELS.items():
                rows.append((label, None, _interval(c, key)))
        out = []
        for name, text, interval in rows:
            if interval is None:  # a count, or a note: the ablation leaves faithfulness undefined
                out.append({"measure": name, "value": "undefined" if text and "undefined" in text else text,
                            "95% CI": ""})
            else:  # + 0.0 turns -0 into 0
                out.append({"measure": name, "value": f"{interval.value + 0.0:.4g}",
                            "95% CI": f"[{interval.low + 0.0:.4g}, {interval.high + 0.0:.4g}]"})
        return out

    def summary(self) -> dict[str, Any]:
        stats = self.circuit.stats()
        out: dict[str, Any] = {
            "metric": self.metric, "ablation": self.ablation, "n_prompts": self.n_prompts,
            "circuit_edges": stats["n_edges"], "circuit_nodes": stats["n_nodes"],
            "edge_fraction": stats["edge_fraction"], "full_metric": self.full_metric,
            "empty_metric": self.empty_metric,
            **self.faithfulness.as_dict("faithfulness"), **self.kl.as_dict("kl"),
        }
        for name, interval in self.consistency_means.items():
            out.update(interval.as_dict(name))
        out.update(self.completeness.worst.as_dict("completeness_gap"))
        out["completeness_nodes"] = self.completeness.worst_nodes
        out["n_non_minimal"] = len(self.non_minimal)
        out["non_minimal"] = self.non_minimal
        out.update(self.perturbation.model_slope.as_dict("perturbation_slope_model"))
        out.update(self.perturbation.circuit_slope.as_dict("perturbation_slope_circuit"))
        for row in self.ablations:
            if row["ablation"] != self.ablation:
                out[f"faithfulness_{row['ablation']}"] = row.get("faithfulness")
                out[f"kl_{row['ablation']}"] = row.get("kl")
        if self.split is not None:
            out["split"] = self.split
        if self.other_split is not None:
            out["faithfulness_other_split"] = self.other_split.get("faithfulness")
            out["faithfulness_other_split_ci_low"] = self.other_split.get("faithfulness_ci_low")
            out["faithfulness_other_split_ci_high"] = self.other_split.get("faithfulness_ci_high")
            out["n_prompts_other_split"] = self.other_split.get("n_prompts")
        if self.comparison is not None:
            out.update({f"compare_{k}": v for k, v in self.comparison.items()})
        return out

    def files(self) -> dict[str, str]:
        return {
            "consistency.csv": csv_text(self.consistency.records(self.prompts)),
            "completeness.csv": csv_text(self.completeness.tried),
            "perturbation.csv": csv_text(self.perturbation.records()),
            "ablations.csv": csv_text(self.ablations),
        }

    def figures(self) -> dict[str, Figure]:
        return {"faithfulness.png": self._faithfulness_figure(), "minimality.png": self._minimality_figure(),
                "perturbation.png": self._perturbation_figure()}

    # --- figures ------------------------------------------------------------------------------------------
    def _faithfulness_figure(self) -> Figure:
        from matplotlib.figure import Figure

        bars: list[tuple[str, Interval]] = []
        for row in self.ablations or [{"ablation": self.ablation, **self.faithfulness.as_dict("faithfulness")}]:
            interval = _interval(row, "faithfulness")
            if interval is not None:
                bars.append((row["ablation"] + (" (chosen)" if row["ablation"] == self.ablation else ""), interval))
        other = _interval(self.other_split, "faithfulness") if self.other_split is not None else None
        if self.other_split is not None and other is not None:
            bars.append((f"other split ({self.other_split['split']})", other))
        if self.comparison is not None:
            for key, label in COMPARISON_LABELS.items():
                interval = _interval(self.comparison, key)
                if interval is not None:
                    bars.append((label, interval))
        fig = Figure(figsize=(6.4, 3.6), dpi=150)
        ax = fig.add_subplot()
        x = list(range(len(bars)))
        values = [b.value for _, b in bars]
        errors = [[max(0.0, b.value - b.low) if math.isfinite(b.low) else 0.0 for _, b in bars],
                  [max(0.0, b.high - b.value) if math.isfinite(b.high) else 0.0 for _, b in bars]]
        ax.bar(x, values, yerr=errors, capsize=4, color="#1f77b4")
        ax.axhline(1.0, color="#7f7f7f", lw=0.8, ls="--")
        ax.axhline(0.0, color="#7f7f7f", lw=0.8, ls=":")
        ax.set_xticks(x, [name for name, _ in bars], rotation=20, ha="right", fontsize=7)
        ax.set_ylabel("normalised faithfulness")
        ax.set_title(f"faithfulness ({self.metric}) with 95% bootstrap CIs, {self.n_prompts} prompts", fontsize=9)
        fig.tight_layout()
        return fig

    def _minimality_figure(self) -> Figure:
        from matplotlib.figure import Figure

        rows = sorted(self.minimality, key=lambda r: abs(r["drop"]))[:MAX_DRAWN_COMPONENTS]
        fig = Figure(figsize=(6.4, max(2.4, 0.18 * len(rows) + 1.2)), dpi=150)
        ax = fig.add_subplot()
        if not rows:
            ax.text(0.5, 0.5, "the circuit has no heads or MLPs", ha="center", va="center")
            ax.set_axis_off()
            return fig
        y = list(range(len(rows)))
        values = [r["drop"] for r in rows]
        errors = [[max(0.0, r["drop"] - r["drop_ci_low"]) for r in rows],
                  [max(0.0, r["drop_ci_high"] - r["drop"]) for r in rows]]
        colors = ["#d62728" if abs(v) < self.epsilon else "#1f77b4" for v in values]
        ax.barh(y, values, xerr=errors, color=colors, capsize=2)
        for edge in (-self.epsilon, self.epsilon):
            ax.axvline(edge, color="#7f7f7f", lw=0.8, ls="--")
        ax.set_yticks(y, [r["component"] for r in rows], fontsize=6)
        ax.invert_yaxis()
        ax.set_xlabel("drop in faithfulness when removed alone")
        shown = "" if len(rows) == len(self.minimality) else f" (the {len(rows)} smallest |drop|)"
        ax.set_title(f"minimality: red = |drop| < {self.epsilon:g}{shown}", fontsize=9)
        fig.tight_layout()
        return fig

    def _perturbation_figure(self) -> Figure:
        from matplotlib.figure import Figure

        p = self.perturbation
        fig = Figure(figsize=(6.0, 3.6), dpi=150)
        ax = fig.add_subplot()
        for label, curve, color in (("full model", p.model, "#1f77b4"), ("circuit", p.circuit, "#d62728")):
            ax.plot(p.levels, [c.value for c in curve], "o-", color=color, label=label)
            ax.fill_between(p.levels, [c.low for c in curve], [c.high for c in curve], color=color, alpha=0.2)
        ax.set_xlabel("noise strength (relative to the embedding norm)")
        ax.set_ylabel("relative change of the answer logits")
        ax.set_title(f"perturbation: slope model {p.model_slope.value:.3g}, circuit {p.circuit_slope.value:.3g}",
                     fontsize=9)
        ax.legend(fontsize=7, frameon=False)
        fig.tight_layout()
        return fig


def _interval(row: dict[str, Any], name: str) -> Interval | None:
    value = row.get(name)
    if value is None:
        return None
    return Interval(value, row.get(f"{name}_ci_low", math.nan), row.get(f"{name}_ci_high", math.nan))


# --- the verb: per-prompt values, then the finishing --------------------------------------------------------
# A run is two steps, shared by the one-process run and a run over prompt shards (docs/METHODS.md,
# "Distributed runs"): `prompt_values` makes the masked runs and keeps per-prompt values of fixed masks;
# `finish` turns them into the verdict (means, bootstrap intervals, comparisons). A shard returns its
# `PromptValues`; the merge concatenates them in task order and finishes as one process would.

SHARD_ABLATIONS = ("corrupt", "zero")  # ablated outputs of one prompt depend on that prompt alone


@dataclass
class AblationValues:
    """Per-prompt values of the circuit under one ablation: the full model's and the empty circuit's metric
    (`ends`, [2, prompt]), the circuit's metric and KL(model || circuit)."""

    ends: torch.Tensor
    circuit: torch.Tensor
    kl: torch.Tensor


@dataclass
class PromptValues:
    """Per-prompt values of every measure of one verification, on some prompts in task order (a prompt
    shard's partial result); `ablations`: the other ablation types' values, or why they cannot run."""

    metric: str
    ends: torch.Tensor
    circuit: torch.Tensor
    consistency: Consistency
    minimality: MinimalityRows
    completeness: CompletenessRows
    perturbation: PerturbationRows
    compare: torch.Tensor | None
    ablations: dict[str, AblationValues | str] = field(default_factory=dict)

    def chosen(self) -> AblationValues:
        """The values under the chosen ablation (what the other split reports)."""
        return AblationValues(self.ends, self.circuit, self.consistency.kl)


def _circuits(model: Model, params: VerifyParams) -> tuple[Circuit, Circuit | None]:
    """The circuit and the one to compare with; the files must be those the options were checked with."""
    for path, digest in ((params.circuit, params.circuit_sha256), (params.compare, params.compare_sha256)):
        if path is not None and _sha256(path) != digest:
            raise VerifyError(f"circuit file {path} changed during the run (or differs on this worker): every "
                              "shard must read the same circuit")
    circuit = Circuit.load(params.circuit, model=model)  # another model's circuit: GraphError naming both shapes
    other = Circuit.load(params.compare, model=model) if params.compare is not None else None
    return circuit, other


def prompt_values(model: Model, task: Task, circuit: Circuit, other: Circuit | None, params: VerifyParams, *,
                  ablations: tuple[str, ...] = (), check: bool = True) -> PromptValues:
    """Per-prompt values of every measure of `circuit` on `task`, and of `ablations` (other ablation types).
    check=False (a prompt shard): whether faithfulness is defined is left to `finish`, on every prompt."""
    with status("measuring faithfulness"):
        verifier = Verifier(model, task, circuit.graph, ablation=params.ablation, metric=params.score_metric,
                            seed=params.seed, n_bootstrap=params.n_bootstrap, check=check)
        mask = circuit.in_graph
        circuit_row = verifier.metric_rows(mask.unsqueeze(0))[0]
        consistency = verifier.consistency(mask, params.tolerance)
    minimality = verifier.minimality_rows(mask, per_edge=params.per_edge)
    completeness = verifier.completeness_rows(mask, subsets=params.subsets, greedy_steps=params.greedy_steps)
    perturbation = verifier.perturbation_rows(mask, params.noise)
    compare = verifier.compare_rows(mask, other.in_graph) if other is not None else None
    values = PromptValues(verifier.metric_name, verifier.ends, circuit_row, consistency, minimality, completeness,
                          perturbation, compare)
    if ablations:
        with status("faithfulness under every ablation"):
            for kind in ablations:
                values.ablations[kind] = ablation_values(model, task, circuit, kind, params, check=check)
    return values


def ablation_values(model: Model, task: Task, circuit: Circuit, ablation: str, params: VerifyParams, *,
                    check: bool = True) -> AblationValues | str:
    """Per-prompt faithfulness inputs and KL of the circuit under `ablation` on `task`; a note instead when
    it cannot be measured."""
    try:
        verifier = Verifier(model, task, circuit.graph, ablation=ablation, metric=params.score_metric, seed=params.seed,
                            n_bootstrap=params.n_bootstrap, check=check)
    except VerifyError as exc:
        return str(exc)
    row = verifier.metric_rows(circuit.in_graph.unsqueeze(0))[0]
    return AblationValues(verifier.ends, row, verifier.consistency(circuit.in_graph, params.tolerance).kl)


def _ablation_row(values: AblationValues | str, metric: str, ablation: str, params: VerifyParams) -> dict[str, Any]:
    """Faithfulness and KL (with intervals) under one ablation; a note instead when undefined."""
    reason = values if isinstance(values, str) else undefined(values.ends, metric, ablation)
    if reason is not None or isinstance(values, str):
        return {"note": reason}
    n = values.ends.shape[-1]
    finisher = Finisher(values.ends, Bootstrap(n, params.n_bootstrap, params.seed))
    faithful = finisher.faithfulness(values.circuit.unsqueeze(0))[0]
    return {**faithful.as_dict("faithfulness"), **finisher.mean(values.kl).as_dict("kl"), "n_prompts": n}


def finish(values: PromptValues, evaluated: Task, held_out: Task | None, held: AblationValues | str | None,
           circuit: Circuit, other: Circuit | None, params: VerifyParams) -> Verification:
    """The verification from per-prompt values of the `evaluated` prompts (and, with a split, the values of
    the `held_out` prompts under the chosen ablation)."""
    reason = undefined(values.ends, values.metric, params.ablation)
    if reason is not None:
        raise VerifyError(reason)
    n = values.ends.shape[-1]
    finisher = Finisher(values.ends, Bootstrap(n, params.n_bootstrap, params.seed))
    faithful = finisher.faithfulness(values.circuit.unsqueeze(0))[0]
    consistency = values.consistency
    means = {"top1_agreement": finisher.mean(consistency.top1_agree),
             "max_abs_logit_diff": finisher.mean(consistency.max_abs_diff),
             "allclose": finisher.mean(consistency.within)}
    kl = finisher.mean(consistency.kl)
    ablations = [{"ablation": params.ablation, **faithful.as_dict("faithfulness"), **kl.as_dict("kl")}]
    ablations += [{"ablation": kind, **_ablation_row(values.ablations[kind], values.metric, kind, params)}
                  for kind in ABLATIONS if kind in values.ablations]
    other_split = None
    if held_out is not None and held is not None:
        other_split = {"split": held_out.params.get("split"),
                       **_ablation_row(held, values.metric, params.ablation, params)}
    comparison = None
    if other is not None and values.compare is not None:
        comparison = {**other.overlap(circuit), "other_edges": other.n_edges}
        comparison.pop("edge_precision")
        comparison.pop("edge_recall")
        for name, interval in finisher.compare(values.compare).items():
            if name != "faithfulness":
                comparison.update(interval.as_dict(name))
    labels = [ex.clean for ex in evaluated.examples]
    return Verification(
        circuit, values.metric, params.ablation, n, float(values.ends[0].mean()), float(values.ends[1].mean()),
        faithful, kl, consistency, means, finisher.completeness(values.completeness),
        finisher.minimality(values.minimality), finisher.perturbation(values.perturbation), params.epsilon, labels,
        ablations, params.split, other_split, comparison)


def verify(model: Model, task: Task, params: VerifyParams) -> Verification:
    """Every measure of the circuit in `params.circuit` on `task` (see the module docstring)."""
    circuit, other = _circuits(model, params)
    evaluated, held_out = split_task(task, params.split)
    others = tuple(kind for kind in ABLATIONS if kind != params.ablation) if params.all_ablations else ()
    values = prompt_values(model, evaluated, circuit, other, params, ablations=others)
    held = None
    if held_out is not None:
        with status("faithfulness on the other split"):
            held = ablation_values(model, held_out, circuit, params.ablation, params)
    return finish(values, evaluated, held_out, held, circuit, other, params)


# --- prompt shards (--backend ray, --resume) -----------------------------------------------------------------

def _shardable(params: VerifyParams) -> None:
    """Options under which shards merge exactly; the others are refused naming the fix."""
    if params.ablation not in SHARD_ABLATIONS:
        raise VerifyError(f"--ablation {params.ablation} draws from every prompt of a token-length group, so prompt "
                          "shards would change every measure: use --ablation corrupt or zero with --backend ray / "
                          "--resume, or --backend local")
    if params.greedy_steps > 0:
        raise VerifyError("the greedy completeness search picks each next node from the mean over every prompt, so "
                          "it cannot run on prompt shards: pass --greedy-steps 0 (the random subsets still run) with "
                          "--backend ray / --resume, or use --backend local")


def _partial(model: Model, task: Task, params: VerifyParams) -> PromptValues:
    """A shard's per-prompt values of every measure, on every prompt of the shard (which prompts belong to
    a train/test split depends on their index in the whole task: the merge picks them out)."""
    circuit, other = _circuits(model, params)
    others = tuple(kind for kind in SHARD_ABLATIONS if kind != params.ablation) if params.all_ablations else ()
    return prompt_values(model, task, circuit, other, params, ablations=others, check=False)


def _merge(model: Model, task: Task, partials: list[PromptValues], params: VerifyParams) -> Verification:
    """The shards' values side by side, the split picked out by prompt index in the whole task, the mean and
    resample ablation rows measured here on the whole task (they draw from every prompt), then `finish`."""
    circuit, other = _circuits(model, params)
    values = concat_prompts(partials)
    evaluated, held_out = split_task(task, params.split)
    held: AblationValues | None = None
    if params.split is not None:
        inside, outside = split_indices(task, params.split)
        held = select_prompts(values.chosen(), outside) if outside else None
        values = select_prompts(values, inside)
    if params.all_ablations:
        with status("faithfulness under the mean and resample ablations"):
            for kind in ABLATIONS:
                if kind != params.ablation and kind not in values.ablations:
                    values.ablations[kind] = ablation_values(model, evaluated, circuit, kind, params)
    return finish(values, evaluated, held_out, held, circuit, other, params)


def _source(source: TaskSource, params: VerifyParams) -> TaskSource:
    """Answers are optional under kl / l2 (as for discovery); a one-prompt test split is empty: say so now."""
    if params.split == "test" and source.n == 1:
        raise VerifyError("split 'test' is empty with --n 1: the test half needs at least 2 prompts (raise --n)")
    return answers_optional(source, params)


def _compute(model: Model, task: Task | None, params: VerifyParams) -> Verification:
    assert task is not None  # the entry requires a task
    return verify(model, task, params)


VERIFY = Analysis("verify", "circuit verification: faithfulness, consistency, completeness, minimality, "
                  "perturbation, generalisation (bootstrap CIs)", VerifyParams, _compute, task_source=_source,
                  shard=ShardSpec(_partial, _merge, _shardable))

