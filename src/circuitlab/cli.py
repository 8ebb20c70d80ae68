"""circuitlab: circuit analysis for transformer language models. Every analysis command writes one run
directory into --out (results.json, results.csv, figures, report.html), replaced whole or not at all."""

# Each command only parses its options and calls `circuitlab.runner.run` (through `execute`).

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from circuitlab import __version__
from circuitlab.errors import CircuitlabError
from circuitlab.models.hooks import hook_name
from circuitlab.models.specs import DEFAULT_SPEC

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, rich_markup_mode=None,
                  epilog="Example: circuitlab demo --out out/demo")
tasks_app = typer.Typer(no_args_is_help=False, invoke_without_command=True, help="List built-in tasks, or show one.",
                        epilog="Example: circuitlab tasks show ioi --n 4")
app.add_typer(tasks_app, name="tasks")
cache_app = typer.Typer(no_args_is_help=True, help="List or clean the model cache (fp32 checkpoints converted from GGUF).",
                        epilog="Example: circuitlab cache list")
app.add_typer(cache_app, name="cache")
console = Console()
errors = Console(stderr=True)

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Model spec: smollm2-135m, gemma3-270m, a .gguf file, a model dir or hub id")]
TaskOpt = Annotated[str, typer.Option("--task", "-t", help="Built-in task name or a .jsonl/.csv file")]
NOpt = Annotated[int | None, typer.Option("--n", help="Number of prompts (default: the task's own)")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed for task generation and sampling")]
MetricOpt = Annotated[str | None, typer.Option("--metric", help="Override the task metric: logit_diff, logprob, prob, kl, or output:K (raw output K at the answer position)")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an --out directory that holds an earlier run")]
BackendOpt = Annotated[str, typer.Option("--backend", help="local (this process) or ray (prompt shards over Ray "
                                         "workers; same result)")]
RayAddressOpt = Annotated[str | None, typer.Option("--ray-address", help="--backend ray: join a running cluster "
                                                   "(auto or HOST:PORT); default: start a local one")]
WorkersOpt = Annotated[int, typer.Option("--workers", help="--backend ray: workers (each loads the model once)")]
ThreadsOpt = Annotated[int, typer.Option("--threads-per-worker", help="--backend ray: torch threads per worker")]
ShardSizeOpt = Annotated[int, typer.Option("--shard-size", help="--backend ray / --resume: prompts per shard")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Reuse the finished prompt shards of an interrupted run "
                                         "into the same --out (kept in OUT.shards)")]


def OutOpt(default: str) -> Any:  # noqa: N802 - reads as a type in the signatures below
    return typer.Option(Path(default), "--out", "-o", help=f"Run directory to write (default {default}); refused if it holds "
                        "another run, unless --force")


def _version(value: bool) -> None:
    if value:
        console.print(f"circuitlab {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars")] = False,
) -> None:
    """Circuit analysis for transformer language models. Example: circuitlab demo"""
    from circuitlab.progress import set_quiet

    set_quiet(quiet)


@contextmanager
def user_errors() -> Iterator[None]:
    """Bad input -> one line on stderr and exit 2; Ctrl-C -> exit 130. Never a traceback for either."""
    try:
        yield
    except CircuitlabError as exc:
        errors.print(f"[bold red]error:[/] {exc}", highlight=False, markup=True, soft_wrap=True)
        raise typer.Exit(code=2) from None
    except KeyboardInterrupt:
        errors.print("interrupted; the --out directory was left as it was")
        raise typer.Exit(code=130) from None


def _executor(backend: str, ray_address: str | None, workers: int, threads: int, shard_size: int,
              resume: bool) -> Any:
    """The `Executor` of the distribution options; None for today's in-process run (Ray never imported)."""
    if backend == "local" and ray_address is None and not resume:
        return None
    from circuitlab.runner.executor import Executor

    with user_errors():
        return Executor(backend, ray_address, workers, threads, shard_size, resume)


def execute(analysis: str, *, out: Path, print_result: Callable[[Any], None] | None = None, **kwargs: Any) -> None:
    """Run one analysis into `out` and print its summary and strongest records."""
    from circuitlab.report.terminal import print_result as default_print
    from circuitlab.runner import run

    with user_errors():
        done = run(analysis, out=out, **kwargs)
    (print_result or (lambda r: default_print(r.result, console)))(done)
    console.print(f"wrote {out} (open {out / 'report.html'})")


