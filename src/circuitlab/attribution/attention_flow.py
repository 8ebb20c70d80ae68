"""Attention rollout and attention flow (Abnar & Zuidema 2020).

Both treat the network as a layered graph over token positions: node (l, i) is position i after layer l
(l = 0 is the input), and the edge (l-1, j) -> (l, i) carries A~_l[i, j], where A~_l = 0.5 A_l + 0.5 I is
the head-averaged attention of layer l mixed with the residual connection, rows renormalised.
Rollout multiplies the matrices: R_l = A~_l ... A~_1 and R_l[i, j] is the share of input j in node (l, i).
Flow treats the weights as capacities: the maximum flow from input node (0, j) to node (l, i);
`normalised_flow` divides each node's flows by their sum over inputs, as the authors' `compute_flows` does.

BOS (`exclude_bos=True`): on models with an attention sink most heads put nearly all their weight on BOS,
so rollout hands BOS nearly all of every row (0.99999 at SmolLM2's last layer) and says nothing about the
other tokens. Excluding BOS drops its row and column from the head-averaged attention and renormalises
each remaining row to sum 1 (the share of attention paid to the other tokens), before the residual mix;
positions are then 1..n-1.
"""

from __future__ import annotations

import networkx as nx
import torch
from jaxtyping import Float
from networkx.algorithms.flow import boykov_kolmogorov, build_residual_network

from circuitlab.errors import AttributionError
from circuitlab.models.hooks import layer_hook_names
from circuitlab.models.model import Model
from circuitlab.progress import progress_bar


def attention_patterns(model: Model, tokens: torch.Tensor) -> Float[torch.Tensor, "batch layer head q k"]:
    """Every layer's attention pattern (the ``pattern`` site of each block) on `tokens`."""
    model.check_tokens(tokens)
    names = layer_hook_names("pattern", model.n_layers)
    wanted = set(names)
    with torch.no_grad():
        _, cache = model.bridge.run_with_cache(tokens, names_filter=lambda n: n in wanted)
    return torch.stack([cache[name] for name in names], 1)


def residual_attention(
    patterns: Float[torch.Tensor, "... layer head q k"], residual: float = 0.5, *, exclude_bos: bool = False,
) -> Float[torch.Tensor, "... layer q k"]:
    """A~_l = (1 - residual) * mean_h A_l,h + residual * I, each row renormalised to sum 1.

    exclude_bos: drop position 0 (row and column) from mean_h A_l,h and renormalise its rows to sum 1
    first; the result then covers positions 1..n-1. A row with no weight left keeps only itself.
    """
    _check_patterns(patterns)
    if not 0.0 <= residual <= 1.0:
        raise AttributionError(f"residual weight must lie in [0, 1], got {residual}")
    mean = patterns.mean(-3)
    if exclude_bos:
        if mean.shape[-1] < 2:
            raise AttributionError("excluding BOS leaves no position: the prompt is BOS alone")
        mean = mean[..., 1:, 1:]
        total = mean.sum(-1, keepdim=True)
        eye = torch.eye(mean.shape[-1], dtype=mean.dtype)
        mean = torch.where(total > 0, mean / total.clamp(min=torch.finfo(mean.dtype).tiny), eye)
    eye = torch.eye(mean.shape[-1], dtype=mean.dtype)
    mixed = (1 - residual) * mean + residual * eye
    return mixed / mixed.sum(-1, keepdim=True)


def attention_rollout(
    patterns: Float[torch.Tensor, "... layer head q k"], residual: float = 0.5, *, exclude_bos: bool = False,
) -> Float[torch.Tensor, "... layer q k"]:
    """R_l = A~_l @ ... @ A~_1 for every layer l (entry l of the layer axis is the rollout up to layer l).
    With `exclude_bos` the q and k axes are positions 1..n-1."""
    mixed = residual_attention(patterns, residual, exclude_bos=exclude_bos)
    out = []
    joint = torch.eye(mixed.shape[-1], dtype=mixed.dtype).expand_as(mixed[..., 0, :, :])
    for layer in range(mixed.shape[-3]):
        joint = mixed[..., layer, :, :] @ joint
        out.append(joint)
    return torch.stack(out, -3)


