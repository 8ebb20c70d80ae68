"""Measures of how well a circuit explains a model's behaviour, on the masked-edge engine.

A circuit C (a set of edges) runs with every edge outside it ablated (corrupt, mean, zero or resample;
graph/ablation.py). With m the task metric averaged over prompts, M the full model and the empty circuit
(every edge ablated):

- **faithfulness** f(C) = (m(C) - m(empty)) / (m(M) - m(empty))  (MIB's normalised form), and
  KL(M || C) of the next-token distributions at the answer position;
- **consistency**: per prompt, the top-1 agreement of M and C at the answer position, max |logit(M) -
  logit(C)| over the vocabulary, and whether that stays within a tolerance;
- **completeness** (Wang et al. 2022, "Interpretability in the Wild"): for subsets K of the circuit's nodes,
  the gap |f(C \\ K) - f(M \\ K)| (removing a node ablates every edge out of it); the worst gap over random
  subsets and a greedy search;
- **minimality**: per node (and optionally per edge) the drop f(C) - f(C without it);
- **perturbation**: Gaussian noise of relative strength s on the input embeddings; the relative change
  ||logits(noisy) - logits|| / ||logits|| at the answer position of M and of C;
- **comparison** of two circuits A, B: Jaccard of edges and nodes, and A inside B:
  (m(A & B) - m(empty)) / (m(B) - m(empty)), the share of B's behaviour the part of A inside B keeps.

Every number comes with a bootstrap 95% interval over prompts (bootstrap.py). See docs/METHODS.md,
"Circuit verification".
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float

from circuitlab.discovery.faithfulness import CircuitEvaluator
from circuitlab.errors import DiscoveryError, VerifyError
from circuitlab.graph.circuit import Circuit
from circuitlab.models.hooks import hook_name
from circuitlab.models.model import Model
from circuitlab.progress import progress_bar
from circuitlab.tasks.task import PreparedTask, Task, TaskBatch
from circuitlab.verify.bootstrap import Bootstrap, Interval

Mask = Bool[torch.Tensor, " edge"]
Masks = Bool[torch.Tensor, "k edge"]
DEFAULT_NOISE = (0.0, 0.05, 0.1, 0.2, 0.5)


def answer_logits(logits: torch.Tensor, batch: TaskBatch, reference: torch.Tensor | None) -> torch.Tensor:
    """The next-token logits [rows, vocab] at each prompt's answer position (an evaluator `read`)."""
    return logits[torch.arange(logits.shape[0]), batch.answer_pos]


def faithfulness_statistic(means: torch.Tensor) -> torch.Tensor:
    """Rows [full, empty, circuit...] of prompt means -> f of each circuit."""
    full, empty = means[0], means[1]
    return (means[2:] - empty) / (full - empty)


def check_noise(levels: tuple[float, ...]) -> tuple[float, ...]:
    if not levels or any(not math.isfinite(s) or s < 0 for s in levels):
        raise VerifyError(f"noise levels must be finite numbers >= 0 (relative to the embedding norm), got {levels!r}")
    return tuple(sorted(set(float(s) for s in levels)))


def check_positive(name: str, value: float) -> float:
    if not math.isfinite(value) or value < 0:
        raise VerifyError(f"{name} must be a finite number >= 0, got {value!r}")
    return value


@dataclass
class Consistency:
    """Per prompt: top-1 agreement, max |logit difference| at the answer position, KL(M || C), within tolerance."""

    top1_agree: Float[torch.Tensor, " prompt"]
    max_abs_diff: Float[torch.Tensor, " prompt"]
    kl: Float[torch.Tensor, " prompt"]
    tolerance: float

    @property
    def within(self) -> Float[torch.Tensor, " prompt"]:
        return (self.max_abs_diff <= self.tolerance).double()

    def records(self, labels: list[str]) -> list[dict[str, Any]]:
        return [{"prompt": i, "text": labels[i], "top1_agree": bool(a), "max_abs_logit_diff": float(d),
                 "kl": float(k), "allclose": bool(d <= self.tolerance)}
                for i, (a, d, k) in enumerate(zip(self.top1_agree, self.max_abs_diff, self.kl, strict=True))]


@dataclass
class Completeness:
    """The worst gap |f(C \\ K) - f(M \\ K)| found and its K; every subset tried (source: random, greedy)."""

    worst: Interval
    worst_nodes: list[str]
    tried: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Perturbation:
    """Mean relative output change (with intervals) of the full model and the circuit at each noise level,
    and the slope of each curve: the least-squares line through the origin, sum(s * change) / sum(s^2)."""

    levels: list[float]
    model: list[Interval]
    circuit: list[Interval]
    model_slope: Interval
    circuit_slope: Interval

    def records(self) -> list[dict[str, Any]]:
        return [{"noise": s, **m.as_dict("model_change"), **c.as_dict("circuit_change")}
                for s, m, c in zip(self.levels, self.model, self.circuit, strict=True)]


class Verifier:
    """One circuit on one task under one ablation: the evaluator, the per-prompt ends and the bootstrap."""

    def __init__(self, model: Model, task: Task | PreparedTask, circuit: Circuit, *, ablation: str = "corrupt",
                 metric: str | None = None, seed: int = 0, n_bootstrap: int = 1000,
                 rows_per_forward: int | None = None):
        try:
            self.evaluator = CircuitEvaluator(model, task, ablation=ablation, metric=metric, graph=circuit.graph,
                                              seed=seed, rows_per_forward=rows_per_forward)
        except DiscoveryError as exc:
            raise VerifyError(f"{exc} (ablation {ablation!r})") from None
        self.model, self.circuit, self.ablation, self.seed = model, circuit, ablation, seed
        self.graph = self.evaluator.graph
        self.prepared = self.evaluator.prepared
        self.n_prompts = self.prepared.n_prompts
        self.bootstrap = Bootstrap(self.n_prompts, n_bootstrap, seed)
        ends = self.evaluator.per_prompt(torch.stack([self.full_mask, ~self.full_mask]))
        self.ends = ends.double()  # [2, prompt]: full model, empty circuit
        self._rows: dict[bytes, torch.Tensor] = {}  # per-prompt metric rows by mask digest

    @property
    def full_mask(self) -> Mask:
        return torch.ones(self.graph.n_edges, dtype=torch.bool)

    @property
    def metric_name(self) -> str:
        return self.evaluator.scorer.name

    # --- faithfulness -------------------------------------------------------------------------------------
    def metric_rows(self, masks: Masks) -> Float[torch.Tensor, "k prompt"]:
        """Per-prompt metric of each mask; a mask run before (minimality's C without v is completeness's
        C \\ {v}) is not run again."""
        keys = [hashlib.sha1(m.numpy().tobytes()).digest() for m in masks]
        todo = list(dict.fromkeys(key for key in keys if key not in self._rows))
        if todo:
            first = {key: i for i, key in reversed(list(enumerate(keys)))}
            rows = self.evaluator.per_prompt(masks[[first[key] for key in todo]]).double()
            self._rows.update(zip(todo, rows, strict=True))
        return torch.stack([self._rows[key] for key in keys])

    def faithfulness(self, masks: Masks, rows: torch.Tensor | None = None) -> list[Interval]:
        """f of each mask with its interval (rows: their per-prompt metric, when already computed)."""
        rows = self.metric_rows(masks) if rows is None else rows
        return self.bootstrap.intervals(torch.cat([self.ends, rows]), faithfulness_statistic)

    def consistency(self, mask: Mask, tolerance: float) -> Consistency:
        """The circuit's and the full model's next-token logits side by side, per prompt."""
        logits = self.evaluator.per_prompt(torch.stack([self.full_mask, mask]), read=answer_logits)
        full, circuit = logits[0].double(), logits[1].double()
        kl = (F.softmax(full, -1) * (F.log_softmax(full, -1) - F.log_softmax(circuit, -1))).sum(-1)
        return Consistency((full.argmax(-1) == circuit.argmax(-1)).double(), (full - circuit).abs().amax(-1),
                           kl.clamp_min(0.0), tolerance)

    # --- nodes --------------------------------------------------------------------------------------------
    def removable_nodes(self, mask: Mask) -> list[str]:
        """The circuit's sender nodes other than the input (heads and MLPs), in graph order."""
        return [n for n in Circuit(self.graph, mask).nodes if n not in ("input", "logits")]

    def out_edges(self, nodes: list[str]) -> Bool[torch.Tensor, "node edge"]:
        """For each node, the edges it sends (removing the node ablates all of them)."""
        index = torch.tensor([self.graph.sender_index[n] for n in nodes], dtype=torch.long)
        return self.graph.edge_src.unsqueeze(0) == index.unsqueeze(1)

    # --- minimality ---------------------------------------------------------------------------------------
    def minimality(self, mask: Mask, *, per_edge: bool = False) -> list[dict[str, Any]]:
        """Per node (and edge) of the circuit: drop = f(C) - f(C without it), with its interval."""
        nodes = self.removable_nodes(mask)
        components: list[tuple[str, str, Mask]] = [(n, "node", mask & ~row) for n, row in
                                                   zip(nodes, self.out_edges(nodes), strict=True)]
        if per_edge:
            for e in torch.nonzero(mask).flatten().tolist():
                without = mask.clone()
                without[e] = False
                components.append((self.graph.edges[e], "edge", without))
        if not components:
            return []
        masks = torch.stack([mask, *[c[2] for c in components]])
        rows = self._rows_with_progress(masks, "minimality")

        def drops(means: torch.Tensor) -> torch.Tensor:
            f = faithfulness_statistic(means)
            return f[0] - f[1:]

        intervals = self.bootstrap.intervals(torch.cat([self.ends, rows]), drops)
        return [{"component": name, "kind": kind, **interval.as_dict("drop")}
                for (name, kind, _), interval in zip(components, intervals, strict=True)]

    def _rows_with_progress(self, masks: Masks, what: str, chunk: int = 32) -> torch.Tensor:
        parts = []
        with progress_bar(masks.shape[0], f"{what}: {masks.shape[0]} masked runs") as advance:
            for first in range(0, masks.shape[0], chunk):
                parts.append(self.metric_rows(masks[first:first + chunk]))
                advance(min(chunk, masks.shape[0] - first))
        return torch.cat(parts)

    # --- completeness -------------------------------------------------------------------------------------
    def completeness(self, mask: Mask, *, subsets: int = 8, greedy_steps: int = 2) -> Completeness:
        """Worst |f(C \\ K) - f(M \\ K)| over K = {} , `subsets` random node subsets (each node in with
        probability 1/2) and a greedy search adding, `greedy_steps` times, the node that widens the gap most."""
        nodes = self.removable_nodes(mask)
        out = self.out_edges(nodes) if nodes else torch.zeros(0, self.graph.n_edges, dtype=torch.bool)
        rng = random.Random(self.seed)
        candidates: list[tuple[str, frozenset[int]]] = [("empty", frozenset())]
        candidates += [("random", frozenset(i for i in range(len(nodes)) if rng.random() < 0.5))
                       for _ in range(subsets if nodes else 0)]
        total = 2 * len(candidates) + 2 * sum(max(0, len(nodes) - s) for s in range(min(greedy_steps, len(nodes))))
        tried: dict[frozenset[int], tuple[float, torch.Tensor]] = {}
        with progress_bar(total, "completeness search") as advance:
            def gaps(sets: list[frozenset[int]]) -> list[float]:
                new = [s for s in dict.fromkeys(sets) if s not in tried]
                if new:
                    removed = torch.stack([out[sorted(s)].any(0) if s else torch.zeros(self.graph.n_edges, dtype=torch.bool)
                                           for s in new])
                    masks = torch.cat([mask.unsqueeze(0) & ~removed, ~removed])
                    rows = self.metric_rows(masks)
                    advance(masks.shape[0])
                    for i, s in enumerate(new):
                        pair = torch.stack([rows[i], rows[len(new) + i]])
                        f = faithfulness_statistic(torch.cat([self.ends, pair]).mean(-1))
                        tried[s] = (float((f[0] - f[1]).abs()), pair)
                return [tried[s][0] for s in sets]

            sources: dict[frozenset[int], str] = {}
            for source, s in candidates:
                sources.setdefault(s, source)
            gaps([s for _, s in candidates])
            current: frozenset[int] = frozenset()
            for _ in range(min(greedy_steps, len(nodes))):
                options = [current | {i} for i in range(len(nodes)) if i not in current]
                values = gaps(options)
                current = options[max(range(len(options)), key=values.__getitem__)]
                sources.setdefault(current, "greedy")
        worst_set = max(tried, key=lambda s: tried[s][0])

        def gap(means: torch.Tensor) -> torch.Tensor:
            f = faithfulness_statistic(means)
            return (f[0] - f[1]).abs()

        worst = self.bootstrap.interval(torch.cat([self.ends, tried[worst_set][1]]), gap)
        rows = [{"source": sources.get(s, "greedy"), "size": len(s), "gap": value,
                 "nodes": " ".join(nodes[i] for i in sorted(s))} for s, (value, _) in tried.items()]
        return Completeness(worst, [nodes[i] for i in sorted(worst_set)], sorted(rows, key=lambda r: -r["gap"]))

    # --- perturbation -------------------------------------------------------------------------------------
    def perturbation(self, mask: Mask, levels: tuple[float, ...] = DEFAULT_NOISE) -> Perturbation:
        """Relative change of the full model's and the circuit's answer logits under input-embedding noise.

        Noise at a token with embedding e: s * ||e|| / sqrt(d_model) * N(0, I), so its expected norm is
        about s * ||e||; one draw per prompt and position (seeded), shared by every level and by both runs.
        """
        levels = check_noise(levels)
        masks = torch.stack([self.full_mask, mask])
        clean = self.evaluator.per_prompt(masks, read=answer_logits).double()  # [2, prompt, vocab]
        d_model = self.model.d_model
        draws: dict[int, torch.Tensor] = {}
        for g, inputs in enumerate(self.evaluator.inputs):
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + g)
            draws[id(inputs)] = torch.randn(*inputs.tokens.shape, d_model, generator=generator)
        changes = []
        with progress_bar(len(levels), "perturbation") as advance:
            for level in levels:
                def hooks(inputs: Any, k: int, level: float = level) -> list[Any]:
                    noise = draws[id(inputs)].repeat(k, 1, 1)

                    def add(x: torch.Tensor, hook: Any) -> torch.Tensor:
                        scale = level * x.norm(dim=-1, keepdim=True) / math.sqrt(d_model)
                        return x + scale * noise.to(x.dtype)
                    return [(hook_name("resid_pre", 0), add)]

                noisy = self.evaluator.per_prompt(masks, read=answer_logits, hooks=hooks).double()
                change = (noisy - clean).norm(dim=-1) / clean.norm(dim=-1).clamp_min(torch.finfo(torch.float64).tiny)
                changes.append(change)
                advance(1)
        rows = torch.stack(changes, 1)  # [2 (model, circuit), level, prompt]
        weights = torch.tensor(levels, dtype=torch.float64)
        norm = float((weights ** 2).sum())

        def slope(means: torch.Tensor) -> torch.Tensor:  # [level, *resamples] -> [*resamples]
            return torch.tensordot(weights, means, dims=1) / norm if norm > 0 else torch.full_like(means[0], math.nan)

        curves = [self.bootstrap.intervals(r, lambda means: means) for r in rows]
        slopes = [self.bootstrap.interval(r, slope) for r in rows]
        return Perturbation(list(levels), curves[0], curves[1], slopes[0], slopes[1])

    # --- comparison ---------------------------------------------------------------------------------------
    def compare(self, mask: Mask, other: Mask) -> dict[str, Interval]:
        """Each circuit's faithfulness, and each one inside the other (see the module docstring)."""
        rows = self.metric_rows(torch.stack([mask, other, mask & other]))

        def inside(means: torch.Tensor) -> torch.Tensor:
            full, empty, a, b, both = means
            return torch.stack([(a - empty) / (full - empty), (b - empty) / (full - empty),
                                (both - empty) / (b - empty), (both - empty) / (a - empty)])

        names = ("faithfulness", "other_faithfulness", "inside_other", "other_inside")
        return dict(zip(names, self.bootstrap.intervals(torch.cat([self.ends, rows]), inside), strict=True))


def kl_interval(verifier: Verifier, consistency: Consistency) -> Interval:
    return verifier.bootstrap.mean(consistency.kl)

