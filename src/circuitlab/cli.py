"""The `circuitlab` command line: each command loads a model and a task, runs one analysis and writes
results.json, results.csv and plots into `--out`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from circuitlab.errors import CircuitlabError
from circuitlab.models.specs import DEFAULT_SPEC

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
tasks_app = typer.Typer(no_args_is_help=False, invoke_without_command=True, help="List built-in tasks, or show one.")
app.add_typer(tasks_app, name="tasks")
console = Console()

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Model spec: smollm2-135m, gemma3-270m, a .gguf file, a model dir or hub id")]
TaskOpt = Annotated[str, typer.Option("--task", "-t", help="Built-in task name or a .jsonl/.csv file")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output directory for results.json, tables and plots")]
NOpt = Annotated[int | None, typer.Option("--n", help="Number of prompts (default: the task's own)")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed for task generation and sampling")]
MetricOpt = Annotated[str | None, typer.Option("--metric", help="Override the task metric: logit_diff, logprob, prob, kl")]


def fail(exc: Exception) -> None:
    console.print(f"[bold red]error:[/] {exc}")
    raise typer.Exit(code=2)


def load(spec: str):
    """Load a model with a status spinner; returns the Model."""
    from circuitlab.models import load_model

    with console.status(f"loading {spec} ..."):
        model = load_model(spec)
    console.print(f"loaded [bold]{spec}[/] in {model.load_s:.2f} s")
    return model


def save_result(result, out: Path) -> Path:
    """results.json + results.csv + report.html into `out`; returns the report path."""
    from circuitlab.report import write_report

    result.save(out)
    return write_report(result, out)


def task_info(task) -> dict:
    return {"name": task.name, "n": len(task), "metric": task.metric, "params": task.params}


def print_records(records: list[dict], title: str, limit: int = 20) -> None:
    if not records:
        return
    table = Table(title=title)
    cols = list(records[0])
    for c in cols:
        table.add_column(c)
    for r in records[:limit]:
        table.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in (r[c] for c in cols)))
    console.print(table)
    if len(records) > limit:
        console.print(f"... {len(records) - limit} more rows in results.csv")


@app.command()
def models() -> None:
    """List the known model specs, whether each is installed and cached, and its size."""
    from circuitlab.models import cache
    from circuitlab.models.specs import KNOWN_SPECS

    table = Table(title=f"known models (cache: {cache.cache_root()})")
    for col in ("spec", "package", "installed", "gguf size", "cached fp32"):
        table.add_column(col)
    for name, packaged in KNOWN_SPECS.items():
        path = packaged.gguf_path()
        cached = path is not None and cache.cached_dir(cache.cache_key(path)) is not None
        size = f"{path.stat().st_size / 2**20:.0f} MiB" if path else "-"
        table.add_row(name, packaged.pip_name, "yes" if path else f"no ({packaged.install_hint})", size, "yes" if cached else "no")
    console.print(table)
    console.print("Also accepted: a .gguf file, a local HF model dir, a native model dir, or an HF hub id.")


@tasks_app.callback()
def tasks_list(ctx: typer.Context) -> None:
    """List the built-in tasks."""
    if ctx.invoked_subcommand is not None:
        return
    from circuitlab.tasks import builtin_tasks

    table = Table(title="built-in tasks (or pass a .jsonl/.csv file to --task)")
    table.add_column("task")
    table.add_column("description")
    for name, desc in builtin_tasks().items():
        table.add_row(name, desc)
    console.print(table)


@tasks_app.command("show")
def tasks_show(name: str, model: ModelOpt = DEFAULT_SPEC, n: NOpt = 8, seed: SeedOpt = 0, examples: int = 4) -> None:
    """Print a few examples of a task and its clean vs corrupt metric on the model."""
    from circuitlab.tasks import evaluate_task, make_task

    try:
        m = load(model)
        task = make_task(name, m, n=n, seed=seed)
        prepared = task.prepare(m)
        evaluation = evaluate_task(m, prepared)
    except CircuitlabError as exc:
        fail(exc)
    table = Table(title=f"{task.name}: {task.description}")
    for col in ("clean", "corrupt", "answer", "wrong", "clean metric", "corrupt metric"):
        table.add_column(col)
    for i, ex in enumerate(task.examples[:examples]):
        table.add_row(ex.clean, ex.corrupt, "|".join(ex.answer), "|".join(ex.wrong),
                      f"{float(evaluation.clean[i]):.3f}", f"{float(evaluation.corrupt[i]):.3f}")
    console.print(table)
    console.print(evaluation.summary())


def run_eval(model: str, task: str, out: Path, n: int | None, seed: int, metric: str | None, m=None):
    """Evaluate a task clean vs corrupt; write results; returns (Result, Model)."""
    from circuitlab.results import Result
    from circuitlab.tasks import evaluate_task, make_task

    m = m or load(model)
    t = make_task(task, m, n=n, seed=seed, metric=metric)
    start = time.perf_counter()
    prepared = t.prepare(m)
    evaluation = evaluate_task(m, prepared)
    elapsed = time.perf_counter() - start
    records = [
        {"example": i, "clean": ex.clean, "corrupt": ex.corrupt, "answer": "|".join(ex.answer),
         "wrong": "|".join(ex.wrong), "clean_metric": float(evaluation.clean[i]),
         "corrupt_metric": float(evaluation.corrupt[i]), "top1_correct": bool(evaluation.top1_correct[i])}
        for i, ex in enumerate(t.examples)
    ]
    result = Result("eval", m.info(), task_info(t), {"n": len(t), "metric": t.metric}, records, seed=seed,
                    timing_s=elapsed, load_s=m.load_s, summary=evaluation.summary())
    save_result(result, out)
    return result, m


@app.command("eval")
def eval_cmd(task: TaskOpt = "ioi", model: ModelOpt = DEFAULT_SPEC, out: OutOpt = Path("out/eval"), n: NOpt = None,
             seed: SeedOpt = 0, metric: MetricOpt = None) -> None:
    """Evaluate a task: accuracy and mean clean / corrupt metric."""
    try:
        result, _ = run_eval(model, task, out, n, seed, metric)
    except CircuitlabError as exc:
        fail(exc)
    print_records([result.summary], f"{task} on {model}")
    console.print(f"wrote {out / 'results.json'}")


@app.command()
def demo(model: ModelOpt = DEFAULT_SPEC, out: OutOpt = Path("out/demo"), n: NOpt = 32, seed: SeedOpt = 0) -> None:
    """The main job: IOI on the model (evaluation table, and the analyses that later issues add)."""
    try:
        result, m = run_eval(model, "ioi", out / "eval", n, seed, None)
    except CircuitlabError as exc:
        fail(exc)
    print_records([result.summary], f"IOI on {model}")
    console.print(f"wrote {out}")


# --- end of commands ---


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
