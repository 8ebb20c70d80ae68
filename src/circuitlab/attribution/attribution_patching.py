"""Attribution patching (Nanda 2023; docs/METHODS.md, "Attribution patching"): the first-order Taylor
approximation of activation patching, in either of its directions (the names of `circuitlab.patching`):

- "denoise" (Nanda's notebook): putting the clean activation a_s(x) into the corrupt run x' changes the
  metric by about (a_s(x) - a_s(x')) . dm/da_s, the gradient taken on the corrupt run;
- "noise": putting the corrupt activation a_s(x') into the clean run x changes it by about
  (a_s(x') - a_s(x)) . dm/da_s, the gradient taken on the clean run (EAP's convention).

m is the metric averaged over the prompts. The estimate of the patched metric (the receiving run's metric
plus the change) is normalised like activation patching, (m - m(x')) / (m(x) - m(x')): 0 = corrupt
behaviour, 1 = clean behaviour, so each direction estimates the `value` of `circuitlab patch --direction`
with the same name. Cost: one forward of the donor run, one forward and one backward of the receiving run,
for every site, layer, position and head at once.

`attribution_patching_sums` returns the first-order changes and metrics as sums over the batch's prompts,
which add over batches of one token length (prompt shards, docs/METHODS.md "Distributed runs");
`AtPSums.finish` turns sums into the normalised effects, and `attribution_patching` is the two in a row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from jaxtyping import Float

from circuitlab.attribution.forward import MetricFn, metric_with_hooks
from circuitlab.errors import AttributionError
from circuitlab.models.hooks import PATCHABLE_SITES, SITES, hook_name, layer_hook_names
from circuitlab.models.model import Model
from circuitlab.tasks.metrics import normalised
from circuitlab.tasks.task import TaskBatch

# Per-head sites come from the one site table: q/z are indexed by query head, k/v by key/value head under
# GQA (as in circuitlab.patching); pattern is [batch, head, dest, src], reported per destination position
# (summed over sources). The rest are [batch, pos, d_model].
HEAD_SITES = tuple(name for name in PATCHABLE_SITES if SITES[name].has_heads)
DEFAULT_SITES = ("resid_pre", "attn_out", "mlp_out", "z")
DIRECTIONS = ("denoise", "noise")


def check_direction(direction: str) -> str:
    if direction not in DIRECTIONS:
        raise AttributionError(f"unknown direction {direction!r}; use 'denoise' (clean into corrupt, gradient at the "
                               "corrupt run) or 'noise' (corrupt into clean, gradient at the clean run)")
    return direction


@dataclass
class AttributionPatching:
    """effects[site]: normalised effects, [layer, pos] ([layer, pos, head] for the per-head sites);
    clean_metric / corrupt_metric: dataset means of the metric."""

    effects: dict[str, torch.Tensor]
    clean_metric: float
    corrupt_metric: float
    direction: str = "denoise"

    @property
    def baseline(self) -> float:
        """The normalised value of patching nothing: 0 when denoising, 1 when noising."""
        return 0.0 if self.direction == "denoise" else 1.0

    def head_all_positions(self) -> Float[torch.Tensor, "layer head"]:
        """Each head patched at every position at once (first order: the changes over positions add)."""
        if "z" not in self.effects:
            raise AttributionError("head effects need the 'z' site; include it in sites")
        return self.baseline + (self.effects["z"] - self.baseline).sum(1)

    def records(self) -> list[dict]:
        rows = []
        for site, values in self.effects.items():
            for index in torch.cartesian_prod(*(torch.arange(n) for n in values.shape)).tolist():
                row = {"site": site, "layer": index[0], "pos": index[1], "head": index[2] if site in HEAD_SITES else -1}
                rows.append({**row, "value": float(values[tuple(index)])})
        return rows


@dataclass
class AtPSums:
    """Attribution patching of some prompts as sums over them, which add over batches of one token length.

    changes[site]: the first-order change of the receiving run's metric, summed over the prompts, [layer,
    pos] ([layer, pos, head] for the per-head sites); clean, corrupt: the metric summed over the prompts;
    n: the number of prompts."""

    changes: dict[str, torch.Tensor]
    clean: float
    corrupt: float
    n: int
    direction: str = "denoise"

    def __add__(self, other: AtPSums) -> AtPSums:
        if other.direction != self.direction or list(other.changes) != list(self.changes):
            raise AttributionError("cannot add attribution-patching sums of different directions or sites")
        changes = {site: values + other.changes[site] for site, values in self.changes.items()}
        return AtPSums(changes, self.clean + other.clean, self.corrupt + other.corrupt, self.n + other.n,
                       self.direction)

    def finish(self) -> AttributionPatching:
        """The normalised effects: (receiving + change - corrupt) / (clean - corrupt), all means over prompts."""
        clean, corrupt = self.clean / self.n, self.corrupt / self.n
        effects = {}
        for site, change in self.changes.items():
            # the means in the changes' dtype: a float64 model must not normalise by float32 metrics
            clean_t, corrupt_t = (torch.tensor(v, dtype=change.dtype) for v in (clean, corrupt))
            receiving = corrupt_t if self.direction == "denoise" else clean_t
            effects[site] = normalised(change / self.n + receiving, clean_t, corrupt_t)
        return AttributionPatching(effects, clean, corrupt, self.direction)


def check_sites(sites: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """`sites` as a tuple; an `AttributionError` naming the choices for an unknown or repeated site, or none."""
    sites = tuple(sites)
    if not sites:
        raise AttributionError(f"attribution patching needs at least one site; choose from {', '.join(PATCHABLE_SITES)}")
    for site in sites:
        if site not in PATCHABLE_SITES:
            raise AttributionError(f"unknown attribution-patching site {site!r}; choose from {', '.join(PATCHABLE_SITES)}")
    repeated = sorted({site for site in sites if sites.count(site) > 1})
    if repeated:
        raise AttributionError(f"attribution-patching site(s) {', '.join(repeated)} given more than once; name each once")
    return sites


def site_hooks(model: Model, sites: tuple[str, ...] | list[str]) -> dict[str, list[str]]:
    """Hook names per site, with a clear error for unknown sites or sites the model lacks."""
    out = {}
    for site in check_sites(sites):
        if model.attn_only and SITES[site].needs_mlp:
            raise AttributionError(f"site {site!r} does not exist in an attention-only model; choose another site")
        out[site] = layer_hook_names(site, model.n_layers)
    return out


def attribution_patching(
    model: Model, batch: TaskBatch, metric: MetricFn, *, sites: tuple[str, ...] | list[str] = DEFAULT_SITES,
    direction: str = "denoise",
) -> AttributionPatching:
    """Normalised first-order effects of every site, layer, position (and head) of `batch`, in `direction`
    ("denoise": clean into the corrupt run; "noise": corrupt into the clean run)."""
    return attribution_patching_sums(model, batch, metric, sites=sites, direction=direction).finish()


def attribution_patching_sums(
    model: Model, batch: TaskBatch, metric: MetricFn, *, sites: tuple[str, ...] | list[str] = DEFAULT_SITES,
    direction: str = "denoise",
) -> AtPSums:
    """`attribution_patching` before normalising: the first-order changes of the receiving run's metric and
    the clean and corrupt metrics, each summed over the prompts of `batch` (they add over batches)."""
    check_direction(direction)
    hooks = site_hooks(model, sites)
    names = {name for group in hooks.values() for name in group}
    model.check_tokens(batch.clean)
    model.check_tokens(batch.corrupt)
    if batch.clean.shape != batch.corrupt.shape:
        raise AttributionError("attribution patching needs clean and corrupt prompts of the same token length; "
                               "pick corruptions that tokenize to the clean prompt's length")
    # The donor run gives the patched-in values; the receiving run the gradient (metrics always score the
    # clean prompts' answers, so `replace(batch, clean=...)` only changes the tokens run).
    donor_tokens, receiving_tokens = (batch.clean, batch.corrupt) if direction == "denoise" else (batch.corrupt, batch.clean)
    with torch.no_grad():
        donor_logits, donor_cache = model.bridge.run_with_cache(donor_tokens, names_filter=lambda n: n in names)
        donor_metric = metric(donor_logits, batch).mean()
    receiving_acts: dict[str, torch.Tensor] = {}

    def differentiable(act: torch.Tensor, hook=None) -> torch.Tensor:
        return act.detach().requires_grad_(True)  # the graph starts at the embeddings

    def keep(name: str) -> Callable:
        def hook(act: torch.Tensor, hook=None) -> torch.Tensor:
            receiving_acts[name] = act  # keyed by our name: the bridge reports aliases (hook_z) by their target
            return act

        return hook

    with torch.enable_grad():
        run_hooks = [(hook_name("embed"), differentiable)] + [(name, keep(name)) for name in names]
        receiving_metric = metric_with_hooks(model, replace(batch, clean=receiving_tokens), metric, run_hooks).mean()
        ordered = sorted(names)
        grads = dict(zip(ordered, torch.autograd.grad(receiving_metric, [receiving_acts[n] for n in ordered],
                                                      allow_unused=True), strict=True))
    receiving, n = receiving_metric.detach(), batch.size
    clean_metric, corrupt_metric = (donor_metric, receiving) if direction == "denoise" else (receiving, donor_metric)
    changes = {}
    for site, group in hooks.items():
        per_layer = []
        for name in group:
            delta = donor_cache[name] - receiving_acts[name].detach()
            grad = grads[name] if grads[name] is not None else torch.zeros_like(delta)
            raw = (delta * grad).sum(0)  # [pos, d], [pos, head, d_head] or (pattern) [head, dest, src]
            per_layer.append(raw.sum(-1).transpose(0, 1) if site == "pattern" else raw.sum(-1))
        changes[site] = torch.stack(per_layer) * n  # the first-order change of the metric's mean, as a sum
    return AtPSums(changes, float(clean_metric) * n, float(corrupt_metric) * n, n, direction)
