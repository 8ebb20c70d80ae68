"""Pictures of a circuit: a layered matplotlib drawing (PNG + SVG) and a Graphviz DOT file alongside.

Layers run bottom (input) to top (logits); heads of a layer sit side by side, its MLP half a layer above
(it reads the heads' outputs). Edge width grows with |score|; colour says which input an edge feeds:
q blue, k green, v red, MLP / logits grey. No system package is needed (Graphviz only to render the .dot).
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float

from circuitlab.atomic import save_figure_atomically, write_text_atomically
from circuitlab.graph.naming import parse_node

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from circuitlab.graph.circuit import Circuit


COLOURS = {"q": "#1f77b4", "k": "#2ca02c", "v": "#d62728", None: "#7f7f7f"}
MAX_DRAWN_EDGES = 300  # a picture of thousands of arrows shows nothing; the ones that matter most are drawn


def node_position(node: str, n_layers: int, n_heads: int) -> tuple[float, float]:
    parsed = parse_node(node)
    if parsed.kind == "input":
        return (n_heads - 1) / 2, 0.0
    if parsed.kind == "logits":
        return (n_heads - 1) / 2, float(n_layers + 1)
    if parsed.kind == "mlp":
        return float(n_heads), parsed.layer + 1.5  # type: ignore[operator]
    return float(parsed.head), parsed.layer + 1.0  # type: ignore[arg-type,operator]


def _edge_widths(circuit: Circuit, edge_ids: list[int], min_width: float, max_width: float) -> list[float]:
    if circuit.scores is None or not edge_ids:
        return [1.0] * len(edge_ids)
    values = circuit.scores[edge_ids].abs()
    top = float(values.max())
    if top == 0.0 or top != top:
        return [1.0] * len(edge_ids)
    return [min_width + (max_width - min_width) * float(v) / top for v in values]


def draw_circuit(circuit: Circuit, path_stem: str | Path, *, title: str | None = None,
                 min_width: float = 0.4, max_width: float = 4.0) -> list[Path]:
    """Write {stem}.png, {stem}.svg and {stem}.dot; returns the three paths."""
    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    fig = circuit_figure(circuit, title=title, min_width=min_width, max_width=max_width)
    png = save_figure_atomically(fig, stem.with_suffix(".png"), dpi=150)
    svg = save_figure_atomically(fig, stem.with_suffix(".svg"))
    dot = write_text_atomically(stem.with_suffix(".dot"), circuit_dot(circuit, min_width=min_width, max_width=max_width))
    return [Path(png), Path(svg), Path(dot)]


def circuit_figure(circuit: Circuit, *, title: str | None = None, min_width: float = 0.4,
                   max_width: float = 4.0) -> Figure:
    """The layered drawing as a matplotlib Figure (dpi 150), for callers that save it themselves."""
    from matplotlib.figure import Figure

    graph = circuit.graph
    L, H = graph.shape.n_layers, graph.shape.n_heads
    edge_ids = circuit.in_graph.nonzero().flatten().tolist()
    widths = _edge_widths(circuit, edge_ids, min_width, max_width)
    qkv = graph.edge_receiver_qkv
    nodes = circuit.nodes

    fig = Figure(figsize=(max(4.0, 0.6 * (H + 2)), max(4.0, 0.45 * (L + 2))), dpi=150)
    ax = fig.add_subplot()
    for e, width in zip(edge_ids, widths, strict=True):
        sender, receiver = graph.edges[e].split("->")
        x0, y0 = node_position(sender, L, H)
        x1, y1 = node_position(receiver.split("<")[0], L, H)
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0),
                    arrowprops={"arrowstyle": "-|>", "lw": width, "color": COLOURS[qkv[e]], "alpha": 0.7,
                                "shrinkA": 8, "shrinkB": 8, "mutation_scale": 6})
    for node in nodes:
        x, y = node_position(node, L, H)
        ax.text(x, y, node, ha="center", va="center", fontsize=7,
                bbox={"boxstyle": "round", "facecolor": "#fff4d6" if node.startswith("m") else "#e8eefc"})
    for label, colour in (("q", COLOURS["q"]), ("k", COLOURS["k"]), ("v", COLOURS["v"]), ("mlp / logits", COLOURS[None])):
        ax.plot([], [], color=colour, label=label)
    ax.legend(loc="upper right", fontsize=7, frameon=False)
    ax.set_xlim(-1, H + 1)
    ax.set_ylim(-0.7, L + 1.7)
    ax.set_yticks(range(L + 2), ["input", *[f"L{layer}" for layer in range(L)], "logits"], fontsize=7)
    ax.set_xticks([])
    ax.set_title(title or f"circuit: {circuit.n_edges} edges, {len(nodes)} nodes", fontsize=9)
    fig.tight_layout()
    return fig


def drawn_subset(circuit: Circuit, priority: Float[torch.Tensor, " edge"],
                 limit: int = MAX_DRAWN_EDGES) -> tuple[Circuit, str]:
    """The circuit itself when it has at most `limit` edges, else its `limit` edges of highest `priority`
    (ties in graph order), with a note for the picture's title saying so ("" when every edge is drawn)."""
    if circuit.n_edges <= limit:
        return circuit, ""
    key = torch.where(circuit.in_graph, priority.to(torch.float64), -math.inf)
    mask = torch.zeros_like(circuit.in_graph)
    mask[torch.topk(key, limit, sorted=True).indices] = True
    return replace(circuit, in_graph=mask), f" ({limit} of {circuit.n_edges} edges drawn)"


