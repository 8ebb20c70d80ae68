"""`study/ioi`: the IOI circuit of a model, found, verified, and its heads sorted into Wang et al.'s roles.

Wang et al. 2022 ("Interpretability in the Wild") explain how GPT-2 small completes "When Mary and John
went to the store, John gave a drink to" with " Mary" (the indirect object, IO, not the subject S) by a
circuit of head classes. This study runs the same programme on any model with circuitlab's verbs:

1. **Find**: EAP-IG edge scores (discovery/scores.py) and the smallest top-n circuit reaching a target
   faithfulness (discovery/analysis.py `measure`).
2. **Verify**: that circuit's faithfulness and KL(model || circuit) with bootstrap 95% intervals over
   prompts (verify/measures.py `Verifier`).
3. **Measure** every head (numbers, no judgement): its attention from the final position END to the IO,
   S1 and S2 tokens (mean over prompts; `name_positions` finds them in each prompt's tokens); its direct
   effect on logit(IO) - logit(S) (attribution/dla.py); its previous-token, duplicate-token and induction
   scores on repeated random tokens (heads/detectors.py); and, for candidate heads, two path-patching
   effects (graph/restart.py `restart_sweep`, corrupt = the task's ABC prompts): into the found name
   movers' queries, and into the found S-inhibition heads' values.
4. **Classify** (`classify_head`, a pure function of those numbers, applied in this order):
   - *name mover*: attention END -> IO >= `attention_floor`, more than to S1 and S2 together, and direct
     effect >= `dla_floor` x the clean logit difference;
   - *negative name mover*: the same attention, direct effect <= -`dla_floor` x the logit difference;
   - *S-inhibition*: path patching into the name movers' queries lowers the logit difference by at least
     `effect_floor` of the clean - corrupt gap, and attention END -> S2 >= `attention_floor`;
   - *induction* / *duplicate-token*: detector score >= `detector_floor` and path patching into the
     S-inhibition heads' values lowers the logit difference by at least `effect_floor` of the gap (the
     larger of the two scores names the role);
   - *other*: a head of the circuit that meets none of these.

Candidate heads (the records) are the heads of the circuit and those whose |direct effect| or detector
score passes its floor. Only heads whose other numbers allow a role are path patched: into the name movers'
queries, the candidates attending END -> S2 above the floor; into the S-inhibition heads' values, the heads
whose detector score passes its floor. So the sweeps stay small. See
docs/METHODS.md, "Case studies" (IOI) for the definitions and why the floors are where they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int

from circuitlab.analysis import Analysis
from circuitlab.attribution.dla import ComponentAttribution, direct_logit_attribution
from circuitlab.discovery.analysis import DiscoverParams, Discovery, measure
from circuitlab.discovery.scores import check_steps, edge_scores
from circuitlab.discovery.selection import check_target, check_top_n
from circuitlab.errors import AnalysisError, TaskError
from circuitlab.graph.direct_paths import SenderSweep
from circuitlab.graph.graph import Graph
from circuitlab.graph.masked import MaskedEdgeEngine
from circuitlab.graph.naming import head_name, parse_node, receiver_name
from circuitlab.graph.restart import restart_sweep
from circuitlab.heads.detectors import HeadScores, attention_patterns, detect_heads
from circuitlab.models.model import Model
from circuitlab.progress import status
from circuitlab.tasks.task import PreparedTask, Task, TaskBatch
from circuitlab.verify.bootstrap import Interval
from circuitlab.verify.measures import Verifier, kl_interval

if TYPE_CHECKING:
    from matplotlib.figure import Figure

NAME_MOVER, NEGATIVE, S_INHIBITION = "name mover", "negative name mover", "S-inhibition"
INDUCTION, DUPLICATE, OTHER = "induction", "duplicate-token", "other"
ROLES = (NAME_MOVER, NEGATIVE, S_INHIBITION, INDUCTION, DUPLICATE, OTHER)
ROLE_COLOURS = {NAME_MOVER: "#2ca02c", NEGATIVE: "#d62728", S_INHIBITION: "#1f77b4", INDUCTION: "#9467bd",
                DUPLICATE: "#ff7f0e", OTHER: "#bdbdbd"}
SUMMARY_KEYS = {NAME_MOVER: "name_movers", NEGATIVE: "negative_name_movers", S_INHIBITION: "s_inhibition_heads",
                INDUCTION: "induction_heads", DUPLICATE: "duplicate_token_heads", OTHER: "other_circuit_heads"}
# Wang et al. 2022's GPT-2 small heads (layer.head, 12 layers), for findings.md's comparison.
WANG_GPT2 = {NAME_MOVER: ["9.6", "9.9", "10.0"], NEGATIVE: ["10.7", "11.10"],
             S_INHIBITION: ["7.3", "7.9", "8.6", "8.10"], INDUCTION: ["5.5", "6.9"], DUPLICATE: ["0.1", "3.0"]}
GPT2_LAYERS = 12
STRONGEST_OTHER = 5  # heads without a role shown by name (the records list them all)
DPI = 120


# --- options -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Thresholds:
    """The classification floors (see the module docstring and docs/METHODS.md, "Case studies").

    attention: mean attention END -> IO (name movers) or END -> S2 (S-inhibition); 0.2 is several times
      what a uniform causal head gives one token of a 15-20-token IOI prompt (1/15-1/20).
    dla: |direct effect| as a share of the clean logit difference; 0.05 = a head carrying 1/20 of it.
    effect: path-patching effect as a share of the clean - corrupt gap (-0.05 = a twentieth of the gap).
    detector: duplicate-token / induction score (share of attention on the detector's targets; 1 = perfect;
      a uniform causal head scores about 0.03 on 20 repeated tokens, so 0.3 is ten times chance).
    """

    attention: float = 0.2
    dla: float = 0.05
    effect: float = 0.05
    detector: float = 0.3


@dataclass(frozen=True)
class IOIStudyParams:
    """target_faithfulness: the EAP-IG circuit is the smallest top-n one reaching it (default 0.8). top_n:
    instead, the top-n edges (no faithfulness curve: cheaper; not with target_faithfulness). steps: EAP-IG
    interpolation points. attention_floor, dla_floor, effect_floor, detector_floor: the role rules'
    floors (`Thresholds`). n_repeat_tokens, n_sequences: the detectors' repeated random tokens.
    n_bootstrap: resamples per interval. max_batch: rows (senders x prompts) per path-patching forward."""

    target_faithfulness: float | None = None
    top_n: int | None = None
    steps: int = 5
    attention_floor: float = 0.2
    dla_floor: float = 0.05
    effect_floor: float = 0.05
    detector_floor: float = 0.3
    n_repeat_tokens: int = 20
    n_sequences: int = 4
    n_bootstrap: int = 1000
    max_batch: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.target_faithfulness is not None and self.top_n is not None:
            raise AnalysisError("choose the circuit by target_faithfulness or by top_n, not both")
        if self.target_faithfulness is not None:
            check_target(self.target_faithfulness)
        if self.top_n is not None:
            check_top_n(self.top_n)
        check_steps(self.steps)
        for name in ("attention_floor", "dla_floor", "effect_floor", "detector_floor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise AnalysisError(f"{name} must lie in (0, 1], got {value!r}")
        for name in ("n_repeat_tokens", "n_sequences", "n_bootstrap", "max_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise AnalysisError(f"{name} must be a positive integer, got {value!r}")

    @property
    def thresholds(self) -> Thresholds:
        return Thresholds(self.attention_floor, self.dla_floor, self.effect_floor, self.detector_floor)


# --- the measured numbers and the rules ----------------------------------------------------------------------

@dataclass
class HeadMeasures:
    """Everything measured about one head. attn_*: mean attention from END to that name's position.
    dla: mean direct effect on logit(IO) - logit(S) (logits); dla_share: dla / the clean logit difference.
    nm_effect / sinh_effect: path-patching effect into the name movers' queries / the S-inhibition heads'
    values, as a share of the clean - corrupt gap (negative = the path carries the behaviour; NaN = not
    measured). prev_token, duplicate_token, induction: detector scores."""

    layer: int
    head: int
    in_circuit: bool
    attn_io: float
    attn_s1: float
    attn_s2: float
    dla: float
    dla_share: float
    prev_token: float
    duplicate_token: float
    induction: float
    nm_effect: float = math.nan
    sinh_effect: float = math.nan

    @property
    def name(self) -> str:
        return head_name(self.layer, self.head)


def _moves_io(m: HeadMeasures, t: Thresholds) -> bool:
    return m.attn_io >= t.attention and m.attn_io > m.attn_s1 + m.attn_s2


def classify_head(m: HeadMeasures, t: Thresholds) -> str | None:
    """The head's role by the rules of the module docstring (first match wins); None when it has none and
    is not in the circuit. NaN effects (not measured) fail every comparison, so they never assign a role."""
    if _moves_io(m, t) and m.dla_share >= t.dla:
        return NAME_MOVER
    if _moves_io(m, t) and m.dla_share <= -t.dla:
        return NEGATIVE
    if m.nm_effect <= -t.effect and m.attn_s2 >= t.attention:
        return S_INHIBITION
    if m.sinh_effect <= -t.effect and max(m.induction, m.duplicate_token) >= t.detector:
        return INDUCTION if m.induction >= m.duplicate_token else DUPLICATE
    return OTHER if m.in_circuit else None


def heads_with_role(measures: list[HeadMeasures], role: str, t: Thresholds) -> list[HeadMeasures]:
    return [m for m in measures if classify_head(m, t) == role]


# --- positions of the names ----------------------------------------------------------------------------------

@dataclass
class NamePositions:
    """Per prompt of one batch: the positions of the IO token, the subject's two occurrences and END."""

    io: Int[torch.Tensor, " batch"]
    s1: Int[torch.Tensor, " batch"]
    s2: Int[torch.Tensor, " batch"]
    end: Int[torch.Tensor, " batch"]