@app.command(epilog="Example: circuitlab models")
def models() -> None:
    """List the known model specs, whether each is installed and cached, and its size."""
    from rich.table import Table

    from circuitlab.models import cache
    from circuitlab.models.specs import KNOWN_SPECS

    console.print(f"cache: {cache.cache_root()}")
    table = Table(title="known models", title_justify="left")
    for col in ("spec", "installed", "gguf", "cached"):
        table.add_column(col, no_wrap=col != "installed")
    for name, packaged in KNOWN_SPECS.items():
        path = packaged.gguf_path()
        cached = path is not None and cache.cached_dir(cache.cache_key(path)) is not None
        size = f"{path.stat().st_size / 2**20:.0f} MiB" if path else "-"
        table.add_row(name, "yes" if path else f"no: {packaged.install_hint}", size, "yes" if cached else "no")
    console.print(table)
    console.print("Also accepted: a .gguf file, a local HF model dir, a native model dir, or an HF hub id.")


@tasks_app.callback()
def tasks_list(ctx: typer.Context) -> None:
    """List the built-in tasks. Example: circuitlab tasks"""
    if ctx.invoked_subcommand is not None:
        return
    from rich.table import Table

    from circuitlab.tasks import builtin_tasks

    table = Table(title="built-in tasks (or pass a .jsonl/.csv file to --task)", title_justify="left")
    table.add_column("task", no_wrap=True)
    table.add_column("description")
    for name, desc in builtin_tasks().items():
        table.add_row(name, desc)
    console.print(table)


@tasks_app.command("show", epilog="Example: circuitlab tasks show ioi --n 4")
def tasks_show(name: str, model: ModelOpt = DEFAULT_SPEC, n: NOpt = 8, seed: SeedOpt = 0,
               examples: Annotated[int, typer.Option("--examples", help="Examples to print")] = 4) -> None:
    """Print a few examples of a task and its clean vs corrupt metric on the model."""
    from circuitlab.report.terminal import summary_table
    from circuitlab.runner import run

    with user_errors():
        done = run("eval", model=model, task=name, n=n, seed=seed)
    for record in done.result.records[:examples]:
        console.print(summary_table(record, f"example {record['example']}"))
    console.print(summary_table(done.result.summary, f"{name}: clean vs corrupt"))


@cache_app.command("list", epilog="Example: circuitlab cache list")
def cache_list(quick: Annotated[bool, typer.Option("--quick", help="Check sizes only, not sha256 hashes")] = False) -> None:
    """List the cache entries, their sizes and whether they match their recorded sizes and hashes."""
    from circuitlab.models import cache
    from circuitlab.progress import status
    from circuitlab.report.terminal import summary_table

    with user_errors(), status("verifying the cache entries"):
        entries, leftovers = cache.list_entries(hashes=not quick), cache.leftovers()
    console.print(f"cache: {cache.cache_root()} ({len(entries)} {'entry' if len(entries) == 1 else 'entries'})")
    for e in entries:
        console.print(summary_table({"size": f"{e.size / 2**20:.0f} MiB", "status": e.status, "spec": e.spec,
                                     "source": e.source}, e.key))
    for item in leftovers:
        state = "in use by a running conversion" if item.in_use else "removed by `circuitlab cache clean`"
        console.print(f"temp leftover {item.path.name} ({item.size / 2**20:.0f} MiB): {state}")


@cache_app.command("clean", epilog="Examples: circuitlab cache clean\n\ncircuitlab cache clean --all")
def cache_clean(everything: Annotated[bool, typer.Option("--all", help="Also remove every entry (each is rebuilt on its next load)")] = False) -> None:
    """Remove temp directories left by interrupted conversions; with --all, every cache entry too."""
    from circuitlab.models import cache

    with user_errors():
        report = cache.clean(everything=everything)
    for path in report.removed:
        console.print(f"removed {path}")
    for path in report.kept_in_use:
        console.print(f"kept {path} (a conversion in progress)")
    console.print(f"freed {report.freed / 2**20:.0f} MiB")


@app.command("eval", epilog="Example: circuitlab eval --task ioi --n 32 --out out/eval")
def eval_cmd(task: TaskOpt = "ioi", model: ModelOpt = DEFAULT_SPEC, out: Path = OutOpt("out/eval"),
             n: NOpt = None, seed: SeedOpt = 0, metric: MetricOpt = None, force: ForceOpt = False,
             backend: BackendOpt = "local", ray_address: RayAddressOpt = None, workers: WorkersOpt = 2,
    threads_per_worker: ThreadsOpt = 1, shard_size: ShardSizeOpt = 8, resume: ResumeOpt = False,) -> None:
    """Evaluate a task: accuracy and mean clean / corrupt metric."""
    from circuitlab.report.terminal import summary_table

    execute("eval", out=out, model=model, task=task, n=n, seed=seed, metric=metric, force=force,
            executor=_executor(backend, ray_address, workers, threads_per_worker, shard_size, resume),
            print_result=lambda r: console.print(summary_table(r.result.summary, f"{task} on {model}")))


