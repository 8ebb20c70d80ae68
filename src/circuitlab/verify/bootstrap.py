"""Percentile-bootstrap 95% confidence intervals over prompts.

Every verification number is a function of *means over prompts* of a few per-prompt rows (the metric of the
full model, of the empty circuit, of the circuit, ...). One bootstrap draws `n_resamples` sets of prompt
indices with replacement (seeded, shared by every number of a run, so the intervals of related numbers
come from the same resamples), recomputes the means on each set and applies the same function; the
interval is the 2.5 and 97.5 percentiles of those values (Efron & Tibshirani 1993, "An Introduction to the
Bootstrap", the percentile method). A resample where the function is undefined (a zero denominator)
is left out. See docs/METHODS.md, "Circuit verification".
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from jaxtyping import Float

from circuitlab.errors import VerifyError

LEVEL = 0.95
Rows = Float[torch.Tensor, "row prompt"]
# means [row, *resamples] -> values [*resamples] or [item, *resamples]
Statistic = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Interval:
    """A point estimate and its bootstrap 95% interval (low = high = value with a single prompt)."""

    value: float
    low: float
    high: float

    def as_dict(self, name: str) -> dict[str, float]:
        return {name: self.value, f"{name}_ci_low": self.low, f"{name}_ci_high": self.high}

    def __str__(self) -> str:
        return f"{self.value:.4g} [{self.low:.4g}, {self.high:.4g}]"


def check_resamples(n_resamples: int) -> int:
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < 1:
        raise VerifyError(f"n_bootstrap must be a positive integer (bootstrap resamples), got {n_resamples!r}")
    return n_resamples


class Bootstrap:
    """Resampled prompt sets for `n_prompts` prompts, drawn once from `seed`."""

    def __init__(self, n_prompts: int, n_resamples: int = 1000, seed: int = 0):
        check_resamples(n_resamples)
        generator = torch.Generator().manual_seed(seed)
        self.n_prompts = n_prompts
        self.indices = torch.randint(n_prompts, (n_resamples, n_prompts), generator=generator)

    def intervals(self, rows: Rows, statistic: Statistic) -> list[Interval]:
        """Intervals of `statistic` (means [row] -> [item] or a scalar) of the rows' prompt means."""
        rows = rows.double()
        if rows.shape[-1] != self.n_prompts:
            raise VerifyError(f"per-prompt rows have {rows.shape[-1]} prompts, the bootstrap {self.n_prompts}")
        point = statistic(rows.mean(-1)).reshape(-1)
        resampled = rows[:, self.indices].mean(-1)  # [row, resample]
        values = statistic(resampled).reshape(len(point), -1)
        values = torch.where(torch.isfinite(values), values, torch.nan)
        out = []
        for p, v in zip(point.tolist(), values, strict=True):
            kept = v[~torch.isnan(v)]
            if kept.numel() == 0 or not math.isfinite(p):
                out.append(Interval(p, math.nan, math.nan))
                continue
            low, high = torch.quantile(kept, torch.tensor([(1 - LEVEL) / 2, (1 + LEVEL) / 2], dtype=kept.dtype))
            out.append(Interval(p, float(low), float(high)))
        return out

    def interval(self, rows: Rows, statistic: Statistic) -> Interval:
        return self.intervals(rows, statistic)[0]

    def mean(self, values: Float[torch.Tensor, " prompt"]) -> Interval:
        """The mean of one per-prompt value and its interval."""
        return self.interval(values.reshape(1, -1), lambda means: means[0])
