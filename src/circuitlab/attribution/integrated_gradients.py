"""Integrated gradients (Sundararajan et al. 2017; docs/METHODS.md, "Integrated gradients") on input
embeddings or on any hook activation.

IG_i = (x_i - x'_i) * integral_0^1 d f(x' + a (x - x')) / d x_i da, where x is the activation at a hook
(the ``embed`` site for the input embeddings: token ids are never interpolated) and x' a baseline activation.
The path is evaluated in batches of interpolation steps; the hook replaces the activation with the
interpolated one, so everything downstream is the bridge's own forward. Completeness:
sum_i IG_i = f(x) - f(x'), up to the quadrature error reported as `completeness_gap`.

Position 0 (BOS): by default it is not interpolated (the baseline keeps the prompt's BOS activation), so
its attribution is exactly 0 and a baseline never removes the attention sink. `interpolate_bos=True`
interpolates it like every other position. (With the zero baseline and BOS interpolated, every position
starts at 0; RMSNorm is scale-invariant, so f jumps at alpha = 0 and no quadrature rule converges there.)
Even with BOS kept, the zero baseline is badly conditioned on RMSNorm models: RMSNorm(alpha e) is flat in
alpha except within ~sqrt(eps) / rms(e) of 0, so f(path) jumps near alpha = 0. On SmolLM2 IOI (2 prompts,
64 Gauss-Legendre steps) the zero baseline misses completeness by ~130 %, the corrupt baseline by 4e-6 %.
Hence the default baseline is the corrupt prompt.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from jaxtyping import Float

from circuitlab.attribution.forward import MetricFn, capture_activation, check_hook, metric_with_hooks
from circuitlab.attribution.quadrature import quadrature
from circuitlab.errors import AttributionError, TokenizationError
from circuitlab.models.hooks import hook_name
from circuitlab.models.model import Model
from circuitlab.progress import progress_bar
from circuitlab.tasks.task import TaskBatch

EMBED_HOOK = hook_name("embed")
BASELINES = ("zero", "pad", "bos", "corrupt")
# Activations of one interpolation chunk are kept below roughly this many bytes.
CHUNK_BYTES = 1024 * 2**20


@dataclass
class IntegratedGradients:
    """IG of one batch at one hook.

    attributions: [batch, pos] (summed over the activation's feature dims), full: [batch, pos, ...].
    f_input, f_baseline: [batch] the metric with the hook at x and at the baseline x'.
    """

    hook: str
    attributions: Float[torch.Tensor, "batch pos"]
    full: torch.Tensor
    f_input: Float[torch.Tensor, " batch"]
    f_baseline: Float[torch.Tensor, " batch"]
    rule: str
    steps: int
    baseline: str

    @property
    def completeness_gap(self) -> Float[torch.Tensor, " batch"]:
        """|sum_i IG_i - (f(x) - f(x'))| per prompt."""
        return (self.attributions.sum(-1) - (self.f_input - self.f_baseline)).abs()

    @property
    def relative_gap(self) -> Float[torch.Tensor, " batch"]:
        return self.completeness_gap / (self.f_input - self.f_baseline).abs().clamp(min=1e-12)

    def summary(self) -> dict:
        return {
            "hook": self.hook, "rule": self.rule, "steps": self.steps, "baseline": self.baseline,
            "f_input_mean": float(self.f_input.mean()), "f_baseline_mean": float(self.f_baseline.mean()),
            "max_completeness_gap": float(self.completeness_gap.max()),
            "max_relative_gap": float(self.relative_gap.max()),
        }

    def records(self, str_tokens: list[list[str]] | None = None) -> list[dict]:
        rows = []
        for b in range(self.attributions.shape[0]):
            for p in range(self.attributions.shape[1]):
                token = str_tokens[b][p] if str_tokens else ""
                rows.append({"prompt": b, "pos": p, "token": token, "value": float(self.attributions[b, p])})
        return rows


def baseline_activation(
    model: Model, batch: TaskBatch, hook: str, baseline: str | torch.Tensor, x: torch.Tensor, *, interpolate_bos: bool = False
) -> torch.Tensor:
    """The baseline x' at `hook`: 'zero'; 'pad' / 'bos' (every position that token); 'corrupt' (the corrupt
    prompts); a [batch, pos] tensor of token ids; or an activation tensor shaped like x."""
    if isinstance(baseline, torch.Tensor):
        if baseline.dtype in (torch.long, torch.int32, torch.int64):
            base = capture_activation(model, _check_ids(baseline, batch.clean), hook)
        else:
            if baseline.shape != x.shape:
                raise AttributionError(
                    f"baseline activation has shape {tuple(baseline.shape)} but the prompts' activation at "
                    f"{hook!r} has shape {tuple(x.shape)}; pass one baseline of the same shape (same batch and length)"
                )
            base = baseline.detach().to(x.dtype)
    elif baseline == "zero":
        base = torch.zeros_like(x)
    elif baseline in ("pad", "bos"):
        token = model.tokenizer.pad_token_id if baseline == "pad" and model.tokenizer is not None else model.bos_token_id
        if token is None:
            raise TokenizationError(f"{model.spec} has no {baseline} token; use baseline 'zero' or 'corrupt'")
        base = capture_activation(model, torch.full_like(batch.clean, token), hook)
    elif baseline == "corrupt":
        base = capture_activation(model, _check_ids(batch.corrupt, batch.clean), hook)
    else:
        raise AttributionError(f"unknown baseline {baseline!r}; choose one of {', '.join(BASELINES)} or pass a tensor")
    bos = model.bos_token_id
    if not interpolate_bos and bos is not None and bool((batch.clean[:, 0] == bos).all()):
        base = base.clone()
        base[:, 0] = x[:, 0]  # BOS stays at its own activation: causal, so position 0 depends on BOS only
    return base


def _check_ids(ids: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    if ids.shape != clean.shape:
        raise TokenizationError(
            f"baseline tokens have shape {tuple(ids.shape)} but the prompts have shape {tuple(clean.shape)}; "
            "a token baseline must have the prompts' batch size and token length"
        )
    return ids


def layer_integrated_gradients(
    model: Model, batch: TaskBatch, metric: MetricFn, *, hook: str = EMBED_HOOK,
    baseline: str | torch.Tensor = "corrupt", steps: int = 64, rule: str = "gausslegendre",
    interpolate_bos: bool = False, chunk_steps: int | None = None,
) -> IntegratedGradients:
    """IG of `metric` (per prompt) at `hook` for the clean prompts of `batch`; `EMBED_HOOK` = input embeddings."""
    alphas, weights = quadrature(rule, steps)
    x, f_input = _activation_and_metric(model, batch, metric, hook)
    base = baseline_activation(model, batch, hook, baseline, x, interpolate_bos=interpolate_bos)
    chunk = chunk_steps or _default_chunk(model, batch.clean)
    if chunk < 1:
        raise AttributionError(f"chunk_steps must be >= 1, got {chunk}")
    gradient_sum = torch.zeros_like(x)
    with progress_bar(steps, f"integrated gradients ({batch.size} prompts x {batch.n_pos} tokens)") as advance:
        for start in range(0, steps, chunk):
            a, w = alphas[start:start + chunk].to(x.dtype), weights[start:start + chunk].to(x.dtype)
            gradient_sum += _weighted_path_gradient(model, batch, metric, hook, x, base, a, w)
            advance(len(a))
    full = (x - base) * gradient_sum
    attributions = full.reshape(*full.shape[:2], -1).sum(-1)
    with torch.no_grad():
        f_baseline = metric_with_hooks(model, batch, metric, [(hook, _replace(base, hook))]).detach()
    label = baseline if isinstance(baseline, str) else "tensor"
    return IntegratedGradients(hook, attributions, full, f_input, f_baseline, rule, steps, label)


def embedding_integrated_gradients(model: Model, batch: TaskBatch, metric: MetricFn, **options) -> IntegratedGradients:
    """IG over the input token embeddings (the output of `hook_embed`)."""
    return layer_integrated_gradients(model, batch, metric, hook=EMBED_HOOK, **options)


def _default_chunk(model: Model, tokens: torch.Tensor) -> int:
    # Saved activations per sequence: ~40 d_model-sized tensors per layer (attention, MLP and their grads).
    per_step = tokens.numel() * model.n_layers * 40 * model.d_model * 4
    return max(1, CHUNK_BYTES // per_step)


def _activation_and_metric(model: Model, batch: TaskBatch, metric: MetricFn, hook: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean activation at `hook` and the clean metric, from one forward."""
    model.check_tokens(batch.clean)
    check_hook(model, hook)
    captured: dict[str, torch.Tensor] = {}

    def grab(act: torch.Tensor, **_) -> torch.Tensor:
        captured["act"] = act.detach()
        return act

    with torch.no_grad():
        values = metric_with_hooks(model, batch, metric, [(hook, grab)]).detach()
    if "act" not in captured:
        raise AttributionError(f"hook {hook!r} never fires in {model.spec} (is it switched off in the bridge?)")
    return captured["act"], values


def _replace(path: torch.Tensor, name: str) -> Callable:
    def hook(act: torch.Tensor, hook=None) -> torch.Tensor:
        if act.shape != path.shape:
            raise AttributionError(f"hook {name!r}: activation shape {tuple(act.shape)} != {tuple(path.shape)}")
        return path

    return hook


def _weighted_path_gradient(
    model: Model, batch: TaskBatch, metric: MetricFn, hook: str, x: torch.Tensor, base: torch.Tensor,
    alphas: torch.Tensor, weights: torch.Tensor,
) -> torch.Tensor:
    """sum_k weights[k] * d f / d act at act = base + alphas[k] (x - base), for all prompts at once."""
    k, n = len(alphas), x.shape[0]
    shape = (k,) + (1,) * x.dim()
    path = (base[None] + alphas.view(shape) * (x - base)[None]).reshape(k * n, *x.shape[1:])
    path.requires_grad_(True)
    repeated = batch.select(list(range(n)) * k)  # step-major: row s*n + i is prompt i at step s
    with torch.enable_grad():
        values = metric_with_hooks(model, repeated, metric, [(hook, _replace(path, hook))])
        (grad,) = torch.autograd.grad((values * weights.repeat_interleave(n)).sum(), path)
    return grad.view(k, n, *x.shape[1:]).sum(0)
