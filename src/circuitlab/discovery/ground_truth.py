"""Circuits whose truth is known: the yardstick for the discovery methods (EAP, EAP-IG, exact effects).

Two attention-only 2-layer models run induction on repeated random tokens (Olsson et al. 2022): a
*previous-token head* in layer 0 writes each position's previous token into the residual stream, and an
*induction head* in layer 1 finds, by K-composition with it, the position after the earlier occurrence of
the current token and copies that token to the logits.

- ``handset-induction``: every weight set by hand (`handset_model`), so every edge's truth is known. The
  residual stream has four blocks of one-hot coordinates, TOK (token id), POS (position), PREV (previous
  token) and OUT (predicted token). Head a0.h1 attends from position i to i - 1 by its POS-only query and
  key and copies TOK into PREV; head a1.h2 matches its query (TOK of the current token) with its key (PREV)
  and copies TOK into OUT; the unembedding reads OUT only. All other heads have zero weights.
- ``trained-induction``: trained in the repository on repeated random tokens by
  ``python -m circuitlab.discovery.ground_truth_train`` (seeded, a few seconds on one CPU thread); the
  weights ship in ``discovery/data/trained_induction``. Its truth comes from a documented procedure,
  `derive_true_edges`: previous-token heads by their attention to the previous position, induction heads
  by their attention to the induction source, and the edges that carry the mechanism between them.

The true edge set of a mechanism (`mechanism_edges`): the previous-token head's value input (the token it
moves), the previous-token head into the induction head's key (K-composition), the induction head's query
and value inputs (the current token, the token it copies) and the induction head into the logits. The
previous-token head's query and key inputs carry positions only; positions are the same in the clean and
the corrupt prompt (and in the mean and resampled inputs), so ablating those edges changes nothing unless
the ablation is ``zero``: they belong to the truth under zero ablation only (`true_circuit`).

Every edge outside the hand-set circuit has an effect of exactly 0 (its sender writes, or its receiver
reads, nothing the circuit uses); every edge inside it changes the metric. See docs/METHODS.md,
"Ground-truth circuits".
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float

from circuitlab.errors import DiscoveryError
from circuitlab.graph.circuit import Circuit
from circuitlab.graph.graph import Graph
from circuitlab.graph.naming import edge_name, head_name, receiver_name
from circuitlab.heads.detectors import attention_patterns, induction_scores, previous_token_scores
from circuitlab.models.model import Model
from circuitlab.tasks.task import Example, Task

if TYPE_CHECKING:
    from transformer_lens.model_bridge.sources.native.model import NativeModel

HANDSET = "handset-induction"
TRAINED = "trained-induction"
GROUND_TRUTHS = (HANDSET, TRAINED)
DATA = Path(__file__).resolve().parent / "data"
TRUTH_FILE = "true_circuit.json"
ZERO_TRUTH_FILE = "true_circuit_zero.json"  # the hand-set truth under zero ablation
DIRS = {HANDSET: DATA / "handset_induction", TRAINED: DATA / "trained_induction"}

BOS = 0  # token 0 starts every prompt and never occurs in the random part
SEQ_LEN = 8  # tokens per copy in the ground-truth tasks: BOS + x + x is 17 tokens

# --- the hand-set model ------------------------------------------------------------------------------------
HANDSET_VOCAB = 32
HANDSET_CTX = 20
HANDSET_HEADS = 3
HANDSET_D_HEAD = 32  # >= vocab (the OV circuits copy one-hot tokens) and >= context (the QK circuit shifts positions)
PREV_HEAD = (0, 1)  # (layer, head) of the previous-token head
INDUCTION_HEAD = (1, 2)
# Attention logit of the matching key (others score 0): with at most 19 competitors the match gets
# e^8 / (e^8 + 19) = 99.4% of the attention. Logit scale: the target's logit is 6 x that weight, so its
# probability is about e^6 / (e^6 + 31) = 0.93 (the model is right but not saturated, so gradients live).
ATTN_LOGIT = 8.0
LOGIT_SCALE = 6.0

# A head has a role when most of its attention goes to the role's target position. The trained model's
# scores split into >= 0.85 (one previous-token head, four induction heads) and <= 0.49 (layer-0 heads
# that share their attention between the current and the previous token), so any threshold in between
# names the same heads; 0.7 sits in the middle of that gap.
ROLE_THRESHOLD = 0.7
POSITION_ONLY_ABLATIONS = ("corrupt", "mean", "resample")  # ablations that keep the positional embedding


@dataclass(frozen=True)
class Layout:
    """The hand-set residual stream: four blocks of one-hot coordinates."""

    vocab: int
    ctx: int

    @property
    def tok(self) -> int:
        return 0

    @property
    def pos(self) -> int:
        return self.vocab

    @property
    def prev(self) -> int:
        return self.vocab + self.ctx

    @property
    def out(self) -> int:
        return 2 * self.vocab + self.ctx

    @property
    def d_model(self) -> int:
        return 3 * self.vocab + self.ctx


def handset_config() -> dict:
    """The native config of the hand-set model (attention-only, no norms, learned absolute positions)."""
    layout = Layout(HANDSET_VOCAB, HANDSET_CTX)
    return dict(
        n_layers=2, d_model=layout.d_model, n_heads=HANDSET_HEADS, d_head=HANDSET_D_HEAD, d_vocab=HANDSET_VOCAB,
        n_ctx=HANDSET_CTX, attn_only=True, normalization_type=None, positional_embedding_type="standard",
        act_fn="gelu", seed=0,
    )


def handset_model() -> Model:
    """The hand-set induction model (built in code in milliseconds: no file to drift from this definition)."""
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge.sources.native.model import NativeModel

    config = handset_config()
    plain = NativeModel(TransformerBridgeConfig.from_dict(config))
    with torch.no_grad():
        for parameter in plain.parameters():
            parameter.zero_()
        _set_handset_weights(plain, Layout(HANDSET_VOCAB, HANDSET_CTX))
    return bridge_from_plain(plain, config, name=HANDSET)


def _set_handset_weights(plain: NativeModel, lay: Layout) -> None:
    d_head, scale = HANDSET_D_HEAD, math.sqrt(HANDSET_D_HEAD)  # the model divides scores by sqrt(d_head)
    tokens, positions = torch.arange(lay.vocab), torch.arange(lay.ctx)
    assert plain.pos is not None  # learned absolute positions (handset_config)
    plain.tok_embed.weight[tokens, lay.tok + tokens] = 1.0
    plain.pos.weight[positions, lay.pos + positions] = 1.0
    plain.head.weight[tokens, lay.out + tokens] = LOGIT_SCALE  # the unembedding reads OUT only

    layer, head = PREV_HEAD
    attn, rows = plain.layers[layer].attn, slice(head * d_head, (head + 1) * d_head)
    q, k, v, o = (attn.q.weight[rows], attn.k.weight[rows], attn.v.weight[rows], attn.o.weight[:, rows])
    q[positions, lay.pos + positions] = ATTN_LOGIT * scale  # query at i: direction i
    k[positions[1:], lay.pos + positions[:-1]] = 1.0  # key at j: direction j + 1, so i meets i - 1
    v[tokens, lay.tok + tokens] = 1.0  # value: the token here ...
    o[lay.prev + tokens, tokens] = 1.0  # ... written into PREV

    layer, head = INDUCTION_HEAD
    attn, rows = plain.layers[layer].attn, slice(head * d_head, (head + 1) * d_head)
    q, k, v, o = (attn.q.weight[rows], attn.k.weight[rows], attn.v.weight[rows], attn.o.weight[:, rows])
    q[tokens, lay.tok + tokens] = ATTN_LOGIT * scale  # query: the current token
    k[tokens, lay.prev + tokens] = 1.0  # key: the previous token (K-composition with PREV_HEAD)
    v[tokens, lay.tok + tokens] = 1.0  # value: the token at the attended position ...
    o[lay.out + tokens, tokens] = 1.0  # ... written into OUT


def bridge_from_plain(plain: NativeModel, config: dict, *, name: str) -> Model:
    """A circuitlab Model (TransformerBridge) holding the weights of a plain TransformerLens `NativeModel`.

    The bridge wraps each module of the native model, so its internal state-dict keys are the plain keys
    with `._original_component` inserted; aliases of one tensor all receive it.
    """
    from circuitlab.models.loading import load_native

    model = load_native(config, name=name)
    plain_state = plain.state_dict()
    target = model.bridge.original_model
    state = {}
    for key in target.state_dict():
        plain_key = key.replace("._original_component", "")
        if plain_key in plain_state:
            state[key] = plain_state[plain_key]
    placed = {key.replace("._original_component", "") for key in state}
    if placed != set(plain_state):
        raise DiscoveryError(f"native weights without a place in the bridge: {sorted(set(plain_state) - placed)[:3]}")
    target.load_state_dict(state, strict=False)
    model.bridge.eval()
    return model


# --- the task ----------------------------------------------------------------------------------------------

def repeated_tokens_task(d_vocab: int, *, n: int = 32, seed: int = 0, seq_len: int = SEQ_LEN,
                         name: str = "repeated-tokens") -> Task:
    """Induction on random token ids: clean BOS + x + x, corrupt BOS + y + z (nothing repeats).

    x, y and z are seq_len tokens each, all 3 * seq_len distinct and never BOS, so the corrupt prompt shares
    no token with the clean one: every token-carrying edge sees a different value there. The metric is
    `induction_logprob`, the mean log-prob of each second-copy token's successor in the first copy (the
    `induction` task's targets; the last position's answer is the first token of the copy).
    """
    import circuitlab.tasks.induction  # noqa: F401  (registers the induction_logprob metric)

    if 3 * seq_len > d_vocab - 1:
        raise DiscoveryError(f"seq_len {seq_len} needs {3 * seq_len} distinct tokens, the vocabulary has {d_vocab - 1}")
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        tokens = rng.sample(range(1, d_vocab), 3 * seq_len)
        first, fresh = tokens[:seq_len], tokens[seq_len:]
        clean, corrupt = [BOS, *first, *first], [BOS, *fresh]
        targets = [-1] * (1 + seq_len) + first[1:] + first[:1]
        examples.append(Example(
            clean=_text(clean), corrupt=_text(corrupt), answer=[_text(first[:1])],
            clean_ids=clean, corrupt_ids=corrupt, answer_ids=[first[0]], targets=targets,
        ))
    return Task(name=name, examples=examples, metric="induction_logprob",
                description="repeated random token ids; mean log-prob of the induction targets (corrupt: no repeat)",
                params={"n": n, "seed": seed, "seq_len": seq_len, "d_vocab": d_vocab})


def _text(ids: list[int]) -> str:
    return " ".join(f"<{i}>" for i in ids)  # the Model.str_tokens spelling for models without a tokenizer


# --- the truth -----------------------------------------------------------------------------------------

def mechanism_edges(prev_heads: list[tuple[int, int]], induction_heads: list[tuple[int, int]], *,
                    positional: bool = False) -> list[str]:
    """The edges of a previous-token -> induction-head circuit; with `positional`, also the previous-token
    heads' query and key inputs (positions only: visible to zero ablation only)."""
    edges = []
    for layer, head in prev_heads:
        prev = head_name(layer, head)
        inputs = ("q", "k", "v") if positional else ("v",)
        edges += [edge_name("input", receiver_name(prev, qkv)) for qkv in inputs]
    for layer, head in induction_heads:
        induction = head_name(layer, head)
        edges += [edge_name(head_name(*p), receiver_name(induction, "k")) for p in prev_heads if p[0] < layer]
        edges += [edge_name("input", receiver_name(induction, qkv)) for qkv in ("q", "v")]
        edges.append(edge_name(induction, "logits"))
    return edges


