"""Hook names of a TransformerLens 4 `TransformerBridge`: the one module that spells them.

Every activation circuitlab reads or patches is a *site*: a name (``resid_pre``, ``z``, ...) plus, for
sites inside a block, a layer. ``hook_name(site, layer)`` turns the pair into the bridge's hook name, as
TransformerLens' ``get_act_name`` does for ``HookedTransformer``::

    >>> hook_name("resid_pre", 3)
    'blocks.3.hook_resid_pre'
    >>> hook_name("z", 0)
    'blocks.0.attn.hook_z'
    >>> hook_name("embed")
    'hook_embed'

No other module writes a ``blocks.{layer}...`` string; they all come from here.

Layouts (batch first, as the bridge's hooks emit them):

- ``resid`` (resid_pre, resid_mid, resid_post, attn_out, mlp_out, mlp_in): ``[batch, pos, d_model]``
- ``head`` (z, q): ``[batch, pos, n_heads, d_head]``; k and v: ``[batch, pos, n_kv_heads, d_head]``.
  Under grouped-query attention the bridge emits keys and values per *key/value head*, so for k/v a
  "head" is a kv head (SmolLM2: 0..2), as in TransformerLens.
- ``pattern``: ``[batch, n_heads, dest_pos, src_pos]``.
- ``other``: rotary tables, norm scales and the embeddings, whose shapes depend on the architecture.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from circuitlab.errors import CircuitlabError

Layout = Literal["resid", "head", "pattern", "other"]


@dataclass(frozen=True)
class Site:
    """One named activation. `template` holds ``{layer}`` for sites inside a block."""

    name: str
    template: str
    layout: Layout
    kv: bool = False  # indexed by key/value head (k, v)
    needs_mlp: bool = False  # absent from attention-only models
    patchable: bool = True  # offered by activation patching

    @property
    def per_layer(self) -> bool:
        return "{layer}" in self.template

    @property
    def has_heads(self) -> bool:
        return self.layout in ("head", "pattern")

    def hook_name(self, layer: int | None = None) -> str:
        if self.per_layer:
            if layer is None:
                raise CircuitlabError(f"site {self.name!r} lives inside a block: give its layer")
            return self.template.format(layer=layer)
        return self.template


SITES: dict[str, Site] = {s.name: s for s in (
    # patchable activations (activation patching, attribution patching)
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
    # read-only plumbing
    Site("embed", "hook_embed", "other", patchable=False),
    Site("pos_embed", "hook_pos_embed", "other", patchable=False),
    Site("rot_cos", "blocks.{layer}.attn.hook_cos", "other", patchable=False),
    Site("rot_sin", "blocks.{layer}.attn.hook_sin", "other", patchable=False),
    # the MLP's input: the pre-MLP norm's input where the block has one, else the MLP's own input
    Site("mlp_in", "blocks.{layer}.ln2.hook_in", "resid", needs_mlp=True, patchable=False),
    Site("mlp_in_raw", "blocks.{layer}.mlp.hook_in", "resid", needs_mlp=True, patchable=False),
    Site("final_norm_in", "ln_final.hook_in", "resid", patchable=False),
    Site("final_norm_scale", "ln_final.hook_scale", "other", patchable=False),
    Site("unembed_in", "unembed.hook_in", "resid", patchable=False),
)}

PATCHABLE_SITES: tuple[str, ...] = tuple(name for name, s in SITES.items() if s.patchable)


def site(name: str) -> Site:
    """The site called `name`; a `CircuitlabError` naming the choices when unknown."""
    try:
        return SITES[name]
    except KeyError:
        raise CircuitlabError(f"unknown site {name!r}; choose one of {', '.join(SITES)}") from None


def hook_name(name: str, layer: int | None = None) -> str:
    """The bridge hook name of site `name` (at `layer` for sites inside a block)."""
    return site(name).hook_name(layer)


def layer_hook_names(name: str, n_layers: int) -> list[str]:
    """`hook_name(name, l)` for every layer l = 0..n_layers-1."""
    return [hook_name(name, layer) for layer in range(n_layers)]