@app.command(epilog="Example: circuitlab demo --out out/demo --force")
def demo(model: ModelOpt = DEFAULT_SPEC, out: Path = OutOpt("out/demo"), n: NOpt = 32, seed: SeedOpt = 0,
         patch_n: Annotated[int, typer.Option("--patch-n", help="IOI prompts for the patching sweeps")] = 8,
         force: ForceOpt = False) -> None:
    """The main job on IOI, the whole pipeline: evaluation, activation patching heatmaps, path patching into
    the logits, the EAP-IG circuit and its faithfulness curve, its verification on held-out prompts, head
    detectors, the IOI head roles and the induction case study; each step writes its own folder under --out
    (results.json, report.html) and index.html links them."""
    from circuitlab.report.terminal import print_result
    from circuitlab.runner.demo import run_demo

    def show(step: Any, done: Any) -> None:
        print_result(done.result, console, limit=5)

    with user_errors():
        index = run_demo(model, out, force=force, n=n or 32, patch_n=patch_n, seed=seed, on_step=show)
    console.print(f"wrote {out} (open {index})")


ATTRIBUTION_METHODS = ("dla", "ig", "rollout", "flow", "attn-grad", "atp")


@app.command(epilog="Examples: circuitlab attribute --method ig --task ioi --n 4\n\n"
             "circuitlab attribute --method dla --prompt 'When Mary and John went to the store, John gave a "
             "drink to' --answer ' Mary' --wrong ' John'")
def attribute(
    method: Annotated[str, typer.Option("--method", help="dla, ig, rollout, flow, attn-grad or atp")] = "dla",
    model: ModelOpt = DEFAULT_SPEC, task: Annotated[str | None, typer.Option("--task", "-t", help="Built-in task or file")] = None,
    prompt: Annotated[str | None, typer.Option("--prompt", help="A single prompt instead of --task")] = None,
    answer: Annotated[str | None, typer.Option("--answer", help="Answer token for --prompt, e.g. ' Mary'")] = None,
    wrong: Annotated[str | None, typer.Option("--wrong", help="Wrong-answer token for --prompt (logit difference)")] = None,
    corrupt: Annotated[str | None, typer.Option("--corrupt", help="Corrupt prompt for --prompt (atp, ig baseline)")] = None,
    out: Path = OutOpt("out/attribute"), n: NOpt = 8, seed: SeedOpt = 0, metric: MetricOpt = None,
    steps: Annotated[int, typer.Option("--steps", help="IG interpolation steps")] = 64,
    rule: Annotated[str, typer.Option("--rule", help="IG rule: riemann_left/right/middle/trapezoid, gausslegendre")] = "gausslegendre",
    baseline: Annotated[str, typer.Option("--baseline", help="IG baseline: auto (corrupt if given, else pad), zero, pad, bos, corrupt")] = "auto",
    hook: Annotated[str, typer.Option("--hook", help="IG hook (hook_embed = input embeddings)")] = hook_name("embed"),
    index: Annotated[int, typer.Option("--index", help="Prompt shown by rollout / flow")] = 0,
    bos: Annotated[str, typer.Option("--bos", help="rollout / flow: exclude (drop BOS as a source, renormalise the "
                                     "rows), include, or auto (exclude when the model has a BOS token)")] = "auto",
    sites: Annotated[str, typer.Option("--sites", help="atp sites, comma-separated: resid_pre, resid_mid, "
                                       "resid_post, attn_out, mlp_out, z, q, k, v, pattern")] = "resid_pre,attn_out,mlp_out,z",
    direction: Annotated[str, typer.Option("--direction", help="atp: denoise (clean into corrupt, gradient at the "
                                           "corrupt run) or noise (corrupt into clean, gradient at the clean run)")] = "denoise",
    force: ForceOpt = False,
    backend: BackendOpt = "local", ray_address: RayAddressOpt = None, workers: WorkersOpt = 2,
    threads_per_worker: ThreadsOpt = 1, shard_size: ShardSizeOpt = 8, resume: ResumeOpt = False,
) -> None:
    """Attribution: direct logit attribution, integrated gradients, attention rollout / flow,
    attention x gradient, attribution patching."""
    from circuitlab.tasks.task import prompt_task

    with user_errors():
        if method not in ATTRIBUTION_METHODS:
            raise CircuitlabError(f"unknown attribution method {method!r}; choose one of {', '.join(ATTRIBUTION_METHODS)}")
        if (task is None) == (prompt is None) or (prompt is not None and answer is None):
            raise CircuitlabError("pass either --task, or --prompt with --answer (and optionally --wrong, --corrupt)")
        source: Any = task if task is not None else prompt_task(prompt or "", answer or "", wrong, corrupt)
    options: dict[str, dict[str, Any]] = {
        "ig": {"steps": steps, "rule": rule, "baseline": baseline, "hook": hook},
        "rollout": {"index": index, "bos": bos}, "flow": {"index": index, "bos": bos},
        "atp": {"sites": tuple(x.strip() for x in sites.split(",") if x.strip()), "direction": direction},
    }
    execute(f"attribute/{method}", out=out, model=model, task=source, n=n if task else None, seed=seed,
            metric=metric, force=force, executor=_executor(backend, ray_address, workers, threads_per_worker, shard_size, resume), **options.get(method, {}))


