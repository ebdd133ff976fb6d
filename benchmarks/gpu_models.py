"""Random-weight models of real shapes, in mlx-lm folder form, for benchmarks/gpu.py.

No weights can be downloaded on the GPU machine, and speed depends on shapes, not on what
the weights say: each model is built from its published config (llama-3-8B; Gemma-3-12B
with its sliding-window layers), its linear layers and embeddings quantized as mlx-lm
quantizes them (4-bit, groups of 64), and saved as `model.safetensors` beside a config
that `mlx_lm.load` reads. The tokenizer is the tiny byte-level BPE of tests/tinymodels.py
padded with added tokens to the model's vocabulary size, so whatever id a random model
samples decodes to text.

    python benchmarks/gpu_models.py NAME OUT_DIR     (NAME: llama-8b, gemma3-12b, tiny-llama)
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CONFIGS = {
    # Meta-Llama-3-8B-Instruct's config.json (the fields mlx-lm reads).
    "llama-8b": {
        "model_type": "llama",
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "intermediate_size": 14336,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-5,
        "vocab_size": 128256,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "max_position_embeddings": 131072,
    },
    # gemma-3-12b-it's text_config: 48 layers, 5 of every 6 with a 1,024-token window.
    "gemma3-12b": {
        "model_type": "gemma3_text",
        "hidden_size": 3840,
        "num_hidden_layers": 48,
        "intermediate_size": 15360,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 256,
        "query_pre_attn_scalar": 256,
        "rms_norm_eps": 1e-6,
        "vocab_size": 262208,
        "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0,
        "sliding_window": 1024,
        "sliding_window_pattern": 6,
        "max_position_embeddings": 131072,
    },
    # For a smoke test on a CPU machine: llama layout, small.
    "tiny-llama": {
        "model_type": "llama",
        "hidden_size": 128,
        "num_hidden_layers": 2,
        "intermediate_size": 256,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": 1024,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "max_position_embeddings": 65536,
    },
}
QUANTIZATION = {"group_size": 64, "bits": 4}


def _tokenizer(out: Path, config: dict) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    import tinymodels

    gemma = config["model_type"].startswith("gemma")
    if gemma:
        special = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]
        tinymodels._write_tokenizer(out, special, "<bos>", "<end_of_turn>", tinymodels.GEMMA_TEMPLATE)
    else:
        special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        tinymodels._write_tokenizer(out, special, "<|im_start|>", "<|im_end|>", tinymodels.CHATML_TEMPLATE)
    # Plain vocabulary entries (" w123" as byte-level BPE spells it), not added tokens: a
    # quarter of a million added tokens make a 48 MB tokenizer.json that takes seconds to load.
    # tinymodels writes a 4,096-token model_max_length, which agentd takes as the context limit.
    tc = json.loads((out / "tokenizer_config.json").read_text())
    tc["model_max_length"] = config["max_position_embeddings"]
    (out / "tokenizer_config.json").write_text(json.dumps(tc))
    spec = json.loads((out / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    taken = set(vocab.values()) | {t["id"] for t in spec.get("added_tokens", [])}
    for i in range(config["vocab_size"]):
        if i not in taken:
            vocab[f"\u0120w{i}"] = i
    (out / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))


def build(name: str, out: Path, seed: int = 0) -> Path:
    """Build model `name` into `out` (skipped when `out` already holds it). Returns `out`."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    out = Path(out)
    config = {**CONFIGS[name], "quantization": QUANTIZATION}
    if (out / "config.json").is_file() and json.loads((out / "config.json").read_text()) == config \
            and json.loads((out / "tokenizer_config.json").read_text()).get("model_max_length") == config["max_position_embeddings"]:
        return out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    _tokenizer(out, config)
    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    # Norms and the like in bfloat16, as real checkpoints ship them; the quantized layers'
    # scales and biases follow the dtype of the weights they are made from.
    model.set_dtype(mx.bfloat16)
    nn.quantize(model, **QUANTIZATION)
    weights = dict(tree_flatten(model.parameters()))
    mx.eval(weights)
    mx.save_safetensors(str(out / "model.safetensors"), weights, {"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config, indent=1))
    nbytes = sum(v.nbytes for v in weights.values())
    print(f"built {name} in {out}: {nbytes / 1e9:.2f} GB in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return out


if __name__ == "__main__":
    build(sys.argv[1], Path(sys.argv[2]))
