"""The ``heads`` analysis: every head's detector scores and its composition with earlier heads.

Task optional: with one, attention to BOS is measured on the task's clean prompts; without, on the
repeated random tokens the other detectors use. See docs/METHODS.md, "Head analysis".
"""

from __future__ import annotations

from dataclasses import dataclass

from circuitlab.analysis import Analysis
from circuitlab.errors import HeadsError
from circuitlab.graph.naming import head_name
from circuitlab.heads.composition import MODES, CompositionScores, composition_scores
from circuitlab.heads.detectors import DETECTORS, HeadScores, detect_heads
from circuitlab.heads.plots import composition_figure, detector_figure
from circuitlab.models.model import Model
from circuitlab.results import csv_text
from circuitlab.tasks.task import Task

SCORES = (*DETECTORS, "bos")


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise HeadsError(f"{name} must be an integer >= 1, got {value!r}")


@dataclass(frozen=True)
class HeadsParams:
    """n_repeat_tokens: random tokens per copy (each sequence is BOS + x + x); n_sequences: sequences
    averaged over; seed: draws the tokens (and the composition baseline); top: heads listed per detector."""

    n_repeat_tokens: int = 20
    n_sequences: int = 4
    seed: int = 0
    top: int = 5

    def __post_init__(self) -> None:
        for name in ("n_repeat_tokens", "n_sequences", "top"):
            _positive_int(name, getattr(self, name))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise HeadsError(f"seed must be an integer, got {self.seed!r}")


@dataclass
class HeadsResult:
    """Detector scores and composition scores of every head."""

    model: str
    detectors: HeadScores
    composition: CompositionScores
    params: HeadsParams

    def records(self) -> list[dict]:
        rows = []
        n_layers, n_heads = self.detectors.scores["induction"].shape
        for layer in range(n_layers):
            for head in range(n_heads):
                row: dict = {"head": head_name(layer, head), "layer": layer, "index": head}
                row.update({k: float(self.detectors.scores[k][layer, head]) for k in SCORES})
                for mode in MODES:
                    partner = self.composition.partner(mode, layer, head)
                    row[f"{mode}_partner"] = partner[0] if partner else None
                    row[f"{mode}_composition"] = partner[1] if partner else None
                rows.append(row)
        return rows

    def top_heads(self, kind: str) -> list[tuple[str, float]]:
        scores = self.detectors.scores[kind]
        flat = scores.flatten()
        top = flat.topk(min(self.params.top, flat.numel())).indices.tolist()
        return [(head_name(*divmod(i, scores.shape[1])), float(flat[i])) for i in top]

    def summary(self) -> dict:
        return {
            "model": self.model,
            "sequences": f"{self.params.n_sequences} x BOS + 2 x {self.params.n_repeat_tokens} random tokens "
                         f"(seed {self.params.seed})",
            "bos_measured_on": self.detectors.bos_source,
            "top": {kind: [f"{name} {score:.3f}" for name, score in self.top_heads(kind)] for kind in SCORES},
            "uniform_head": {kind: round(self.detectors.uniform[kind], 4) for kind in SCORES},
            "composition_random_baseline": {mode: round(self.composition.baseline[mode], 4) for mode in MODES},
            "strongest_composition": {mode: [f"{w}->{r} {s:.3f}" for w, r, s in self.composition.strongest(mode, 2)]
                                      for mode in MODES},
        }

    def figures(self) -> dict:
        figures = {f"heads_{kind}.png": detector_figure(self.detectors.scores[kind], kind, self.detectors.uniform[kind])
                   for kind in SCORES}
        if self.composition.n_layers > 1:
            figures.update({f"composition_{mode}.png": composition_figure(self.composition, mode) for mode in MODES})
        return figures

    def files(self) -> dict[str, str]:
        return {"composition.csv": csv_text(self.composition.pairs(), ["writer", "reader", *MODES])}


def head_analysis(model: Model, task: Task | None = None, params: HeadsParams | None = None) -> HeadsResult:
    """Detectors (attention to BOS on `task`'s clean prompts when given) and composition scores."""
    params = params or HeadsParams()
    bos_prompts = [batch.clean for batch in task.prepare(model)] if task is not None else None
    detectors = detect_heads(model, n_tokens=params.n_repeat_tokens, n_sequences=params.n_sequences,
                             seed=params.seed, bos_prompts=bos_prompts,
                             bos_source=f"task {task.name}" if task is not None else "repeated tokens")
    return HeadsResult(model.spec, detectors, composition_scores(model, seed=params.seed), params)


HEADS = Analysis("heads", "head detectors (previous-token, duplicate-token, induction, BOS) and Q/K/V composition",
                 HeadsParams, head_analysis, task="optional")
