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
    result = Result("eval", m.info(), t.info(), {"n": len(t), "metric": t.metric}, records, seed=seed,
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
def demo(model: ModelOpt = DEFAULT_SPEC, out: OutOpt = Path("out/demo"), n: NOpt = 32, seed: SeedOpt = 0,
         patch_n: Annotated[int, typer.Option("--patch-n", help="IOI prompts for the patching sweeps")] = 8) -> None:
    """The main job on IOI: evaluation table, then resid_pre (layer x position) and per-head z activation
    patching heatmaps; each step writes its own folder under --out with results.json and report.html."""
    from circuitlab.patching.run import run_patching
    from circuitlab.report import write_index

    steps = []
    try:
        result, m = run_eval(model, "ioi", out / "eval", n, seed, None)
        print_records([result.summary], f"IOI on {model}")
        steps.append(("eval", "IOI evaluation: accuracy and clean / corrupt logit difference", result))
        for site, by in (("resid_pre", "layer,pos"), ("z", "layer,head")):
            folder = out / f"patch_{site}"
            res, sweep = run_patching(m, "ioi", site=site, by=by, n=patch_n, seed=seed, out=folder)
            save_result(res, folder)
            steps.append((folder.name, f"activation patching, {site} by {by} (denoising, normalised)", res))
            top = sorted(res.records, key=lambda r: -abs(r["value"]))[:5]
            print_records(top, f"{site} by {by}: largest effects ({res.timing_s:.1f} s)")
    except CircuitlabError as exc:
        fail(exc)
    index = write_index(out, [(name, desc, r) for name, desc, r in steps])
    console.print(f"wrote {out} (open {index})")


@app.command()
def attribute(
    method: Annotated[str, typer.Option("--method", help="dla, ig, rollout, flow, attn-grad or atp")] = "dla",
    model: ModelOpt = DEFAULT_SPEC, task: Annotated[str | None, typer.Option("--task", "-t", help="Built-in task or file")] = None,
    prompt: Annotated[str | None, typer.Option("--prompt", help="A single prompt instead of --task")] = None,
    answer: Annotated[str | None, typer.Option("--answer", help="Answer token for --prompt, e.g. ' Mary'")] = None,
    wrong: Annotated[str | None, typer.Option("--wrong", help="Wrong-answer token for --prompt (logit difference)")] = None,
    corrupt: Annotated[str | None, typer.Option("--corrupt", help="Corrupt prompt for --prompt (atp, ig baseline)")] = None,
    out: OutOpt = Path("out/attribute"), n: NOpt = 8, seed: SeedOpt = 0, metric: MetricOpt = None,
    steps: Annotated[int, typer.Option("--steps", help="IG interpolation steps")] = 64,
    rule: Annotated[str, typer.Option("--rule", help="IG rule: riemann_left/right/middle/trapezoid, gausslegendre")] = "gausslegendre",
    baseline: Annotated[str, typer.Option("--baseline", help="IG baseline: auto (corrupt if given, else pad), zero, pad, bos, corrupt")] = "auto",
    hook: Annotated[str, typer.Option("--hook", help="IG hook (hook_embed = input embeddings)")] = "hook_embed",
    index: Annotated[int, typer.Option("--index", help="Prompt shown by rollout / flow")] = 0,
    sites: Annotated[str, typer.Option("--sites", help="atp sites, comma-separated: resid_pre, resid_mid, "
                                       "resid_post, attn_out, mlp_out, z, q, k, v, pattern")] = "resid_pre,attn_out,mlp_out,z",
) -> None:
    """Attribution: direct logit attribution, integrated gradients, attention rollout / flow,
    attention x gradient, attribution patching."""
    from circuitlab.attribution import prompt_task, run_attribution
    from circuitlab.tasks import make_task

    try:
        if (task is None) == (prompt is None) or (prompt is not None and answer is None):
            raise CircuitlabError("pass either --task, or --prompt with --answer (and optionally --wrong, --corrupt)")
        m = load(model)
        t = make_task(task, m, n=n, seed=seed, metric=metric) if task else prompt_task(prompt, answer, wrong, corrupt)
        result = run_attribution(m, t.prepare(m), method, out, steps=steps, rule=rule, baseline=baseline, hook=hook,
                                 prompt=index, seed=seed,
                                 sites=tuple(x.strip() for x in sites.split(",") if x.strip()))
        save_result(result, out)
    except CircuitlabError as exc:
        fail(exc)
    print_records([result.summary], f"attribute --method {method} on {model}")
    print_records(sorted(result.records, key=lambda r: -abs(r["value"]))[:10], "largest |value|")
    console.print(f"wrote {out}")


@app.command()
def trace(
    model: ModelOpt = DEFAULT_SPEC,
    prompt: Annotated[str | None, typer.Option("--prompt", help="Prompt, e.g. 'The Eiffel Tower is located in the city of'")] = None,
    subject: Annotated[str | None, typer.Option("--subject", help="Subject string as written in the prompt (noised)")] = None,
    target: Annotated[str | None, typer.Option("--target", help="Target token, e.g. ' Paris'")] = None,
    task: Annotated[str | None, typer.Option("--task", "-t", help="Average over a task with subjects (facts)")] = None,
    kind: Annotated[str, typer.Option("--kind", help="resid, mlp, attn or all")] = "all",
    samples: Annotated[int, typer.Option("--samples", help="Noise samples per run")] = 10,
    noise: Annotated[float, typer.Option("--noise", help="Noise std as a multiple of the embedding std")] = 3.0,
    window: Annotated[int, typer.Option("--window", help="Layers restored together for mlp / attn")] = 10,
    out: OutOpt = Path("out/trace"), n: NOpt = None, seed: SeedOpt = 0,
) -> None:
    """ROME causal tracing: noise the subject's embeddings, restore clean states per (layer, token)."""
    from circuitlab.patching.causal_trace import KINDS, run_average_trace, run_causal_trace
    from circuitlab.tasks import make_task

    kinds = list(KINDS) if kind == "all" else [kind]
    try:
        if (task is None) == (prompt is None) or (prompt is not None and (subject is None or target is None)):
            raise CircuitlabError("pass either --prompt with --subject and --target, or --task (e.g. facts)")
        m = load(model)
        if task is not None:
            t = make_task(task, m, n=n, seed=seed)
            result = run_average_trace(m, t, kinds, out, window=window, noise=noise, samples=samples, seed=seed)
        else:
            result = run_causal_trace(m, prompt, subject, target, kinds, out, window=window, noise=noise,
                                      samples=samples, seed=seed)
        save_result(result, out)
    except CircuitlabError as exc:
        fail(exc)
    print_records([{"summary": k, "value": v} for k, v in result.summary.items()], f"trace on {model}", limit=40)
    console.print(f"wrote {out}")


@app.command()
def lens(
    model: ModelOpt = DEFAULT_SPEC,
    prompt: Annotated[str, typer.Option("--prompt", help="Prompt to read layer by layer")] = "The Eiffel Tower is located in the city of",
    target: Annotated[str | None, typer.Option("--target", help="Token to follow through depth, e.g. ' Paris'")] = None,
    top_k: Annotated[int, typer.Option("--top-k", help="Top tokens kept per layer and position")] = 10,
    out: OutOpt = Path("out/lens"),
) -> None:
    """Logit lens: final norm + unembedding of every layer's residual stream."""
    from circuitlab.lens.logit_lens import run_logit_lens

    try:
        m = load(model)
        result = run_logit_lens(m, prompt, out, target=target, top_k=top_k)
        save_result(result, out)
    except CircuitlabError as exc:
        fail(exc)
    last = len(result.records) // (m.n_layers + 1)
    rows = [{k: r[k] for k in ("layer", "top1", "top1_prob", "target_rank", "target_prob", "kl_final") if k in r}
            for r in result.records[last - 1 :: last]]
    print_records(rows, f"logit lens at the last token on {model}", limit=m.n_layers + 1)
    console.print(f"wrote {out}")


@app.command("path-patch")
def path_patch_cmd(
    model: ModelOpt = DEFAULT_SPEC, task: TaskOpt = "ioi",
    receivers: Annotated[str, typer.Option("--receivers", "-r", help="Receiver pattern(s), comma-separated: 'a9.h*<q>' (queries of layer-9 heads), 'a9.h1' (its q,k,v), 'm5', 'logits'")] = "logits",
    out: OutOpt = Path("out/path-patch"), n: NOpt = 8, seed: SeedOpt = 0, metric: MetricOpt = None,
) -> None:
    """Path patching: every head as sender into --receivers (direct edges, corrupt -> clean), layer x head heatmap."""
    from circuitlab.graph.path_patching import run_path_patching
    from circuitlab.tasks import make_task

    try:
        m = load(model)
        result = run_path_patching(m, make_task(task, m, n=n, seed=seed, metric=metric), receivers, out, seed=seed)
        save_result(result, out)
    except CircuitlabError as exc:
        fail(exc)
    print_records([result.summary], f"path-patch into {receivers} on {model}")
    print_records(sorted(result.records, key=lambda r: r["normalised"] if r["normalised"] == r["normalised"] else 0.0)[:10],
                  "strongest senders")
    console.print(f"wrote {out}")


@app.command()
def patch(
    model: ModelOpt = DEFAULT_SPEC, task: TaskOpt = "ioi",
    site: Annotated[str, typer.Option("--site", help="resid_pre, resid_mid, resid_post, attn_out, mlp_out, z, q, k, v, pattern")] = "resid_pre",
    by: Annotated[str, typer.Option("--by", help="layer,pos | layer | layer,head | layer,head,pos")] = "layer,pos",
    direction: Annotated[str, typer.Option("--direction", help="denoise (clean into corrupt) or noise (corrupt into clean)")] = "denoise",
    max_batch: Annotated[int, typer.Option("--max-batch", help="Patched rows per forward pass (memory budget)")] = 256,
    per_prompt: Annotated[bool, typer.Option("--per-prompt", help="One record per cell and prompt")] = False,
    out: OutOpt = Path("out/patch"), n: NOpt = 8, seed: SeedOpt = 0, metric: MetricOpt = None,
) -> None:
    """Activation patching sweep: normalised effect per cell (0 = corrupt, 1 = clean) and heatmaps."""
    from circuitlab.patching.run import run_patching

    try:
        m = load(model)
        result, _ = run_patching(m, task, site=site, by=by, direction=direction, n=n, seed=seed, metric=metric,
                                 max_batch=max_batch, out=out, per_prompt=per_prompt)
        save_result(result, out)
    except CircuitlabError as exc:
        fail(exc)
    print_records([{k: v for k, v in result.summary.items() if k != "max_abs_cell"} | result.summary["max_abs_cell"]],
                  f"patch --site {site} --by {by} on {model}")
    print_records(sorted(result.records, key=lambda r: -abs(r["value"]))[:10], "largest |effect|")
    console.print(f"wrote {out}")


# --- end of commands ---


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
