"""Patchable sites: which bridge hook each site name means, and the layout of its activation.

Layouts (batch first, as the bridge's hooks emit them):
- residual-like (resid_pre, resid_mid, resid_post, attn_out, mlp_out): [batch, pos, d_model]
- head vectors (z, q): [batch, pos, n_heads, d_head]
- k, v: [batch, pos, n_kv_heads, d_head]. With grouped-query attention (SmolLM2: 9 query heads, 3 kv heads)
  the bridge emits keys/values per *kv head*, so "head" for k/v means a kv head index 0..n_kv_heads-1, and
  patching kv head g changes every query head that shares it (query heads g*group .. (g+1)*group-1 with
  group = n_heads / n_kv_heads). This is also what TransformerLens's patching functions do for k/v.
- pattern: [batch, n_heads, dest_pos, src_pos]; "pos" for the pattern is the destination (query) position,
  as in transformer_lens.patching.get_act_patch_attn_head_pattern_by_pos.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from circuitlab.errors import CircuitlabError
from circuitlab.models.model import Model

Layout = Literal["resid", "head", "pattern"]


class PatchingError(CircuitlabError):
    """An activation-patching request that cannot run: unknown site, bad granularity, head out of range."""


@dataclass(frozen=True)
class Site:
    name: str
    hook: str  # bridge hook name, formatted with the layer
    layout: Layout
    kv: bool = False  # indexed by kv head (k, v)
    needs_mlp: bool = False

    def hook_name(self, layer: int) -> str:
        return self.hook.format(layer=layer)

    @property
    def has_heads(self) -> bool:
        return self.layout != "resid"


SITES: dict[str, Site] = {s.name: s for s in (
    Site("resid_pre", "blocks.{layer}.hook_resid_pre", "resid"),
    Site("resid_mid", "blocks.{layer}.hook_resid_mid", "resid", needs_mlp=True),
    Site("resid_post", "blocks.{layer}.hook_resid_post", "resid"),
    Site("attn_out", "blocks.{layer}.hook_attn_out", "resid"),
    Site("mlp_out", "blocks.{layer}.hook_mlp_out", "resid", needs_mlp=True),
    Site("z", "blocks.{layer}.attn.hook_z", "head"),
    Site("q", "blocks.{layer}.attn.hook_q", "head"),
    Site("k", "blocks.{layer}.attn.hook_k", "head", kv=True),
    Site("v", "blocks.{layer}.attn.hook_v", "head", kv=True),
    Site("pattern", "blocks.{layer}.attn.hook_pattern", "pattern"),
)}


def get_site(name: str, model: Model | None = None) -> Site:
    """The site called `name`; a PatchingError naming the choices when unknown or absent from `model`."""
    if name not in SITES:
        raise PatchingError(f"unknown patching site {name!r}; choose one of {', '.join(SITES)}")
    site = SITES[name]
    if model is not None and site.needs_mlp and model.attn_only:
        raise PatchingError(f"site {name!r} needs MLP layers, but {model.spec} is attention-only; use "
                            "resid_pre, resid_post, attn_out or a head site")
    return site


def n_site_heads(model: Model, site: Site) -> int:
    """Heads the site is indexed by: kv heads for k/v, query heads otherwise (0 for residual sites)."""
    if not site.has_heads:
        return 0
    return model.n_kv_heads if site.kv else model.n_heads
