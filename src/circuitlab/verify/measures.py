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

Every measure comes in two steps, so that a run split into prompt shards gives the one-process result:
`Verifier` computes *per-prompt values* of fixed masks (``*_rows`` methods: the masked runs, the only part
that needs the model), and `Finisher` turns per-prompt values into numbers with bootstrap 95% intervals over
prompts (bootstrap.py). Per-prompt values of consecutive prompt sets concatenate (`concat_prompts`) and any
prompts can be picked out of them (`select_prompts`). Only the greedy completeness search decides on the
way (the next node from the mean over every prompt), so it needs every prompt in one `Verifier`. See
docs/METHODS.md, "Circuit verification".
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Any, TypeVar, cast

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int

from circuitlab.discovery.faithfulness import CircuitEvaluator, undefined_reason
from circuitlab.errors import DiscoveryError, VerifyError
from circuitlab.graph.circuit import Circuit
from circuitlab.graph.graph import Graph
from circuitlab.models.hooks import hook_name
from circuitlab.models.model import Model
from circuitlab.progress import progress_bar
from circuitlab.tasks.task import PreparedTask, Task, TaskBatch
from circuitlab.verify.bootstrap import Bootstrap, Interval

Mask = Bool[torch.Tensor, " edge"]
Masks = Bool[torch.Tensor, "k edge"]
Ends = Float[torch.Tensor, "2 prompt"]  # per-prompt metric of the full model and of the empty circuit
DEFAULT_NOISE = (0.0, 0.05, 0.1, 0.2, 0.5)
T = TypeVar("T")


def answer_logits(logits: torch.Tensor, batch: TaskBatch, reference: torch.Tensor | None) -> torch.Tensor:
    """The next-token logits [rows, vocab] at each prompt's answer position (an evaluator `read`)."""
    return logits[torch.arange(logits.shape[0]), batch.answer_pos]


def faithfulness_statistic(means: torch.Tensor) -> torch.Tensor:
    """Rows [full, empty, circuit...] of prompt means -> f of each circuit."""
    full, empty = means[0], means[1]
    return (means[2:] - empty) / (full - empty)


def completeness_gap(means: torch.Tensor) -> torch.Tensor:
    """Rows [full, empty, C \\ K, M \\ K] of prompt means -> |f(C \\ K) - f(M \\ K)|."""
    f = faithfulness_statistic(means)
    return (f[0] - f[1]).abs()


def check_noise(levels: tuple[float, ...]) -> tuple[float, ...]:
    if not levels or any(not math.isfinite(s) or s < 0 for s in levels):
        raise VerifyError(f"noise levels must be finite numbers >= 0 (relative to the embedding norm), got {levels!r}")
    return tuple(sorted(set(float(s) for s in levels)))


def check_positive(name: str, value: float) -> float:
    if not math.isfinite(value) or value < 0:
        raise VerifyError(f"{name} must be a finite number >= 0, got {value!r}")
    return value


def undefined(ends: Ends, metric: str, ablation: str) -> str | None:
    """Why faithfulness is undefined on these prompts (m(full) = m(empty)), or None when it is defined. A
    property of the means over *every* prompt: a run split into prompt shards tests the merged values."""
    reason = undefined_reason(float(ends[0].mean()), float(ends[1].mean()), metric)
    return None if reason is None else f"{reason} (ablation {ablation!r})"


# --- per-prompt values: prompt is the last dimension of every tensor ----------------------------------------

def concat_prompts(parts: list[T]) -> T:
    """Per-prompt values of consecutive prompt sets (shards, in task order) as one: tensors are concatenated
    along their last (prompt) dimension, dataclasses and dicts field by field; anything else (component
    names, noise levels, a note) is the same in every part and taken from the first."""
    return cast(T, _concat(list(parts)))


def select_prompts(values: T, indices: list[int]) -> T:
    """The per-prompt values of the prompts at `indices` (see `concat_prompts`)."""
    return cast(T, _select(values, torch.tensor(indices, dtype=torch.long)))


