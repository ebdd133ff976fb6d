"""Reading what agentd needs from a GGUF file: its metadata and its tokenizer.

`mx.load` returns GGUF metadata as arrays and strings; these helpers turn the vocabulary,
merges, token types and chat template into the `tokenizers` object and the
tokenizer_config.json / special_tokens_map.json an mlx-lm model folder carries.
"""

from __future__ import annotations

from typing import Any


class ConvertError(Exception):
    """A conversion that cannot proceed; the message is one line meant for a person."""


# llama.cpp token types (llama_token_type).
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4

# Our name for a special token -> its GGUF metadata key.
SPECIAL_IDS = {
    "bos": "tokenizer.ggml.bos_token_id",
    "eos": "tokenizer.ggml.eos_token_id",
    "pad": "tokenizer.ggml.padding_token_id",
    "unk": "tokenizer.ggml.unknown_token_id",
}

# GGUF "tokenizer.ggml.pre" values whose pre-split is one digit per token, then GPT-2's regex.
_PRE_DIGITS_THEN_GPT2 = {"smollm", "starcoder", "refact"}
_PRE_GPT2 = {"gpt-2", "gpt2", "default"}


def scalar(value: Any) -> Any:
    """GGUF metadata scalars come back from mx.load as 0-d arrays."""
    return value.item() if hasattr(value, "item") else value


def meta(metadata: dict, key: str, default: Any = ...) -> Any:
    if key not in metadata:
        if default is ...:
            raise ConvertError(f"GGUF metadata has no {key!r}")
        return default
    return scalar(metadata[key])


def build_tokenizer(metadata: dict):
    """A tokenizers.Tokenizer equal to llama.cpp's reading of the GGUF vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = meta(metadata, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ConvertError(f"GGUF tokenizer model {kind!r} is not supported (only gpt2 BPE)")
    pre = meta(metadata, "tokenizer.ggml.pre", "default")
    if pre in _PRE_DIGITS_THEN_GPT2:
        pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    elif pre in _PRE_GPT2:
        pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        raise ConvertError(f"GGUF tokenizer pre-split {pre!r} is not supported")

    tokens = list(metadata["tokenizer.ggml.tokens"])
    types = metadata["tokenizer.ggml.token_type"].tolist()
    merges = [tuple(m.split(" ", 1)) for m in metadata["tokenizer.ggml.merges"]]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ConvertError("GGUF vocabulary has duplicate tokens")

    tokenizer = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, dropout=None, fuse_unk=False, byte_fallback=False)
    )
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    added = [
        AddedToken(tokens[i], special=types[i] == _TOKEN_CONTROL, normalized=False)
        for i in range(len(tokens))
        if types[i] in (_TOKEN_CONTROL, _TOKEN_USER_DEFINED)
    ]
    # Added tokens keep their vocabulary ids because they are already in the vocab.
    tokenizer.add_special_tokens([a for a in added if a.special])
    tokenizer.add_tokens([a for a in added if not a.special])
    return tokenizer, added


def tokenizer_files(metadata: dict, added: list, max_length: int) -> dict[str, dict]:
    tokens = metadata["tokenizer.ggml.tokens"]

    def token(key: str) -> str | None:
        index = meta(metadata, SPECIAL_IDS[key], None)
        return None if index is None else tokens[int(index)]

    named = {f"{k}_token": t for k in ("bos", "eos", "pad", "unk") if (t := token(k)) is not None}
    named_values = set(named.values())
    extra = [a.content for a in added if a.special and a.content not in named_values]
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_length,
        "add_bos_token": bool(meta(metadata, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta(metadata, "tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        **named,
        "additional_special_tokens": extra,
        "added_tokens_decoder": {
            str(tokens.index(a.content)): {
                "content": a.content,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": a.special,
            }
            for a in added
        },
    }
    if (template := meta(metadata, "tokenizer.chat_template", None)) is not None:
        config["chat_template"] = template
    return {
        "tokenizer_config.json": config,
        "special_tokens_map.json": {**named, "additional_special_tokens": extra},
    }


# --- writing -------------------------------------------------------------------------
