"""The cells of a patching sweep and the boolean mask each cell patches.

Granularity (`by`) is a set of axes swept one cell at a time; axes not named are patched whole:
- ("layer", "pos"): every (layer, position), all heads at once for head sites
- ("layer",): every layer over all positions (and heads)
- ("layer", "head"): every (layer, head) over all positions
- ("layer", "head", "pos"): every (layer, head, position)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from circuitlab.errors import PatchingError
from circuitlab.models.hooks import Site

GRANULARITIES: tuple[tuple[str, ...], ...] = (("layer", "pos"), ("layer",), ("layer", "head"), ("layer", "head", "pos"))


@dataclass(frozen=True)
class Cell:
    """One patch: `pos` / `head` None = every position / head."""

    layer: int
    pos: int | None = None
    head: int | None = None


def parse_by(by: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """'layer,pos' (any order, 'position' accepted) -> canonical axes tuple; PatchingError if unsupported."""
    raw = by.split(",") if isinstance(by, str) else list(by)
    axes = {"position": "pos", "heads": "head", "layers": "layer"}
    names = {axes.get(a.strip(), a.strip()) for a in raw if a.strip()}
    for canon in GRANULARITIES:
        if names == set(canon):
            return canon
    choices = ", ".join(",".join(g) for g in GRANULARITIES)
    raise PatchingError(f"unsupported granularity {by!r}; choose one of: {choices}")


def check_heads(by: tuple[str, ...], site: Site) -> None:
    """A per-head granularity needs a site with heads."""
    if "head" in by and not site.has_heads:
        raise PatchingError(f"site {site.name!r} has no heads; use --by layer,pos or layer (head sites: z, q, k, v, "
                            "pattern)")


def make_cells(
    by: tuple[str, ...], site: Site, *, n_layers: int, n_pos: int, n_heads: int,
    layers: list[int] | None = None, positions: list[int] | None = None, heads: list[int] | None = None,
) -> list[Cell]:
    """Every cell of the sweep, layer-major, validated against the model and prompt shape."""
    check_heads(by, site)
    layer_list = _checked("layer", layers, n_layers)
    pos_list = _checked("position", positions, n_pos) if "pos" in by else [None]
    head_list = _checked("head", heads, n_heads, hint=_head_hint(site)) if "head" in by else [None]
    return [Cell(layer, pos, head) for layer in layer_list for head in head_list for pos in pos_list]


def _head_hint(site: Site) -> str:
    return " (k/v are indexed by kv head under grouped-query attention)" if site.kv else ""


def _checked(label: str, chosen: list[int] | None, size: int, hint: str = "") -> list[int]:
    if chosen is None:
        return list(range(size))
    for i in chosen:
        if not 0 <= int(i) < size:
            raise PatchingError(f"{label} index {i} out of range 0..{size - 1}{hint}")
    return [int(i) for i in chosen]


def cell_mask(cell: Cell, site: Site, *, n_pos: int, n_heads: int) -> torch.Tensor:
    """Boolean mask over the site's non-batch index dims: resid [pos], head [pos, head], pattern [head, dest]."""
    pos = slice(None) if cell.pos is None else cell.pos
    head = slice(None) if cell.head is None else cell.head
    if site.layout == "resid":
        mask = torch.zeros(n_pos, dtype=torch.bool)
        mask[pos] = True
    elif site.layout == "head":
        mask = torch.zeros(n_pos, n_heads, dtype=torch.bool)
        mask[pos, head] = True
    else:
        mask = torch.zeros(n_heads, n_pos, dtype=torch.bool)
        mask[head, pos] = True
    return mask
