"""ROME causal tracing (Meng et al. 2022, `experiments/causal_trace.py`; docs/METHODS.md, "Causal tracing").

Corrupt: add Gaussian noise N(0, sigma^2 I) to the input embeddings of the subject tokens only. sigma is
(`noise_level`):
- "subject" (the default, ROME's `collect_embedding_std`): `scale` (3) x the standard deviation of all
  entries of the embeddings of the subjects' tokens, each subject string tokenized on its own without BOS
  or special tokens (as ROME's `make_inputs` does for GPT-2), over every subject of the run: the task's
  subjects for an average, the one subject for a single prompt;
- "vocab": `scale` x the standard deviation of the embedding vectors over the whole vocabulary (larger
  than ROME's on SmolLM2: 0.1356 vs 0.1162 on the facts set);
- a number: sigma itself (ROME's `noise=` argument).
Several seeded noise samples run as rows of one batch and probabilities are averaged over them.
Restore: put back the clean value of one hidden state (layer, position) in the corrupted run:
- "resid": the block output (resid_post of block l), as ROME restores `transformer.h.{l}`;
- "mlp" / "attn": that component's output at position p in a window of `window` layers around l:
  layers max(0, l - window//2) .. min(L, l - window//2 + window) - 1 (ROME's window, shrinking at the edges).
Indirect effect = p(target | corrupted + restored) - p(target | corrupted), for the *target* token.

Unlike ROME's reference code this scores the target token (not the most probable one), and each restore
hook is built by a factory over its own (rows, positions), so no hook is late-bound to another's values.
The average over prompts (`average_indirect_effect`) pools tokens per group as ROME's notebook does
(`aggregate="token"`), or averages each prompt's group first (`aggregate="prompt"`).

Speed: a restoration at layer l changes nothing below l, so each batch restarts at the first restored layer
from the cached corrupted residual (`LayerRestart`, which runs the bridge's own blocks and hooks) and only
the last position is unembedded. `restored_probs(..., fast=False)` runs plain full bridge forwards with the
noise hook instead; the tests check the two agree.

Figures of these results are in `circuitlab.patching.plots`; the runs behind `circuitlab trace` in
`circuitlab.patching.trace_analysis`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from jaxtyping import Float

from circuitlab.errors import CausalTraceError, TaskError, TokenizationError
from circuitlab.models.hooks import hook_name, layer_hook_names
from circuitlab.models.model import Model
from circuitlab.patching.restart import LayerRestart
from circuitlab.tasks.task import Task

Kind = Literal["resid", "mlp", "attn"]
KINDS: tuple[str, ...] = ("resid", "mlp", "attn")
# The input of block 0 on the bridge: the embed hook is an alias of `embed.hook_out`, whose value is block 0's
# resid_pre (tests/unit/patching/test_causal_trace.py checks this), so noise here reaches every block.
NOISE_HOOK = hook_name("embed")
# The site each kind restores (names in circuitlab.models.hooks).
RESTORE_SITES = {"resid": "resid_post", "mlp": "mlp_out", "attn": "attn_out"}
# ROME's six token groups for averaging over prompts of different lengths (Meng et al. 2022, Fig. 2).
TOKEN_GROUPS: tuple[str, ...] = (
    "first subject token", "middle subject tokens", "last subject token",
    "first subsequent token", "further tokens", "last token",
)
Advance = Callable[[float], None]  # a progress bar's advance(n)


# --- inputs ----------------------------------------------------------------------------------------------
def subject_token_span(model: Model, prompt: str, subject: str) -> tuple[int, int]:
    """[start, end) token positions of the first occurrence of `subject` in `prompt` (BOS policy applied).

    Every token that overlaps the subject's characters belongs to the span, so a subject that starts
    mid-token (e.g. "iffel" in " Eiffel") still gets the token holding it.
    """
    if not subject or not subject.strip():
        raise CausalTraceError("the subject is empty; pass the subject string as it appears in the prompt")
    char_start = prompt.find(subject)
    if char_start < 0:
        raise CausalTraceError(
            f"subject {subject!r} does not occur in the prompt {prompt!r}; pass the subject exactly as it is "
            "written in the prompt (same case and spacing)"
        )
    char_end = char_start + len(subject)
    offsets = _token_char_offsets(model, prompt)
    inside = [i for i, (a, b) in enumerate(offsets) if a < char_end and b > char_start and b > a]
    if not inside:
        raise CausalTraceError(f"no token of {prompt!r} covers the subject {subject!r}")
    shift = 1 if model.bos_token_id is not None else 0  # positions count the prepended BOS
    return inside[0] + shift, inside[-1] + 1 + shift


def _token_char_offsets(model: Model, prompt: str) -> list[tuple[int, int]]:
    """Character span of each prompt token (without BOS), from the fast tokenizer's offset mapping."""
    tokenizer = model._require_tokenizer()
    try:
        enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as exc:  # slow tokenizers have no offsets
        raise TokenizationError(
            f"{model.spec}'s tokenizer cannot map tokens to characters; pass subject_span=(start, end) instead"
        ) from exc
    if list(enc["input_ids"]) != model.encode(prompt, bos=False):
        raise TokenizationError(f"offsets of {prompt!r} do not match its encoding; pass subject_span explicitly")
    return [tuple(o) for o in enc["offset_mapping"]]