@app.command(epilog="Examples: circuitlab trace --prompt 'The Eiffel Tower is located in the city of' "
             "--subject 'Eiffel Tower' --target ' Paris'\n\ncircuitlab trace --task facts --n 8 --kind resid")
def trace(
    model: ModelOpt = DEFAULT_SPEC,
    prompt: Annotated[str | None, typer.Option("--prompt", help="Prompt, e.g. 'The Eiffel Tower is located in the city of'")] = None,
    subject: Annotated[str | None, typer.Option("--subject", help="Subject string as written in the prompt (noised)")] = None,
    target: Annotated[str | None, typer.Option("--target", help="Target token, e.g. ' Paris'")] = None,
    task: Annotated[str | None, typer.Option("--task", "-t", help="Average over a task with subjects (facts)")] = None,
    kind: Annotated[str, typer.Option("--kind", help="resid, mlp, attn or all")] = "all",
    samples: Annotated[int, typer.Option("--samples", help="Noise samples per run")] = 10,
    noise: Annotated[str, typer.Option("--noise", help="Noise sigma: subject (ROME: 3 x std of the subject tokens' "
                                       "embeddings), vocab (3 x std over the vocabulary) or a number (sigma)")] = "subject",
    noise_scale: Annotated[float, typer.Option("--noise-scale", help="Multiplier of the std for --noise subject / vocab "
                                               "(ROME: 3)")] = 3.0,
    aggregate: Annotated[str, typer.Option("--aggregate", help="--task average: token (ROME's notebook: pool every "
                                           "token of a group) or prompt (each prompt's group mean first)")] = "token",
    window: Annotated[int, typer.Option("--window", help="Layers restored together for mlp / attn")] = 10,
    out: Path = OutOpt("out/trace"), n: NOpt = None, seed: SeedOpt = 0, force: ForceOpt = False,
    backend: BackendOpt = "local", ray_address: RayAddressOpt = None, workers: WorkersOpt = 2,
    threads_per_worker: ThreadsOpt = 1, shard_size: ShardSizeOpt = 8, resume: ResumeOpt = False,
) -> None:
    """ROME causal tracing: noise the subject's embeddings, restore clean states per (layer, token)."""
    with user_errors():
        if (task is None) == (prompt is None) or (prompt is not None and (subject is None or target is None)):
            raise CircuitlabError("pass either --prompt with --subject and --target, or --task (e.g. facts)")
    common: dict[str, Any] = {"kind": kind, "samples": samples, "noise": noise, "noise_scale": noise_scale,
                              "window": window}
    if task is not None:
        execute("trace/average", out=out, model=model, task=task, n=n, seed=seed, force=force, aggregate=aggregate,
                executor=_executor(backend, ray_address, workers, threads_per_worker, shard_size, resume), **common)
    else:
        execute("trace", out=out, model=model, seed=seed, force=force, prompt=prompt, subject=subject,
                target=target, **common)


@app.command(epilog="Example: circuitlab lens --prompt 'The Eiffel Tower is located in the city of' --target ' Paris'")
def lens(
    model: ModelOpt = DEFAULT_SPEC,
    prompt: Annotated[str, typer.Option("--prompt", help="Prompt to read layer by layer")] = "The Eiffel Tower is located in the city of",
    target: Annotated[str | None, typer.Option("--target", help="Token to follow through depth, e.g. ' Paris'")] = None,
    top_k: Annotated[int, typer.Option("--top-k", help="Top tokens kept per layer and position")] = 10,
    out: Path = OutOpt("out/lens"), force: ForceOpt = False,
) -> None:
    """Logit lens: final norm + unembedding of every layer's residual stream."""
    execute("lens", out=out, model=model, force=force, prompt=prompt, target=target, top_k=top_k)


