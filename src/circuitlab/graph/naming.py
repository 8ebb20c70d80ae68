"""Node and edge names of the EAP-IG / MIB edge graph, and wildcard patterns over them.

Nodes: `input` (embeddings), `a{L}.h{H}` (attention head output), `m{L}` (MLP output), `logits`.
Receivers (node inputs): `a{L}.h{H}<q>`, `<k>`, `<v>` (one per head input), `m{L}`, `logits`.
Edges: `{sender}->{receiver}`, e.g. `a3.h1->a7.h4<k>`, `input->m0`, `m11->logits`.

Patterns (used by path patching and the CLI) are shell-style wildcards matched against node or receiver
names with `fnmatch`: `a9.h*` = every head of layer 9, `a*.h3` = head 3 of every layer, `a9.h*<q>` =
the query inputs of every layer-9 head, `a9.h1` as a receiver = its q, k and v inputs, `m*` = every MLP.
Several patterns are separated by commas: `a9.h6<q>,a9.h9<q>,logits`.

`check_receiver_patterns` checks a receiver pattern's *syntax* without a model (so a typo fails before
the model loads); whether the layers and heads it names exist is checked against the model's graph.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fnmatch import fnmatchcase

from circuitlab.errors import GraphError

QKV = ("q", "k", "v")
RECEIVER_FORMS = ("'logits', 'm{layer}', 'a{layer}.h{head}' (its q, k and v inputs) or 'a{layer}.h{head}<q|k|v>', "
                  "with shell wildcards * ? [..], comma-separated, e.g. 'a9.h*<q>,logits'")
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


# Syntax check without a model: every number in a name is written with the digit 0 only, one to six
# digits long, so this finite set of names stands for every name of every graph. A pattern is well formed
# when, with its digits rewritten to 0 (negated classes widened to '?'), it matches one of these.
_NUMBERS = tuple("0" * n for n in range(1, 7))
_GENERIC_NODES = tuple([f"a{layer}.h{head}" for layer in _NUMBERS for head in _NUMBERS]
                       + [f"m{layer}" for layer in _NUMBERS] + ["logits"])
_GENERIC_RECEIVERS = tuple([f"a{layer}.h{head}<{x}>" for layer in _NUMBERS for head in _NUMBERS for x in QKV]
                           + list(_GENERIC_NODES[-len(_NUMBERS) - 1:]))
_NEGATED_CLASS = re.compile(r"\[![^\]]*\]")


def _generic(pattern: str) -> str:
    return re.sub(r"\d", "0", _NEGATED_CLASS.sub("?", pattern))


def check_receiver_patterns(patterns: str | list[str]) -> list[str]:
    """The comma-separated receiver patterns, each checked for syntax (no model needed); GraphError naming
    the accepted forms otherwise. Patterns with `<...>` match receiver names, others node names."""
    out = split_patterns(patterns)
    for pattern in out:
        if pattern == "input":
            raise GraphError("'input' cannot be a receiver (it has no incoming edges); receivers are "
                             + RECEIVER_FORMS)
        names = _GENERIC_RECEIVERS if "<" in pattern else _GENERIC_NODES
        generic = _generic(pattern)
        if not any(fnmatchcase(name, generic) for name in names):
            raise GraphError(f"receiver pattern {pattern!r} is not well formed; receivers are {RECEIVER_FORMS}")
    return out