def embedding_std(model: Model) -> float:
    """Standard deviation of the embedding vectors' entries over the whole vocabulary ("vocab" noise).

    Taken from the embedding module's own output (not raw W_E) so that models which scale embeddings
    inside the embedding bridge get noise on the same scale as the values the noise is added to.
    """
    with torch.no_grad():
        ids = torch.arange(model.d_vocab).unsqueeze(0)
        return float(model.bridge.embed(ids).float().std())


def subject_embedding_std(model: Model, subjects: Sequence[str]) -> float:
    """ROME's `collect_embedding_std`: the standard deviation of all entries of the subjects' token
    embeddings, each subject tokenized on its own (no BOS, no special tokens), all tokens pooled.

    Duplicates count as often as they occur (ROME passes one subject per fact). The embeddings are the
    embedding module's output, as ROME traces the embedding layer's output.
    """
    ids = [token for subject in subjects for token in model.encode(subject, bos=False)]
    if not ids:
        raise CausalTraceError(f"'subject' noise needs subject tokens, but {list(subjects)!r} tokenize to none; "
                               "pass --noise vocab or a number")
    with torch.no_grad():
        return float(model.bridge.embed(torch.tensor([ids])).float().std())


NOISE_SOURCES: tuple[str, ...] = ("subject", "vocab")
ROME_NOISE_SCALE = 3.0


@dataclass(frozen=True)
class NoiseLevel:
    """The noise of a trace: sigma = scale x std (source "subject" or "vocab"), or sigma given ("absolute")."""

    source: str
    sigma: float
    std: float | None = None
    scale: float | None = None

    def summary(self) -> dict[str, Any]:
        return {"noise": self.source, "noise_std": self.std, "noise_scale": self.scale, "sigma": self.sigma}


def check_noise(noise: str | float, scale: float = ROME_NOISE_SCALE) -> str | float:
    """'subject', 'vocab' or a finite number >= 0 (a numeric string is read as a number); a
    `CausalTraceError` otherwise. `scale` multiplies the std of 'subject' / 'vocab' only."""
    if isinstance(noise, str) and noise not in NOISE_SOURCES:
        try:
            noise = float(noise)
        except ValueError:
            raise CausalTraceError(f"noise must be 'subject' (ROME's), 'vocab' or a number (sigma itself), got "
                                   f"{noise!r}") from None
    if not isinstance(noise, str):
        if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not math.isfinite(noise) or noise < 0:
            raise CausalTraceError(f"noise must be 'subject' (ROME's), 'vocab' or a finite number >= 0 (sigma "
                                   f"itself), got {noise!r}")
        noise = float(noise)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 0:
        raise CausalTraceError(f"noise scale must be a finite number >= 0 (ROME uses 3), got {scale!r}")
    if not isinstance(noise, str) and scale != ROME_NOISE_SCALE:
        raise CausalTraceError("a noise scale applies to --noise subject or vocab only; a numeric --noise is "
                               "sigma itself (multiply it yourself)")
    return noise


