"""TransformerLens-format model directories: `config.json` with TransformerLens config fields + `model.safetensors`.

This is the format TransformerLens users have their models in (toy models, compiled RASP programs, models
trained with TransformerLens), and the format `save_native` writes. A directory holds:

- `config.json`: TransformerLens config fields (`d_model`, `n_layers`, `n_heads`, `d_head`, `d_mlp`,
  `act_fn`, `normalization_type`, `attention_dir`, `positional_embedding_type`, `d_vocab`, `d_vocab_out`,
  `n_ctx`, ...). An HF config is told apart by its `model_type` / `architectures` keys.
- `model.safetensors`, keyed either
  - the `HookedTransformer` way (`embed.W_E`, `pos_embed.W_pos`, `blocks.0.attn.W_Q` [n_heads, d_model,
    d_head], `blocks.0.attn.b_Q`, `W_K`/`W_V`/`W_O`, `blocks.0.ln1.w`, `blocks.0.mlp.W_in`, `unembed.W_U`,
    ...), converted with TransformerLens' own `convert_tl_checkpoint`; or
  - the way a TransformerBridge's `state_dict()` names them (`embed.weight`, `blocks.0.attn.q.weight`, ...),
    which is what `save_native` writes (each tensor once).
- optionally a tokenizer (`tokenizer.json`); without one, tasks give token ids (see docs/METHODS.md, "Tasks
  and metrics").

The model is built with `TransformerBridge.boot_native`. Config properties the native model does not
compute (parallel attention + MLP, ALiBi, local attention, ...) are refused by name instead of being
dropped silently. `HookedTransformer` rotates query/key halves (`rotary_adjacent_pairs: false`, its default)
while the native model rotates adjacent pairs; the loader permutes the query/key dimensions of each head so
that both compute the same attention scores (a dot product is unchanged by permuting both vectors alike).

Directories written by circuitlab before this format (`native_config.json` + the bridge's internal
`_original_component` keys) still load.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from circuitlab.errors import ModelLoadError
from circuitlab.models.checkpoint import check_safetensors, read_json_object
from circuitlab.models.model import Model

TL_CONFIG = "config.json"
LEGACY_CONFIG = "native_config.json"  # circuitlab's own format before the TransformerLens one
WEIGHTS = "model.safetensors"
HF_CONFIG_KEYS = ("model_type", "architectures")
TL_REQUIRED = ("d_model", "n_layers", "n_heads", "d_head", "d_vocab", "n_ctx")
TL_EXPECTED = "d_model, n_layers, n_heads, d_head, d_mlp, act_fn, d_vocab, n_ctx, ..."
ACT_FNS = ("gelu", "gelu_new", "relu", "silu", "swish", "solu", "solu_ln")
_ACT_ALIASES = {"gelu_pytorch_tanh": "gelu_new"}  # the same tanh formula under HF's name
NORMS = (None, "LN", "LNPre", "RMS", "RMSPre")
_LOAD_FIX = "save the model again with circuitlab.models.loading.save_native"
# Config fields the JSON carries but `boot_native` must not receive: the caller's dtype and device win.
_NOT_PASSED = ("dtype", "device", "n_devices", "tokenizer_name", "model_name")
# Properties the native model does not compute: (field, value that is fine, what the user is told).
_UNSUPPORTED: tuple[tuple[str, Any, str], ...] = (
    ("parallel_attn_mlp", False, "parallel attention and MLP (parallel_attn_mlp)"),
    ("use_local_attn", False, "local attention (use_local_attn)"),
    ("window_size", None, "windowed attention (window_size)"),
    ("attn_types", None, "per-layer attention types (attn_types)"),
    ("scale_attn_by_inverse_layer_idx", False, "scale_attn_by_inverse_layer_idx"),
    ("post_embedding_ln", False, "a LayerNorm after the embedding (post_embedding_ln)"),
    ("use_qk_norm", False, "QK normalisation (use_qk_norm)"),
    ("use_normalization_before_and_after", False, "pre and post norms (use_normalization_before_and_after)"),
    ("rmsnorm_uses_offset", False, "RMSNorm with a (1 + w) offset (rmsnorm_uses_offset)"),
    ("use_NTK_by_parts_rope", False, "NTK-by-parts rotary (use_NTK_by_parts_rope)"),
    ("rotary_interleaved_cos_sin", False, "interleaved rotary cos/sin (rotary_interleaved_cos_sin)"),
    ("scale_embedding", None, "a scaled embedding (scale_embedding)"),
    ("num_experts", None, "mixture-of-experts MLPs (num_experts)"),
    ("per_layer_head_dim", None, "per-layer head sizes (per_layer_head_dim)"),
    ("relative_attention_num_buckets", None, "relative attention (relative_attention_num_buckets)"),
)


# --- format detection (no torch, no model) ----------------------------------------------------------

def config_format(config: dict[str, Any], path: Path) -> str:
    """'hf' or 'tl' for the config.json in `path`; a ModelLoadError naming both formats otherwise."""
    if any(key in config for key in HF_CONFIG_KEYS):
        return "hf"
    if "d_model" in config and "n_layers" in config:
        return "tl"
    raise ModelLoadError(
        f"{path} is neither an HF config (it has no 'model_type' or 'architectures') nor a TransformerLens "
        f"config (it lacks 'd_model' and 'n_layers'; a TransformerLens config.json holds {TL_EXPECTED}); "
        "write the model's config in one of these two formats"
    )


def tl_config_problems(config: dict[str, Any]) -> list[str]:
    """What in a TransformerLens config the native model cannot compute (empty when it can)."""
    problems = []
    for name in TL_REQUIRED:
        value = config.get(name)
        if value is None:
            problems.append(f"missing field {name!r}")
        elif not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            problems.append(f"field {name!r} must be a positive integer, got {value!r}")
    if not config.get("attn_only") and config.get("act_fn") is None:
        problems.append("missing field 'act_fn' (needed unless attn_only is true)")
    act = config.get("act_fn")
    act = _ACT_ALIASES.get(act, act) if isinstance(act, str) else act
    if not config.get("attn_only") and act is not None and not (isinstance(act, str) and act.lower() in ACT_FNS):
        problems.append(f"act_fn {act!r} (supported: {', '.join(ACT_FNS)})")
    if config.get("normalization_type", "LN") not in NORMS:
        problems.append(f"normalization_type {config['normalization_type']!r} (supported: {NORMS})")
    if config.get("positional_embedding_type", "standard") not in ("standard", "rotary"):
        problems.append(f"positional_embedding_type {config['positional_embedding_type']!r} (supported: "
                        "standard, rotary)")
    if config.get("attention_dir", "causal") not in ("causal", "bidirectional"):
        problems.append(f"attention_dir {config['attention_dir']!r} (supported: causal, bidirectional)")
    d_head = config.get("d_head")
    per_head = isinstance(d_head, int) and d_head > 1
    scale = config.get("attn_scale")
    if per_head and config.get("use_attn_scale", True) is False:
        problems.append("unscaled attention scores (use_attn_scale false with d_head > 1)")
    elif per_head and isinstance(scale, (int, float)) and math.isclose(scale, 1.0):
        problems.append("unscaled attention scores (attn_scale 1.0 with d_head > 1)")
    if config.get("rope_scaling") is not None:
        problems.append("rope_scaling (not a TransformerLens config field)")
    for name, fine, what in _UNSUPPORTED:
        value = config.get(name, fine)
        if value not in (fine, None, False, [], 0):
            problems.append(what)
    return problems


def check_tl_dir(path: Path, config: dict[str, Any]) -> None:
    """Everything about a TransformerLens-format dir that needs no model load; ModelLoadError naming the fix."""
    problems = tl_config_problems(config)
    if problems:
        raise ModelLoadError(
            f"{path / TL_CONFIG} is a TransformerLens config that circuitlab cannot build: {'; '.join(problems)}; "
            "circuitlab builds TransformerLens-format models with the native TransformerBridge, which computes "
            "causal or bidirectional attention, LN / RMS / no normalisation, standard or rotary positions"
        )
    weights = path / WEIGHTS
    if not weights.is_file():
        raise ModelLoadError(f"{path} has a TransformerLens {TL_CONFIG} but no {WEIGHTS}; put the weights there "
                             "(safetensors.torch.save_file(state_dict, 'model.safetensors'))")
    check_safetensors(weights, fix=_LOAD_FIX)


def check_legacy_dir(path: Path) -> None:
    read_json_object(path / LEGACY_CONFIG, what="native model config", fix=_LOAD_FIX)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise ModelLoadError(f"{path} has {LEGACY_CONFIG} but no {WEIGHTS}; {_LOAD_FIX}")
    check_safetensors(weights, fix=_LOAD_FIX)


# --- building -----------------------------------------------------------------------------------------

def load_native(config: Any, *, dtype: torch.dtype = torch.float32, tokenizer: Any = None,
                name: str = "native") -> Model:
    """A TransformerLens native model (`TransformerBridge.boot_native`) from a config dict or object."""
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    if isinstance(config, dict):
        try:
            config = TransformerBridgeConfig.from_dict(config)
        except TypeError as exc:
            raise ModelLoadError(f"invalid native model config: {exc}") from exc
    if not isinstance(config, TransformerBridgeConfig):
        raise ModelLoadError(
            f"cannot load a model from a {type(config).__name__}; pass a spec string, a path, or a "
            "TransformerBridgeConfig / dict for a native model"
        )
    # The tokenizer stays on the Model only: the bridge would try to re-load it by name from the hub.
    try:
        bridge = TransformerBridge.boot_native(config, dtype=dtype)  # type: ignore[attr-defined]
    except ValueError as exc:  # the native model refuses e.g. an unknown act_fn or an odd rotary_dim
        raise ModelLoadError(f"invalid native model config: {exc}") from exc
    bridge.eval()  # boot_native returns training mode; analyses (and TL's patching) need eval
    return Model(bridge=bridge, tokenizer=tokenizer, spec=name, source="native")


def bridge_config(config: dict[str, Any]) -> dict[str, Any]:
    """The `boot_native` config of a TransformerLens config.json (checked by `tl_config_problems`)."""
    cfg = {k: v for k, v in config.items() if k not in _NOT_PASSED}
    if cfg.get("act_fn") in _ACT_ALIASES:
        cfg["act_fn"] = _ACT_ALIASES[cfg["act_fn"]]
    cfg["architecture"] = "TransformerLensNative"
    cfg["init_weights"] = False  # the file's weights replace them
    return cfg


def load_tl_dir(path: Path, *, dtype: torch.dtype = torch.float32) -> Model:
    """A TransformerLens-format directory: config.json + model.safetensors (+ tokenizer.json)."""
    config = read_json_object(path / TL_CONFIG, what="TransformerLens config", fix=_LOAD_FIX)
    check_tl_dir(path, config)
    model = load_native(bridge_config(config), dtype=dtype, tokenizer=_tokenizer(path), name=str(path))
    state = {k: v.to(dtype) for k, v in _read_weights(path / WEIGHTS).items()}
    if "embed.W_E" in state:
        state = _from_hooked_transformer(state, model, config, path)
    elif "embed.weight" not in state:
        raise ModelLoadError(
            f"{path / WEIGHTS} holds neither HookedTransformer keys ('embed.W_E', 'blocks.0.attn.W_Q', ...) nor "
            f"TransformerBridge state_dict keys ('embed.weight', 'blocks.0.attn.q.weight', ...); its first keys are "
            f"{sorted(state)[:3]}"
        )
    _load_state(model, state, path)
    model.source = str(path)
    return model


def load_legacy_dir(path: Path, *, dtype: torch.dtype = torch.float32) -> Model:
    """A directory written by circuitlab's earlier `save_native` (native_config.json + internal keys)."""
    check_legacy_dir(path)
    config = read_json_object(path / LEGACY_CONFIG, what="native model config", fix=_LOAD_FIX)
    model = load_native(config, dtype=dtype, tokenizer=_tokenizer(path), name=str(path))
    weights = path / WEIGHTS
    missing, unexpected = model.bridge.original_model.load_state_dict(_read_weights(weights), strict=False)
    if missing or unexpected:
        raise ModelLoadError(
            f"{weights} does not fit the config in {LEGACY_CONFIG}: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    model.source = str(path)
    return model


def _tokenizer(path: Path) -> Any:
    if not (path / "tokenizer.json").is_file():
        return None
    from transformers import PreTrainedTokenizerFast

    try:
        return PreTrainedTokenizerFast.from_pretrained(str(path))
    except Exception as exc:  # the tokenizers library raises plain Exception subclasses
        raise ModelLoadError(f"{path / 'tokenizer.json'} cannot be read ({exc}); {_LOAD_FIX}") from exc


def _read_weights(weights: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(weights))
    except SafetensorError as exc:
        raise ModelLoadError(f"{weights} cannot be read ({exc}); {_LOAD_FIX}") from exc


def _from_hooked_transformer(state: dict[str, torch.Tensor], model: Model, config: dict[str, Any],
                             path: Path) -> dict[str, torch.Tensor]:
    """HookedTransformer keys and per-head shapes -> the bridge's keys (TransformerLens' converter)."""
    from transformer_lens.utilities.tl_checkpoint_conversion import convert_tl_checkpoint

    # Rotary tables are buffers the native model recomputes from the config.
    state = {k: v for k, v in state.items() if not k.endswith((".rotary_sin", ".rotary_cos"))}
    if config.get("positional_embedding_type") == "rotary" and not config.get("rotary_adjacent_pairs", False):
        state = _halves_to_adjacent_pairs(state, model)
    try:
        converted = convert_tl_checkpoint(state, model.cfg)
    except ValueError as exc:  # an unknown key, or per-head shapes that do not fit the config
        raise ModelLoadError(f"{path / WEIGHTS} does not fit {path / TL_CONFIG}: {exc}") from exc
    return _reconcile(converted, model, path)


def _halves_to_adjacent_pairs(state: dict[str, torch.Tensor], model: Model) -> dict[str, torch.Tensor]:
    """Permute each head's query/key dims from HookedTransformer's rotate-halves layout to the native
    model's adjacent-pairs layout: dim i and dim i + r/2 (one rotated pair) become dims 2i and 2i + 1.

    Queries and keys are permuted alike, so every attention score q . k is unchanged.
    """
    d_head = int(model.cfg.d_head)
    rotary_dim = int(model.cfg.rotary_dim or d_head)
    half = rotary_dim // 2
    pairs = torch.stack([torch.arange(half), torch.arange(half) + half], dim=-1).flatten()
    order = torch.cat([pairs, torch.arange(rotary_dim, d_head)])
    rotated = (".W_Q", ".W_K", "._W_K", ".b_Q", ".b_K", "._b_K")
    return {k: v[..., order] if k.endswith(rotated) else v for k, v in state.items()}


def _reconcile(converted: dict[str, torch.Tensor], model: Model, path: Path) -> dict[str, torch.Tensor]:
    """Fit converted keys to the bridge: an absent bias is zero (HookedTransformer files may omit them); a
    bias the native model does not have (e.g. on gated MLPs) is dropped only when it is zero."""
    expected = model.bridge.state_dict()
    out = dict(converted)
    for key in set(out) - set(expected):
        if not key.endswith(".bias") or out[key].count_nonzero():
            raise ModelLoadError(f"{path / WEIGHTS}: the model built from {TL_CONFIG} has no parameter for "
                                 f"{key!r}; check the config (e.g. gated_mlp, attn_only, normalization_type)")
        del out[key]
    for key in set(expected) - set(out):
        if not key.endswith(".bias"):
            raise ModelLoadError(f"{path / WEIGHTS} lacks the weight {key!r} that the config in {TL_CONFIG} needs")
        out[key] = torch.zeros_like(expected[key])
    return out


def _load_state(model: Model, state: dict[str, torch.Tensor], path: Path) -> None:
    try:
        result = model.bridge.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ModelLoadError(f"{path / WEIGHTS} does not fit {path / TL_CONFIG}: {exc}") from exc
    if result.missing_keys or result.unexpected_keys:
        raise ModelLoadError(
            f"{path / WEIGHTS} does not fit the config in {TL_CONFIG}: missing {sorted(result.missing_keys)[:3]}, "
            f"unexpected {sorted(result.unexpected_keys)[:3]}"
        )


# --- saving -------------------------------------------------------------------------------------------

def save_native(model: Model, out_dir: str | Path, config: Any = None) -> Path:
    """Write a native model as a TransformerLens-format directory: config.json (the bridge's resolved config,
    or `config`) + model.safetensors (the bridge's `state_dict()`, each tensor once) + its tokenizer if it
    has one. `load_model(out_dir)` reads it back."""
    from safetensors.torch import save_file

    if getattr(model.cfg, "architecture", None) != "TransformerLensNative":
        raise ModelLoadError(f"save_native saves native (TransformerLens-built) models; {model.spec} is an HF "
                             "model: save it with its HF model's save_pretrained instead")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    resolved = model.cfg.to_dict()
    given = config if isinstance(config, dict) else (config.to_dict() if config is not None else {})
    cfg = {k: v for k, v in {**resolved, **given}.items() if k not in _NOT_PASSED and _json_safe(v)}
    if cfg.get("positional_embedding_type") == "rotary":
        cfg["rotary_adjacent_pairs"] = True  # what the native model computes (see the module docstring)
    (out / TL_CONFIG).write_text(json.dumps(cfg, indent=2))
    # `state_dict()` holds each parameter once; `original_model.state_dict()` repeats each under aliases.
    state = {k: v.detach().contiguous().clone() for k, v in model.bridge.state_dict().items()}
    save_file(state, str(out / WEIGHTS))
    (out / LEGACY_CONFIG).unlink(missing_ok=True)  # an older save here would shadow this one
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(str(out))
    return out


def _json_safe(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str, list, dict))