def name_positions(batch: TaskBatch) -> NamePositions:
    """IO, S1, S2 and END in each clean prompt, found from the tokens: IO = the one occurrence of the answer
    token before END, S1 < S2 = the two occurrences of the wrong (subject) token. TaskError when a prompt
    does not have that shape (not an IOI prompt)."""
    io, s1, s2 = [], [], []
    for row in range(batch.size):
        end = int(batch.answer_pos[row])
        tokens = batch.clean[row, : end + 1]
        io_at = (tokens == batch.answers[row, 0]).nonzero().flatten().tolist()
        s_at = (tokens == batch.wrong[row, 0]).nonzero().flatten().tolist()
        if len(io_at) != 1 or len(s_at) != 2:
            raise TaskError(f"prompt {batch.indices[row]} is not an IOI prompt: the IO token occurs {len(io_at)} "
                            f"time(s) and the subject token {len(s_at)} time(s) before the answer position "
                            "(IOI needs 1 and 2); use the ioi task or a file of IOI prompts")
        io.append(io_at[0])
        s1.append(s_at[0])
        s2.append(s_at[1])
    return NamePositions(torch.tensor(io), torch.tensor(s1), torch.tensor(s2), batch.answer_pos.clone())


def end_attention(patterns: Float[torch.Tensor, "layer batch head dest src"],
                  where: NamePositions) -> Float[torch.Tensor, "3 batch layer head"]:
    """Attention from END to IO, S1 and S2 of each prompt, per head."""
    rows = torch.arange(patterns.shape[1])
    at_end = patterns.permute(1, 3, 0, 2, 4)[rows, where.end]  # [batch, layer, head, src]
    return torch.stack([at_end[rows, :, :, pos] for pos in (where.io, where.s1, where.s2)])


