"""Tiny models built in code for fast tests: a native TransformerLens config and a word-level tokenizer.

`toy_config` covers the architectures the edge graph supports (docs/METHODS.md, "Edge graph"): causal or
bidirectional attention (`attention_dir`), RMSNorm / LayerNorm / no norm (`normalization_type` "RMS",
"LN", None), rotary or learned positions (`positional_embedding_type` "rotary", "standard"),
attention-only, ReLU / GELU / gated MLPs (`act_fn`, `gated_mlp`), GQA (`n_key_value_heads`), and
attention soft-capping (`attn_scores_soft_cap`). `ARCHITECTURES` names one config of each.
"""

from __future__ import annotations

from typing import Any

from circuitlab.models.model import Model

BOS, PAD, UNK = "<bos>", "<pad>", "<unk>"


def word_tokenizer(words: list[str]) -> Any:
    """A whitespace word-level tokenizer; ' Mary' and 'Mary' are the same single token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([BOS, PAD, UNK, *dict.fromkeys(words)])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS, pad_token=PAD, unk_token=UNK)


def toy_config(
    *, n_layers: int = 2, d_model: int = 32, n_heads: int = 4, d_head: int = 8, d_mlp: int | None = 64,
    d_vocab: int = 64, n_ctx: int = 32, attn_only: bool = False, n_key_value_heads: int | None = None,
    seed: int = 0, normalization_type: str | None = "RMS", positional_embedding_type: str = "rotary",
    attention_dir: str = "causal", act_fn: str = "gelu", gated_mlp: bool = False,
    attn_scores_soft_cap: float = -1.0,
) -> dict:
    """A native config dict (random init, seeded)."""
    cfg: dict[str, Any] = dict(
        n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_head=d_head, d_vocab=d_vocab, n_ctx=n_ctx,
        act_fn=act_fn, normalization_type=normalization_type, seed=seed,
        positional_embedding_type=positional_embedding_type, attn_only=attn_only, attention_dir=attention_dir,
        gated_mlp=gated_mlp, attn_scores_soft_cap=attn_scores_soft_cap,
    )
    if not attn_only:
        cfg["d_mlp"] = d_mlp
    if n_key_value_heads is not None:
        cfg["n_key_value_heads"] = n_key_value_heads
    return cfg


def toy_model(words: list[str] | None = None, **config: Any) -> Model:
    """A seeded random native model; with `words`, a word tokenizer whose vocab sets d_vocab."""
    from circuitlab.models.loading import load_native

    tokenizer = word_tokenizer(words) if words else None
    if tokenizer is not None:
        config.setdefault("d_vocab", len(tokenizer))
    return load_native(toy_config(**config), tokenizer=tokenizer, name="toy")


# One native config per architecture the edge graph supports (keyword arguments of `toy_config`).
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "rms_rotary_causal": {},
    "bidirectional": {"attention_dir": "bidirectional"},
    "layernorm_learned_positions": {"normalization_type": "LN", "positional_embedding_type": "standard"},
    "no_norm": {"normalization_type": None},
    "attention_only": {"attn_only": True},
    "relu": {"act_fn": "relu"},
    "gated_silu_gqa": {"gated_mlp": True, "act_fn": "silu", "n_key_value_heads": 2},
    "soft_capped": {"attn_scores_soft_cap": 2.0},
    "bidirectional_layernorm": {"attention_dir": "bidirectional", "normalization_type": "LN",
                                "positional_embedding_type": "standard", "act_fn": "relu"},
}

HF_KINDS = ("llama", "gpt2", "gemma3")


def tiny_hf_dir(kind: str, path: Any, words: list[str], *, seed: int = 0) -> Any:
    """Save a random tiny HF model of `kind` ("llama": RMSNorm + rotary + GQA + gated SiLU MLP; "gpt2":
    LayerNorm + learned positions + GELU MLP with biases; "gemma3": Q/K norms, pre and post norms, a
    sliding-window layer of 4 keys then a global one, one kv head) and a word tokenizer into `path`, as
    a local HF model directory that `load_model(path)` boots through the bridge. No download."""
    from pathlib import Path

    import torch
    import transformers

    tokenizer = word_tokenizer(words)
    vocab = len(tokenizer)
    ids = dict(bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
               eos_token_id=tokenizer.bos_token_id)
    if kind == "llama":
        config: Any = transformers.LlamaConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, **ids)
        cls: Any = transformers.LlamaForCausalLM
    elif kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                         bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"])
        cls = transformers.GPT2LMHeadModel
    elif kind == "gemma3":
        config = transformers.Gemma3TextConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=1, head_dim=8, max_position_embeddings=64, sliding_window=4,
            layer_types=["sliding_attention", "full_attention"], **ids)
        cls = transformers.Gemma3ForCausalLM
    else:
        raise ValueError(f"unknown tiny HF model kind {kind!r}; choose one of {', '.join(HF_KINDS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
        # Random non-trivial norm gains (HF initialises them to the identity), so a wrong norm shows.
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "norm" in name or "ln_" in name:
                    param.add_(0.3 * torch.randn_like(param))
    out = Path(path)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
