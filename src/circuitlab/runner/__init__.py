"""The runner layer: one verb (`run`) for every analysis, the registry of analyses, and run directories
that are replaced whole or not at all."""

from circuitlab.runner.executor import Executor
from circuitlab.runner.grid import run_grid
from circuitlab.runner.registry import analysis_names, get_analysis
from circuitlab.runner.run import Run, run, save_run
from circuitlab.runner.rundir import RunDirectory

__all__ = ["run", "Run", "save_run", "RunDirectory", "get_analysis", "analysis_names", "Executor", "run_grid"]