def true_circuit(name: str, model: Model, *, ablation: str = "corrupt") -> Circuit:
    """The shipped true circuit of ground truth `name` for `ablation` (see the module docstring)."""
    return Circuit.load(DIRS[name] / truth_file(name, ablation), model=model)


def truth_file(name: str, ablation: str) -> str:
    """The file name of the truth of `name` under `ablation`; a DiscoveryError where none is defined."""
    check_name(name)
    if ablation == "zero" and name == HANDSET:
        return ZERO_TRUTH_FILE
    if ablation not in POSITION_ONLY_ABLATIONS:
        raise DiscoveryError(
            f"ground truth {name!r} defines its circuit for ablations that keep positions "
            f"({', '.join(POSITION_ONLY_ABLATIONS)})" + (" and zero" if name == HANDSET else "") + f", not {ablation!r}"
        )
    return TRUTH_FILE


def load_ground_truth(name: str, *, n: int = 32, seed: int = 0, ablation: str = "corrupt") -> tuple[Model, Task, Circuit]:
    """(model, task, true circuit) of ground truth `name` (one of GROUND_TRUTHS)."""
    truth_file(name, ablation)  # a bad name or ablation fails before the model loads
    if name == HANDSET:
        model = handset_model()
    else:
        from circuitlab.models.loading import load_model

        model = load_model(DIRS[TRAINED])
        model.spec = TRAINED
    task = repeated_tokens_task(model.d_vocab, n=n, seed=seed, name=name)
    return model, task, true_circuit(name, model, ablation=ablation)


