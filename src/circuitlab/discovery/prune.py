"""`discover/prune`: learn a mask over the edges (edge pruning) with the model's weights frozen.

Every edge e gets a *hard-concrete* gate z_e in [0, 1] (Louizos et al. 2018, "Learning Sparse Neural
Networks through L0 Regularization"), as in edge pruning (Bhaskar et al. 2024, "Finding Transformer
Circuits with Edge Pruning"). With a learned logit log_alpha_e and u ~ U(0, 1)::

    s = sigmoid((log u - log(1 - u) + log_alpha) / beta),   z = clamp(s (zeta - gamma) + gamma, 0, 1)

(beta = 2/3, gamma = -0.1, zeta = 1.1): z is exactly 0 or 1 with positive probability and differentiable in
log_alpha in between. The gates are the coefficients of the masked-edge engine (`MaskedEdgeEngine.run`
with differentiable coefficients [edge]), so a gate of 0 ablates its edge. The loss is

    faithfulness loss + lambda1 (k/N - t) + lambda2 (k/N - t)^2

with k = sum_e P(z_e > 0) (the expected number of kept edges), N the graph's edges, the faithfulness loss
the mean `kl` between the full model and the sampled circuit (or, for a task metric, the mean per-prompt
|m(circuit) - m(full)|), and t the target fraction of edges, lowered linearly from 1 to target / N over the
first half of the steps. Adam minimises over the logits and maximises over the two Lagrange multipliers
(which therefore grow while the circuit is larger than t), as in edge pruning. The mask of an edge is
its gate without noise, clamp(sigmoid(log_alpha) (zeta - gamma) + gamma, 0, 1): above 0.5 exactly when
log_alpha > 0. Training stops when at most `target_edges` masks exceed 0.5, or after `steps` steps; the
learned circuit is then the `target_edges` edges with the largest logits (so it has exactly that size
whichever way training stopped).

Scores in circuit.json and the records are the keep probabilities sigmoid(log_alpha) (in (0, 1), ranked
like the logits also by |score|, which MIB tools use); the logits themselves are in the records. See
docs/METHODS.md, "Learned edge masks".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float

from circuitlab.analysis import Analysis
from circuitlab.discovery.analysis import Discovery, answers_optional
from circuitlab.discovery.faithfulness import CircuitEvaluator, faithfulness_curve, faithfulness_of
from circuitlab.discovery.metrics import DiscoveryMetric, check_metric_name
from circuitlab.discovery.scores import (
    BatchInputs,
    EdgeScoring,
    at_read_positions,
    check_ablation,
    gradient_rows,
)
from circuitlab.discovery.selection import check_edge_count, top_n_mask
from circuitlab.errors import DiscoveryError
from circuitlab.graph.circuit import Circuit
from circuitlab.graph.graph import Graph
from circuitlab.graph.masked import MaskedEdgeEngine
from circuitlab.models.model import Model
from circuitlab.progress import progress_bar, status
from circuitlab.tasks.task import Task

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Hard-concrete constants of Louizos et al. (2018), also edge pruning's.
BETA, GAMMA, ZETA = 2 / 3, -0.1, 1.1
# Initial logit: P(z = 1) = 0.6 per edge, so the first circuits are close to the full model while every
# gate still gets a gradient in 40% of the samples (at larger logits the clamp hides most of them).
INIT_LOGIT = 2.0
INIT_SPREAD = 0.01  # seeded jitter of the initial logits, breaking ties between edges no loss distinguishes
DEFAULT_FRACTION = 0.05  # target_edges when not given: 5% of the graph's edges
WARMUP = 0.5  # the target fraction reaches target / N after this fraction of the steps

EdgeLogits = Float[torch.Tensor, " edge"]


@dataclass(frozen=True)
class PruneParams:
    """ablation: corrupt | mean | zero | resample. score_metric: kl (default), l2 or a task metric (the loss
    is then |m(circuit) - m(full)| per prompt). positions: last | all. target_edges: edges the learned
    circuit keeps (default 5% of the graph, at least 1). steps: training steps. lr: Adam's learning rate
    (logits and Lagrange multipliers). seed: the gates' noise and the initial jitter. curve: also
    measure the faithfulness curve of the top-n edges by logit (CPR, CMD; faithfulness.png)."""

    ablation: str = "corrupt"
    score_metric: str | None = "kl"
    positions: str = "last"
    target_edges: int | None = None
    steps: int = 200
    lr: float = 0.1
    seed: int = 0
    curve: bool = True

    def __post_init__(self) -> None:
        check_ablation(self.ablation)
        check_metric_name(self.score_metric, self.positions)
        if self.target_edges is not None:
            check_target_edges(self.target_edges)
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise DiscoveryError(f"steps must be a positive integer (training steps), got {self.steps!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not 0 < self.lr < math.inf:
            raise DiscoveryError(f"lr must be a positive number (Adam's learning rate), got {self.lr!r}")


def check_target_edges(target: int, graph: Graph | None = None) -> int:
    """A positive edge count, at most the graph's size when the graph is known."""
    return check_edge_count(target, "target edges", graph, minimum=1)


