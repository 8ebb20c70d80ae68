"""The edge graph of a transformer, in the layout of the EAP-IG library and the MIB benchmark.

Senders (nodes with an output) in "forward" order: input, then per layer its heads a{l}.h0..h{H-1} and its
MLP m{l}. Receivers (node inputs) in "backward" order: per layer the q inputs of its heads, then k, then v,
then m{l}; finally logits. A head at layer l feeds m{l} (blocks are sequential) and every receiver of
later layers; an MLP at layer l feeds every receiver of later layers; input feeds everything; everything
feeds logits. Edges are listed in the insertion order of EAP-IG's `Graph.from_model`, so an edge's index
here is its position in an EAP-IG / MIB JSON file written from a fresh graph.

GQA (grouped-query attention, e.g. SmolLM2: 9 query heads share 3 key/value heads): the graph is
*ungrouped*, as in MIB: every query head has its own q, k and v receiver. The k receiver of head h is the
residual input from which head h's keys are computed with its kv group's W_K; two heads of one group may
thus read different k inputs in a masked run. The edge count does not depend on the number of kv heads.

Attention-only models have no m nodes. Parallel attention+MLP blocks are not supported (GraphError).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Any

import torch
from jaxtyping import Float, Int

from circuitlab.errors import GraphError
from circuitlab.graph.naming import QKV, edge_name, head_name, mlp_name, parse_node, receiver_name, split_edge
from circuitlab.models.model import Model


@dataclass(frozen=True)
class GraphShape:
    """The model dimensions that determine the graph (and are written as the JSON 'cfg')."""

    n_layers: int
    n_heads: int
    attn_only: bool = False
    n_key_value_heads: int | None = None
    d_model: int | None = None

    def __post_init__(self) -> None:
        if self.n_layers < 1 or self.n_heads < 1:
            raise GraphError(f"a graph needs n_layers >= 1 and n_heads >= 1, got {self.n_layers}, {self.n_heads}")

    @classmethod
    def from_model(cls, model: Model) -> GraphShape:
        """From a circuitlab Model (its bridge's TransformerLens-style `cfg`)."""
        cfg = model.cfg
        if bool(getattr(cfg, "parallel_attn_mlp", False)):
            raise GraphError("parallel attention+MLP blocks are not supported by the edge graph (sequential blocks only)")
        n_kv = getattr(cfg, "n_key_value_heads", None)
        return cls(int(cfg.n_layers), int(cfg.n_heads), bool(getattr(cfg, "attn_only", False)),
                   int(n_kv) if n_kv else None, int(cfg.d_model))

    def to_cfg(self) -> dict[str, int | bool]:
        """The JSON 'cfg' block: EAP-IG's keys first (n_layers, n_heads, parallel_attn_mlp, d_model)."""
        cfg: dict[str, int | bool] = {"n_layers": self.n_layers, "n_heads": self.n_heads, "parallel_attn_mlp": False}
        if self.d_model is not None:
            cfg["d_model"] = self.d_model
        cfg["attn_only"] = self.attn_only
        if self.n_key_value_heads is not None:
            cfg["n_key_value_heads"] = self.n_key_value_heads
        return cfg

    @classmethod
    def from_cfg(cls, cfg: dict[str, Any]) -> GraphShape:
        try:
            n_layers, n_heads = int(cfg["n_layers"]), int(cfg["n_heads"])
        except (KeyError, TypeError, ValueError) as exc:
            raise GraphError(f"graph cfg must give integer 'n_layers' and 'n_heads', got {cfg!r}") from exc
        if cfg.get("parallel_attn_mlp"):
            raise GraphError("this circuit was made for a parallel attention+MLP model, which circuitlab does not support")
        n_kv = cfg.get("n_key_value_heads")
        d_model = cfg.get("d_model")
        return cls(n_layers, n_heads, bool(cfg.get("attn_only", False)), int(n_kv) if n_kv else None,
                   int(d_model) if d_model is not None else None)

    def compatible_with(self, other: GraphShape) -> bool:
        """Same nodes and edges (d_model / kv heads compared only when both sides record them)."""
        same = (self.n_layers, self.n_heads, self.attn_only) == (other.n_layers, other.n_heads, other.attn_only)
        if self.d_model is not None and other.d_model is not None:
            same = same and self.d_model == other.d_model
        return same

    def describe(self) -> str:
        mlp = "attention-only" if self.attn_only else "with MLPs"
        return f"{self.n_layers} layers x {self.n_heads} heads, {mlp}" + (
            f", d_model {self.d_model}" if self.d_model is not None else "")


def count_edges(n_layers: int, n_heads: int, attn_only: bool = False) -> int:
    """Closed-form edge count (checks the enumeration): GPT-2 small 32,491; SmolLM2-135M 123,211."""
    mlp = 0 if attn_only else 1
    total = 0
    senders_before = 1  # input
    for _ in range(n_layers):
        total += senders_before * 3 * n_heads  # into this layer's q/k/v
        total += (senders_before + n_heads) * mlp  # into this layer's MLP (its heads feed it too)
        senders_before += n_heads + mlp
    return total + senders_before  # into logits


class Graph:
    """Nodes, receivers and edges of one model shape, with index tensors for the masked-edge engine.

    senders[i] is the node with forward index i; receivers[j] the input with backward index j;
    edge e runs from senders[edge_src[e]] to receivers[edge_dst[e]] and is named edges[e].
    """

    def __init__(self, shape: GraphShape):
        self.shape = shape
        L, H = shape.n_layers, shape.n_heads
        self.senders: list[str] = ["input"]
        for layer in range(L):
            self.senders += [head_name(layer, h) for h in range(H)]
            if not shape.attn_only:
                self.senders.append(mlp_name(layer))
        self.nodes: list[str] = [*self.senders, "logits"]
        self.receivers: list[str] = []
        for layer in range(L):
            for qkv in QKV:
                self.receivers += [receiver_name(head_name(layer, h), qkv) for h in range(H)]
            if not shape.attn_only:
                self.receivers.append(mlp_name(layer))
        self.receivers.append("logits")
        self.sender_index = {n: i for i, n in enumerate(self.senders)}
        self.receiver_index = {n: j for j, n in enumerate(self.receivers)}
        src, dst = self._enumerate_edges()
        self.edge_src: Int[torch.Tensor, " edge"] = torch.tensor(src, dtype=torch.long)
        self.edge_dst: Int[torch.Tensor, " edge"] = torch.tensor(dst, dtype=torch.long)
        self.edges: list[str] = [edge_name(self.senders[s], self.receivers[r]) for s, r in zip(src, dst, strict=True)]
        self.edge_index = {n: e for e, n in enumerate(self.edges)}

    @classmethod
    def from_model(cls, model: Model) -> Graph:
        return cls(GraphShape.from_model(model))

    def _enumerate_edges(self) -> tuple[list[int], list[int]]:
        # EAP-IG Graph.from_model order: per layer, (every earlier sender x heads x qkv), then the MLP's edges.
        L, H = self.shape.n_layers, self.shape.n_heads
        src: list[int] = []
        dst: list[int] = []
        stream = [0]
        for layer in range(L):
            heads = [self.sender_index[head_name(layer, h)] for h in range(H)]
            for s in stream:
                for h in range(H):
                    for qkv in QKV:
                        src.append(s)
                        dst.append(self.receiver_index[receiver_name(head_name(layer, h), qkv)])
            stream += heads
            if not self.shape.attn_only:
                m = mlp_name(layer)
                for s in stream:
                    src.append(s)
                    dst.append(self.receiver_index[m])
                stream.append(self.sender_index[m])
        for s in stream:
            src.append(s)
            dst.append(self.receiver_index["logits"])
        return src, dst

    # --- sizes and layout ------------------------------------------------------------------------------
    @property
    def n_edges(self) -> int:
        return len(self.edges)

    @property
    def n_senders(self) -> int:
        return len(self.senders)

    @property
    def n_receivers(self) -> int:
        return len(self.receivers)

    def sender_block(self, layer: int) -> slice:
        """Forward indices of layer `layer`'s senders (its heads, then its MLP)."""
        width = self.shape.n_heads + (0 if self.shape.attn_only else 1)
        start = 1 + layer * width
        return slice(start, start + width)

    def head_receivers(self, layer: int) -> slice:
        """Backward indices of layer `layer`'s head inputs: q of heads 0..H-1, then k, then v."""
        width = 3 * self.shape.n_heads + (0 if self.shape.attn_only else 1)
        start = layer * width
        return slice(start, start + 3 * self.shape.n_heads)

    def mlp_receiver(self, layer: int) -> int:
        if self.shape.attn_only:
            raise GraphError("attention-only model: there are no MLP receivers")
        return self.head_receivers(layer).stop

    def senders_before(self, receiver: int) -> int:
        """How many senders (a prefix of the forward order) can feed backward index `receiver`."""
        name = self.receivers[receiver]
        if name == "logits":
            return self.n_senders
        node = parse_node(name.split("<")[0])
        block = self.sender_block(node.layer)  # type: ignore[arg-type]
        return block.start if node.kind == "head" else block.start + self.shape.n_heads

    def node_layer(self, node: str) -> int:
        """Drawing layer: input -1, heads and MLPs their layer, logits n_layers."""
        parsed = parse_node(node)
        if parsed.kind == "input":
            return -1
        if parsed.kind == "logits":
            return self.shape.n_layers
        return parsed.layer  # type: ignore[return-value]

    # --- lookups with clear errors -------------------------------------------------------------------
    def check_node(self, name: str) -> str:
        parse_node(name)
        if name not in self.sender_index and name != "logits":
            raise GraphError(f"node {name!r} is not in this graph ({self.shape.describe()})")
        return name

    def edge_id(self, name: str) -> int:
        """Index of an edge name; errors say whether the name is malformed, runs backwards, or is unknown."""
        if name in self.edge_index:
            return self.edge_index[name]
        sender, receiver = split_edge(name)
        self.check_node(sender)
        node = receiver.split("<")[0]
        self.check_node(node)
        if sender == "logits":
            raise GraphError(f"edge {name!r}: logits has no output, it cannot send")
        if receiver not in self.receiver_index:
            kind = parse_node(node).kind
            hint = "heads take '<q>', '<k>' or '<v>'" if kind == "head" else f"{node} takes no <q/k/v> suffix"
            if kind == "input":
                hint = "input has no incoming edges"
            raise GraphError(f"edge {name!r}: {receiver!r} is not a receiver ({hint})")
        if self.sender_index[sender] >= self.senders_before(self.receiver_index[receiver]):
            raise GraphError(
                f"edge {name!r} runs backwards or sideways: {sender} is computed after (or alongside) {node}, "
                "so it cannot feed it; edges go from earlier layers to later ones"
            )
        raise GraphError(f"edge {name!r} is not in this graph")  # pragma: no cover - all cases covered above

    def edge_ids(self, names: list[str]) -> Int[torch.Tensor, " n"]:
        return torch.tensor([self.edge_id(n) for n in names], dtype=torch.long)

    # --- coefficient tensors -------------------------------------------------------------------------
    def check_coefficients(self, coefficients: Float[torch.Tensor, "*k edge"]) -> Float[torch.Tensor, "k edge"]:
        """Validate [n_edges] or [k, n_edges] edge coefficients in [0, 1]; returns them as [k, n_edges]."""
        if not isinstance(coefficients, torch.Tensor):
            raise GraphError(f"edge coefficients must be a torch tensor, got {type(coefficients).__name__}")
        if coefficients.ndim not in (1, 2) or coefficients.shape[-1] != self.n_edges:
            raise GraphError(
                f"edge coefficients must have shape [{self.n_edges}] or [k, {self.n_edges}] (one value per edge, in "
                f"graph.edges order), got {tuple(coefficients.shape)}"
            )
        if not coefficients.is_floating_point():
            coefficients = coefficients.float()
        with torch.no_grad():
            low, high = float(coefficients.min()), float(coefficients.max())
        if low < 0.0 or high > 1.0 or low != low or high != high:
            raise GraphError(f"edge coefficients must lie in [0, 1], got values in [{low:.4g}, {high:.4g}]")
        return coefficients if coefficients.ndim == 2 else coefficients.unsqueeze(0)

    def ones(self) -> Float[torch.Tensor, " edge"]:
        return torch.ones(self.n_edges)

    def summary(self) -> dict[str, Any]:
        return {**asdict(self.shape), "n_nodes": len(self.nodes), "n_edges": self.n_edges,
                "n_senders": self.n_senders, "n_receivers": self.n_receivers}

    @cached_property
    def edge_receiver_qkv(self) -> list[str | None]:
        """'q'/'k'/'v' for edges into heads, None otherwise (for colouring and statistics)."""
        out: list[str | None] = []
        for name in self.edges:
            receiver = name.split("->")[1]
            out.append(receiver[-2] if receiver.endswith(">") else None)
        return out

    def __repr__(self) -> str:
        return f"Graph({self.shape.describe()}: {len(self.nodes)} nodes, {self.n_edges} edges)"