def circuit_dot(circuit: Circuit, *, min_width: float = 0.4, max_width: float = 4.0) -> str:
    """Graphviz DOT text of every edge of the circuit, widths scaled by |score|."""
    edge_ids = circuit.in_graph.nonzero().flatten().tolist()
    return to_dot(circuit, edge_ids, _edge_widths(circuit, edge_ids, min_width, max_width))


def to_dot(circuit: Circuit, edge_ids: list[int], widths: list[float]) -> str:
    """Graphviz DOT text: ranks bottom-to-top, the same colours and widths."""
    graph = circuit.graph
    qkv = graph.edge_receiver_qkv
    lines = ["digraph circuit {", "  rankdir=BT;", '  node [shape=box, style="rounded,filled", fontname=Helvetica];']
    by_rank: dict[float, list[str]] = {}
    for node in circuit.nodes:
        by_rank.setdefault(node_position(node, graph.shape.n_layers, graph.shape.n_heads)[1], []).append(node)
    for rank in sorted(by_rank):
        names = " ".join(f'"{n}" [fillcolor="{"#fff4d6" if n.startswith("m") else "#e8eefc"}"];' for n in by_rank[rank])
        lines.append(f"  {{ rank=same; {names} }}")
    for e, width in zip(edge_ids, widths, strict=True):
        sender, receiver = graph.edges[e].split("->")
        score = "" if circuit.scores is None else f', tooltip="{float(circuit.scores[e]):.4g}"'
        lines.append(f'  "{sender}" -> "{receiver.split("<")[0]}" [color="{COLOURS[qkv[e]]}", penwidth={width:.2f}{score}];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def path_patching_figure(values: Float[torch.Tensor, "layer head"], *, title: str) -> Figure:
    """Layer x head heatmap of a path-patching sweep (NaN = no edge into the receivers), diverging at 0."""
    from matplotlib.figure import Figure

    finite = values[~torch.isnan(values)]
    bound = float(finite.abs().max()) if finite.numel() else 1.0
    bound = bound or 1.0  # an all-zero sweep still needs a colour scale
    fig = Figure(figsize=(max(4.0, 0.45 * values.shape[1] + 2), max(3.0, 0.22 * values.shape[0] + 1.5)), dpi=150)
    ax = fig.add_subplot()
    image = ax.imshow(values.numpy(), cmap="RdBu", vmin=-bound, vmax=bound, aspect="auto", origin="lower")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title("\n".join(textwrap.wrap(title, 60)), fontsize=9)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig
