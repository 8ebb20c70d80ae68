"""`study/induction`: induction heads, their previous-token partners, and the circuit they form, verified.

An induction head (Olsson et al. 2022, "In-context Learning and Induction Heads") completes ... A B ... A
-> B: at the second A its query (the current token) matches the key of the position after the first A,
because a *previous-token head* in an earlier layer wrote "the previous token was A" into that position's
residual stream (K-composition, Elhage et al. 2021); the induction head then copies B to the logits. This
study finds that mechanism in any model with circuitlab's verbs, on the task's repeated random tokens
(the `induction` task, or the ground-truth models' `repeated_tokens_task`; metric `induction_logprob`):

1. **Induction heads**: every head's induction score (heads/detectors.py: the share of its attention on the
   induction target, TransformerLens' detection pattern, over the second-copy positions of the task's clean
   prompts), with a bootstrap 95% interval over prompts. A head of layer >= 1 (a layer-0 head has no earlier
   head to compose with) is an induction head when its score reaches `threshold` (default 0.4, several
   times the uniform causal head's score, which the summary reports); at most `max_heads`, strongest first.
2. **Previous-token partners** of each induction head, over every head of earlier layers, two ways:
   (a) K-composition score (heads/composition.py's factored score, for these readers only), weights
   only; (b) path patching into the induction head's key input only (graph/restart.py `restart_sweep`, the masked-edge rule restarted at
   the induction head's layer): the sender's output comes from another prompt of the task (the clean
   prompts rolled by one, a resample) while every other path keeps its clean value. The effect is the drop
   of the metric as a share of the clean-vs-resampled gap, (clean - patched) / (clean - resampled). Why a
   resample and not the task's corrupt prompt: the induction task's corrupt prompt keeps the first copy,
   and the keys an induction head reads live there, so no sender output would change where it matters.
   Each way ranks the earlier heads; the summary reports whether the top partners coincide and the
   Spearman rank correlation of the two scores. The `n_partners` heads of largest path effect are the
   partners kept in the circuit.
3. **Ablation**: the induction heads mean-ablated all at once (every edge out of them carries its mean over
   the task's clean prompts at each position: the masked-edge engine's mean ablation via
   verify/measures.py `Verifier`), per prompt the rise of the loss on the repeated half (the loss is
   -induction_logprob: the mean negative log-prob of the second-copy targets), with a bootstrap 95%
   interval; the same for a control: `n_controls` seeded draws of as many heads from outside the circuit
   (neither an induction head nor a kept partner; fewer when the model has fewer such heads), their rises
   averaged per prompt.
4. **Circuit**: input -> each partner's value input, partner -> its induction head's key, input -> the
   induction head's query and value, induction head -> logits (discovery/ground_truth.py
   `mechanism_edges`, the ground-truth models' definition) and its faithfulness under the same mean
   ablation, with a bootstrap interval.

See docs/METHODS.md, "Case studies" (Induction).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int

from circuitlab.analysis import Analysis
from circuitlab.discovery.ground_truth import mechanism_edges
from circuitlab.errors import AnalysisError, TaskError
from circuitlab.graph.circuit import Circuit
from circuitlab.graph.direct_paths import SenderSweep
from circuitlab.graph.graph import Graph
from circuitlab.graph.mib_json import to_mib_dict
from circuitlab.graph.naming import head_name, parse_node
from circuitlab.graph.restart import restart_sweep
from circuitlab.heads.composition import (
    head_weights,
    pair_scores,
    random_baseline,
    reader_factors,
    writer_factors,
)
from circuitlab.heads.detectors import (
    attention_patterns,
    detection_pattern,
    detector_scores,
    uniform_patterns,
)
from circuitlab.models.model import Model
from circuitlab.progress import progress_bar, status
from circuitlab.tasks.task import PreparedTask, Task, TaskBatch
from circuitlab.verify.bootstrap import Interval
from circuitlab.verify.measures import Verifier

if TYPE_CHECKING:
    from matplotlib.figure import Figure

METRIC = "induction_logprob"
DPI = 120
BARS_SHOWN = 12  # earlier heads per partner chart (the strongest by path effect)


# --- options -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class InductionStudyParams:
    """threshold: induction score (share of attention on the induction target) a head must reach.
    max_heads: at most this many induction heads, strongest first (each costs one path-patching sweep).
    n_partners: previous-token partners per induction head kept in the circuit (largest path effect).
    n_controls: random draws of control heads. n_bootstrap: resamples per interval. max_batch: rows
    (senders x prompts) per restarted path-patching forward. seed: control draws, bootstrap."""

    threshold: float = 0.4
    max_heads: int = 4
    n_partners: int = 1
    n_controls: int = 5
    n_bootstrap: int = 1000
    max_batch: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 1:
            raise AnalysisError(f"threshold must lie in (0, 1] (a share of attention), got {t!r}")
        for name in ("max_heads", "n_partners", "n_controls", "n_bootstrap", "max_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise AnalysisError(f"{name} must be a positive integer, got {value!r}")


# --- step 1: induction scores per prompt ---------------------------------------------------------------------

@torch.no_grad()
def induction_scores_per_prompt(model: Model, prepared: PreparedTask) -> tuple[Float[torch.Tensor, "prompt layer head"],
                                                                             Float[torch.Tensor, " prompt"]]:
    """Each prompt's induction score per head on its clean tokens, and a uniform causal head's score on
    the same prompt (the chance level), in the task's example order."""
    scores = torch.zeros(prepared.n_prompts, model.n_layers, model.n_heads)
    uniform = torch.zeros(prepared.n_prompts)
    for batch in prepared.batches:
        patterns = attention_patterns(model, batch.clean)  # [layer, batch, head, dest, src]
        detection = detection_pattern("induction", batch.clean)
        for row, index in enumerate(batch.indices):
            scores[index] = detector_scores(patterns[:, row:row + 1], detection[row:row + 1])
            uniform[index] = float(detector_scores(uniform_patterns(1, batch.n_pos), detection[row:row + 1]))
    return scores, uniform