@app.command("path-patch", epilog="Example: circuitlab path-patch --task ioi --receivers 'a9.h*<q>' --n 4")
def path_patch_cmd(
    model: ModelOpt = DEFAULT_SPEC, task: TaskOpt = "ioi",
    receivers: Annotated[str, typer.Option("--receivers", "-r", help="Receiver pattern(s), comma-separated: 'a9.h*<q>' (queries of layer-9 heads), 'a9.h1' (its q,k,v), 'm5', 'logits'")] = "logits",
    method: Annotated[str, typer.Option("--method", help="auto (fast paths, self-checked, equal to the masked run "
                                        "up to float32 rounding) or masked (one masked-edge forward per sender: "
                                        "the reference)")] = "auto",
    max_batch: Annotated[int, typer.Option("--max-batch", help="Rows (senders x prompts) per batched step of the "
                                           "fast paths (memory budget)")] = 256,
    out: Path = OutOpt("out/path-patch"), n: NOpt = 8, seed: SeedOpt = 0, metric: MetricOpt = None,
    force: ForceOpt = False,
    backend: BackendOpt = "local", ray_address: RayAddressOpt = None, workers: WorkersOpt = 2,
    threads_per_worker: ThreadsOpt = 1, shard_size: ShardSizeOpt = 8, resume: ResumeOpt = False,
) -> None:
    """Path patching: every head as sender into --receivers (direct edges, corrupt -> clean), layer x head heatmap."""
    execute("path-patch", out=out, model=model, task=task, n=n, seed=seed, metric=metric, force=force,
            receivers=receivers, method=method, max_batch=max_batch, executor=_executor(backend, ray_address, workers, threads_per_worker, shard_size, resume))


@app.command(epilog="Example: circuitlab patch --task ioi --site z --by layer,head --n 8 --out out/z")
def patch(
    model: ModelOpt = DEFAULT_SPEC, task: TaskOpt = "ioi",
    site: Annotated[str, typer.Option("--site", help="resid_pre, resid_mid, resid_post, attn_out, mlp_out, z, q, k, v, pattern")] = "resid_pre",
    by: Annotated[str, typer.Option("--by", help="layer,pos | layer | layer,head | layer,head,pos")] = "layer,pos",
    direction: Annotated[str, typer.Option("--direction", help="denoise (clean into corrupt) or noise (corrupt into clean)")] = "denoise",
    max_batch: Annotated[int, typer.Option("--max-batch", help="Patched rows per forward pass (memory budget)")] = 256,
    per_prompt: Annotated[bool, typer.Option("--per-prompt", help="One record per cell and prompt")] = False,
    out: Path = OutOpt("out/patch"), n: NOpt = 8, seed: SeedOpt = 0, metric: MetricOpt = None,
    force: ForceOpt = False,
    backend: BackendOpt = "local", ray_address: RayAddressOpt = None, workers: WorkersOpt = 2,
    threads_per_worker: ThreadsOpt = 1, shard_size: ShardSizeOpt = 8, resume: ResumeOpt = False,
) -> None:
    """Activation patching sweep: normalised effect per cell (0 = corrupt, 1 = clean) and heatmaps."""
    execute("patch", out=out, model=model, task=task, n=n, seed=seed, metric=metric, force=force, site=site,
            by=by, direction=direction, max_batch=max_batch, per_prompt=per_prompt,
            executor=_executor(backend, ray_address, workers, threads_per_worker, shard_size, resume))


# CLI spelling of each option discover passes on; only options given on the command line are passed, so each
# method keeps its own defaults and an option a method does not take is a clear error (AnalysisError).
_DISCOVER_FLAGS = {"score_metric": "--metric", "positions": "--positions", "ablation": "--ablation",
                   "top_n": "--top-n", "threshold": "--threshold", "target_faithfulness": "--target-faithfulness",
                   "greedy": "--greedy", "steps": "--steps", "tau": "--tau", "level": "--level",
                   "target_edges": "--target-edges", "seed_nodes": "--seed-nodes", "max_edges": "--max-edges"}


@app.command(epilog="Examples: circuitlab discover --method eap --task ioi --n 8 --top-n 200 --out out/discover\n\n"
             "circuitlab discover --method eap-ig --steps 5 --metric kl --target-faithfulness 0.8\n\n"
             "circuitlab discover --method acdc --tau 0.02 --metric kl --task induction --n 8")