# --- measuring -----------------------------------------------------------------------------------------------

def _check_ioi_task(prepared: PreparedTask) -> None:
    if prepared.metric_name != "logit_diff":
        raise TaskError(f"the IOI study scores logit(IO) - logit(S): the task's metric must be logit_diff, got "
                        f"{prepared.metric_name!r}")
    for batch in prepared.batches:
        if (batch.answers >= 0).sum(1).ne(1).any() or (batch.wrong >= 0).sum(1).ne(1).any():
            raise TaskError("the IOI study needs exactly one answer (the IO) and one wrong answer (the subject) "
                            "per prompt")


@torch.no_grad()
def measure_heads(model: Model, prepared: PreparedTask, detected: HeadScores, circuit_heads: set[str],
                  ) -> tuple[list[HeadMeasures], float]:
    """Attention from END, DLA and detector scores of every head (path effects NaN), and the mean clean
    logit difference over prompts."""
    attention = torch.zeros(3, model.n_layers, model.n_heads)
    parts: list[ComponentAttribution] = []
    for batch in prepared.batches:
        where = name_positions(batch)
        attention += end_attention(attention_patterns(model, batch.clean), where).sum(1)
        parts.append(direct_logit_attribution(model, batch))
    attention /= prepared.n_prompts
    dla = ComponentAttribution.concat(parts)
    head_dla = dla.head_values().mean(0)
    logit_diff = float(dla.target.mean())
    measures = []
    for layer in range(model.n_layers):
        for head in range(model.n_heads):
            value = float(head_dla[layer, head])
            attn_io, attn_s1, attn_s2 = (float(a) for a in attention[:, layer, head])
            measures.append(HeadMeasures(
                layer, head, head_name(layer, head) in circuit_heads, attn_io=attn_io, attn_s1=attn_s1,
                attn_s2=attn_s2, dla=value, dla_share=value / logit_diff,
                prev_token=float(detected.scores["prev_token"][layer, head]),
                duplicate_token=float(detected.scores["duplicate_token"][layer, head]),
                induction=float(detected.scores["induction"][layer, head])))
    return measures, logit_diff


@torch.no_grad()
def path_effects(engine: MaskedEdgeEngine, prepared: PreparedTask, senders: list[str], receivers: list[str], *,
                 max_batch: int = 64) -> dict[str, float]:
    """Each sender's path-patching effect into `receivers` (corrupt -> clean, the masked-edge rule, restarted
    at the earliest receiver layer), as a share of the clean - corrupt gap: (patched - clean) / (clean -
    corrupt), every token-length group weighted by its size. Senders with no edge into a receiver (not
    earlier in the forward order) are left out."""
    graph = engine.graph
    last = max(graph.receiver_index[r] for r in receivers)
    feeding = set(graph.senders[: graph.senders_before(last)])
    senders = [s for s in senders if s in feeding]
    if not senders:
        return {}
    sweeps = []
    for batch in prepared.batches:
        local = replace(batch, answer_pos=torch.zeros_like(batch.answer_pos))

        def readout(logits: torch.Tensor, local: TaskBatch = local) -> torch.Tensor:
            return prepared.metric(logits, local)

        sweeps.append(restart_sweep(engine, receivers, batch.clean, batch.corrupt, readout,
                                    batch.answer_pos.unsqueeze(1), senders, max_batch=max_batch))
    combined = SenderSweep.weighted_mean(sweeps, [b.size for b in prepared.batches]).normalised
    return {s: float(combined[parse_node(s).layer, parse_node(s).head]) for s in senders}


def _receivers(heads: list[HeadMeasures], qkv: str) -> list[str]:
    return [receiver_name(m.name, qkv) for m in heads]


# --- the result ----------------------------------------------------------------------------------------------

