"""Paired timing for the benchmarks: a baseline and a method alternate, so both see the same CPU load."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def paired_ratio(baseline: Callable[[], object], method: Callable[[], object],
                 repeats: int) -> tuple[float, float, float]:
    """(min baseline s, min method s, median of the per-pair ratios method / baseline), after one warm-up
    of each. Alternating the two keeps the ratio honest when the machine is shared."""
    baseline()
    method()
    base, meth, ratios = [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        baseline()
        middle = time.perf_counter()
        method()
        end = time.perf_counter()
        base.append(middle - start)
        meth.append(end - middle)
        ratios.append((end - middle) / (middle - start))
    return min(base), min(meth), statistics.median(ratios)