def discover(
    method: Annotated[str, typer.Option("--method", help="eap (first order), eap-ig (integrated gradients on the "
                                        "input embeddings), eap-ig-act (integrated gradients on each layer's output in turn; "
                                        "about 2 x layers x steps backwards), exact (one masked run per edge; small models), acdc "
                                        "(greedy edge removal), prune (learned edge masks), grad (parameter-"
                                        "gradient importance), heads (per-head patching map) or grow "
                                        "(expand-and-prune from seed nodes)")] = "eap-ig",
    model: ModelOpt = DEFAULT_SPEC, task: TaskOpt = "ioi",
    metric: Annotated[str | None, typer.Option("--metric", help="Score by: the task metric (default; kl for acdc "
                                               "and prune), kl (KL(full || circuit)), l2 (squared output distance), "
                                               "or logit_diff, logprob, prob")] = None,
    positions: Annotated[str | None, typer.Option("--positions", help="last (answer position; default) or all "
                                                  "(mean over positions; kl, l2)")] = None,
    ablation: Annotated[str | None, typer.Option("--ablation", help="What an ablated edge carries: corrupt "
                                                 "(default), mean, zero or resample")] = None,
    top_n: Annotated[int | None, typer.Option("--top-n", help="Keep the N edges with the largest |score|")] = None,
    threshold: Annotated[float | None, typer.Option("--threshold", help="Keep edges with |score| >= X")] = None,
    target: Annotated[float | None, typer.Option("--target-faithfulness", help="Smallest circuit with normalised "
                                                 "faithfulness >= F, F in (0, 1] (default 0.8 when no selection is given)")] = None,
    greedy: Annotated[bool, typer.Option("--greedy", help="Grow the circuit from the logits backwards (no dangling edges)")] = False,
    steps: Annotated[int | None, typer.Option("--steps", help="eap-ig, eap-ig-act: interpolation points (default 5); prune: "
                                              "training steps")] = None,
    tau: Annotated[float | None, typer.Option("--tau", help="acdc: remove an edge when the metric moves by less "
                                              "than tau")] = None,
    level: Annotated[str | None, typer.Option("--level", help="acdc: edge (q, k, v inputs apart) or head (a "
                                              "head's three inputs as one receiver)")] = None,
    target_edges: Annotated[int | None, typer.Option("--target-edges", help="prune: edges the learned mask keeps")] = None,
    seed_nodes: Annotated[str | None, typer.Option("--seed-nodes", help="grow: comma-separated nodes to start from, "
                                                   "e.g. a5.h3,m7 (default: the logits)")] = None,
    max_edges: Annotated[int | None, typer.Option("--max-edges", help="grow: stop at this many edges")] = None,
    out: Path = OutOpt("out/discover"), n: NOpt = 8, seed: SeedOpt = 0, force: ForceOpt = False,
    backend: BackendOpt = "local", ray_address: RayAddressOpt = None, workers: WorkersOpt = 2,
    threads_per_worker: ThreadsOpt = 1, shard_size: ShardSizeOpt = 8, resume: ResumeOpt = False,
) -> None:
    """Circuit discovery: score edges (EAP, EAP-IG, exact effects), remove them greedily (ACDC), learn an edge
    mask (prune), rank parameters (grad) or heads (heads), or grow a circuit from seed nodes (grow); write
    circuit.json (EAP-IG / MIB layout), its picture and its faithfulness."""
    given = {"score_metric": metric, "positions": positions, "ablation": ablation, "top_n": top_n,
             "threshold": threshold, "target_faithfulness": target, "greedy": greedy or None, "steps": steps,
             "tau": tau, "level": level, "target_edges": target_edges, "max_edges": max_edges,
             "seed_nodes": tuple(s.strip() for s in seed_nodes.split(",") if s.strip()) if seed_nodes else None}
    # only the options given: the rest keep the method's defaults (values are the method's own option types)
    options: dict[str, Any] = {name: value for name, value in given.items() if value is not None}
    with user_errors():
        from circuitlab.runner.registry import get_analysis

        methods = _registered("discover/")
        if method not in methods:
            raise CircuitlabError(f"unknown discovery method {method!r}; choose one of {', '.join(methods)}")

        accepted = get_analysis(f"discover/{method}").option_names()
        foreign = [_DISCOVER_FLAGS[name] for name in options if name not in accepted]
        if foreign:
            raise CircuitlabError(f"{', '.join(foreign)} does not apply to --method {method}")
    execute(f"discover/{method}", out=out, model=model, task=task, n=n, seed=seed, force=force,
            executor=_executor(backend, ray_address, workers, threads_per_worker, shard_size, resume), **options)


@app.command("report", epilog="Examples: circuitlab report out/demo\n\ncircuitlab report runs/ --out runs.html")
def report(
    folder: Annotated[Path, typer.Argument(help="A run directory or a folder holding runs (searched recursively)")],
    out: Annotated[Path | None, typer.Option("--out", help="The HTML file to write (default: FOLDER/"
                                             "circuitlab-report.html)")] = None,
    force: ForceOpt = False,
) -> None:
    """Every run under FOLDER in one self-contained HTML file: heatmaps with values on hover, circuits as
    zoomable graphs, records and parameters; plots embedded, no network needed to view it."""
    from circuitlab.report.collection import write_collection

    with user_errors():
        path, shown, broken = write_collection(folder, out, force=force)
    if broken:
        errors.print(f"[bold yellow]warning:[/] {broken} folder(s) with an unreadable results.json are listed "
                     "at the top of the report, not shown", markup=True, highlight=False)
    console.print(f"wrote {path} ({shown} run{'s' if shown != 1 else ''})")


