# respin-export — the two commands a new user needs: `make run` and `make test`.
# Both create .venv and install everything on a fresh machine (CPU torch wheel pinned here;
# a machine that already has torch keeps its own build).

VENV        ?= .venv
PY          := $(VENV)/bin/python
PIP         := $(PY) -m pip
TORCH_SPEC  ?= torch==2.13.0
# llama.cpp is compiled from the llama-cpp-python sdist; portable flags keep the pip cache reusable.
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF
OUT         ?= out
PYTEST_ARGS ?=

.PHONY: setup run test test-fast bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -e ".[test]"
	touch $@

# Bundled SmolLM2-135M → Hadamard-rotated GPTQ Q4_0 GGUF → run in llama.cpp → quality/parity table.
run: setup
	$(VENV)/bin/respin-export --rotate hadamard --quant gptq --wtype q4_0 \
		-o $(OUT)/smollm2-hadamard-gptq-q4_0.gguf --force --eval --report $(OUT)/report.json

# Unit tests (tiny random models) and the budgeted SmolLM2 integration tests (marked slow).
test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: setup
	$(PY) benchmarks/gguf_quality.py

clean:
	rm -rf $(VENV) $(OUT) build
