"""ACDC (Conmy et al. 2023, "Towards Automated Circuit Discovery for Mechanistic Interpretability").

The published greedy algorithm: start from the full graph; visit the receivers from the logits backwards;
for each receiver, try removing its incoming edges one at a time and remove an edge for good when the
metric of the *current* circuit moves by less than tau::

    for receiver r in ACDC's order:                  # logits, then per layer L-1..0: m{l}, every head's
        if r's node has no outgoing edge left:       #   q input (heads H-1..0), then k, then v
            remove every edge into r (untested)      # nothing reads r: its inputs cannot matter
            continue
        for edge e into r, latest sender first:      # m{l-1}, a{l-1}.h{H-1} .. h0, m{l-2}, ..., input
            m_e = metric(current circuit without e)
            if damage(m_e, m_current) < tau:         # damage = m_e - m_current for kl / l2 (lower is
                remove e; m_current = m_e            #   better), m_current - m_e for a task metric
            (score of e: m_e - m_current)

That order is the public ACDC code's: its correspondence lists the logits, then per layer (last first)
the MLP, then the heads' q inputs, k inputs and v inputs (heads in descending order), and each receiver's
parents in the order they were added (latest sender first). The metric defaults to `kl` (KL(full ||
circuit) at the answer position); an edge's ablated value comes from the chosen ablation (corrupt, mean,
zero or resample; graph/ablation.py). `acdc_sequential` is that loop verbatim: one full masked run per
tested edge.

`acdc` returns the same circuit, edge for edge, faster:

- **restarts**: when the receivers of layer l are processed, every removed edge goes into layer l or
  later (receivers are visited from the logits backwards), so every node before layer l still has its
  clean output. One recorded clean run (`MaskedEdgeEngine.record`) per token-length group therefore
  serves the whole search: each run restarts at layer l (the logits: only the final norm and the
  unembedding run). No re-recording is needed.
- **speculative batching**: the candidates of one receiver run as one batch of circuits, where candidate
  i is tested against the circuit that the *predicted* decisions of candidates 0..i-1 leave. The first
  batch holds every candidate and predicts for each the decision most edges tested so far in the run got
  ("kept" at the start: each candidate tested against the current circuit; most later receivers lose
  most of their edges, so "removed" there makes fewer rows wasted); later batches predict each edge's decision from its latest evaluation and hold about twice as many
  candidates as the last batch accepted. Decisions are accepted in order while they match
  their predictions; the first that does not is still correct (its circuit assumed only correct
  decisions), so it is accepted too, and the remaining candidates are evaluated again from the new
  circuit. A receiver typically takes two or three batched forwards instead of one forward per edge.

The two agree up to float32 rounding: batched and restarted runs group the same sums differently, so a
decision can differ only for an edge whose damage lies within rounding of tau (tests use taus away from
every edge's damage). The current metric is carried from the run that removed the last edge (ACDC
re-evaluates the same circuit between receivers; in exact arithmetic that gives the same number). See
docs/METHODS.md, "ACDC".
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Bool, Float, Int

from circuitlab.discovery.metrics import DiscoveryMetric
from circuitlab.discovery.scores import BatchInputs, at_read_positions, scoring_setup
from circuitlab.errors import DiscoveryError
from circuitlab.graph.circuit import Circuit
from circuitlab.graph.graph import Graph
from circuitlab.graph.masked import CleanRun, MaskedEdgeEngine
from circuitlab.graph.naming import QKV, head_name, mlp_name, receiver_name
from circuitlab.models.model import Model
from circuitlab.progress import progress_bar
from circuitlab.tasks.task import PreparedTask, Task

DEFAULT_TAU = 0.01
EdgeIds = Int[torch.Tensor, " n"]
# Memory for one masked forward (bytes): the engine holds per row and prompt the coefficient table
# [senders, receivers], every sender's difference [senders, pos, d_model], the per-head streams of one
# layer and the logits of the read positions.
FORWARD_BUDGET_BYTES = 2**29
MIN_WINDOW = 16  # candidates per speculative batch after the first, at least


def check_tau(tau: float) -> float:
    """tau: a finite number >= 0 (the damage below which ACDC removes an edge)."""
    if isinstance(tau, bool) or not isinstance(tau, int | float) or not math.isfinite(tau) or tau < 0:
        raise DiscoveryError(f"tau must be a finite number >= 0 (ACDC removes an edge whose removal moves the metric "
                             f"by less than tau), got {tau!r}")
    return float(tau)


# --- ACDC's order ----------------------------------------------------------------------------------------

def receiver_order(graph: Graph) -> list[int]:
    """Receivers (backward indices) in the published visiting order: logits; then per layer, last first,
    the MLP, the q inputs of heads H-1..0, their k inputs, their v inputs."""
    shape, index = graph.shape, graph.receiver_index
    order = [index["logits"]]
    for layer in range(shape.n_layers - 1, -1, -1):
        if not shape.attn_only:
            order.append(index[mlp_name(layer)])
        for qkv in QKV:
            order += [index[receiver_name(head_name(layer, h), qkv)] for h in range(shape.n_heads - 1, -1, -1)]
    return order


def incoming_edges(graph: Graph) -> list[EdgeIds]:
    """Per receiver, its incoming edges in the published order: latest sender first."""
    order = torch.argsort(graph.edge_dst * graph.n_senders - graph.edge_src, stable=True)
    counts = torch.bincount(graph.edge_dst, minlength=graph.n_receivers).tolist()
    return list(torch.split(order, counts))


def receiver_senders(graph: Graph) -> list[int | None]:
    """Per receiver, the sender index of its node (None for the logits): the node whose outgoing edges
    decide whether ACDC visits the receiver at all."""
    return [None if r == "logits" else graph.sender_index[r.split("<")[0]] for r in graph.receivers]


LEVELS = ("edge", "head")


def check_level(level: str) -> str:
    """level: edge (every q, k and v input of a head is a receiver of its own, as in the edge graph) or
    head (a head's q, k and v inputs are one receiver; an edge from a sender into them is removed whole)."""
    if level not in LEVELS:
        raise DiscoveryError(f"level must be 'edge' (q, k and v inputs apart) or 'head' (a head's three inputs "
                             f"as one receiver), got {level!r}")
    return level


@dataclass(frozen=True)
class SearchOrder:
    """What ACDC visits, in its order: each receiver's name and layer, the sender index of its node (None
    for the logits), and its candidates (edge-id groups removed together), latest sender first."""

    names: list[str]
    layers: list[int]
    nodes: list[int | None]
    candidates: list[list[EdgeIds]]


def search_order(graph: Graph, level: str = "edge") -> SearchOrder:
    """ACDC's receivers and candidates. level 'edge': the published order (`receiver_order`), one edge per
    candidate. level 'head': the logits; then per layer, last first, the MLP and the heads H-1..0, each
    head one receiver whose candidate from a sender holds that sender's edges into its q, k and v inputs."""
    check_level(level)
    incoming, node_of = incoming_edges(graph), receiver_senders(graph)
    if level == "edge":
        order = receiver_order(graph)
        return SearchOrder([graph.receivers[r] for r in order],
                           [graph.node_layer(graph.receivers[r].split("<")[0]) for r in order],
                           [node_of[r] for r in order], [list(incoming[r].split(1)) for r in order])
    shape, index = graph.shape, graph.receiver_index
    groups: list[tuple[str, list[int]]] = [("logits", [index["logits"]])]
    for layer in range(shape.n_layers - 1, -1, -1):
        if not shape.attn_only:
            groups.append((mlp_name(layer), [index[mlp_name(layer)]]))
        for h in range(shape.n_heads - 1, -1, -1):
            groups.append((head_name(layer, h), [index[receiver_name(head_name(layer, h), qkv)] for qkv in QKV]))
    names, layers, nodes, candidates = [], [], [], []
    for name, receivers in groups:
        edges = torch.cat([incoming[r] for r in receivers])
        senders = graph.edge_src[edges]
        names.append(name)
        layers.append(graph.node_layer(name))
        nodes.append(node_of[receivers[0]])
        candidates.append([edges[senders == s] for s in torch.unique(senders).flip(0).tolist()])
    return SearchOrder(names, layers, nodes, candidates)


# --- the result ------------------------------------------------------------------------------------------

@dataclass
class ReceiverStep:
    """What ACDC did at one receiver: edges tested and removed, or skipped (its node feeds nothing left,
    so every incoming edge was removed untested); forwards: masked forward passes spent on it."""

    receiver: str
    layer: int
    edges: int
    tested: int
    removed: int
    skipped: bool
    forwards: int
    seconds: float = 0.0

    def record(self) -> dict[str, Any]:
        return {"receiver": self.receiver, "layer": self.layer, "edges": self.edges, "tested": self.tested,
                "removed": self.removed, "kept": self.edges - self.removed, "skipped": self.skipped,
                "forwards": self.forwards, "seconds": self.seconds}


@dataclass
class ACDCRun:
    """The circuit ACDC kept (`in_graph`), each edge's metric change when it was tested (`scores`; NaN for
    edges never tested), the log per receiver and the cost (circuits evaluated, masked forwards)."""

    graph: Graph
    in_graph: Bool[torch.Tensor, " edge"]
    scores: Float[torch.Tensor, " edge"]
    tau: float
    ablation: str
    metric: str
    positions: str
    higher_is_better: bool
    n_prompts: int
    full_metric: float
    final_metric: float
    steps: list[ReceiverStep] = field(default_factory=list)
    n_circuits: int = 0
    n_forwards: int = 0
    variant: str = "batched"
    level: str = "edge"

    @property
    def tested(self) -> Bool[torch.Tensor, " edge"]:
        return ~self.scores.isnan()

    @property
    def n_edges(self) -> int:
        return int(self.in_graph.sum())

    def circuit(self, model: Model | None = None) -> Circuit:
        """The kept edges as a `Circuit`, scores = metric change when tested (0 for untested edges)."""
        return Circuit(self.graph, self.in_graph.clone(), torch.nan_to_num(self.scores, nan=0.0), model=model)

    def log(self) -> list[dict[str, Any]]:
        return [step.record() for step in self.steps]


# --- metric of circuits ----------------------------------------------------------------------------------

@dataclass
class _Group:
    inputs: BatchInputs
    positions: Int[torch.Tensor, "batch 1"] | None
    record: CleanRun | None


class CircuitMetric:
    """The mean metric over the task's prompts of batches of circuits, each given as the current
    coefficients with some candidate edges set to 0. With `restart`, every run starts at the earliest
    receiver layer it changes, from one recorded clean run per token-length group."""

    def __init__(self, engine: MaskedEdgeEngine, prepared: PreparedTask, scorer: DiscoveryMetric, ablation: str, *,
                 seed: int = 0, restart: bool = True, rows_per_forward: int | None = None):
        self.engine, self.scorer = engine, scorer
        self.n_prompts = prepared.n_prompts
        self.groups: list[_Group] = []
        with torch.no_grad():
            for batch in prepared.batches:
                inputs, positions = at_read_positions(scorer, BatchInputs.build(engine, batch, ablation, scorer, seed=seed))
                self.groups.append(_Group(inputs, positions, engine.record(inputs.tokens) if restart else None))
        self.rows_per_forward = rows_per_forward
        self.n_circuits = 0
        self.n_forwards = 0

    def circuits_per_forward(self, group: _Group, start: int) -> int:
        """Circuits per masked forward of this group: from `rows_per_forward` (prompt rows), or what fits
        FORWARD_BUDGET_BYTES for a run restarted at layer `start`: per circuit its coefficient table from
        that layer's receivers on [senders, receivers]; per prompt row the differences of the senders it
        runs, the per-head streams of one layer and the logits of the read positions."""
        size = group.inputs.batch.size
        if self.rows_per_forward is not None:
            return max(1, self.rows_per_forward // size)
        engine, g, n_pos = self.engine, self.engine.graph, group.inputs.tokens.shape[1]
        n_read = n_pos if group.positions is None else group.positions.shape[1]
        n_layers = g.shape.n_layers
        live = g.n_senders - (g.sender_block(start).start if 0 < start < n_layers else (g.n_senders if start else 0))
        per_row = n_pos * engine.model.d_model * (live + 4 * g.shape.n_heads) + n_read * engine.model.d_vocab
        per_circuit = 4 * (g.n_senders * (g.n_receivers - engine.first_receiver(start)) + size * per_row)
        return max(1, FORWARD_BUDGET_BYTES // per_circuit)

    def __call__(self, base: Float[torch.Tensor, " edge"], ids: EdgeIds,
                 off: Bool[torch.Tensor, "k n"]) -> list[float]:
        """Metric of k circuits: circuit i is `base` with the edges ids[off[i]] set to 0."""
        k = off.shape[0]
        totals = [0.0] * k
        probe = base.clone()
        probe[ids] = 0.0
        start = self.engine.restart_layer(probe) if self.groups and self.groups[0].record is not None else 0
        with torch.no_grad():
            for group in self.groups:
                per_forward = self.circuits_per_forward(group, start)
                for first in range(0, k, per_forward):
                    part = off[first:first + per_forward]
                    rows = base.repeat(part.shape[0], 1)
                    rows[:, ids] = torch.where(part, 0.0, rows[:, ids])
                    values = self._values(group, rows)
                    for i, value in enumerate(values):
                        totals[first + i] += value
                    self.n_forwards += 1
        self.n_circuits += k
        return [total / self.n_prompts for total in totals]

    def _values(self, group: _Group, rows: Float[torch.Tensor, "k edge"]) -> list[float]:
        """Summed metric over the group's prompts of each coefficient row."""
        inputs, k = group.inputs, rows.shape[0]
        logits = self.engine.run(inputs.tokens, rows, inputs.ablated, record=group.record, positions=group.positions)
        batch, reference = inputs.repeated(k)
        values = self.scorer(logits.reshape(-1, *logits.shape[2:]), batch, reference).view(k, -1)
        return values.double().sum(1).tolist()


# --- the search ------------------------------------------------------------------------------------------

class _Search:
    """The state both variants share: current coefficients, scores, the current metric and the log."""

    def __init__(self, graph: Graph, order: SearchOrder, tau: float, higher_is_better: bool, full_metric: float):
        self.graph, self.order, self.tau, self.higher_is_better = graph, order, tau, higher_is_better
        self.coefficients = torch.ones(graph.n_edges)
        self.scores = torch.full((graph.n_edges,), math.nan)
        self.current = full_metric
        by_sender = torch.argsort(graph.edge_src, stable=True)
        self.outgoing = list(torch.split(by_sender, torch.bincount(graph.edge_src, minlength=graph.n_senders).tolist()))
        self.steps: list[ReceiverStep] = []
        self.n_tested = 0  # candidates tested so far, and how many of them were removed
        self.n_removed = 0

    def removal_likely(self) -> bool:
        """Whether most edges tested so far were removed: the guess for an edge not evaluated yet."""
        return 2 * self.n_removed > self.n_tested

    def damage(self, metric: float, reference: float) -> float:
        """How much worse `metric` is than `reference` (positive = worse)."""
        return reference - metric if self.higher_is_better else metric - reference

    def removes(self, metric: float, reference: float) -> bool:
        return self.damage(metric, reference) < self.tau

    def connected(self, receiver: int) -> bool:
        """Whether receiver `receiver` (its place in the order)'s node still sends along a kept edge."""
        sender = self.order.nodes[receiver]
        if sender is None:
            return True
        return bool((self.coefficients[self.outgoing[sender]] > 0).any())

    def decide(self, candidate: EdgeIds, metric: float, reference: float) -> bool:
        """Record a candidate's test (the metric without its edges against its reference); remove its edges
        when ACDC's rule says so. Returns whether it was removed."""
        self.scores[candidate] = metric - reference
        self.n_tested += 1
        if self.removes(metric, reference):
            self.coefficients[candidate] = 0.0
            self.current = metric
            self.n_removed += 1
            return True
        return False


def _run(model: Model, task: Task | PreparedTask, variant: str, *, tau: float, ablation: str, metric: str | None,
         positions: str, graph: Graph | None, seed: int, receivers: int | None,
         rows_per_forward: int | None, level: str) -> ACDCRun:
    tau = check_tau(tau)
    check_level(level)
    prepared, engine, scorer = scoring_setup(model, task, ablation=ablation, metric=metric, positions=positions,
                                             graph=graph)
    g = engine.graph
    evaluate = CircuitMetric(engine, prepared, scorer, ablation, seed=seed, restart=variant == "batched",
                             rows_per_forward=rows_per_forward)
    full = evaluate(torch.ones(g.n_edges), torch.zeros(0, dtype=torch.long), torch.zeros(1, 0, dtype=torch.bool))[0]
    order = search_order(g, level)
    search = _Search(g, order, tau, scorer.higher_is_better, full)
    visit = len(order.names)
    if receivers is not None:
        if isinstance(receivers, bool) or not isinstance(receivers, int) or not 1 <= receivers <= visit:
            raise DiscoveryError(f"receivers must be an integer in [1, {visit}] (the first receivers in "
                                 f"ACDC's order), got {receivers!r}")
        visit = receivers
    step = _test_sequential if variant == "sequential" else _test_batched
    with progress_bar(visit, f"acdc ({variant}, {level} level)") as advance:
        for i in range(visit):
            started, forwards = time.perf_counter(), evaluate.n_forwards
            candidates = order.candidates[i]
            n_edges = sum(len(c) for c in candidates)
            if search.connected(i):
                removed = sum(len(c) for c in step(search, evaluate, candidates))
                skipped = False
            else:
                for candidate in candidates:
                    search.coefficients[candidate] = 0.0
                removed, skipped = n_edges, True
            search.steps.append(ReceiverStep(order.names[i], order.layers[i], n_edges, 0 if skipped else n_edges,
                                             removed, skipped, evaluate.n_forwards - forwards,
                                             time.perf_counter() - started))
            advance(1)
    return ACDCRun(g, search.coefficients > 0, search.scores, float(tau), ablation, scorer.name, positions,
                   scorer.higher_is_better, prepared.n_prompts, full, search.current, search.steps,
                   evaluate.n_circuits, evaluate.n_forwards, variant, level)


def _removal_rows(candidates: list[EdgeIds], off: Bool[torch.Tensor, "k n"]) -> tuple[EdgeIds, Bool[torch.Tensor, "k e"]]:
    """The edge ids of `candidates` side by side and `off` (rows x candidates) spread over their edges."""
    sizes = torch.tensor([len(c) for c in candidates])
    return torch.cat(candidates), off.repeat_interleave(sizes, dim=1)


def _test_sequential(search: _Search, evaluate: CircuitMetric, candidates: list[EdgeIds]) -> list[EdgeIds]:
    """One masked run per candidate, against the current circuit. Returns the candidates removed."""
    removed = []
    one = torch.ones(1, 1, dtype=torch.bool)
    for candidate in candidates:
        value = evaluate(search.coefficients, *_removal_rows([candidate], one))[0]
        if search.decide(candidate, value, search.current):
            removed.append(candidate)
    return removed


def _test_batched(search: _Search, evaluate: CircuitMetric, candidates: list[EdgeIds]) -> list[EdgeIds]:
    """The candidates of one receiver in speculative batches (module docstring). Returns those removed."""
    pending = list(candidates)
    predicted = [search.removal_likely()] * len(pending)  # first batch: the run's majority decision so far
    window = len(pending)
    removed = []
    while pending:
        n = min(window, len(pending))
        ahead = torch.tensor(predicted[:n], dtype=torch.bool)
        # row i ablates the candidates before i predicted to be removed, and candidate i itself
        off = torch.tril(ahead.unsqueeze(0).expand(n, n), diagonal=-1) | torch.eye(n, dtype=torch.bool)
        values = evaluate(search.coefficients, *_removal_rows(pending[:n], off))
        chain = _chain(values, predicted[:n], search.current)
        decisions = [search.removes(value, reference) for value, reference in chain]
        # Accept in order while decisions match their predictions; the first mismatch is still right (its
        # circuit assumed only right decisions), the candidates after it assumed a wrong one.
        wrong = [i for i in range(n) if decisions[i] != predicted[i]]
        accepted = wrong[0] + 1 if wrong else n
        for i in range(accepted):
            if search.decide(pending[i], values[i], search.current):
                removed.append(pending[i])
        pending, predicted = pending[accepted:], decisions[accepted:n] + predicted[n:]
        # A mispredicted batch wastes the rows after the mismatch: batch about twice what the last one
        # accepted (at least MIN_WINDOW), so a run of surprises costs little and a run of hits grows fast.
        window = max(MIN_WINDOW, 2 * accepted)
    return removed


def _chain(values: list[float], predicted: list[bool], start: float) -> list[tuple[float, float]]:
    """(value, reference) of each row of a speculative batch: the reference of row i is the value of the
    last earlier row predicted to be removed (`start`, the current metric, if none)."""
    out, reference = [], start
    for value, remove in zip(values, predicted, strict=True):
        out.append((value, reference))
        if remove:
            reference = value
    return out


def acdc_sequential(model: Model, task: Task | PreparedTask, *, tau: float = DEFAULT_TAU, ablation: str = "corrupt",
                    metric: str | None = "kl", positions: str = "last", graph: Graph | None = None, seed: int = 0,
                    receivers: int | None = None, level: str = "edge") -> ACDCRun:
    """ACDC as published, the reference: one full masked run per tested edge (module docstring).

    metric: kl (default), l2 or a task metric (None: the task's own); positions: last | all; receivers:
    visit only the first this many receivers in ACDC's order (a partial run, e.g. to time a large graph);
    level: edge (default: q, k and v inputs apart) or head (a head's three inputs as one receiver, an
    edge into them removed whole: a third of the tests; `search_order`).
    """
    return _run(model, task, "sequential", tau=tau, ablation=ablation, metric=metric, positions=positions,
                graph=graph, seed=seed, receivers=receivers, rows_per_forward=None, level=level)


def acdc(model: Model, task: Task | PreparedTask, *, tau: float = DEFAULT_TAU, ablation: str = "corrupt",
         metric: str | None = "kl", positions: str = "last", graph: Graph | None = None, seed: int = 0,
         receivers: int | None = None, rows_per_forward: int | None = None, level: str = "edge") -> ACDCRun:
    """ACDC with restarted runs and speculative batches: the circuit of `acdc_sequential`, faster.

    rows_per_forward: prompt rows (circuits x prompts) per masked forward (default: what fits about
    512 MB). Other options as `acdc_sequential`.
    """
    if rows_per_forward is not None and (isinstance(rows_per_forward, bool) or not isinstance(rows_per_forward, int)
                                         or rows_per_forward < 1):
        raise DiscoveryError(f"rows_per_forward must be a positive integer, got {rows_per_forward!r}")
    return _run(model, task, "batched", tau=tau, ablation=ablation, metric=metric, positions=positions,
                graph=graph, seed=seed, receivers=receivers, rows_per_forward=rows_per_forward, level=level)