def flow_graph(mixed: Float[torch.Tensor, "layer q k"]) -> nx.DiGraph:
    """The layered graph: node (l, i) for l = 0..L; edge (l-1, j) -> (l, i) with capacity A~_l[i, j]."""
    n_layers, n_pos, _ = mixed.shape
    graph = nx.DiGraph()
    graph.add_nodes_from((layer, i) for layer in range(n_layers + 1) for i in range(n_pos))
    weights = mixed.detach().double().tolist()
    for layer in range(1, n_layers + 1):
        for i in range(n_pos):
            for j in range(n_pos):
                if weights[layer - 1][i][j] > 0:
                    graph.add_edge((layer - 1, j), (layer, i), capacity=weights[layer - 1][i][j])
    return graph


def attention_flow(
    patterns: Float[torch.Tensor, "layer head q k"], *, target: int = -1, residual: float = 0.5,
    layers: list[int] | None = None, exclude_bos: bool = False,
) -> Float[torch.Tensor, "layer src"]:
    """Max flow (raw, unnormalised) from each input token (0, j) to the target position's node after each layer.

    Row l of the result belongs to layer l (0-based, i.e. node l + 1); rows not in `layers` stay NaN.
    One prompt at a time: patterns [layer, head, q, k]; `target` counts positions of the full prompt. With
    `exclude_bos` the sources are positions 1..n-1 (column j is position j + 1). See `normalised_flow`.
    """
    if patterns.dim() != 4:
        raise AttributionError(f"attention_flow takes one prompt's patterns [layer, head, q, k], got {tuple(patterns.shape)}")
    mixed = residual_attention(patterns, residual, exclude_bos=exclude_bos)
    n_layers, n_pos = mixed.shape[0], mixed.shape[-1]
    target = target % patterns.shape[-1]
    if exclude_bos:
        if target == 0:
            raise AttributionError("the target position is BOS, which excluding BOS removes; choose another target")
        target -= 1
    chosen = list(range(n_layers)) if layers is None else list(layers)
    graph = flow_graph(mixed)
    for layer in chosen:
        if not 0 <= layer < n_layers:
            raise AttributionError(f"layer {layer} out of range 0..{n_layers - 1}")
    out = torch.full((n_layers, n_pos), float("nan"), dtype=torch.float64)
    # n_layers x n_pos max-flow problems: seconds on a 30-layer model with a few dozen tokens
    with progress_bar(len(chosen), "attention flow") as advance:
        for layer in chosen:
            # Edges only go up a layer, so flows into node (layer + 1, .) never use the layers above it.
            below = graph.subgraph(node for node in graph if node[0] <= layer + 1)
            residual_network = build_residual_network(below, "capacity")  # reused (reset) by every source
            for src in range(n_pos):
                flow = boykov_kolmogorov(below, (0, src), (layer + 1, target), residual=residual_network)
                out[layer, src] = flow.graph["flow_value"]
            advance(1)
    return out


def normalised_flow(flow: Float[torch.Tensor, "layer src"]) -> Float[torch.Tensor, "layer src"]:
    """Each row divided by its sum over sources (Abnar & Zuidema's `compute_flows`: flow_values[u] /=
    flow_values[u].sum()), so a layer's row gives each input's share of the flow into the target."""
    return flow / flow.sum(-1, keepdim=True)


def _check_patterns(patterns: torch.Tensor) -> None:
    if patterns.dim() < 4 or patterns.shape[-1] != patterns.shape[-2]:
        raise AttributionError(
            f"attention patterns must be [..., layer, head, q, k] with q == k, got {tuple(patterns.shape)}"
        )