def noise_level(model: Model, noise: str | float, subjects: Sequence[str],
                scale: float = ROME_NOISE_SCALE) -> NoiseLevel:
    """The sigma a trace uses for `noise` ('subject', 'vocab' or a number) over `subjects`."""
    noise = check_noise(noise, scale)
    if noise == "subject":
        std = subject_embedding_std(model, subjects)
    elif noise == "vocab":
        std = embedding_std(model)
    else:
        return NoiseLevel("absolute", float(noise))
    return NoiseLevel(str(noise), scale * std, std, float(scale))


def window_layers(layer: int, window: int, n_layers: int) -> range:
    """Layers restored for an MLP/attention trace at `layer` (ROME: l - k//2 .. l - k//2 + k, clipped)."""
    if window < 1:
        raise CausalTraceError(f"window must be >= 1 layer, got {window}")
    start = layer - window // 2
    return range(max(0, start), min(n_layers, start + window))


# --- restorations --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Restoration:
    """Restore the clean value of one site at some positions.

    site "embed" is the input of block 0 (the noised embeddings); "resid" the output of block `layer`;
    "mlp"/"attn" that block's MLP/attention output.
    """

    site: Literal["embed", "resid", "mlp", "attn"]
    layer: int
    positions: tuple[int, ...]

    @property
    def hook(self) -> str:
        return NOISE_HOOK if self.site == "embed" else hook_name(RESTORE_SITES[self.site], self.layer)

    @property
    def start_layer(self) -> int:
        """First block whose input the restoration can change."""
        return 0 if self.site == "embed" else self.layer


Variant = tuple[Restoration, ...]  # restorations applied together in one corrupted run


def check_kind(kind: str) -> Kind:
    if kind not in KINDS:
        raise CausalTraceError(f"unknown trace kind {kind!r}; choose one of {', '.join(KINDS)} (or 'all' in the CLI)")
    return kind  # type: ignore[return-value]


def kind_variant(kind: str, layer: int, positions: Sequence[int], window: int, n_layers: int) -> Variant:
    """The restorations ROME applies for (kind, layer, positions): one block output, or a window of outputs."""
    kind = check_kind(kind)
    pos = tuple(positions)
    if kind == "resid":
        return (Restoration("resid", layer, pos),)
    return tuple(Restoration(kind, j, pos) for j in window_layers(layer, window, n_layers))


# --- results -------------------------------------------------------------------------------------------------
@dataclass
class TraceGrid:
    """p(target) with each (position, layer) restored. probs: [len(positions), len(layers)] (ROME's layout:
    rows = tokens, columns = layers)."""

    kind: str
    window: int
    target: str
    str_tokens: list[str]
    subject_span: tuple[int, int]
    clean_prob: float
    corrupt_prob: float
    layers: list[int]
    positions: list[int]
    probs: Float[torch.Tensor, "pos layer"]
    samples: int = 10
    sigma: float = 0.0

    @property
    def effect(self) -> Float[torch.Tensor, "pos layer"]:
        """Indirect effect of each restored state."""
        return self.probs - self.corrupt_prob

    def is_subject(self, pos: int) -> bool:
        return self.subject_span[0] <= pos < self.subject_span[1]

    def token_labels(self) -> list[str]:
        """Row labels: token text, subject tokens marked with '*' as in ROME's figures."""
        return [repr(self.str_tokens[p])[1:-1] + ("*" if self.is_subject(p) else "") for p in self.positions]

    def peak(self) -> dict[str, Any]:
        """The (layer, position) with the largest indirect effect."""
        flat = int(self.effect.argmax())
        row, col = divmod(flat, len(self.layers))
        pos = self.positions[row]
        return {"kind": self.kind, "layer": self.layers[col], "pos": pos, "token": self.str_tokens[pos],
                "effect": float(self.effect[row, col])}

    def records(self) -> list[dict[str, Any]]:
        return [
            {"kind": self.kind, "layer": layer, "pos": pos, "token": self.str_tokens[pos],
             "subject": self.is_subject(pos), "prob": float(self.probs[r, c]), "effect": float(self.effect[r, c])}
            for r, pos in enumerate(self.positions) for c, layer in enumerate(self.layers)
        ]

    def summary(self) -> dict[str, Any]:
        return {"clean_prob": self.clean_prob, "corrupt_prob": self.corrupt_prob,
                **{f"{self.kind}_peak_{k}": v for k, v in self.peak().items() if k != "kind"}}


