"""`PatchingResult`: the patched metric of every cell and prompt, plus the clean/corrupt baselines.

The headline number is the normalised effect of the dataset-mean metric, as in TransformerLens's patching
demos (Wang et al. 2022): (mean patched - mean corrupt) / (mean clean - mean corrupt); 0 = corrupt
behaviour, 1 = clean behaviour, in both directions (noising starts from 1, denoising from 0).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from jaxtyping import Float

from circuitlab.patching.grid import Cell
from circuitlab.tasks.metrics import normalised


@dataclass
class PatchingResult:
    """values[c, i]: metric of prompt i with cell c patched. clean/corrupt: the unpatched metric per prompt."""

    site: str
    by: tuple[str, ...]
    direction: str
    metric: str
    cells: list[Cell]
    values: Float[torch.Tensor, "cell prompt"]
    clean: Float[torch.Tensor, " prompt"]
    corrupt: Float[torch.Tensor, " prompt"]
    n_layers: int
    n_heads: int = 0
    pos_labels: list[str] = field(default_factory=list)  # readable clean tokens of the first prompt
    timing_s: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)  # rows run, cells skipped, forward passes

    def mean(self) -> Float[torch.Tensor, " cell"]:
        return self.values.mean(1)

    def normalised(self) -> Float[torch.Tensor, " cell"]:
        """(mean patched - mean corrupt) / (mean clean - mean corrupt), per cell."""
        return normalised(self.mean(), self.clean.mean(), self.corrupt.mean())

    def per_prompt_normalised(self) -> Float[torch.Tensor, "cell prompt"]:
        """Each prompt normalised by its own clean/corrupt metric (noisy when they are close)."""
        return (self.values - self.corrupt) / (self.clean - self.corrupt)

    def records(self, *, per_prompt: bool = False) -> list[dict[str, Any]]:
        """Tidy rows: site, layer, pos, head, value (normalised), metric (raw mean or per-prompt metric)."""
        rows = []
        if per_prompt:
            norm = self.per_prompt_normalised()
            for c, cell in enumerate(self.cells):
                for i in range(self.values.shape[1]):
                    rows.append({**self._cell_fields(cell), "prompt": i, "value": float(norm[c, i]),
                                 "metric": float(self.values[c, i])})
            return rows
        norm, mean = self.normalised(), self.mean()
        for c, cell in enumerate(self.cells):
            rows.append({**self._cell_fields(cell), "value": float(norm[c]), "metric": float(mean[c])})
        return rows

    def _cell_fields(self, cell: Cell) -> dict[str, Any]:
        return {"site": self.site, "layer": cell.layer, "pos": cell.pos, "head": cell.head}

    def grid(self, rows: str = "layer", cols: str = "pos") -> np.ndarray:
        """Normalised effect as a [rows, cols] array (NaN where not swept). An axis of the sweep that is
        not shown is reduced by taking the value of largest magnitude."""
        sizes = {"layer": self.n_layers, "head": max(self.n_heads, 1), "pos": max(len(self.pos_labels), 1)}
        if any(c.pos is not None for c in self.cells):
            sizes["pos"] = max(sizes["pos"], 1 + max(c.pos for c in self.cells if c.pos is not None))
        out = np.full((sizes[rows], sizes[cols]), np.nan)
        for cell, value in zip(self.cells, self.normalised().tolist(), strict=True):
            index = {"layer": cell.layer, "head": cell.head or 0, "pos": cell.pos or 0}
            r, c = index[rows], index[cols]
            if np.isnan(out[r, c]) or abs(value) > abs(out[r, c]):
                out[r, c] = value
        return out

    def summary(self) -> dict[str, Any]:
        norm = self.normalised()
        best = int(norm.abs().argmax())
        cell = self.cells[best]
        return {
            "site": self.site, "by": ",".join(self.by), "direction": self.direction, "metric": self.metric,
            "n_cells": len(self.cells), "n_prompts": int(self.values.shape[1]),
            "clean_mean": float(self.clean.mean()), "corrupt_mean": float(self.corrupt.mean()),
            "max_abs_cell": {"layer": cell.layer, "pos": cell.pos, "head": cell.head, "value": float(norm[best])},
            "timing_s": self.timing_s, **self.stats,
        }

    def to_json(self) -> str:
        data = {
            "site": self.site, "by": list(self.by), "direction": self.direction, "metric": self.metric,
            "cells": [[c.layer, c.pos, c.head] for c in self.cells], "values": self.values.tolist(),
            "clean": self.clean.tolist(), "corrupt": self.corrupt.tolist(), "n_layers": self.n_layers,
            "n_heads": self.n_heads, "pos_labels": self.pos_labels, "timing_s": self.timing_s, "stats": self.stats,
        }
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> PatchingResult:
        d = json.loads(text)
        return cls(
            site=d["site"], by=tuple(d["by"]), direction=d["direction"], metric=d["metric"],
            cells=[Cell(*c) for c in d["cells"]], values=torch.tensor(d["values"]), clean=torch.tensor(d["clean"]),
            corrupt=torch.tensor(d["corrupt"]), n_layers=d["n_layers"], n_heads=d["n_heads"],
            pos_labels=d["pos_labels"], timing_s=d["timing_s"], stats=d["stats"],
        )
