"""What activation patching adds to the site vocabulary of `circuitlab.models.hooks`: which sites it can
patch, whether a model has them, and how many heads index them.

The hook names and layouts live in `circuitlab.models.hooks` (the one home of bridge hook names). Two
layout facts matter for patching (see docs/METHODS.md, "Activation patching"):

- k and v are indexed by *key/value head* under grouped-query attention (SmolLM2: 9 query heads, 3 kv
  heads), so patching kv head g changes every query head that shares it, as in TransformerLens' patching
  functions;
- for ``pattern`` [batch, n_heads, dest_pos, src_pos], "pos" is the destination (query) position, as in
  ``transformer_lens.patching.get_act_patch_attn_head_pattern_by_pos``.
"""

from __future__ import annotations

from circuitlab.errors import PatchingError
from circuitlab.models import hooks
from circuitlab.models.hooks import Site
from circuitlab.models.model import Model

# The patchable sites of the one site table, in its order.
SITES: dict[str, Site] = {name: site for name, site in hooks.SITES.items() if site.patchable}


def check_site_name(name: str) -> Site:
    """The patchable site called `name` (no model needed); a PatchingError naming the choices otherwise."""
    if name not in SITES:
        raise PatchingError(f"unknown patching site {name!r}; choose one of {', '.join(SITES)}")
    return SITES[name]


def get_site(name: str, model: Model | None = None) -> Site:
    """The site called `name`; a PatchingError naming the choices when unknown or absent from `model`."""
    site = check_site_name(name)
    if model is not None and site.needs_mlp and model.attn_only:
        raise PatchingError(f"site {name!r} needs MLP layers, but {model.spec} is attention-only; use "
                            "resid_pre, resid_post, attn_out or a head site")
    return site


def n_site_heads(model: Model, site: Site) -> int:
    """Heads the site is indexed by: kv heads for k/v, query heads otherwise (0 for residual sites)."""
    if not site.has_heads:
        return 0
    return model.n_kv_heads if site.kv else model.n_heads
