"""Tiny models built in code for fast tests: a native TransformerLens config and a word-level tokenizer."""

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
) -> dict:
    """A native config dict (random init, seeded)."""
    cfg: dict[str, Any] = dict(
        n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_head=d_head, d_vocab=d_vocab, n_ctx=n_ctx,
        act_fn="gelu", normalization_type=normalization_type, seed=seed,
        positional_embedding_type=positional_embedding_type, attn_only=attn_only,
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