@app.command("grid", epilog="Example: circuitlab grid spec.toml --out out/grid (spec: models, tasks, methods, "
             "seeds lists; [methods.NAME] tables of options)")
def grid_cmd(
    spec: Annotated[Path, typer.Argument(help="Grid spec (.toml, or .yaml with PyYAML): models, tasks, methods, "
                                         "seeds, n, metric")],
    out: Path = OutOpt("out/grid"), force: ForceOpt = False,
    backend: BackendOpt = "local", ray_address: RayAddressOpt = None, workers: WorkersOpt = 2,
    threads_per_worker: ThreadsOpt = 1, shard_size: ShardSizeOpt = 8,
    resume: Annotated[bool, typer.Option("--resume", help="Keep the cells that already hold a finished run "
                                         "(and resume an interrupted cell's prompt shards)")] = False,
) -> None:
    """One command over a product of tasks, models, methods and seeds: a run folder per cell under --out,
    index.json and index.html over them; the whole spec is checked before anything runs."""
    from circuitlab.runner.grid import run_grid

    executor = _executor(backend, ray_address, workers, threads_per_worker, shard_size, resume)
    with user_errors():
        index = run_grid(spec, out, force=force, resume=resume, executor=executor,
                         on_cell=lambda cell, _: console.print(f"done {cell.folder}"))
    console.print(f"wrote {out} (open {index})")