def default_target(graph: Graph) -> int:
    return max(1, round(DEFAULT_FRACTION * graph.n_edges))


# --- hard-concrete gates ------------------------------------------------------------------------------------

def sample_gates(logits: EdgeLogits, generator: torch.Generator) -> EdgeLogits:
    """One stretched, clamped hard-concrete sample per edge (differentiable in `logits`)."""
    u = torch.rand(logits.shape, generator=generator).clamp(1e-6, 1 - 1e-6)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + logits) / BETA)
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def deterministic_mask(logits: EdgeLogits) -> EdgeLogits:
    """The gates without noise; > 0.5 exactly when the logit is > 0."""
    return (torch.sigmoid(logits) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def expected_kept(logits: EdgeLogits) -> torch.Tensor:
    """sum_e P(z_e > 0): the expected L0 norm of the gates (the number of edges a sample keeps)."""
    return torch.sigmoid(logits - BETA * math.log(-GAMMA / ZETA)).sum()


# --- training -----------------------------------------------------------------------------------------------

@dataclass
class PruneTraining:
    """The learned logits, one log row per step (step, loss, metric, faithfulness of the sampled circuit,
    expected and mask > 0.5 edge counts, the scheduled target, lambda1), and why training stopped."""

    logits: EdgeLogits
    log: list[dict[str, float]]
    target_edges: int
    stopped: str

    def csv(self) -> str:
        if not self.log:
            return ""
        names = list(self.log[0])
        return "\n".join([",".join(names), *(",".join(f"{row[n]:.6g}" for n in names) for row in self.log)]) + "\n"

    def figure(self) -> Figure:
        """prune.png: loss, edge counts (mask > 0.5, expected, scheduled target) and faithfulness per step."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(9.0, 3.0), dpi=150)
        steps = [row["step"] for row in self.log]
        axes = fig.subplots(1, 3)
        axes[0].plot(steps, [row["loss"] for row in self.log], color="#1f77b4")
        axes[0].set_title("loss", fontsize=9)
        axes[1].plot(steps, [row["edges"] for row in self.log], color="#d62728", label="mask > 0.5")
        axes[1].plot(steps, [row["expected_edges"] for row in self.log], color="#ff7f0e", label="expected")
        axes[1].plot(steps, [row["scheduled_edges"] for row in self.log], color="#7f7f7f", ls="--",
                     label="scheduled")
        axes[1].axhline(self.target_edges, color="#2ca02c", lw=0.8, ls=":", label="target")
        axes[1].set_yscale("log")
        axes[1].set_title("edges", fontsize=9)
        axes[1].legend(fontsize=6, frameon=False)
        axes[2].plot(steps, [row["faithfulness"] for row in self.log], color="#9467bd")
        axes[2].axhline(1.0, color="#7f7f7f", lw=0.8, ls="--")
        axes[2].set_title("faithfulness (sampled mask)", fontsize=9)
        for ax in axes:
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
        fig.suptitle(f"learned edge mask: {self.stopped}", fontsize=9)
        fig.tight_layout()
        return fig


def learn_edge_mask(evaluator: CircuitEvaluator, target_edges: int, *, steps: int = 200, lr: float = 0.1,
                    seed: int = 0) -> PruneTraining:
    """Train the edge logits on the evaluator's task, ablation and metric (see the module docstring)."""
    graph, engine, scorer = evaluator.graph, evaluator.engine, evaluator.scorer
    check_target_edges(target_edges, graph)
    n_edges, n_prompts = graph.n_edges, evaluator.prepared.n_prompts
    generator = torch.Generator().manual_seed(seed)
    logits = (INIT_LOGIT + INIT_SPREAD * torch.randn(n_edges, generator=generator)).requires_grad_()
    lambdas = torch.zeros(2, requires_grad=True)
    optimiser = torch.optim.Adam([logits, lambdas], lr=lr)
    parts = _parts(evaluator)
    warmup = max(1, round(WARMUP * steps))
    log: list[dict[str, float]] = []
    stopped = f"step budget ({steps} steps) reached"
    with progress_bar(steps, "learning edge mask") as advance:
        for step in range(1, steps + 1):
            optimiser.zero_grad()
            gates = sample_gates(logits, generator)
            leaf = gates.detach().requires_grad_()
            loss_sum, metric_sum = _faithfulness_loss(engine, scorer, parts, leaf)
            if leaf.grad is None:  # every part's loss.backward() reaches the gates
                raise DiscoveryError("the faithfulness loss gave the edge gates no gradient")
            gates.backward(leaf.grad / n_prompts)
            scheduled = n_edges - (n_edges - target_edges) * min(1.0, step / warmup)
            gap = expected_kept(logits) / n_edges - scheduled / n_edges
            penalty = lambdas[0] * gap + lambdas[1] * gap**2
            penalty.backward()
            assert lambdas.grad is not None
            lambdas.grad.neg_()  # gradient ascent on the multipliers
            optimiser.step()
            with torch.no_grad():
                kept = int((logits > 0).sum())
                metric = metric_sum / n_prompts
                row = {"step": step, "loss": loss_sum / n_prompts + float(penalty), "metric": metric,
                       "faithfulness": (metric - evaluator.empty) / (evaluator.full - evaluator.empty),
                       "expected_edges": float(expected_kept(logits)), "edges": kept,
                       "scheduled_edges": scheduled, "lambda1": float(lambdas[0])}
            log.append(row)
            advance(1, f"loss {row['loss']:.4g} f {row['faithfulness']:.3f} edges {kept}")
            if kept <= target_edges:
                stopped = f"target reached at step {step} ({kept} masks > 0.5)"
                break
    return PruneTraining(logits.detach().clone(), log, target_edges, stopped)


@dataclass
class _Part:
    """A slice of one token-length group, small enough for one masked forward + backward, with the full
    model's per-prompt metric (for task metrics: the value the circuit should keep)."""

    inputs: BatchInputs  # re-indexed to the read positions
    positions: torch.Tensor | None
    full: torch.Tensor | None


def _parts(evaluator: CircuitEvaluator) -> list[_Part]:
    engine, scorer = evaluator.engine, evaluator.scorer
    parts = []
    for inputs in evaluator.inputs:
        rows = gradient_rows(engine, inputs.batch.n_pos)
        for first in range(0, inputs.batch.size, rows):
            part, positions = at_read_positions(scorer, inputs.select(list(range(first, min(first + rows, inputs.batch.size)))))
            full = None
            if not scorer.needs_reference:
                with torch.no_grad():
                    ones = torch.ones(evaluator.graph.n_edges)
                    full = scorer(engine.run(part.tokens, ones, part.ablated, positions=positions), part.batch)
            parts.append(_Part(part, positions, full))
    return parts


def _faithfulness_loss(engine: MaskedEdgeEngine, scorer: DiscoveryMetric, parts: list[_Part], gates: EdgeLogits) -> tuple[float, float]:
    """Accumulate d(summed loss)/d(gates) into `gates.grad`; return the summed loss and metric."""
    loss_sum = metric_sum = 0.0
    for part in parts:
        with torch.enable_grad():
            logits = engine.run(part.inputs.tokens, gates, part.inputs.ablated, positions=part.positions)
            values = scorer(logits, part.inputs.batch, part.inputs.reference)
            loss = values.sum() if part.full is None else (values - part.full).abs().sum()
            loss.backward()
        loss_sum += float(loss.detach())
        metric_sum += float(values.detach().sum())
    return loss_sum, metric_sum


# --- the analysis -------------------------------------------------------------------------------------------

@dataclass
class PruneDiscovery(Discovery):
    """A `Discovery` whose scores are keep probabilities, plus the training log (prune.png, prune_log.csv)."""

    training: PruneTraining | None = field(default=None)

    def records(self) -> list[dict[str, Any]]:
        rows = super().records()
        assert self.training is not None
        logits = self.training.logits.tolist()
        for row in rows:
            row["mask_logit"] = logits[row["edge_index"]]
        return rows

    def summary(self) -> dict[str, Any]:
        out = super().summary()
        assert self.training is not None
        last = self.training.log[-1] if self.training.log else {}
        out.update({"target_edges": self.training.target_edges, "training_steps": len(self.training.log),
                    "stopped": self.training.stopped, "final_loss": last.get("loss", math.nan),
                    "final_masks_above_half": last.get("edges", math.nan)})
        return out

    def figures(self) -> dict[str, Figure]:
        figures = super().figures()
        assert self.training is not None
        figures["prune.png"] = self.training.figure()
        return figures

    def files(self) -> dict[str, str]:
        assert self.training is not None
        return {**super().files(), "prune_log.csv": self.training.csv()}


def prune(model: Model, task: Task, params: PruneParams) -> PruneDiscovery:
    """Learn the mask, keep the top `target_edges` edges by logit, measure that circuit and the curve."""
    graph = Graph.from_model(model)
    target = default_target(graph) if params.target_edges is None else check_target_edges(params.target_edges, graph)
    prepared = task.prepare(model)
    evaluator = CircuitEvaluator(model, prepared, ablation=params.ablation, metric=params.score_metric,
                                 positions=params.positions, graph=graph, seed=params.seed)
    training = learn_edge_mask(evaluator, target, steps=params.steps, lr=params.lr, seed=params.seed)
    keep = torch.sigmoid(training.logits)
    scoring = EdgeScoring(graph, keep, "prune", params.ablation, evaluator.scorer.name, params.positions,
                          None, prepared.n_prompts, evaluator.full)
    circuit = Circuit(graph, top_n_mask(training.logits, target, absolute=False), keep.clone(), model=model)
    with status("measuring faithfulness"):
        faithful = faithfulness_of(evaluator, circuit)
        curve = faithfulness_curve(evaluator, keep) if params.curve else None
    return PruneDiscovery(scoring, circuit, faithful, curve, ("target_edges", target), training=training)


def _compute(model: Model, task: Task | None, params: PruneParams) -> PruneDiscovery:
    assert task is not None  # the entry requires a task
    return prune(model, task, params)


PRUNE = Analysis("discover/prune", "circuit discovery by learned edge masks (hard-concrete edge pruning)",
                 PruneParams, _compute, task_source=answers_optional)