# --- step 2: partners ----------------------------------------------------------------------------------------

@dataclass
class PartnerScores:
    """For one induction head, every head of earlier layers: K-composition and path-patching effect."""

    head: str
    senders: list[str]
    composition: list[float]
    path_effect: list[float]

    def rank(self, values: list[float]) -> list[int]:
        """1 = the largest value."""
        order = sorted(range(len(values)), key=lambda i: -values[i])
        ranks = [0] * len(values)
        for position, i in enumerate(order):
            ranks[i] = position + 1
        return ranks

    def top(self, values: list[float], k: int = 1) -> list[str]:
        order = sorted(range(len(values)), key=lambda i: -values[i])
        return [self.senders[i] for i in order[:k]]

    @property
    def spearman(self) -> float:
        return spearman(torch.tensor(self.composition), torch.tensor(self.path_effect))


def spearman(a: Float[torch.Tensor, " n"], b: Float[torch.Tensor, " n"]) -> float:
    """Spearman's rank correlation (ties get their average rank); NaN with fewer than 2 values or a
    constant input."""
    if a.numel() < 2:
        return math.nan
    ra, rb = _average_ranks(a.double()), _average_ranks(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denom if denom > 0 else math.nan


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    ranks = torch.empty_like(x)
    order = torch.argsort(x, stable=True)
    ranks[order] = torch.arange(1, len(x) + 1, dtype=x.dtype)
    for value in torch.unique(x):
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks


@torch.no_grad()
def key_path_effects(verifier: Verifier, prepared: PreparedTask, head: str, senders: list[str], *,
                     max_batch: int = 64, advance: Any = None) -> list[float]:
    """Each sender's path-patching effect into `head`'s key input, its output taken from the clean prompt
    before it in the batch (rolled by one): (clean - patched) / (clean - resampled), every token-length
    group weighted by its size."""
    engine = verifier.evaluator.engine
    receivers = [f"{head}<k>"]
    sweeps = []
    for batch in prepared.batches:
        if batch.size < 2:
            raise TaskError(f"path patching from another prompt needs at least 2 prompts of each token length; "
                            f"a group of {batch.n_pos} tokens has {batch.size} (raise --n)")
        positions, local = scored_positions(batch)

        def readout(logits: torch.Tensor, local: TaskBatch = local) -> torch.Tensor:
            return prepared.metric(logits, local)

        sweeps.append(restart_sweep(engine, receivers, batch.clean, batch.clean.roll(1, 0), readout, positions,
                                    senders, max_batch=max_batch, advance=advance))
    sweep = SenderSweep.weighted_mean(sweeps, [b.size for b in prepared.batches])
    normalised = sweep.normalised  # (patched - clean) / (clean - resampled)
    return [-float(normalised[parse_node(s).layer, parse_node(s).head]) for s in senders]


def scored_positions(batch: TaskBatch) -> tuple[Int[torch.Tensor, "batch n_read"], TaskBatch]:
    """The positions the metric scores (targets >= 0) and the batch with its targets read there, so the
    restarted runs unembed only those (the unembedding is a large share of a late restart). Rows scoring
    different numbers of positions: every position."""
    assert batch.targets is not None  # _check_task
    scored = batch.targets >= 0
    counts = scored.sum(1)
    if bool((counts != counts[0]).any()):
        return torch.arange(batch.n_pos).expand(batch.size, -1), batch
    positions = scored.nonzero()[:, 1].reshape(batch.size, -1)
    return positions, replace(batch, targets=batch.targets.gather(1, positions))


def earlier_heads(model: Model, layer: int) -> list[str]:
    return [head_name(lyr, h) for lyr in range(layer) for h in range(model.n_heads)]


def k_composition_columns(model: Model, heads: list[str], *, seed: int = 0) -> tuple[dict[str, list[float]], float]:
    """K-composition of every earlier head into each of `heads` (heads/composition.py's factors and score,
    for these readers only: the full [layer, head, layer, head] grid costs every reader of the model), and
    the random-matrix baseline."""
    weights = head_weights(model)
    shape = (int(weights.W_Q.shape[2]), int(weights.W_Q.shape[3]))
    writers = writer_factors(weights)  # [layer, head, k, d_model]
    readers = reader_factors(weights, "k")  # [layer, head, d_model, k]
    out = {}
    for head in heads:
        layer, h = _lh(head)
        out[head] = pair_scores(writers[:layer].flatten(0, 1), readers[layer, h][None])[:, 0].tolist()
    return out, random_baseline(shape, "k", seed=seed)


# --- the result ----------------------------------------------------------------------------------------------

@dataclass
class InductionStudy:
    """Every number of the study (see the module docstring)."""

    model_spec: str
    n_prompts: int
    threshold: float
    scores: Float[torch.Tensor, "layer head"]
    uniform: float
    heads: list[str]
    head_intervals: dict[str, Interval]
    partners: list[PartnerScores]
    kept_partners: dict[str, list[str]]
    composition_baseline: float
    clean_loss: float
    ablated_loss: float
    loss_rise: Interval
    control_heads: list[list[str]]
    control_rise: Interval | None
    rise_over_control: Interval | None
    circuit: Circuit
    faithfulness: Interval
    ablation: str = "mean"

    # --- records / summary ---------------------------------------------------------------------------------
    def records(self) -> list[dict[str, Any]]:
        """One row per (induction head, earlier head)."""
        rows = []
        for p in self.partners:
            comp_rank, path_rank = p.rank(p.composition), p.rank(p.path_effect)
            kept = set(self.kept_partners.get(p.head, []))
            ind = parse_node(p.head)
            for i, sender in enumerate(p.senders):
                s = parse_node(sender)
                rows.append({"induction_head": p.head, "induction_score": float(self.scores[ind.layer, ind.head]),
                             "partner": sender, "partner_layer": s.layer, "partner_head": s.head,
                             "k_composition": p.composition[i], "path_effect": p.path_effect[i],
                             "composition_rank": comp_rank[i], "path_rank": path_rank[i],
                             "in_circuit": sender in kept})
        return rows

    def partner_summary(self) -> dict[str, dict[str, Any]]:
        out = {}
        for p in self.partners:
            by_comp, by_path = p.top(p.composition), p.top(p.path_effect)
            out[p.head] = {"by_k_composition": by_comp[0], "by_path_patching": by_path[0],
                           "top_agree": by_comp[0] == by_path[0], "spearman": p.spearman,
                           "kept": self.kept_partners[p.head]}
        return out

    def summary(self) -> dict[str, Any]:
        partners = self.partner_summary()
        out: dict[str, Any] = {
            "n_prompts": self.n_prompts, "threshold": self.threshold, "uniform_induction_score": self.uniform,
            "induction_heads": [f"{h} (score {self.head_intervals[h]})" for h in self.heads],
            "previous_token_partners": {h: f"{v['by_path_patching']} by path patching, {v['by_k_composition']} by "
                                           f"K-composition (Spearman {v['spearman']:.2f})" for h, v in partners.items()},
            "partners_agree": sum(v["top_agree"] for v in partners.values()), "partners_compared": len(partners),
            "k_composition_baseline": self.composition_baseline,
            "clean_loss": self.clean_loss, "ablated_loss": self.ablated_loss,
            **self.loss_rise.as_dict("loss_rise"),
        }
        if self.control_rise is not None and self.rise_over_control is not None:
            out["control_heads"] = [", ".join(draw) for draw in self.control_heads]
            out.update(self.control_rise.as_dict("control_loss_rise"))
            out.update(self.rise_over_control.as_dict("rise_over_control"))
        stats = self.circuit.stats()
        out.update({"circuit_edges": stats["n_edges"], "circuit_heads": stats["n_heads"], "ablation": self.ablation,
                    **self.faithfulness.as_dict("faithfulness")})
        return out

    # --- figures ---------------------------------------------------------------------------------------------
    def figures(self) -> dict[str, Figure]:
        from circuitlab.graph.draw import circuit_figure
        from circuitlab.heads.plots import detector_figure

        figures = {"induction_scores.png": detector_figure(self.scores, "induction", self.uniform)}
        if self.partners:
            figures["partners.png"] = self.partner_figure()
        figures["circuit.png"] = circuit_figure(
            self.circuit, title=f"induction circuit: {self.circuit.n_edges} edges, faithfulness "
                                f"{self.faithfulness.value:.3f} ({self.ablation} ablation)")
        return figures

    def partner_figure(self) -> Figure:
        """Per induction head, the earlier heads of largest path effect: path effect and K-composition."""
        from matplotlib.figure import Figure

        n = len(self.partners)
        fig = Figure(figsize=(7.0, 2.4 * n + 0.6), dpi=DPI)
        axes = fig.subplots(n, 1, squeeze=False)[:, 0]
        for ax, p in zip(axes, self.partners, strict=True):
            order = sorted(range(len(p.senders)), key=lambda i: -p.path_effect[i])[:BARS_SHOWN]
            x = torch.arange(len(order)).float()
            ax.bar((x - 0.2).tolist(), [p.path_effect[i] for i in order], width=0.4, color="#1f77b4",
                   label="path effect into k (share of gap)")
            twin = ax.twinx()
            twin.bar((x + 0.2).tolist(), [p.composition[i] for i in order], width=0.4, color="#ff7f0e",
                     label="K-composition")
            twin.axhline(self.composition_baseline, color="#ff7f0e", linewidth=0.7, linestyle="--")
            ax.set_xticks(x.tolist(), [p.senders[i] for i in order], fontsize=7, rotation=45)
            ax.set_ylabel("path effect", fontsize=8)
            twin.set_ylabel("K-composition", fontsize=8)
            ax.set_title(f"previous-token partners of {p.head} (Spearman {p.spearman:.2f})", fontsize=9)
            if ax is axes[0]:
                handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
                ax.legend(handles=handles, fontsize=7, frameon=False, loc="upper right")
        fig.tight_layout()
        return fig

    # --- files -----------------------------------------------------------------------------------------------
    def files(self) -> dict[str, str]:
        node_scores = {h: float(self.scores[parse_node(h).layer, parse_node(h).head]) for h in self.heads}
        data = to_mib_dict(self.circuit.graph, self.circuit.in_graph, None, node_scores)
        return {"circuit.json": json.dumps(data), "findings.md": self.findings()}

    def findings(self) -> str:
        partners = self.partner_summary()
        lines = [
            f"# Induction case study: {self.model_spec}", "",
            f"Numbers from this run only: {self.n_prompts} prompts of repeated random tokens; 95% intervals are "
            "percentile bootstraps over prompts.", "",
            "## Induction heads", "",
            f"Heads of layer >= 1 whose induction score (share of attention on the induction target) reaches "
            f"{self.threshold:g}; a uniform causal head scores {self.uniform:.3f}.", "",
            *(f"- {h}: score {self.head_intervals[h]}" for h in self.heads), "",
            "## Previous-token partners", "",
            "Every head of an earlier layer, ranked by K-composition with the induction head (weights; random "
            f"matrices score {self.composition_baseline:.3f}) and by path patching into its key input (the "
            "drop of the metric as a share of the clean-vs-resampled gap).", "",
            "| induction head | top by path patching | top by K-composition | agree | Spearman |",
            "|---|---|---|---|---|",
        ]
        by_head = {p.head: p for p in self.partners}
        for head, v in partners.items():
            p = by_head[head]
            i, j = p.senders.index(v["by_path_patching"]), p.senders.index(v["by_k_composition"])
            lines.append(f"| {head} | {v['by_path_patching']} ({p.path_effect[i]:+.3f}) | {v['by_k_composition']} "
                         f"({p.composition[j]:.3f}) | {'yes' if v['top_agree'] else 'no'} | {v['spearman']:.2f} |")
        lines += ["", "## Ablation", "",
                  f"Mean-ablating the {len(self.heads)} induction heads together raises the loss on the repeated "
                  f"half from {self.clean_loss:.3f} to {self.ablated_loss:.3f} nats: a rise of {self.loss_rise}."]
        if self.control_rise is not None and self.rise_over_control is not None:
            size = len(self.control_heads[0])
            lines.append(f"Ablating {size} random heads from outside the circuit instead ({len(self.control_heads)} "
                         f"draws, averaged) raises it by {self.control_rise}; the induction heads' rise exceeds "
                         f"the control's by {self.rise_over_control}.")
        else:
            lines.append("No control: every head of the model is in the circuit.")
        lines += ["", "## Circuit", "",
                  f"input -> partners' values, partners -> induction heads' keys, input -> induction heads' queries "
                  f"and values, induction heads -> logits: {self.circuit.n_edges} edges. Faithfulness under "
                  f"{self.ablation} ablation of every other edge: {self.faithfulness}."]
        return "\n".join(lines) + "\n"


# --- the study -----------------------------------------------------------------------------------------------

def _check_task(prepared: PreparedTask) -> None:
    if prepared.metric_name != METRIC or any(b.targets is None for b in prepared.batches):
        raise TaskError(f"the induction study scores the repeated half with {METRIC} (per-position targets); "
                        f"use the induction task, got metric {prepared.metric_name!r}")


def find_induction_heads(scores: Float[torch.Tensor, "layer head"], threshold: float, max_heads: int) -> list[str]:
    """Heads of layer >= 1 with score >= threshold, strongest first, at most max_heads."""
    n_heads = scores.shape[1]
    order = torch.argsort(scores[1:].flatten(), descending=True, stable=True).tolist()
    found = [head_name(1 + i // n_heads, i % n_heads) for i in order if float(scores[1:].flatten()[i]) >= threshold]
    return found[:max_heads]


def control_draws(model: Model, excluded: set[str], size: int, draws: int, seed: int) -> list[list[str]]:
    """`draws` seeded samples of `size` heads (fewer if the model has fewer) from outside `excluded`."""
    pool = [head_name(layer, h) for layer in range(model.n_layers) for h in range(model.n_heads)
            if head_name(layer, h) not in excluded]
    if not pool:
        return []
    if len(pool) <= size:  # every draw would be the same heads
        return [pool]
    rng = random.Random(seed)
    return [sorted(rng.sample(pool, min(size, len(pool))), key=lambda n: (parse_node(n).layer, parse_node(n).head))
            for _ in range(draws)]


def induction_study(model: Model, task: Task | PreparedTask, params: InductionStudyParams) -> InductionStudy:
    """Find, partner, ablate and verify (see the module docstring)."""
    prepared = task if isinstance(task, PreparedTask) else task.prepare(model)
    _check_task(prepared)
    if model.n_layers < 2:
        raise AnalysisError("induction heads compose with an earlier head: the model needs at least 2 layers")
    with status("induction scores"):
        per_prompt, uniform = induction_scores_per_prompt(model, prepared)
    scores = per_prompt.mean(0)
    heads = find_induction_heads(scores, params.threshold, params.max_heads)
    if not heads:
        best_layer, best_head = divmod(int(scores[1:].flatten().argmax()), model.n_heads)
        raise AnalysisError(f"no head of layer >= 1 reaches induction score {params.threshold:g} on these prompts "
                            f"(the highest is {head_name(best_layer + 1, best_head)} at {float(scores[1:].max()):.3f}; a "
                            f"uniform head scores {float(uniform.mean()):.3f}); lower threshold")
    graph = Graph.from_model(model)
    # the full circuit: the verifier is used for its mean-ablation evaluator and its bootstrap only
    verifier = Verifier(model, prepared, graph, ablation="mean", seed=params.seed,
                        n_bootstrap=params.n_bootstrap)
    bootstrap = verifier.bootstrap
    intervals = {h: bootstrap.mean(per_prompt[:, parse_node(h).layer, parse_node(h).head]) for h in heads}

    with status("K-composition scores"), torch.no_grad():
        composition, baseline = k_composition_columns(model, heads, seed=params.seed)
    partners: list[PartnerScores] = []
    kept: dict[str, list[str]] = {}
    total = sum(len(earlier_heads(model, _lh(h)[0])) * len(prepared.batches) for h in heads)
    with progress_bar(total, "path patching into the induction heads' keys") as advance:
        for head in heads:
            senders = earlier_heads(model, _lh(head)[0])
            effects = key_path_effects(verifier, prepared, head, senders, max_batch=params.max_batch, advance=advance)
            p = PartnerScores(head, senders, composition[head], effects)
            partners.append(p)
            kept[head] = p.top(p.path_effect, params.n_partners)

    edges = sorted({e for head in heads for e in mechanism_edges([_lh(p) for p in kept[head]], [_lh(head)])},
                   key=graph.edge_id)
    circuit = Circuit.from_edges(graph, edges)
    circuit_heads = set(heads) | {p for ps in kept.values() for p in ps}
    controls = control_draws(model, circuit_heads, len(heads), params.n_controls, params.seed)

    with status("ablating the induction heads and the controls; circuit faithfulness"):
        full = verifier.full_mask
        masks = [full & ~verifier.out_edges(heads).any(0)]
        masks += [full & ~verifier.out_edges(draw).any(0) for draw in controls]
        masks.append(circuit.in_graph)
        rows = verifier.metric_rows(torch.stack(masks))  # [mask, prompt] of induction_logprob
        clean = verifier.ends[0]
        rise = clean - rows[0]  # loss = -induction_logprob
        faithfulness = verifier.faithfulness(circuit.in_graph.unsqueeze(0), rows[-1:])[0]
    control_rise = over = None
    if controls:
        control = (clean - rows[1:1 + len(controls)]).mean(0)
        control_rise, over = bootstrap.mean(control), bootstrap.mean(rise - control)
    return InductionStudy(
        model.spec, prepared.n_prompts, params.threshold, scores, float(uniform.mean()), heads, intervals, partners,
        kept, baseline, -float(clean.mean()), -float(rows[0].mean()), bootstrap.mean(rise),
        controls, control_rise, over, circuit, faithfulness)


def _lh(name: str) -> tuple[int, int]:
    node = parse_node(name)
    assert node.layer is not None and node.head is not None  # head names only
    return node.layer, node.head


def _compute(model: Model, task: Task | None, params: InductionStudyParams) -> InductionStudy:
    assert task is not None  # the entry requires a task
    return induction_study(model, task, params)


INDUCTION: Analysis[InductionStudyParams] = Analysis(
    "study/induction", "Induction case study: induction heads by score, their previous-token partners by "
    "K-composition and path patching, mean ablation against a control, the circuit's faithfulness",
    InductionStudyParams, _compute,
)
