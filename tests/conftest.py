"""Shared fixtures: tiny random-weight models of two architectures, the real default model,
and short temp homes (macOS socket paths are limited to 103 bytes)."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import tinymodels  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` need MLX's CUDA backend: skipped on any other machine."""
    cuda_tests = [item for item in items if item.get_closest_marker("cuda")]
    if not cuda_tests:
        return
    from agentd.backend import CUDA, backend

    if backend() != CUDA:
        skip = pytest.mark.skip(reason="needs MLX's CUDA backend and an NVIDIA GPU")
        for item in cuda_tests:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return tinymodels.make_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_gemma_dir(tmp_path_factory) -> Path:
    return tinymodels.make_tiny_gemma3(tmp_path_factory.mktemp("models") / "tiny-gemma3")


@pytest.fixture(scope="session", params=["llama", "gemma3"])
def tiny_model_dir(request, tiny_llama_dir, tiny_gemma_dir) -> Path:
    return tiny_llama_dir if request.param == "llama" else tiny_gemma_dir


@pytest.fixture(scope="session")
def default_model_dir(tmp_path_factory) -> Path:
    """The real default model, converted once per session (or $AGENTD_TEST_MODEL)."""
    if env := os.environ.get("AGENTD_TEST_MODEL"):
        return Path(env)
    from agentd.convert import ensure_default_model

    return ensure_default_model(tmp_path_factory.mktemp("default-model") / "SmolLM2-135M-Instruct")


@pytest.fixture
def home() -> Path:
    """A short-path private home for one test: sockets inside it stay under the length limit."""
    path = Path(tempfile.mkdtemp(prefix="ad-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _reap_daemons():
    """No test may leave an agentd running, whatever way it failed."""
    yield
    from daemonproc import reap_all

    reap_all()