@dataclass
class IOIStudy:
    """The study's numbers: the circuit (a `Discovery`), its verification and every head's measures."""

    model_spec: str
    discovery: Discovery
    faithfulness: Interval
    kl: Interval
    top1_agreement: Interval
    measures: list[HeadMeasures]
    thresholds: Thresholds
    logit_diff: float
    n_prompts: int
    n_layers: int
    n_heads: int
    candidates: set[str] = field(default_factory=set)

    def role(self, m: HeadMeasures) -> str | None:
        return classify_head(m, self.thresholds)

    def roles(self) -> dict[str, list[HeadMeasures]]:
        """Role -> its heads, strongest first (|DLA| for (negative) name movers, else |path effect|)."""
        out: dict[str, list[HeadMeasures]] = {r: [] for r in ROLES}
        for m in self.measures:
            role = self.role(m)
            if role is not None:
                out[role].append(m)
        keys = {NAME_MOVER: lambda m: -abs(m.dla), NEGATIVE: lambda m: -abs(m.dla),
                S_INHIBITION: lambda m: m.nm_effect, INDUCTION: lambda m: m.sinh_effect,
                DUPLICATE: lambda m: m.sinh_effect, OTHER: lambda m: -abs(m.dla)}
        return {r: sorted(heads, key=keys[r]) for r, heads in out.items()}

    def records(self) -> list[dict[str, Any]]:
        """One row per classified head (candidates and circuit heads), in layer order."""
        rows = []
        for m in self.measures:
            role = self.role(m)
            if role is None and m.name not in self.candidates:
                continue
            rows.append({"head_name": m.name, "layer": m.layer, "head": m.head, "role": role or "none",
                         "in_circuit": m.in_circuit, "attn_io": m.attn_io, "attn_s1": m.attn_s1,
                         "attn_s2": m.attn_s2, "dla": m.dla, "dla_share": m.dla_share,
                         "nm_query_effect": m.nm_effect, "s_inhibition_value_effect": m.sinh_effect,
                         "prev_token": m.prev_token, "duplicate_token": m.duplicate_token,
                         "induction": m.induction})
        return rows

    def summary(self) -> dict[str, Any]:
        stats = self.discovery.circuit.stats()
        out: dict[str, Any] = {
            "n_prompts": self.n_prompts, "clean_logit_diff": self.logit_diff,
            "circuit_edges": stats["n_edges"], "circuit_heads": stats["n_heads"], "circuit_mlps": stats["n_mlps"],
            "selection": self.discovery.selection[0], "selection_value": self.discovery.selection[1],
            "faithfulness": self.faithfulness.value,
            "faithfulness_ci": [self.faithfulness.low, self.faithfulness.high], "kl": self.kl.value,
            "kl_ci": [self.kl.low, self.kl.high], "top1_agreement": self.top1_agreement.value,
        }
        for role, heads in self.roles().items():
            if role == OTHER:  # most of a large circuit: the count, and the strongest direct effects
                out[SUMMARY_KEYS[role]] = len(heads)
                out["strongest_other_heads"] = [_describe(m, role) for m in heads[:STRONGEST_OTHER]]
            else:
                out[SUMMARY_KEYS[role]] = [_describe(m, role) for m in heads]
        out["thresholds"] = {k: getattr(self.thresholds, k) for k in ("attention", "dla", "effect", "detector")}
        return out

    def figures(self) -> dict[str, Figure]:
        figures = {"roles.png": self.role_figure(), "attention_dla.png": self.scatter_figure()}
        figures.update(self.discovery.figures())  # circuit.png, faithfulness.png
        return figures

    def files(self) -> dict[str, str]:
        return {"circuit.json": self.discovery.circuit_json(), "findings.md": self.findings()}

    # --- figures ---------------------------------------------------------------------------------------------
    def role_grid(self) -> list[list[str | None]]:
        grid: list[list[str | None]] = [[None] * self.n_heads for _ in range(self.n_layers)]
        for m in self.measures:
            grid[m.layer][m.head] = self.role(m)
        return grid

    def role_figure(self) -> Figure:
        """Every head as a cell coloured by its role (drawn as patches, not an image: the colours are
        categories, not values a heatmap's hover could show)."""
        from matplotlib.collections import PatchCollection
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch, Rectangle

        grid = self.role_grid()
        cells = [Rectangle((h - 0.5, layer - 0.5), 1.0, 1.0) for layer in range(self.n_layers) for h in range(self.n_heads)]
        colours = [ROLE_COLOURS[r] if r else "#f0f0f0" for row in grid for r in row]
        fig = Figure(figsize=(max(4.5, 0.45 * self.n_heads + 3.2), max(3.0, 0.2 * self.n_layers + 1.4)), dpi=DPI)
        ax = fig.subplots()
        ax.add_collection(PatchCollection(cells, facecolors=colours, edgecolors="white", linewidths=0.5))
        ax.set_xlim(-0.5, self.n_heads - 0.5)
        ax.set_ylim(self.n_layers - 0.5, -0.5)  # layer 0 on top, as in the other head maps
        ax.set_xticks(range(self.n_heads))
        ax.set_yticks(range(self.n_layers), [str(i) for i in range(self.n_layers)],
                      fontsize=7 if self.n_layers > 16 else 9)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        used = sorted({r for row in grid for r in row if r is not None}, key=ROLES.index)
        ax.legend(handles=[Patch(color=ROLE_COLOURS[r], label=r) for r in used] or [Patch(color="#f0f0f0",
                  label="no role")], loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
        ax.set_title(f"IOI head roles ({self.model_spec}, {self.n_prompts} prompts)", fontsize=9)
        fig.tight_layout()
        return fig

    def scatter_figure(self) -> Figure:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(6.4, 4.6), dpi=DPI)
        ax = fig.subplots()
        for role in (None, *ROLES):
            heads = [m for m in self.measures if self.role(m) == role]
            if heads:
                ax.scatter([m.attn_io for m in heads], [m.dla for m in heads], s=14 if role is None else 30,
                           c="#e6e6e6" if role is None else ROLE_COLOURS[role], label=role or "no role",
                           edgecolors="none")
        strongest = {m.name for m in self.roles()[OTHER][:3]}  # large direct effects without a role, named too
        for m in self.measures:
            if self.role(m) in (NAME_MOVER, NEGATIVE) or m.name in strongest:
                ax.annotate(m.name, (m.attn_io, m.dla), fontsize=7, xytext=(3, 2), textcoords="offset points")
        floor = self.thresholds.dla * self.logit_diff
        ax.axvline(self.thresholds.attention, color="0.5", linewidth=0.6, linestyle="--")
        for y in (floor, -floor):
            ax.axhline(y, color="0.5", linewidth=0.6, linestyle="--")
        ax.set_xlabel("attention END -> IO (mean over prompts)")
        ax.set_ylabel("direct effect on logit(IO) - logit(S)")
        ax.set_title("name movers: attention to the IO vs direct logit attribution", fontsize=9)
        ax.legend(fontsize=7, frameon=False)
        fig.tight_layout()
        return fig

    # --- findings --------------------------------------------------------------------------------------------
    def findings(self) -> str:
        roles = self.roles()
        lines = [
            f"# IOI case study: {self.model_spec}", "",
            f"Numbers from this run only: {self.n_prompts} IOI prompts, mean clean logit difference "
            f"logit(IO) - logit(S) = {self.logit_diff:.3f}.", "",
            "## The circuit", "",
            f"EAP-IG found a circuit of {self.discovery.circuit.n_edges} edges "
            f"({self.discovery.circuit.stats()['n_heads']} heads) as {self._chosen()}. "
            "Verified on the same prompts (95% bootstrap "
            f"intervals): faithfulness {self.faithfulness}, KL(model || circuit) {self.kl}, top-1 agreement "
            f"with the model {self.top1_agreement}.", "",
            "## Head roles", "",
            "| role | heads (layer.head) | key numbers |", "|---|---|---|",
        ]
        for role in ROLES:
            heads = roles[role]
            shown = ", ".join(m.name for m in heads) or "none found"
            if role == OTHER:
                shown = f"{len(heads)} heads of the circuit; the strongest |DLA|:"
            numbers = "; ".join(_describe(m, role) for m in heads[:STRONGEST_OTHER])
            lines.append(f"| {role} | {shown} | {numbers} |")
        lines += ["", _rules_text(self.thresholds), "", "## Compared with Wang et al. 2022 (GPT-2 small)", "",
                  *self._comparison(roles)]
        return "\n".join(lines) + "\n"

    def _chosen(self) -> str:
        mode, value = self.discovery.selection
        if mode == "top_n":
            return f"its top {value:g} edges"
        return f"the smallest top-n circuit reaching faithfulness {value:g}"

    def _comparison(self, roles: dict[str, list[HeadMeasures]]) -> list[str]:
        out = [f"Wang et al. report, for GPT-2 small ({GPT2_LAYERS} layers): name movers "
               f"{', '.join(WANG_GPT2[NAME_MOVER])}; negative name movers {', '.join(WANG_GPT2[NEGATIVE])}; "
               f"S-inhibition heads {', '.join(WANG_GPT2[S_INHIBITION])}; induction heads "
               f"{', '.join(WANG_GPT2[INDUCTION])}; duplicate-token heads {', '.join(WANG_GPT2[DUPLICATE])}. "
               f"This model has {self.n_layers} layers, so the table compares relative depth (layer / number of "
               "layers); it is a different model, and a role missing here means no head passed these floors "
               "on these prompts, not that the mechanism is absent.", "",
               "| role | GPT-2 small relative depth | this run's relative depth |", "|---|---|---|"]
        for role in (NAME_MOVER, NEGATIVE, S_INHIBITION, INDUCTION, DUPLICATE):
            theirs = sorted({int(h.split(".")[0]) / GPT2_LAYERS for h in WANG_GPT2[role]})
            ours = sorted({m.layer / self.n_layers for m in roles[role]})
            out.append(f"| {role} | {_span(theirs)} | {_span(ours) if ours else 'none found'} |")
        found = [r for r in (NAME_MOVER, S_INHIBITION, INDUCTION, DUPLICATE) if roles[r]]
        order = [min(m.layer for m in roles[r]) for r in found]
        if len(found) > 1:
            consistent = all(a >= b for a, b in zip(order, order[1:], strict=False))
            out += ["", "Earliest layer of each found class, from the output back: "
                    + ", ".join(f"{r} {layer}" for r, layer in zip(found, order, strict=True))
                    + (" (the same order as in GPT-2 small: each class sits after the class it reads from)."
                       if consistent else " (not the GPT-2 small order in every step).")]
        return out