def check_name(name: str) -> str:
    if name not in GROUND_TRUTHS:
        raise DiscoveryError(f"unknown ground truth {name!r}; choose one of {', '.join(GROUND_TRUTHS)}")
    return name


# --- head roles (the procedure behind the trained model's truth) ----------------------------------------

def head_roles(model: Model, task: Task, *, threshold: float = ROLE_THRESHOLD) -> dict[str, list[tuple[int, int]]]:
    """Previous-token heads (layers before the last) and induction heads (layers after the first) whose
    score (`previous_token_scores`, `induction_scores`) on the task's clean prompts reaches `threshold`."""
    seq_len = int(task.params["seq_len"])
    tokens = torch.tensor([ex.clean_ids for ex in task.examples])
    patterns = attention_patterns(model, tokens)
    prev, induction = previous_token_scores(patterns), induction_scores(patterns, seq_len)
    return {
        "previous_token": [(layer, h) for layer in range(model.n_layers - 1) for h in range(model.n_heads)
                           if float(prev[layer, h]) >= threshold],
        "induction": [(layer, h) for layer in range(1, model.n_layers) for h in range(model.n_heads)
                      if float(induction[layer, h]) >= threshold],
    }


def derive_true_edges(model: Model, task: Task, *, threshold: float = ROLE_THRESHOLD) -> list[str]:
    """The trained model's true edge set: `mechanism_edges` of the heads `head_roles` finds."""
    roles = head_roles(model, task, threshold=threshold)
    if not roles["previous_token"] or not roles["induction"]:
        raise DiscoveryError(f"no induction mechanism found (heads at threshold {threshold}: {roles}); is the model trained?")
    return mechanism_edges(roles["previous_token"], roles["induction"])


def write_truth(model: Model, edges: list[str], path: str | Path) -> Path:
    """Write a true edge set as a circuit JSON (MIB layout)."""
    return Circuit.from_edges(Graph.from_model(model), edges).save(path)


# --- scoring a method against the truth -----------------------------------------------------------------

def roc_auc(scores: Float[torch.Tensor, " edge"], truth: torch.Tensor) -> float:
    """Area under the ROC curve of ranking edges by |score| against the true set (Mann-Whitney U).

    The probability that a random true edge ranks above a random other edge, ties counting one half:
    1.0 = every true edge above every other, 0.5 = chance.
    """
    key = scores.detach().abs().double()
    truth = truth.bool()
    positive, negative = key[truth], key[~truth]
    if positive.numel() == 0 or negative.numel() == 0:
        raise DiscoveryError("ROC AUC needs at least one true and one other edge")
    above = (positive[:, None] > negative[None, :]).double().sum()
    ties = (positive[:, None] == negative[None, :]).double().sum()
    return float((above + 0.5 * ties) / (positive.numel() * negative.numel()))