def _noise_levels(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise CircuitlabError(f"--noise takes comma-separated numbers, e.g. 0,0.1,0.2; got {text!r}") from None


def _print_verdict(done: Any) -> None:
    """The verdict table (measure, value, 95% CI) in 80 columns, then the least needed components."""
    from rich.table import Table

    from circuitlab.report.terminal import records_table

    table = Table(title=f"verify: {done.result.summary['circuit_edges']} edges, {done.result.summary['n_prompts']} "
                  "prompts", title_justify="left", width=80)
    table.add_column("measure", no_wrap=True, overflow="ellipsis", ratio=3)
    table.add_column("value", justify="right", no_wrap=True, ratio=1)
    table.add_column("95% CI", justify="right", no_wrap=True, ratio=2)
    for row in done.output.verdict():
        table.add_row(row["measure"], row["value"] or "", row["95% CI"])
    console.print(table)
    records = sorted(done.result.records, key=lambda r: abs(r["drop"]))
    minimal = records_table(records, "components with the smallest drop (removed alone)", limit=5, width=80)
    if minimal is not None:
        console.print(minimal)


@app.command(epilog="Examples: circuitlab verify --task ioi --n 16 --circuit out/discover/circuit.json --split test "
             "--out out/verify\n\ncircuitlab verify --task ioi --circuit a.json --compare b.json --ablation mean")
def verify(
    circuit: Annotated[Path, typer.Option("--circuit", "-c", help="Circuit JSON (EAP-IG / MIB layout), e.g. "
                                          "out/discover/circuit.json")],
    model: ModelOpt = DEFAULT_SPEC, task: TaskOpt = "ioi",
    ablation: Annotated[str, typer.Option("--ablation", help="What an ablated edge carries: corrupt, mean, zero "
                                          "or resample")] = "corrupt",
    metric: Annotated[str | None, typer.Option("--metric", help="Faithfulness metric: the task's (default), kl, "
                                               "l2, logit_diff, logprob or prob")] = None,
    split: Annotated[str | None, typer.Option("--split", help="Evaluate on a split: train / test (first / second "
                                              "half of the prompts) or template:I[,J] (IOI, QA); the other part "
                                              "is reported too")] = None,
    compare: Annotated[Path | None, typer.Option("--compare", help="Another circuit JSON: Jaccard overlap and "
                                                 "each one's faithfulness inside the other")] = None,
    tolerance: Annotated[float, typer.Option("--tolerance", help="allclose: max |logit difference| between "
                                             "circuit and model")] = 0.1,
    epsilon: Annotated[float, typer.Option("--epsilon", help="Non-minimal: removing the component changes "
                                           "faithfulness by less than this")] = 0.01,
    noise: Annotated[str, typer.Option("--noise", help="Embedding-noise strengths (relative to the embedding "
                                       "norm), comma-separated")] = "0,0.05,0.1,0.2,0.5",
    n_bootstrap: Annotated[int, typer.Option("--n-bootstrap", help="Bootstrap resamples per 95% CI")] = 1000,
    subsets: Annotated[int, typer.Option("--subsets", help="Completeness: random node subsets tried")] = 8,
    greedy_steps: Annotated[int, typer.Option("--greedy-steps", help="Completeness: greedy search steps")] = 2,
    per_edge: Annotated[bool, typer.Option("--per-edge", help="Minimality per edge too (one run per edge)")] = False,
    out: Path = OutOpt("out/verify"), n: NOpt = 8, seed: SeedOpt = 0, force: ForceOpt = False,
    backend: BackendOpt = "local", ray_address: RayAddressOpt = None, workers: WorkersOpt = 2,
    threads_per_worker: ThreadsOpt = 1, shard_size: ShardSizeOpt = 8, resume: ResumeOpt = False,
) -> None:
    """Circuit verification: faithfulness and KL (every ablation), behaviour consistency, completeness,
    minimality, perturbation, generalisation to a held-out split, comparison; bootstrap 95% CIs."""
    with user_errors():
        levels = _noise_levels(noise)
    execute("verify", out=out, model=model, task=task, n=n, seed=seed, force=force, print_result=_print_verdict,
            circuit=str(circuit), ablation=ablation, score_metric=metric, split=split,
            compare=str(compare) if compare is not None else None, tolerance=tolerance, epsilon=epsilon,
            noise=levels, n_bootstrap=n_bootstrap, subsets=subsets, greedy_steps=greedy_steps, per_edge=per_edge,
            executor=_executor(backend, ray_address, workers, threads_per_worker, shard_size, resume))


def _print_heads(done: Any) -> None:
    """The summary, then per detector the top heads with their scores (80 columns)."""
    from circuitlab.report.terminal import records_table, summary_table

    result = done.result
    console.print(summary_table({k: v for k, v in result.summary.items() if k != "top"}, "heads: summary"))
    top = int(result.params.get("top", 5))
    for kind in ("prev_token", "duplicate_token", "induction", "bos"):
        rows = sorted(result.records, key=lambda r: -r[kind])
        partner = [] if kind == "bos" else ["k_partner", "k_composition"]
        table = records_table(rows, f"top {top} heads by {kind}", limit=top, columns=["head", kind, *partner],
                              width=min(console.width, 80))
        if table is not None:
            console.print(table)


@app.command(epilog="Examples: circuitlab heads --out out/heads\n\n"
             "circuitlab heads --model smollm2-135m --task ioi --n 8 --n-repeat-tokens 20 --out out/heads")
def heads(
    model: ModelOpt = DEFAULT_SPEC,
    task: Annotated[str | None, typer.Option("--task", "-t", help="Optional task: attention to BOS is measured on "
                                             "its clean prompts (default: on the repeated random tokens)")] = None,
    n_repeat_tokens: Annotated[int, typer.Option("--n-repeat-tokens", help="Random tokens per copy: each sequence "
                                                 "is BOS + x + x")] = 20,
    n_sequences: Annotated[int, typer.Option("--n-sequences", help="Repeated random sequences averaged over")] = 4,
    top: Annotated[int, typer.Option("--top", help="Heads listed per detector")] = 5,
    out: Path = OutOpt("out/heads"), n: NOpt = 8, seed: SeedOpt = 0, force: ForceOpt = False,
) -> None:
    """Head analysis: previous-token, duplicate-token and induction scores, attention to BOS, and Q/K/V
    composition between heads (heatmaps, composition.csv)."""
    execute("heads", out=out, model=model, task=task, n=n if task else None, seed=seed, force=force,
            print_result=_print_heads, n_repeat_tokens=n_repeat_tokens, n_sequences=n_sequences, top=top)


def _registered(prefix: str) -> list[str]:
    """The registered analyses under `prefix` ("discover/", "study/"), without it (no analysis is imported)."""
    from circuitlab.runner.registry import analysis_names

    return [name.removeprefix(prefix) for name in analysis_names() if name.startswith(prefix)]


@app.command(epilog="Examples: circuitlab study induction --n 8 --out out/induction\n\n"
             "circuitlab study ioi --n 16 --out out/ioi")
def study(
    name: Annotated[str, typer.Argument(help="induction (induction heads and their previous-token partners), ioi "
                                        "(the IOI circuit and its head roles) or qa (document QA heads)")],
    model: ModelOpt = DEFAULT_SPEC,
    task: Annotated[str | None, typer.Option("--task", "-t", help="The task (default: the study's own: induction, "
                                             "ioi or qa)")] = None,
    out: Path = OutOpt("out/study"), n: NOpt = 8, seed: SeedOpt = 0, force: ForceOpt = False,
) -> None:
    """Case studies: find a circuit, verify it and state the findings with numbers (findings.md)."""
    with user_errors():
        studies = _registered("study/")
        if name not in studies:
            raise CircuitlabError(f"unknown study {name!r}; choose one of {', '.join(studies)}")
    # each study's default task is the task of its name (induction, ioi, qa)
    execute(f"study/{name}", out=out, model=model, task=task or name, n=n, seed=seed, force=force)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
