"""Node and edge names of the EAP-IG / MIB edge graph, and wildcard patterns over them.

Nodes: `input` (embeddings), `a{L}.h{H}` (attention head output), `m{L}` (MLP output), `logits`.
Receivers (node inputs): `a{L}.h{H}<q>`, `<k>`, `<v>` (one per head input), `m{L}`, `logits`.
Edges: `{sender}->{receiver}`, e.g. `a3.h1->a7.h4<k>`, `input->m0`, `m11->logits`.

Patterns (used by path patching and the CLI) are shell-style wildcards matched against node or receiver
names with `fnmatch`: `a9.h*` = every head of layer 9, `a*.h3` = head 3 of every layer, `a9.h*<q>` =
the query inputs of every layer-9 head, `a9.h1` as a receiver = its q, k and v inputs, `m*` = every MLP.
Several patterns are separated by commas: `a9.h6<q>,a9.h9<q>,logits`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fnmatch import fnmatchcase

from circuitlab.errors import GraphError

QKV = ("q", "k", "v")
_HEAD = re.compile(r"^a(\d+)\.h(\d+)$")
_MLP = re.compile(r"^m(\d+)$")
_RECEIVER = re.compile(r"^(?P<node>[^<>]+)(?:<(?P<qkv>[qkv])>)?$")


@dataclass(frozen=True)
class NodeName:
    """A parsed node name. kind: 'input', 'head', 'mlp' or 'logits'; layer/head are None when n/a."""

    kind: str
    layer: int | None = None
    head: int | None = None

    def __str__(self) -> str:
        if self.kind == "head":
            return head_name(self.layer, self.head)  # type: ignore[arg-type]
        if self.kind == "mlp":
            return mlp_name(self.layer)  # type: ignore[arg-type]
        return self.kind


def head_name(layer: int, head: int) -> str:
    return f"a{layer}.h{head}"


def mlp_name(layer: int) -> str:
    return f"m{layer}"


def receiver_name(node: str, qkv: str | None = None) -> str:
    return node if qkv is None else f"{node}<{qkv}>"


def edge_name(sender: str, receiver: str) -> str:
    return f"{sender}->{receiver}"


def parse_node(name: str) -> NodeName:
    """Parse a node name; GraphError naming the accepted forms otherwise."""
    if name in ("input", "logits"):
        return NodeName(name)
    if match := _HEAD.match(name):
        return NodeName("head", int(match.group(1)), int(match.group(2)))
    if match := _MLP.match(name):
        return NodeName("mlp", int(match.group(1)))
    raise GraphError(
        f"{name!r} is not a node name; nodes are 'input', 'a{{layer}}.h{{head}}' (e.g. 'a3.h1'), "
        "'m{layer}' (e.g. 'm3') and 'logits'"
    )


def split_receiver(name: str) -> tuple[str, str | None]:
    """'a7.h4<k>' -> ('a7.h4', 'k'); 'm3' -> ('m3', None)."""
    match = _RECEIVER.match(name)
    if match is None:
        raise GraphError(f"{name!r} is not a receiver name; use e.g. 'a7.h4<k>', 'm3' or 'logits'")
    return match.group("node"), match.group("qkv")


def split_edge(name: str) -> tuple[str, str]:
    """'a3.h1->a7.h4<k>' -> ('a3.h1', 'a7.h4<k>')."""
    parts = name.split("->")
    if len(parts) != 2 or not all(parts):
        raise GraphError(f"{name!r} is not an edge name; edges are written 'sender->receiver', e.g. 'a3.h1->a7.h4<k>'")
    return parts[0], parts[1]


def split_patterns(patterns: str | list[str]) -> list[str]:
    """'a9.h*<q>, logits' -> ['a9.h*<q>', 'logits']."""
    items = patterns.split(",") if isinstance(patterns, str) else list(patterns)
    out = [p.strip() for p in items if p.strip()]
    if not out:
        raise GraphError("empty node pattern; give e.g. 'a9.h*<q>' or 'logits'")
    return out


def match_names(patterns: str | list[str], names: list[str], what: str) -> list[str]:
    """Names (in graph order) matching any pattern; GraphError when a pattern matches nothing."""
    chosen: set[str] = set()
    for pattern in split_patterns(patterns):
        hits = [n for n in names if fnmatchcase(n, pattern)]
        if not hits:
            examples = ", ".join(names[:3] + names[-2:])
            raise GraphError(f"pattern {pattern!r} matches no {what} of this graph (names look like {examples})")
        chosen.update(hits)
    return [n for n in names if n in chosen]