def _concat(parts: list[Any]) -> Any:
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts, -1)
    if is_dataclass(first) and not isinstance(first, type):
        return replace(first, **{f.name: _concat([getattr(p, f.name) for p in parts]) for f in fields(first) if f.init})
    if isinstance(first, dict):
        return {key: _concat([p[key] for p in parts]) for key in first}
    return first


def _select(values: Any, indices: torch.Tensor) -> Any:
    if isinstance(values, torch.Tensor):
        return values[..., indices]
    if is_dataclass(values) and not isinstance(values, type):
        return replace(values, **{f.name: _select(getattr(values, f.name), indices) for f in fields(values) if f.init})
    if isinstance(values, dict):
        return {key: _select(item, indices) for key, item in values.items()}
    return values


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
class MinimalityRows:
    """Per-prompt metric of the circuit (row 0) and of the circuit without each component (rows 1...)."""

    components: list[tuple[str, str]]  # (name, "node" | "edge")
    rows: Float[torch.Tensor, "component_plus_1 prompt"]


@dataclass
class CompletenessRows:
    """Per-prompt metric of C \\ K and M \\ K for every node set K tried, in the order tried, with where each
    set came from (empty, random, greedy). Sets hold indices into `nodes`."""

    nodes: list[str]
    sets: list[tuple[str, frozenset[int]]]
    rows: Float[torch.Tensor, "set 2 prompt"]


@dataclass
class PerturbationRows:
    """Per-prompt relative output change of the full model (row 0) and the circuit (row 1) at each level."""

    levels: list[float]
    changes: Float[torch.Tensor, "2 level prompt"]


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


# --- finishing: per-prompt values -> numbers with intervals -------------------------------------------------

class Finisher:
    """The numbers of a verification from per-prompt values, each with its bootstrap interval; `ends` are the
    full model's and the empty circuit's per-prompt metric, in the same prompt order as every row given."""

    def __init__(self, ends: Ends, bootstrap: Bootstrap):
        self.ends, self.bootstrap = ends.double(), bootstrap

    def faithfulness(self, rows: Float[torch.Tensor, "k prompt"]) -> list[Interval]:
        """f of each row (a circuit's per-prompt metric) with its interval."""
        return self.bootstrap.intervals(torch.cat([self.ends, rows.double()]), faithfulness_statistic)

    def mean(self, values: Float[torch.Tensor, " prompt"]) -> Interval:
        return self.bootstrap.mean(values.double())

    def minimality(self, values: MinimalityRows) -> list[dict[str, Any]]:
        """Per component: drop = f(C) - f(C without it), with its interval."""
        if not values.components:
            return []

        def drops(means: torch.Tensor) -> torch.Tensor:
            f = faithfulness_statistic(means)
            return f[0] - f[1:]

        intervals = self.bootstrap.intervals(torch.cat([self.ends, values.rows.double()]), drops)
        return [{"component": name, "kind": kind, **interval.as_dict("drop")}
                for (name, kind), interval in zip(values.components, intervals, strict=True)]

    def gap_value(self, pair: Float[torch.Tensor, "2 prompt"]) -> float:
        """|f(C \\ K) - f(M \\ K)| from the per-prompt rows of C \\ K and M \\ K (no interval)."""
        return float(completeness_gap(torch.cat([self.ends, pair.double()]).mean(-1)))

    def completeness(self, values: CompletenessRows) -> Completeness:
        """The worst gap over the sets tried (the first on ties, in the order tried), with its interval."""
        gaps = [self.gap_value(pair) for pair in values.rows]
        worst = max(range(len(gaps)), key=gaps.__getitem__)
        interval = self.bootstrap.interval(torch.cat([self.ends, values.rows[worst].double()]), completeness_gap)
        rows = [{"source": source, "size": len(s), "gap": gap, "nodes": " ".join(values.nodes[i] for i in sorted(s))}
                for (source, s), gap in zip(values.sets, gaps, strict=True)]
        worst_set = values.sets[worst][1]
        return Completeness(interval, [values.nodes[i] for i in sorted(worst_set)],
                            sorted(rows, key=lambda r: -r["gap"]))

    def perturbation(self, values: PerturbationRows) -> Perturbation:
        weights = torch.tensor(values.levels, dtype=torch.float64)
        norm = float((weights ** 2).sum())

        def slope(means: torch.Tensor) -> torch.Tensor:  # [level, *resamples] -> [*resamples]
            return torch.tensordot(weights, means, dims=1) / norm if norm > 0 else torch.full_like(means[0], math.nan)

        rows = values.changes.double()
        curves = [self.bootstrap.intervals(r, lambda means: means) for r in rows]
        slopes = [self.bootstrap.interval(r, slope) for r in rows]
        return Perturbation(list(values.levels), curves[0], curves[1], slopes[0], slopes[1])

    def compare(self, rows: Float[torch.Tensor, "3 prompt"]) -> dict[str, Interval]:
        """From the rows of A, B and A & B: each circuit's faithfulness, and each one inside the other."""
        def inside(means: torch.Tensor) -> torch.Tensor:
            full, empty, a, b, both = means
            return torch.stack([(a - empty) / (full - empty), (b - empty) / (full - empty),
                                (both - empty) / (b - empty), (both - empty) / (a - empty)])

        names = ("faithfulness", "other_faithfulness", "inside_other", "other_inside")
        intervals = self.bootstrap.intervals(torch.cat([self.ends, rows.double()]), inside)
        return dict(zip(names, intervals, strict=True))


# --- per-prompt values: the masked runs ---------------------------------------------------------------------

def prompt_noise(tokens: Int[torch.Tensor, "batch pos"], d_model: int, seed: int) -> Float[torch.Tensor, "batch pos d"]:
    """One standard-normal draw per prompt and position, seeded by `seed` and the prompt's tokens: a prompt
    gets the same noise whichever batch, token-length group or shard it runs in."""
    draws = []
    for row in tokens.detach().to("cpu", torch.int64):
        digest = hashlib.sha256(f"{seed}:".encode() + row.numpy().tobytes()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        draws.append(torch.randn(row.shape[0], d_model, generator=generator))
    return torch.stack(draws)


class Verifier:
    """Circuits of one graph on one task under one ablation: the evaluator, the per-prompt ends, and a
    `Finisher`; every measure takes the circuit's mask. graph: the edge graph the masks index (default: the
    model's own).

    check=False leaves the test that faithfulness is defined (`undefined`) to the caller: a shard of the
    task's prompts runs so, and the merged values are tested (see verify/analysis.py)."""

    def __init__(self, model: Model, task: Task | PreparedTask, graph: Graph | None = None, *,
                 ablation: str = "corrupt", metric: str | None = None, seed: int = 0, n_bootstrap: int = 1000,
                 rows_per_forward: int | None = None, check: bool = True):
        try:
            self.evaluator = CircuitEvaluator(model, task, ablation=ablation, metric=metric, graph=graph,
                                              seed=seed, rows_per_forward=rows_per_forward, check=False)
        except DiscoveryError as exc:
            raise VerifyError(f"{exc} (ablation {ablation!r})") from None
        self.model, self.seed = model, seed
        self.graph = self.evaluator.graph
        self.prepared = self.evaluator.prepared
        self.n_prompts = self.prepared.n_prompts
        self.bootstrap = Bootstrap(self.n_prompts, n_bootstrap, seed)
        self.ends = self.evaluator.ends_per_prompt().double()  # [2, prompt]: full model, empty circuit
        if check and (reason := undefined(self.ends, self.metric_name, ablation)) is not None:
            raise VerifyError(reason)
        self.finish = Finisher(self.ends, self.bootstrap)
        self._rows: dict[bytes, torch.Tensor] = {}  # per-prompt metric rows by mask digest

    @property
    def full_mask(self) -> Mask:
        return torch.ones(self.graph.n_edges, dtype=torch.bool)

    @property
    def metric_name(self) -> str:
        return self.evaluator.scorer.name

    # --- faithfulness -------------------------------------------------------------------------------------
    def metric_rows(self, masks: Masks, base: Mask | None = None) -> Float[torch.Tensor, "k prompt"]:
        """Per-prompt metric of each mask; a mask run before (minimality's C without v is completeness's
        C \\ {v}) is not run again. base: a mask the rows share on the edges into early layers (C, when
        they remove nodes of C): the runs restart from its recorded run (`CircuitEvaluator.per_prompt`)."""
        keys = [hashlib.sha1(m.numpy().tobytes()).digest() for m in masks]
        todo = list(dict.fromkeys(key for key in keys if key not in self._rows))
        if todo:
            first = {key: i for i, key in reversed(list(enumerate(keys)))}
            rows = self.evaluator.per_prompt(masks[[first[key] for key in todo]], base=base).double()
            self._rows.update(zip(todo, rows, strict=True))
        return torch.stack([self._rows[key] for key in keys])

    def faithfulness(self, masks: Masks, rows: torch.Tensor | None = None) -> list[Interval]:
        """f of each mask with its interval (rows: their per-prompt metric, when already computed)."""
        return self.finish.faithfulness(self.metric_rows(masks) if rows is None else rows)

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
    def minimality_rows(self, mask: Mask, *, per_edge: bool = False) -> MinimalityRows:
        """Per-prompt metric of C and of C without each node (and edge) of it."""
        nodes = self.removable_nodes(mask)
        components: list[tuple[str, str, Mask]] = [(n, "node", mask & ~row) for n, row in
                                                   zip(nodes, self.out_edges(nodes), strict=True)]
        if per_edge:
            for e in torch.nonzero(mask).flatten().tolist():
                without = mask.clone()
                without[e] = False
                components.append((self.graph.edges[e], "edge", without))
        masks = torch.stack([mask, *[c[2] for c in components]])
        # each row is C with a node's out-edges (or one edge) removed: it restarts after that node's layer
        rows = self._rows_with_progress(masks, "minimality", base=mask) if components else self.metric_rows(masks)
        return MinimalityRows([(name, kind) for name, kind, _ in components], rows)

    def minimality(self, mask: Mask, *, per_edge: bool = False) -> list[dict[str, Any]]:
        """Per node (and edge) of the circuit: drop = f(C) - f(C without it), with its interval."""
        return self.finish.minimality(self.minimality_rows(mask, per_edge=per_edge))

    def _rows_with_progress(self, masks: Masks, what: str, chunk: int = 32, base: Mask | None = None) -> torch.Tensor:
        parts = []
        with progress_bar(masks.shape[0], f"{what}: {masks.shape[0]} masked runs") as advance:
            for first in range(0, masks.shape[0], chunk):
                parts.append(self.metric_rows(masks[first:first + chunk], base))
                advance(min(chunk, masks.shape[0] - first))
        return torch.cat(parts)

    # --- completeness -------------------------------------------------------------------------------------
    def completeness_rows(self, mask: Mask, *, subsets: int = 8, greedy_steps: int = 2) -> CompletenessRows:
        """Per-prompt rows of C \\ K and M \\ K for K = {}, `subsets` random node subsets (each node in with
        probability 1/2, seeded) and a greedy search adding, `greedy_steps` times, the node that widens the
        gap most. The greedy search decides on the mean over this verifier's prompts: give it every prompt."""
        nodes = self.removable_nodes(mask)
        out = self.out_edges(nodes) if nodes else torch.zeros(0, self.graph.n_edges, dtype=torch.bool)
        rng = random.Random(self.seed)
        candidates: list[tuple[str, frozenset[int]]] = [("empty", frozenset())]
        candidates += [("random", frozenset(i for i in range(len(nodes)) if rng.random() < 0.5))
                       for _ in range(subsets if nodes else 0)]
        total = 2 * len(candidates) + 2 * sum(max(0, len(nodes) - s) for s in range(min(greedy_steps, len(nodes))))
        tried: dict[frozenset[int], tuple[str, torch.Tensor]] = {}
        with progress_bar(total, "completeness search") as advance:
            def run(sets: list[tuple[str, frozenset[int]]]) -> list[float]:
                new = list(dict.fromkeys(s for _, s in sets if s not in tried))
                if new:
                    source = {s: src for src, s in reversed(sets)}  # a set's first source names it
                    removed = torch.stack([out[sorted(s)].any(0) if s else torch.zeros(self.graph.n_edges, dtype=torch.bool)
                                           for s in new])
                    # C \\ K restarts from C's run, M \\ K from the full model's, after K's earliest layer
                    rows = torch.cat([self.metric_rows(mask.unsqueeze(0) & ~removed, mask),
                                      self.metric_rows(~removed, self.full_mask)])
                    advance(rows.shape[0])
                    for i, s in enumerate(new):
                        tried[s] = (source[s], torch.stack([rows[i], rows[len(new) + i]]))
                return [self.finish.gap_value(tried[s][1]) for _, s in sets]

            run(candidates)
            current: frozenset[int] = frozenset()
            for _ in range(min(greedy_steps, len(nodes))):
                options = [("greedy", current | {i}) for i in range(len(nodes)) if i not in current]
                values = run(options)
                current = options[max(range(len(options)), key=values.__getitem__)][1]
        return CompletenessRows(nodes, [(source, s) for s, (source, _) in tried.items()],
                                torch.stack([pair for _, pair in tried.values()]))

    def completeness(self, mask: Mask, *, subsets: int = 8, greedy_steps: int = 2) -> Completeness:
        """Worst |f(C \\ K) - f(M \\ K)| over the sets of `completeness_rows`, with its interval."""
        return self.finish.completeness(self.completeness_rows(mask, subsets=subsets, greedy_steps=greedy_steps))

    # --- perturbation -------------------------------------------------------------------------------------
    def perturbation_rows(self, mask: Mask, levels: tuple[float, ...] = DEFAULT_NOISE) -> PerturbationRows:
        """Per-prompt relative change of the full model's and the circuit's answer logits under
        input-embedding noise.

        Noise at a token with embedding e: s * ||e|| / sqrt(d_model) * N(0, I), so its expected norm is
        about s * ||e||; one draw per prompt and position (`prompt_noise`), shared by every level and by
        both runs.
        """
        levels = check_noise(levels)
        masks = torch.stack([self.full_mask, mask])
        clean = self.evaluator.per_prompt(masks, read=answer_logits).double()  # [2, prompt, vocab]
        d_model = self.model.d_model
        draws = {id(inputs): prompt_noise(inputs.tokens, d_model, self.seed) for inputs in self.evaluator.inputs}
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
        return PerturbationRows(list(levels), torch.stack(changes, 1))  # [2 (model, circuit), level, prompt]

    def perturbation(self, mask: Mask, levels: tuple[float, ...] = DEFAULT_NOISE) -> Perturbation:
        """Mean relative output change under embedding noise per level, and each curve's slope."""
        return self.finish.perturbation(self.perturbation_rows(mask, levels))

    # --- comparison ---------------------------------------------------------------------------------------
    def compare_rows(self, mask: Mask, other: Mask) -> Float[torch.Tensor, "3 prompt"]:
        """Per-prompt metric of A, B and A & B."""
        return self.metric_rows(torch.stack([mask, other, mask & other]))

    def compare(self, mask: Mask, other: Mask) -> dict[str, Interval]:
        """Each circuit's faithfulness, and each one inside the other (see the module docstring)."""
        return self.finish.compare(self.compare_rows(mask, other))


def kl_interval(verifier: Verifier, consistency: Consistency) -> Interval:
    return verifier.bootstrap.mean(consistency.kl)

