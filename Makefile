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

.PHONY: setup run run-onnx test test-fast bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(wildcard kernels/CMakeLists.txt kernels/cpu/*.cc kernels/include/*.h kernels/cuda/*)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -e ".[test]"
	# onnxruntime kernel library for the custom ONNX ops; without a compiler the models still run
	# through their ONNX function bodies, so a failed build only warns here
	$(PY) -m runtime_ops.build || echo "warning: kernel library not built (see the line above); ONNX models use function bodies"
	touch $@

# Bundled SmolLM2-135M → Hadamard-rotated GPTQ Q4_0 GGUF → run in llama.cpp → quality/parity table.
run: setup
	$(VENV)/bin/respin-export --rotate hadamard --quant gptq --wtype q4_0 \
		-o $(OUT)/smollm2-hadamard-gptq-q4_0.gguf --force --eval --report $(OUT)/report.json

# Bundled SmolLM2-135M → W4A4KV4 ONNX (Hadamard rotations, custom ops) → parity in onnxruntime → text.
run-onnx: setup
	$(VENV)/bin/respin-export --to onnx --rotate hadamard --wbits 4 --abits 4 --kvbits 4 \
		-o $(OUT)/smollm2-w4a4kv4-onnx --force --eval --eval-tokens 2048 --report $(OUT)/report-onnx.json
	$(VENV)/bin/respin-export generate $(OUT)/smollm2-w4a4kv4-onnx "The capital of France is" --max-new-tokens 24

# Unit tests (tiny random models) and the budgeted SmolLM2 integration tests (marked slow).
test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: setup
	$(PY) benchmarks/gguf_quality.py

clean:
	rm -rf $(VENV) $(OUT) build runtime_ops/_lib