# --- the tracer ----------------------------------------------------------------------------------------------
class CausalTracer:
    """Causal tracing of one prompt: `trace(kind)` -> TraceGrid, `trace_layer(layer, position)` -> record.

    noise: "subject" (ROME's: `noise_scale` x the std of this subject's token embeddings, the subject
    tokenized on its own), "vocab" (`noise_scale` x the std over the vocabulary) or a number (sigma itself;
    0.0 = no corruption). The sigma used is `self.sigma`, its derivation `self.noise`.
    samples: noise draws per run. batch_size: rows per forward pass (variants x samples).
    """

    def __init__(
        self, model: Model, prompt: str, subject: str, target: str, *, noise: str | float = "subject",
        noise_scale: float = ROME_NOISE_SCALE, samples: int = 10, seed: int = 0, batch_size: int = 256,
        subject_span: tuple[int, int] | None = None,
    ) -> None:
        if samples < 1:
            raise CausalTraceError(f"samples must be >= 1, got {samples}")
        check_noise(noise, noise_scale)
        self.model, self.bridge = model, model.bridge
        self.prompt, self.subject, self.target = prompt, subject, target
        self.target_id = model.single_token_id(target)
        self.tokens = model.to_tokens(prompt)
        model.check_tokens(self.tokens)
        self.n_pos = int(self.tokens.shape[1])
        self.str_tokens = model.str_tokens(self.tokens[0])
        span = subject_token_span(model, prompt, subject) if subject_span is None else subject_span
        start, end = int(span[0]), int(span[1])
        self.subject_span: tuple[int, int] = (start, end)
        if not 0 <= start < end <= self.n_pos:
            raise CausalTraceError(f"subject span {self.subject_span} is outside the prompt's {self.n_pos} tokens")
        self.samples, self.seed = samples, seed
        self.batch_size = max(batch_size, samples)
        self.noise: NoiseLevel = noise_level(model, noise, [subject], noise_scale)
        self.sigma = self.noise.sigma
        generator = torch.Generator().manual_seed(seed)
        self.noise_values: Float[torch.Tensor, "sample subj d_model"] = self.sigma * torch.randn(
            samples, end - start, model.d_model, generator=generator)
        self._run_clean_and_corrupt()

    # --- setup runs ------------------------------------------------------------------------------------------
    def _run_clean_and_corrupt(self) -> None:
        L = self.model.n_layers
        names = {NOISE_HOOK, *(name for site in RESTORE_SITES.values() for name in layer_hook_names(site, L))}
        self.restart = LayerRestart(self.model)
        with torch.no_grad():
            # One clean row: the restart records block inputs (mask, rotary) at batch size 1 and broadcasts them.
            with self.restart.capture():
                logits, cache = self.bridge.run_with_cache(self.tokens, names_filter=lambda n: n in names)
            self.clean: dict[str, torch.Tensor] = {n: cache[n][0] for n in names}
            self.clean_prob = float(torch.softmax(logits[0, -1].float(), -1)[self.target_id])
            rows = self.tokens.expand(self.samples, -1)
            resid_pre = layer_hook_names("resid_pre", L)
            with self.bridge.hooks(fwd_hooks=[(NOISE_HOOK, self._noise_hook(self.samples))]):
                logits, cache = self.bridge.run_with_cache(rows, names_filter=lambda n: n in resid_pre)
            self.corrupt_resid_pre = [cache[n] for n in resid_pre]  # each [samples, pos, d_model]
            self.corrupt_prob = float(self._target_prob(logits[:, -1]).mean())

    def _noise_hook(self, rows: int) -> Callable[[torch.Tensor, Any], torch.Tensor]:
        """Adds sample s's noise to the subject embeddings of rows s, s + samples, s + 2*samples, ..."""
        start, end = self.subject_span
        noise = self.noise_values.repeat(rows // self.samples, 1, 1)

        def hook(embed: torch.Tensor, hook: Any) -> torch.Tensor:
            embed = embed.clone()
            embed[:, start:end] += noise.to(embed.dtype)
            return embed

        return hook

    def _target_prob(self, last_logits: Float[torch.Tensor, "rows vocab"]) -> torch.Tensor:
        """p(target) per row: [rows]."""
        return torch.softmax(last_logits.float(), -1)[:, self.target_id]

    # --- restored runs ---------------------------------------------------------------------------------------
    def restored_probs(
        self, variants: Sequence[Variant], *, fast: bool = True, advance: Advance | None = None,
    ) -> torch.Tensor:
        """[variant] p(target) at the last position, averaged over noise samples, for each variant of restorations.

        An empty variant is the corrupted run itself. `advance(k)` is called after each batch of k variants.
        """
        for v in variants:
            for r in v:
                self._check_restoration(r)
        out = torch.empty(len(variants))
        per_batch = max(1, self.batch_size // self.samples)
        by_start: dict[int, list[int]] = {}
        for i, v in enumerate(variants):
            by_start.setdefault(min((r.start_layer for r in v), default=0) if fast else 0, []).append(i)
        with torch.no_grad():
            for start, indices in sorted(by_start.items()):
                for chunk in range(0, len(indices), per_batch):
                    idx = indices[chunk:chunk + per_batch]
                    probs = self._run_variants([variants[i] for i in idx], start, fast)
                    out[idx] = probs.view(len(idx), self.samples).mean(1)
                    if advance is not None:
                        advance(len(idx))
        return out

    def _check_restoration(self, r: Restoration) -> None:
        if r.site not in ("embed", *KINDS):
            raise CausalTraceError(f"unknown restoration site {r.site!r}; use embed, {', '.join(KINDS)}")
        if r.site != "embed" and not 0 <= r.layer < self.model.n_layers:
            raise CausalTraceError(f"layer {r.layer} out of range [0, {self.model.n_layers})")
        bad = [p for p in r.positions if not 0 <= p < self.n_pos]
        if bad:
            raise CausalTraceError(f"positions {bad} out of range [0, {self.n_pos}) for {self.str_tokens}")

    def _run_variants(self, variants: list[Variant], start: int, fast: bool) -> torch.Tensor:
        """[variants * samples] p(target) per row."""
        rows = len(variants) * self.samples
        # Row v * samples + s = variant v under noise sample s.
        where: dict[str, tuple[list[int], list[int]]] = {}
        for v, variant in enumerate(variants):
            for r in variant:
                row_idx, pos_idx = where.setdefault(r.hook, ([], []))
                for s in range(self.samples):
                    for p in r.positions:
                        row_idx.append(v * self.samples + s)
                        pos_idx.append(p)
        hooks = [(name, _restore_hook(self.clean[name], rows_, pos_)) for name, (rows_, pos_) in where.items()]
        last = torch.full((rows,), self.n_pos - 1)
        if fast:
            resid = self.corrupt_resid_pre[start].repeat(len(variants), 1, 1)
            embed = [(name, fn) for name, fn in hooks if name == NOISE_HOOK]
            if embed:  # the embedding is block 0's input: restore it in the tensor we start from
                resid = embed[0][1](resid, None)
            hooks = [(name, fn) for name, fn in hooks if name != NOISE_HOOK]
            with self.bridge.hooks(fwd_hooks=hooks):
                logits = self.restart.run(start, resid, answer_pos=last)
            return self._target_prob(logits[:, 0])
        # Reference path: full forward; the noise hook is added first so an embed restore overrides it.
        with self.bridge.hooks(fwd_hooks=[(NOISE_HOOK, self._noise_hook(rows)), *hooks]):
            logits = self.bridge(self.tokens.expand(rows, -1), return_type="logits")
        return self._target_prob(logits[:, -1])

    # --- one restoration, or a grid of them ------------------------------------------------------------------
    def trace_layer(
        self, layer_idx: int, position: int | None = -1, *, kind: str = "resid", window: int = 10,
    ) -> dict[str, Any]:
        """Restore `kind` at (layer_idx, position); position None = every position, negative = from the end."""
        check_kind(kind)
        positions = list(range(self.n_pos)) if position is None else [self._position(position)]
        variant = kind_variant(kind, layer_idx, positions, window, self.model.n_layers)
        patched = float(self.restored_probs([variant])[0])
        return {"kind": kind, "layer": layer_idx, "pos": "all" if position is None else positions[0],
                "clean_prob": self.clean_prob, "corrupt_prob": self.corrupt_prob, "patched_prob": patched,
                "effect": patched - self.corrupt_prob}

    def _position(self, position: int) -> int:
        pos = position + self.n_pos if position < 0 else position
        if not 0 <= pos < self.n_pos:
            raise CausalTraceError(f"position {position} out of range for a {self.n_pos}-token prompt")
        return pos

    def trace(
        self, kind: str = "resid", window: int = 10, *, layers: Sequence[int] | None = None,
        positions: Sequence[int] | None = None, advance: Advance | None = None,
    ) -> TraceGrid:
        """Restore each (position, layer) in turn (all of them by default); one batched sweep.
        `advance(k)` reports k more (position, layer) cells done."""
        kind = check_kind(kind)
        L = self.model.n_layers
        layers = list(range(L)) if layers is None else list(layers)
        positions = list(range(self.n_pos)) if positions is None else [self._position(p) for p in positions]
        variants = [kind_variant(kind, layer, [p], window, L) for p in positions for layer in layers]
        probs = self.restored_probs(variants, advance=advance).view(len(positions), len(layers))
        return TraceGrid(kind, window, self.target, self.str_tokens, self.subject_span, self.clean_prob,
                         self.corrupt_prob, layers, positions, probs, self.samples, self.sigma)


def _restore_hook(
    clean: Float[torch.Tensor, "pos d_model"], rows: list[int], positions: list[int],
) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    """A hook writing the clean values at (rows[i], positions[i]); bound to its own indices (no late binding)."""
    row_idx, pos_idx = torch.tensor(rows, dtype=torch.long), torch.tensor(positions, dtype=torch.long)
    values = clean[pos_idx]

    def hook(activation: torch.Tensor, hook: Any) -> torch.Tensor:
        activation = activation.clone()
        activation[row_idx, pos_idx] = values.to(activation.dtype)
        return activation

    return hook


# --- averages over prompts ---------------------------------------------------------------------------------------
@dataclass
class Fact:
    """One causal-tracing prompt: the subject appears in the prompt; the target is one token."""

    prompt: str
    subject: str
    target: str


def token_groups(pos: int, span: tuple[int, int], n_pos: int) -> list[str]:
    """ROME's token groups of position `pos` (a single-token subject is both first and last subject token)."""
    start, end = span
    groups = []
    if pos == start:
        groups.append("first subject token")
    if start < pos < end - 1:
        groups.append("middle subject tokens")
    if pos == end - 1:
        groups.append("last subject token")
    if pos == end:
        groups.append("first subsequent token")
    if end < pos < n_pos - 1:
        groups.append("further tokens")
    if pos == n_pos - 1:
        groups.append("last token")
    return groups


AGGREGATES: tuple[str, ...] = ("token", "prompt")


def check_aggregate(aggregate: str) -> str:
    if aggregate not in AGGREGATES:
        raise CausalTraceError(f"unknown aggregate {aggregate!r}; choose 'token' (ROME's notebook: every token of "
                               "a group counts once) or 'prompt' (each prompt's group mean counts once)")
    return aggregate


@dataclass
class AverageTrace:
    """Average indirect effect (AIE) by ROME token group: effect [group, layer].

    aggregate "token": the mean over every (prompt, token) of the group, tokens pooled as in ROME's notebook;
    "prompt": each prompt's mean over its tokens of the group, then the mean over prompts. `counts` are the
    tokens (or prompts) behind each group.
    """

    kind: str
    window: int
    layers: list[int]
    effect: Float[torch.Tensor, "group layer"]
    counts: list[int]
    clean_probs: list[float] = field(default_factory=list)
    corrupt_probs: list[float] = field(default_factory=list)
    aggregate: str = "token"
    noise: NoiseLevel | None = None

    def records(self) -> list[dict[str, Any]]:
        return [{"kind": self.kind, "group": g, "layer": layer, "aie": float(self.effect[i, j]), "n": self.counts[i]}
                for i, g in enumerate(TOKEN_GROUPS) for j, layer in enumerate(self.layers)]

    def summary(self) -> dict[str, Any]:
        flat = int(self.effect.nan_to_num(float("-inf")).argmax())
        gi, li = divmod(flat, len(self.layers))
        n = max(len(self.clean_probs), 1)
        return {"n_prompts": len(self.clean_probs), "mean_clean_prob": sum(self.clean_probs) / n,
                "mean_corrupt_prob": sum(self.corrupt_probs) / n, "aggregate": self.aggregate,
                **(self.noise.summary() if self.noise is not None else {}),
                f"{self.kind}_aie_peak_group": TOKEN_GROUPS[gi],
                f"{self.kind}_aie_peak_layer": self.layers[li], f"{self.kind}_aie_peak": float(self.effect[gi, li])}


def average_indirect_effect(
    model: Model, facts: Sequence[Fact], kinds: Sequence[str] = KINDS, *, window: int = 10,
    noise: str | float = "subject", noise_scale: float = ROME_NOISE_SCALE, aggregate: str = "token",
    samples: int = 10, seed: int = 0, batch_size: int = 256, advance: Advance | None = None,
) -> dict[str, AverageTrace]:
    """AIE per kind over `facts` by ROME's token groups (`aggregate`: "token" pools every token of a group
    over all prompts, as ROME's notebook; "prompt" averages each prompt's group first).

    One sigma for every prompt: "subject" noise is `noise_scale` x the std over all the facts' subjects
    (ROME's `collect_embedding_std` over its fact set). Prompt i draws its noise with seed `seed + i`.
    `advance(1)` is called after each (prompt, kind) trace.
    """
    if not facts:
        raise TaskError("average_indirect_effect needs at least one fact prompt")
    kinds = [check_kind(k) for k in kinds]
    check_aggregate(aggregate)
    level = noise_level(model, noise, [f.subject for f in facts], noise_scale)
    L = model.n_layers
    sums = {k: torch.zeros(len(TOKEN_GROUPS), L) for k in kinds}
    counts = [0] * len(TOKEN_GROUPS)
    clean, corrupt = [], []
    for i, fact in enumerate(facts):
        tracer = CausalTracer(model, fact.prompt, fact.subject, fact.target, noise=level.sigma, samples=samples,
                              seed=seed + i, batch_size=batch_size)
        clean.append(tracer.clean_prob)
        corrupt.append(tracer.corrupt_prob)
        # Positions before the subject see identical inputs in both runs; no group uses them.
        positions = list(range(tracer.subject_span[0], tracer.n_pos))
        rows_of = [[r for r, p in enumerate(positions) if g in token_groups(p, tracer.subject_span, tracer.n_pos)]
                   for g in TOKEN_GROUPS]
        for gi, rows in enumerate(rows_of):
            counts[gi] += len(rows) if aggregate == "token" else int(bool(rows))
        for kind in kinds:
            grid = tracer.trace(kind, window, positions=positions)
            if advance is not None:
                advance(1)
            for gi, rows in enumerate(rows_of):
                if rows:
                    effect = grid.effect[rows]
                    sums[kind][gi] += effect.sum(0) if aggregate == "token" else effect.mean(0)
    denom = torch.tensor(counts, dtype=torch.float32).unsqueeze(1)  # 0 for a group no prompt has: NaN row
    return {k: AverageTrace(k, window, list(range(L)), sums[k] / denom, counts, clean, corrupt, aggregate, level)
            for k in kinds}


def facts_from_task(task: Task) -> list[Fact]:
    """Fact prompts from a Task whose examples carry meta['subject'] (the `facts` task)."""
    facts = []
    for i, ex in enumerate(task.examples):
        subject = ex.subject
        if not subject:
            raise TaskError(
                f"example {i} of task {task.name!r} has no meta['subject']; causal tracing needs the subject "
                "string of each prompt in Example.meta['subject'] (the built-in 'facts' task provides it)"
            )
        facts.append(Fact(ex.clean, subject, ex.answer[0]))
    return facts
