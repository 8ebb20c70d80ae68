"""The main job (`circuitlab demo`): several runs on one loaded model, written as one run directory.

Each step is an ordinary `run` whose files go to a sub-folder; `index.html` links every step's report
and shows its headline numbers. The whole folder is replaced at once (`RunDirectory`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from circuitlab.models.model import Model
from circuitlab.report import write_index
from circuitlab.runner.run import Run, run, save_run
from circuitlab.runner.rundir import RunDirectory


@dataclass(frozen=True)
class Step:
    """One step of the demo: its folder, a description and the `run` arguments."""

    folder: str
    description: str
    analysis: str
    options: dict[str, Any] = field(default_factory=dict)
    n: int | None = None


def demo_steps(n: int, patch_n: int) -> list[Step]:
    return [
        Step("eval", "IOI evaluation: accuracy and clean / corrupt logit difference", "eval", n=n),
        Step("patch_resid_pre", "activation patching, resid_pre by layer,pos (denoising, normalised)", "patch",
             {"site": "resid_pre", "by": "layer,pos"}, n=patch_n),
        Step("patch_z", "activation patching, z by layer,head (denoising, normalised)", "patch",
             {"site": "z", "by": "layer,head"}, n=patch_n),
    ]


def run_demo(model: str | Model, out: str | Path, *, force: bool = False, n: int = 32, patch_n: int = 8,
             seed: int = 0, on_step: Callable[[Step, Run], None] | None = None) -> Path:
    """Run every demo step into `out` (replaced whole); returns the index.html path."""
    steps = demo_steps(n, patch_n)
    done: list[tuple[str, str, Any]] = []
    with RunDirectory(out, force=force) as rundir:
        for step in steps:
            result = run(step.analysis, model=model, task="ioi", n=step.n, seed=seed, **step.options)
            model = result.model  # load once, reuse for every step
            save_run(result.result, result.output, rundir.path / step.folder)
            done.append((step.folder, step.description, result.result))
            if on_step is not None:
                on_step(step, result)
        write_index(rundir.path, done)
    return Path(out) / "index.html"
