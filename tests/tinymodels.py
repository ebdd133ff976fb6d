"""Tiny random-weight models in mlx-lm folder form, for fast hermetic tests.

Two architectures, so cache code is exercised on both cache kinds: a llama (plain
KVCache per layer) and a Gemma 3 text model whose sliding-window layers use
RotatingKVCache with a window small enough that short conversations wrap it.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Gemma folds the system prompt into the first user turn and calls the assistant "model".
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% set ns = namespace(system='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.system = message['content'] + '\n\n' %}"
    "{% else %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' }}"
    "{% if loop.index0 == 1 or (loop.first and message['role'] != 'system') %}{{ ns.system }}{% endif %}"
    "{{ message['content'] + '<end_of_turn>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

_CORPUS = [
    "The payment API returns a 500 error when the card token expires during checkout.",
    "You are a technical specialist. Explain root causes and the steps to fix them.",
    "What are the detailed steps to fix that API bug from our previous discussion?",
    "Business impact: revenue, customers, support tickets, and the service level agreement.",
    "Hello! How are you today? I am fine, thank you. Numbers: 0 1 2 3 4 5 6 7 8 9.",
] * 4


def _train_tokenizer(special: list[str], bos: str, eos: str) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=special,
        # Only the corpus's ASCII characters: whatever a random model samples decodes to
        # valid text, so replies stream token by token as real ones do.
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    return tok


def _write_tokenizer(out: Path, special: list[str], bos: str, eos: str, template: str, context: int = 4096) -> int:
    tok = _train_tokenizer(special, bos, eos)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": bos,
                "eos_token": eos,
                "pad_token": eos,
                "chat_template": template,
                "add_bos_token": False,
                "model_max_length": context,
            }
        )
    )
    return tok.get_vocab_size()


def _write_weights(out: Path, model) -> None:
    mx.eval(model.parameters())
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(out / "model.safetensors"), weights, {"format": "mlx"})


def make_tiny_llama(out: Path, seed: int = 0, head_dim: int | None = None, context: int = 4096) -> Path:
    """`head_dim` 32 or more lets mlx quantize the KV cache (--kv-bits needs groups of 32+)."""
    from mlx_lm.models import llama

    out.mkdir(parents=True, exist_ok=True)
    vocab = _write_tokenizer(
        out, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|im_start|>", "<|im_end|>", CHATML_TEMPLATE,
        context,
    )
    config = {
        "model_type": "llama",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "max_position_embeddings": context,
    }
    if head_dim:
        config["head_dim"] = head_dim
    (out / "config.json").write_text(json.dumps(config))
    mx.random.seed(seed)
    _write_weights(out, llama.Model(llama.ModelArgs.from_dict(config)))
    return out


def make_tiny_gemma3(out: Path, seed: int = 0, sliding_window: int = 16) -> Path:
    from mlx_lm.models import gemma3_text

    out.mkdir(parents=True, exist_ok=True)
    vocab = _write_tokenizer(
        out, ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<end_of_turn>", GEMMA_TEMPLATE
    )
    config = {
        "model_type": "gemma3_text",
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "query_pre_attn_scalar": 16,
        "rms_norm_eps": 1e-6,
        "vocab_size": vocab,
        "sliding_window": sliding_window,
        "sliding_window_pattern": 2,
        "max_position_embeddings": 4096,
    }
    (out / "config.json").write_text(json.dumps(config))
    mx.random.seed(seed)
    _write_weights(out, gemma3_text.Model(gemma3_text.ModelArgs.from_dict(config)))
    return out