def _span(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{values[0]:.2f}" if len(values) == 1 else f"{values[0]:.2f}-{values[-1]:.2f}"


def _describe(m: HeadMeasures, role: str) -> str:
    if role in (NAME_MOVER, NEGATIVE):
        return f"{m.name} (attn IO {m.attn_io:.2f}, DLA {m.dla:+.3f})"
    if role == S_INHIBITION:
        return f"{m.name} (into name movers' q {m.nm_effect:+.3f}, attn S2 {m.attn_s2:.2f})"
    if role in (INDUCTION, DUPLICATE):
        return (f"{m.name} (into S-inh. v {m.sinh_effect:+.3f}, induction {m.induction:.2f}, "
                f"duplicate {m.duplicate_token:.2f})")
    return f"{m.name} (DLA {m.dla:+.3f}, attn IO {m.attn_io:.2f}, S2 {m.attn_s2:.2f})"


def _rules_text(t: Thresholds) -> str:
    return (f"Rules (floors): name mover = attention END->IO >= {t.attention:g} and more than to S1+S2, DLA >= "
            f"{t.dla:g} x the logit difference (negative: <= -{t.dla:g} x); S-inhibition = path patching into "
            f"the name movers' queries moves the logit difference by <= -{t.effect:g} of the clean-corrupt gap "
            f"and attention END->S2 >= {t.attention:g}; induction / duplicate-token = detector score >= "
            f"{t.detector:g} and path patching into the S-inhibition heads' values <= -{t.effect:g} of the gap. "
            "Path-patching effects are over all positions (the masked-edge rule), not one position as in "
            "Wang et al.")


# --- the study -----------------------------------------------------------------------------------------------

def ioi_study(model: Model, task: Task, params: IOIStudyParams) -> IOIStudy:
    """Find, verify, measure and classify (see the module docstring)."""
    prepared = task.prepare(model)
    _check_ioi_task(prepared)
    for batch in prepared.batches:
        name_positions(batch)  # not IOI prompts: fail before the expensive steps
    graph = Graph.from_model(model)
    if params.top_n is not None:
        discover_params = DiscoverParams(steps=params.steps, top_n=params.top_n, curve=False, seed=params.seed)
    else:
        discover_params = DiscoverParams(steps=params.steps, target_faithfulness=params.target_faithfulness or 0.8,
                                         seed=params.seed)
    scoring = edge_scores(model, prepared, method="eap-ig", steps=params.steps, graph=graph, seed=params.seed)
    discovery = measure(model, prepared, scoring, discover_params)
    circuit = discovery.circuit
    with status("verifying the circuit"):
        verifier = Verifier(model, prepared, circuit.graph, seed=params.seed, n_bootstrap=params.n_bootstrap)
        faithfulness = verifier.faithfulness(circuit.in_graph.unsqueeze(0))[0]
        consistency = verifier.consistency(circuit.in_graph, tolerance=0.1)
        kl = kl_interval(verifier, consistency)
        top1 = verifier.bootstrap.mean(consistency.top1_agree)
    with status("measuring every head"):
        detected = detect_heads(model, n_tokens=params.n_repeat_tokens, n_sequences=params.n_sequences,
                                seed=params.seed)
        circuit_heads = {n for n in circuit.nodes if parse_node(n).kind == "head"}
        measures, logit_diff = measure_heads(model, prepared, detected, circuit_heads)
    t = params.thresholds
    candidates = {m.name for m in measures if m.in_circuit or abs(m.dla_share) >= t.dla
                  or max(m.duplicate_token, m.induction) >= t.detector}
    engine = verifier.evaluator.engine
    by_name = {m.name: m for m in measures}
    name_movers = heads_with_role(measures, NAME_MOVER, t)
    # Only heads whose other numbers allow the role are path patched (the rest could not get it anyway).
    senders = [m.name for m in measures if m.name in candidates and m.attn_s2 >= t.attention]
    if name_movers and senders:
        with status(f"path patching {len(senders)} candidate heads into {len(name_movers)} name movers' queries"):
            for sender, value in path_effects(engine, prepared, senders, _receivers(name_movers, "q"),
                                              max_batch=params.max_batch).items():
                by_name[sender].nm_effect = value
    inhibitors = heads_with_role(measures, S_INHIBITION, t)
    senders = [m.name for m in measures if max(m.duplicate_token, m.induction) >= t.detector]
    if inhibitors and senders:
        with status(f"path patching {len(senders)} candidate heads into {len(inhibitors)} S-inhibition heads' values"):
            for sender, value in path_effects(engine, prepared, senders, _receivers(inhibitors, "v"),
                                              max_batch=params.max_batch).items():
                by_name[sender].sinh_effect = value
    return IOIStudy(model.spec, discovery, faithfulness, kl, top1, measures, t, logit_diff, prepared.n_prompts,
                    model.n_layers, model.n_heads, candidates)


def _compute(model: Model, task: Task | None, params: IOIStudyParams) -> IOIStudy:
    assert task is not None  # the entry requires a task
    return ioi_study(model, task, params)


IOI: Analysis[IOIStudyParams] = Analysis(
    "study/ioi", "IOI case study: the EAP-IG circuit, verified, and its heads classified into Wang et al.'s roles "
    "(name movers, negative name movers, S-inhibition, induction, duplicate-token)", IOIStudyParams, _compute,
)
