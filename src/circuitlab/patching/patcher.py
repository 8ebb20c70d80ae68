"""`ActivationPatcher`: activation patching sweeps over a `Model` and a prepared `Task`, fast
(docs/METHODS.md, "Activation patching").

Same numbers as transformer_lens.patching (one full forward per cell), computed with less work:
1. Restart at the patched layer: a patch at layer l leaves layers < l unchanged, so each patched run starts
   at block l from the cached residual of the unpatched run (`LayerRestart`), not from the tokens.
2. Batch stacking: the patched variants of one layer (cells x prompts) run as one batch, chunked to
   `max_batch` rows; the patch is placed by one hook on the bridge hook point with a per-row mask.
3. Shared caches: the clean and corrupt runs are cached once per prompt group and reused by every cell.
4. Only the scored position is unembedded for answer-position metrics (logit_diff, logprob, prob, kl).
5. A cell whose donor activation equals the activation it would replace (e.g. BOS, or a prefix shared by the
   clean and corrupt prompts: in a causal model it is identical at every layer) cannot change the run; its
   value is the unpatched metric, computed without a forward.
6. Prefix reuse (`prefix.SuffixForward`): under causal attention a patch at position p cannot change positions
   < p, so a cell patching position p restarts at (layer l, position p): only positions p..n-1 are recomputed,
   attending to the receiving run's recorded keys and values of positions < p. Cells sharing the restart point
   (heads of one position, and every prompt) share one batched forward. Whether the model is causal is
   checked once on the model itself; a model that fails the check, or a metric that reads every position,
   takes the full restart (1.).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch

from circuitlab.errors import PatchingError, TokenizationError
from circuitlab.models.hooks import Site, hook_name, layer_hook_names
from circuitlab.models.model import Model
from circuitlab.patching.grid import Cell, cell_mask, make_cells, parse_by
from circuitlab.patching.prefix import SuffixForward, SuffixGroup, Tap, prefix_reuse
from circuitlab.patching.restart import LayerRestart
from circuitlab.patching.result import PatchingResult
from circuitlab.patching.sites import get_site, n_site_heads
from circuitlab.progress import progress_bar
from circuitlab.tasks.task import PreparedTask, TaskBatch

DIRECTIONS = {"denoise": "denoise", "denoising": "denoise", "noise": "noise", "noising": "noise"}
# Metrics that read only the logits at batch.answer_pos (see tasks/metrics.py).
ANSWER_POSITION_METRICS = {"logit_diff", "logprob", "prob", "kl"}


@dataclass
class _Runs:
    """Unpatched clean and corrupt runs of one prompt group: cached activations and per-prompt metric."""

    clean: dict[str, torch.Tensor]
    corrupt: dict[str, torch.Tensor]
    clean_metric: torch.Tensor
    corrupt_metric: torch.Tensor
    restart: LayerRestart
    suffix: SuffixForward | None = None  # prefix reuse, when the model passed the causality check


class ActivationPatcher:
    """Patch one site at a time, cell by cell, and measure the task metric.

    max_batch: rows (patched variants x prompts) per forward pass; lower it to save memory.
    restart: restart at the patched layer (fast path); False runs every patched variant from the tokens
    through the full bridge forward (still batched), which is the reference the fast path is tested against.
    prefix: with restart, reuse the unpatched prefix of a position-wise patch (causal models, metrics read at
    the answer position); False restarts every cell at its layer over all positions (the reference).
    sites: sites to cache in the first unpatched runs (others are cached on first use, which costs a rerun
    of the clean and corrupt prompts).
    """

    def __init__(
        self, model: Model, prepared: PreparedTask, *, max_batch: int = 256, restart: bool = True,
        prefix: bool = True, progress: bool = True, sites: tuple[str, ...] = (),
    ) -> None:
        if max_batch < 1:
            raise PatchingError(f"max_batch must be >= 1, got {max_batch}")
        for batch in prepared:
            _check_aligned(batch, prepared)
        self.model, self.prepared = model, prepared
        self.max_batch, self.restart, self.progress = max_batch, restart, progress
        self.prefix = prefix and restart
        self._runs: dict[int, _Runs] = {}
        self._sites = {get_site(name, model) for name in sites}

    # --- public ---------------------------------------------------------------------------------------
    def sweep(
        self, site: str = "resid_pre", by: str | tuple[str, ...] = ("layer", "pos"), direction: str = "denoise",
        *, layers: list[int] | None = None, positions: list[int] | None = None, heads: list[int] | None = None,
    ) -> PatchingResult:
        """Patch every cell of `site` at granularity `by`; `layers`/`positions`/`heads` restrict the sweep."""
        spec = get_site(site, self.model)
        axes = parse_by(by)
        mode = check_direction(direction)
        batches = self.prepared.batches
        if "pos" in axes and len(batches) > 1:
            self.prepared.single_batch()  # raises: positions must mean the same thing in every prompt
        n_heads = n_site_heads(self.model, spec)
        cells = make_cells(axes, spec, n_layers=self.model.n_layers, n_pos=batches[0].n_pos, n_heads=n_heads,
                           layers=layers, positions=positions, heads=heads)
        start = time.perf_counter()
        n = self.prepared.n_prompts
        values = torch.empty(len(cells), n)
        clean, corrupt = torch.empty(n), torch.empty(n)
        stats: dict[str, Any] = {"rows": 0, "forwards": 0, "cells_skipped": 0, "suffix_rows": 0,
                                 "prefix_reuse": self._prefix_status(axes)}
        total_rows = len(cells) * n
        with self._progress_bar(f"patching {site} by {','.join(axes)}", total_rows) as advance:
            for index, batch in enumerate(batches):
                runs = self._unpatched(index, batch, spec)
                cols = torch.tensor(batch.indices)
                clean[cols], corrupt[cols] = runs.clean_metric, runs.corrupt_metric
                values[:, cols] = self._sweep_batch(batch, runs, spec, cells, mode, n_heads, stats, advance)
        labels = self.prepared.str_tokens[batches[0].indices[0]] if "pos" in axes else []
        return PatchingResult(
            site=spec.name, by=axes, direction=mode, metric=self.prepared.metric_name, cells=cells, values=values,
            clean=clean, corrupt=corrupt, n_layers=self.model.n_layers, n_heads=n_heads, pos_labels=labels,
            timing_s=time.perf_counter() - start, stats=stats,
        )

    # --- one prompt group -----------------------------------------------------------------------------
    @torch.no_grad()
    def _sweep_batch(
        self, batch: TaskBatch, runs: _Runs, site: Site, cells: list[Cell], mode: str, n_heads: int,
        stats: dict[str, Any], advance: Callable[[float], None],
    ) -> torch.Tensor:
        receiving, donor = (runs.corrupt, runs.clean) if mode == "denoise" else (runs.clean, runs.corrupt)
        baseline = runs.corrupt_metric if mode == "denoise" else runs.clean_metric
        out = baseline.expand(len(cells), batch.size).clone()
        for layer in sorted({c.layer for c in cells}):
            hook = site.hook_name(layer)
            at_layer = [i for i, c in enumerate(cells) if c.layer == layer]
            masks = torch.stack([cell_mask(cells[i], site, n_pos=batch.n_pos, n_heads=n_heads) for i in at_layer])
            # Cells whose donor values equal the receiving values change nothing: skip their forwards.
            differs = (donor[hook] != receiving[hook]).flatten(start_dim=masks.ndim).any(-1).any(0)
            live = (masks & differs).flatten(1).any(1)
            stats["cells_skipped"] += int((~live).sum())
            advance(int((~live).sum()) * batch.size)  # skipped cells count as done (keeps the ETA honest)
            live_cells = [i for i, keep in zip(at_layer, live.tolist(), strict=True) if keep]
            live_masks = masks[live]
            # Rows: (cell, prompt) pairs, cell-major; chunked to the memory budget.
            cell_rows = torch.arange(len(live_cells)).repeat_interleave(batch.size)
            prompt_rows = torch.arange(batch.size).repeat(len(live_cells))
            starts = None
            if self._reuses_prefix(runs, batch, cells):
                # Restart each row at its patched position; rows sorted by it, so a chunk holds few restart
                # points. A prompt scored before that position cannot see the patch: it keeps the baseline.
                starts = torch.tensor([cells[i].pos for i in live_cells], dtype=torch.long)[cell_rows]
                reach = batch.answer_pos[prompt_rows] >= starts
                advance(int((~reach).sum()))
                order = torch.sort(starts[reach], stable=True).indices
                cell_rows, prompt_rows, starts = cell_rows[reach][order], prompt_rows[reach][order], starts[reach][order]
            for lo in range(0, len(cell_rows), self.max_batch):
                c_idx, p_idx = cell_rows[lo:lo + self.max_batch], prompt_rows[lo:lo + self.max_batch]
                chunk = None if starts is None else starts[lo:lo + self.max_batch]
                metric = self._patched_metric(batch, runs, receiving, donor[hook][p_idx], live_masks[c_idx],
                                              site, layer, p_idx, chunk)
                out[torch.tensor(live_cells)[c_idx], p_idx] = metric.float()
                stats["rows"] += len(p_idx)
                stats["suffix_rows"] += 0 if chunk is None else len(p_idx)
                stats["forwards"] += 1
                advance(len(p_idx))
        return out

    def _reuses_prefix(self, runs: _Runs, batch: TaskBatch, cells: list[Cell]) -> bool:
        """Position-wise cells of a causal model scored at the answer position restart at their position."""
        return runs.suffix is not None and cells[0].pos is not None and self._answer_only(batch)

    def _patched_metric(
        self, batch: TaskBatch, runs: _Runs, receiving: dict[str, torch.Tensor], donor_rows: torch.Tensor,
        mask_rows: torch.Tensor, site: Site, layer: int, p_idx: torch.Tensor, starts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Metric of each row: prompt p_idx[r] of the receiving run with mask_rows[r] of the site patched.

        starts: each row's restart position (sorted) under prefix reuse; None restarts every row at position 0.
        """
        # mask [rows, *index dims] -> broadcast over the activation's trailing feature dims
        mask = mask_rows.reshape(*mask_rows.shape, *([1] * (donor_rows.ndim - mask_rows.ndim)))
        sub = batch.select(p_idx.tolist())
        if starts is not None:
            return self._suffix_metric(sub, runs, receiving, donor_rows, mask, site, layer, p_idx, starts)

        def patch(activation: torch.Tensor, hook: Any) -> torch.Tensor:
            # In place, like transformer_lens.patching: on the bridge, hook_resid_mid is ln2's input, which is
            # the residual tensor itself, so only an in-place write patches the residual stream (the MLP input
            # and the skip connection) rather than just the MLP input.
            return activation.copy_(torch.where(mask, donor_rows, activation))

        with self.model.bridge.hooks(fwd_hooks=[(site.hook_name(layer), patch)]):
            if not self.restart:
                tokens = batch.corrupt if receiving is runs.corrupt else batch.clean
                return self.prepared.metric(self.model.bridge(tokens[p_idx], return_type="logits"), sub)
            resid = receiving[hook_name("resid_pre", layer)][p_idx]
            if self._answer_only(batch):
                logits = runs.restart.run(layer, resid, answer_pos=sub.answer_pos)
                return self.prepared.metric(logits, replace(sub, answer_pos=torch.zeros_like(sub.answer_pos)))
            return self.prepared.metric(runs.restart.run(layer, resid), sub)

    def _suffix_metric(
        self, sub: TaskBatch, runs: _Runs, receiving: dict[str, torch.Tensor], donor_rows: torch.Tensor,
        mask: torch.Tensor, site: Site, layer: int, p_idx: torch.Tensor, starts: torch.Tensor,
    ) -> torch.Tensor:
        """The patched metric of rows restarted at (layer, starts[r]): positions >= start only (prefix reuse)."""
        assert runs.suffix is not None
        pos_dim = 2 if site.layout == "pattern" else 1  # pattern [rows, head, dest, src]; else [rows, pos, ...]
        values, counts = torch.unique_consecutive(starts, return_counts=True)
        groups, answer_pos, lo = [], [], 0
        for start, count in zip(values.tolist(), counts.tolist(), strict=True):
            rows = slice(lo, lo + count)
            width = sub.n_pos - start
            groups.append(SuffixGroup(start, p_idx[rows], _tap(
                site.name, donor_rows[rows].narrow(pos_dim, start, width), mask[rows].narrow(pos_dim, start, width))))
            answer_pos.append(sub.answer_pos[rows])
            lo += count
        run = "corrupt" if receiving is runs.corrupt else "clean"
        logits = runs.suffix.run(layer, groups, receiving, run, answer_pos)
        return self.prepared.metric(logits, replace(sub, answer_pos=torch.zeros_like(sub.answer_pos)))

    def _prefix_status(self, axes: tuple[str, ...]) -> str:
        """What the summary says about prefix reuse: 'on', or 'off' and why."""
        if not self.prefix:
            return "off (disabled)"
        if "pos" not in axes:
            return "off (every position is patched: no prefix to reuse)"
        if self.prepared.metric_name not in ANSWER_POSITION_METRICS:
            return f"off (metric {self.prepared.metric_name!r} reads every position)"
        support = prefix_reuse(self.model)
        return "on" if support.ok else f"off ({support.reason})"

    def _answer_only(self, batch: TaskBatch) -> bool:
        return self.prepared.metric_name in ANSWER_POSITION_METRICS and batch.targets is None

    @torch.no_grad()
    def _unpatched(self, index: int, batch: TaskBatch, site: Site) -> _Runs:
        """Clean and corrupt runs of one prompt group, cached with every hook this and earlier sweeps need."""
        self._sites.add(site)
        names = set(layer_hook_names("resid_pre", self.model.n_layers))
        names |= {s.hook_name(layer) for s in self._sites for layer in range(self.model.n_layers)}
        runs = self._runs.get(index)
        if runs is not None and names <= runs.clean.keys():
            return runs
        restart = runs.restart if runs is not None else LayerRestart(self.model)
        suffix = runs.suffix if runs is not None else None
        if suffix is None and self.prefix and prefix_reuse(self.model).ok:
            suffix = SuffixForward(self.model, restart)
        bridge = self.model.bridge
        keep = sorted(names | (runs.clean.keys() if runs else set()))
        # Record block inputs on one row: _fit broadcasts tensors whose first dim is the recorded batch
        # size, which is only unambiguous at 1 (a batch of n_pos rows would confuse cache_position [pos]).
        with restart.capture():
            bridge(batch.clean[:1], return_type="logits")
        clean_logits, clean_cache = bridge.run_with_cache(batch.clean, names_filter=keep)
        corrupt_logits, corrupt_cache = bridge.run_with_cache(batch.corrupt, names_filter=keep)
        runs = _Runs(
            clean={k: clean_cache[k] for k in keep}, corrupt={k: corrupt_cache[k] for k in keep},
            clean_metric=self.prepared.metric(clean_logits, batch).float(),
            corrupt_metric=self.prepared.metric(corrupt_logits, batch).float(), restart=restart, suffix=suffix,
        )
        self._runs[index] = runs
        return runs

    @contextmanager
    def _progress_bar(self, label: str, total: int) -> Iterator[Callable[[float], None]]:
        """A bar with an ETA over the patched rows (`circuitlab.progress`); a no-op with progress=False."""
        if not self.progress:
            yield lambda _n: None
            return
        with progress_bar(total, label) as advance:
            yield advance


def _tap(site: str, donor: torch.Tensor, mask: torch.Tensor) -> Tap:
    """Place `donor` where `mask` is set in the activation of `site` (suffix positions only)."""

    def tap(name: str, activation: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, donor, activation) if name == site else activation

    return tap


def check_direction(direction: str) -> str:
    """'denoise' or 'noise' (also accepted: 'denoising', 'noising'); a PatchingError otherwise."""
    if direction not in DIRECTIONS:
        raise PatchingError(f"unknown direction {direction!r}; use 'denoise' (clean into corrupt) or 'noise' "
                            "(corrupt into clean)")
    return DIRECTIONS[direction]


def _check_aligned(batch: TaskBatch, prepared: PreparedTask) -> None:
    if batch.clean.shape != batch.corrupt.shape:
        i = batch.indices[0]
        raise TokenizationError(
            f"activation patching needs clean and corrupt prompts of the same token length so positions align, "
            f"but example {i} of task {prepared.task.name!r} has {batch.clean.shape[1]} clean and "
            f"{batch.corrupt.shape[1]} corrupt tokens; pick a corruption with the same tokenization"
        )
