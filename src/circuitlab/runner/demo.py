"""The main job (`circuitlab demo`): the whole pipeline on one loaded model, written as one run directory.

From a prompt pair to a verified circuit: the baseline table, activation patching heatmaps, path patching
into the logits, the EAP-IG circuit with its faithfulness curve, its verification on held-out prompts, the
head detectors, the IOI head roles and the induction case study. Each step is an ordinary `run` whose
files go to a sub-folder; a later step may read an earlier step's file (the verification reads the
discovered circuit.json). `index.html` links every step's report with its headline numbers. The whole
folder is replaced at once (`RunDirectory`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from circuitlab.models.model import Model
from circuitlab.progress import progress_bar
from circuitlab.report import write_index
from circuitlab.runner.run import Run, run, save_run
from circuitlab.runner.rundir import RunDirectory
from circuitlab.tasks.task import Task

MAIN_TASK = "main"  # a step on the demo's task (IOI unless the caller gives another)


@dataclass(frozen=True)
class Output:
    """A file an earlier step wrote, passed to a later step as its path."""

    folder: str
    name: str


@dataclass(frozen=True)
class Step:
    """One step: its folder, a description, the analysis, its options, prompts and task.

    task: MAIN_TASK (the demo's task), a task name of the step's own, or None (no task). ioi_only: the step
    needs the IOI task's structure (names, positions) and is left out for another task.
    """

    folder: str
    description: str
    analysis: str
    options: dict[str, Any] = field(default_factory=dict)
    n: int | None = None
    task: str | None = MAIN_TASK
    ioi_only: bool = False


def demo_steps(n: int, patch_n: int) -> list[Step]:
    """The pipeline. `n` prompts for the evaluation, `patch_n` for every sweep and the discovery (twice as
    many for the verification, whose held-out half are prompts the discovery never saw)."""
    return [
        Step("eval", "IOI evaluation: accuracy and clean / corrupt logit difference", "eval", n=n),
        Step("patch_resid_pre", "activation patching, resid_pre by layer,pos (denoising, normalised)", "patch",
             {"site": "resid_pre", "by": "layer,pos"}, n=patch_n),
        Step("patch_z", "activation patching, z by layer,head (denoising, normalised)", "patch",
             {"site": "z", "by": "layer,head"}, n=patch_n),
        Step("path_patch", "path patching: every head and MLP into the logits (direct effects)", "path-patch",
             {"receivers": "logits"}, n=patch_n),
        Step("discover", "EAP-IG circuit: smallest circuit with faithfulness >= 0.8, and the faithfulness curve",
             "discover/eap-ig", n=patch_n),
        Step("verify", "verification of the EAP-IG circuit on held-out prompts: faithfulness, KL, consistency, "
             "completeness, minimality, perturbation (95% CIs)", "verify",
             # random completeness subsets without the greedy search (2 masked runs per node of the circuit,
             # minutes on SmolLM2) and the corrupt ablation only keep the demo within minutes; `circuitlab
             # verify` runs the full search under every ablation
             {"circuit": Output("discover", "circuit.json"), "split": "test", "subsets": 4, "greedy_steps": 0,
              "all_ablations": False}, n=2 * patch_n),
        Step("heads", "head detectors (previous-token, duplicate-token, induction, BOS) and composition scores",
             "heads", task=None),
        Step("ioi_roles", "IOI case study: the circuit's heads classified into name movers, S-inhibition, "
             "induction and duplicate-token heads", "study/ioi", n=patch_n, ioi_only=True),
        Step("induction", "induction case study: induction heads, their previous-token partners, ablation",
             "study/induction", {"max_heads": 2}, n=patch_n, task="induction"),
    ]


def run_demo(model: str | Model, out: str | Path, *, force: bool = False, n: int = 32, patch_n: int = 8,
             seed: int = 0, task: str | Task = "ioi", steps: list[Step] | None = None,
             on_step: Callable[[Step, Run], None] | None = None) -> Path:
    """Run every demo step into `out` (replaced whole); returns the index.html path."""
    chosen = [s for s in (steps or demo_steps(n, patch_n)) if not (s.ioi_only and task != "ioi")]
    done: list[tuple[str, str, Any]] = []
    with RunDirectory(out, force=force) as rundir, progress_bar(len(chosen), "demo") as advance:
        for step in chosen:
            # the analysis's own options: typed by its Params dataclass, checked by `run` (its **options)
            options: dict[str, Any] = {k: str(rundir.path / v.folder / v.name) if isinstance(v, Output) else v
                                       for k, v in step.options.items()}
            step_task = task if step.task == MAIN_TASK else step.task
            result = run(step.analysis, model=model, task=step_task, n=step.n if step_task else None, seed=seed,
                         **options)
            model = result.model  # load once, reuse for every step
            for key, value in step.options.items():  # record where the file will be, not the staging copy
                if isinstance(value, Output):
                    result.result.params[key] = str(Path(out) / value.folder / value.name)
            save_run(result.result, result.output, rundir.path / step.folder)
            done.append((step.folder, step.description, result.result))
            if on_step is not None:
                on_step(step, result)
            advance(1, step.folder)
        write_index(rundir.path, done)
    return Path(out) / "index.html"
